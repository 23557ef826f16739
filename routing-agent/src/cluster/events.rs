//! Kubernetes Events about Routes, rate-limited by [`Limiter`].
//!
//! Written by hand (about what kube-runtime's `Recorder` does) for one reason: the Recorder
//! uses events.k8s.io/v1 and puts the Events of a cluster-scoped object in `default`, which
//! API servers before 1.20.12 / 1.21.6 / 1.22.3 reject (they wanted `kube-system` there).
//! A core/v1 Event in `default` whose `involvedObject` has no namespace is accepted by
//! every version, and is what `kubectl describe route` lists.
use std::time::Instant;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::logic::report::{self, Limiter};

/// The namespace of the Events about cluster-scoped Routes.
pub const NAMESPACE: &str = "default";

pub struct Events {
    api: Api<Event>,
    /// `source.component` / `reportingComponent`.
    component: String,
    /// `source.host` / `reportingInstance` (the node, or the controller's pod).
    instance: Option<String>,
    limiter: Mutex<Limiter>,
}

impl Events {
    pub fn new(client: Client, component: &str, instance: Option<String>) -> Self {
        Events {
            api: Api::namespaced(client, NAMESPACE),
            component: component.into(),
            instance,
            limiter: Mutex::new(report::limiter()),
        }
    }

    /// Publishes an Event about `regarding`, unless the rate limit holds it back (`key`:
    /// what the limit counts per). Failures are logged, never returned: Events are
    /// best-effort.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        key: &str,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let Some(held) = self.limiter.lock().await.admit(key, Instant::now()) else {
            debug!(key, "event held back by the rate limit");
            return;
        };
        let mut note = note;
        if held > 0 {
            note.push_str(&format!(
                " ({held} similar events held back by the rate limit)"
            ));
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or("route"),
            now.as_nanosecond()
        );
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(NAMESPACE.into()),
                ..Default::default()
            },
            involved_object: regarding.clone(),
            reason: Some(reason.into()),
            message: Some(report::truncate(note, 1000)),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: self.instance.clone(),
            }),
            reporting_component: Some(self.component.clone()),
            reporting_instance: self.instance.clone(),
            ..Default::default()
        };
        if let Err(e) = self.api.create(&PostParams::default(), &ev).await {
            warn!(reason, error = %e, "cannot publish an event");
        }
    }
}
