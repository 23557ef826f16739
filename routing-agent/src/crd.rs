//! The `Route` custom resource (`networking.doks.digitalocean.com/v1alpha1`), the one source
//! of truth for the CRD: `deploy/crd.yaml` is generated from these types
//! (`routing-agent crd`) and a test fails when the committed file is stale.
//!
//! The spec is kept exactly as the DigitalOcean routing agent defines it, so manifests
//! written for it apply unchanged. Values stay strings here: parsing and normalisation
//! happen in [`crate::route`], which can then name the offending field in its errors.
use k8s_openapi::api::core::v1::NodeSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "networking.doks.digitalocean.com";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "networking.doks.digitalocean.com/v1alpha1";
pub const KIND: &str = "Route";

/// Routes for the nodes a `nodeSelector` picks (every node when it is absent).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "networking.doks.digitalocean.com",
    version = "v1alpha1",
    kind = "Route",
    plural = "routes",
    singular = "route",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Destinations","type":"string","jsonPath":".spec.destinations"}"#,
    printcolumn = r#"{"name":"Gateways","type":"string","jsonPath":".spec.gateways"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Destination networks: CIDRs or bare addresses (a bare address is a /32 or /128).
    /// `0.0.0.0/0` or `::/0` overrides the node's default route. All of one family, the
    /// family of the gateways.
    #[schemars(length(min = 1, max = 256))]
    pub destinations: Vec<String>,
    /// Next hops. More than one spreads flows over them (ECMP, hashed on addresses and
    /// ports).
    #[schemars(length(min = 1, max = 32))]
    pub gateways: Vec<String>,
    /// Which nodes get the routes (core/v1 NodeSelector). Absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
}
