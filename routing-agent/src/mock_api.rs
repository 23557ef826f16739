//! Test support: a mock API server (tower-test) for the fast tier of the Kubernetes
//! adapters.
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use tower_test::mock;

pub type Handle = mock::Handle<Request<Body>, Response<Body>>;

/// A client whose every request is answered through the returned handle.
pub fn client() -> (Client, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// Answers the next request (within 5 s) with `code` and `reply`; returns its method, URI
/// and JSON body.
pub async fn next(
    handle: &mut Handle,
    code: u16,
    reply: serde_json::Value,
) -> (String, String, serde_json::Value) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request")
        .expect("the service is alive");
    let (method, uri) = (req.method().to_string(), req.uri().to_string());
    let body = req.into_body().collect_bytes().await.unwrap();
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    (method, uri, body)
}
