//! The custom resources, the one source of truth for the CRDs: `deploy/crd.yaml` is
//! generated from these types (`routing-agent crd`) and a test fails when the committed
//! file is stale.
//!
//! - [`Route`] keeps exactly the spec of the DigitalOcean routing agent, so manifests
//!   written for it apply unchanged. Values stay strings: parsing and normalisation happen
//!   in [`crate::logic::route`], which names the offending field in its errors. Its `status` is a
//!   summary over the nodes, written by `routing-agent controller` alone.
//! - [`NodeRouteStatus`] is one small object per node, written by that node's agent alone:
//!   what it did with each Route and how it sees each gateway. Why one object per node
//!   rather than a per-node entry in every Route's status: every agent watches every Route,
//!   so a status written into the Route by each of N nodes would be sent to all N agents
//!   (N² watch events, each carrying an object that grows with N). A per-node object is
//!   watched by the controller only.
use k8s_openapi::api::core::v1::NodeSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "networking.doks.digitalocean.com";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "networking.doks.digitalocean.com/v1alpha1";
pub const KIND: &str = "Route";
/// The one finalizer on a Route (held by the controller until every node that carried the
/// route has removed it, or the deletion timeout passed).
pub const FINALIZER: &str = "networking.doks.digitalocean.com/routing-agent";

/// An IPv4 address (dotted quad, no leading zeros).
macro_rules! v4 {
    () => {
        r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}"
    };
}
/// An IPv6 address, loosely (hex digits, colons, an embedded IPv4): the agent parses it
/// exactly and names the field when it does not.
macro_rules! v6 {
    () => {
        r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"
    };
}
/// A destination: a CIDR or a bare address.
pub const DESTINATION_PATTERN: &str = concat!(
    "^(",
    v4!(),
    "(/(3[0-2]|[12]?[0-9]))?|",
    v6!(),
    "(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$"
);
/// A gateway: a bare address.
pub const GATEWAY_PATTERN: &str = concat!("^(", v4!(), "|", v6!(), ")$");

/// Routes for the nodes a `nodeSelector` picks (every node when it is absent).
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "networking.doks.digitalocean.com",
    version = "v1alpha1",
    kind = "Route",
    plural = "routes",
    singular = "route",
    derive = "PartialEq",
    status = "RouteStatus",
    printcolumn = r#"{"name":"Destinations","type":"string","jsonPath":".spec.destinations"}"#,
    printcolumn = r#"{"name":"Gateways","type":"string","jsonPath":".spec.gateways"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","jsonPath":".status.nodes","description":"Nodes where the route is applied / nodes the selector picks"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
// CEL rules (Kubernetes ≥ 1.25; `fieldPath` and `reason` would need 1.28, so the message
// names the field). Older API servers drop them: apply with `--validate=false` there.
// Guarded on an empty `gateways` (minItems reports that one; an unguarded
// `self.gateways[0]` would add a CEL runtime error, `index out of bounds`).
#[x_kube(
    validation = Rule::new("self.gateways.size() == 0 || self.gateways.all(g, g.contains(':') == self.gateways[0].contains(':'))")
        .message("spec.gateways: all of one family (IPv4 or IPv6)"),
    validation = Rule::new("self.gateways.size() == 0 || self.destinations.all(d, d.contains(':') == self.gateways[0].contains(':'))")
        .message("spec.destinations: must be of the gateways' family")
)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Destination networks: CIDRs or bare addresses (a bare address is a /32 or /128).
    /// `0.0.0.0/0` or `::/0` overrides the node's default route. All of one family, the
    /// family of the gateways.
    #[schemars(
        length(min = 1, max = 256),
        inner(length(max = 64), pattern(DESTINATION_PATTERN))
    )]
    pub destinations: Vec<String>,
    /// Next hops. More than one spreads flows over them (ECMP, hashed on addresses and
    /// ports).
    #[schemars(
        length(min = 1, max = 32),
        inner(length(max = 64), pattern(GATEWAY_PATTERN))
    )]
    pub gateways: Vec<String>,
    /// Which nodes get the routes (core/v1 NodeSelector). Absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
}

/// The static route operator's `StaticRoute` (`networking.digitalocean.com/v1`, cluster
/// scoped), honoured so that its users can move over: each plans as a Route with the same
/// destinations, its one gateway and no node selector (see [`crate::logic::owner`]). The
/// CRD is the old operator's, not generated here; the agent only reads these objects
/// (unknown fields, such as its status, are ignored).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "networking.digitalocean.com",
    version = "v1",
    kind = "StaticRoute",
    plural = "staticroutes",
    singular = "staticroute",
    shortname = "sr",
    derive = "PartialEq",
    schema = "disabled"
)]
pub struct StaticRouteSpec {
    /// Host addresses or CIDRs.
    #[serde(default)]
    pub destinations: Vec<String>,
    /// The one gateway.
    #[serde(default)]
    pub gateway: String,
}

pub const STATIC_GROUP: &str = "networking.digitalocean.com";
pub const STATIC_API_VERSION: &str = "networking.digitalocean.com/v1";
/// The name of the static route operator's CRD, which the agent follows.
pub const STATIC_CRD: &str = "staticroutes.networking.digitalocean.com";

/// Kubernetes knows the integer formats `int32` and `int64`, not schemars' `uint32` (every
/// CRD create would answer `299 - "unrecognized format \"uint32\""`): an unsigned count
/// is an integer with `minimum: 0` and no format.
fn kubernetes_formats(schema: &mut schemars::Schema) {
    if schema
        .get("format")
        .and_then(|f| f.as_str())
        .is_some_and(|f| f.starts_with("uint"))
    {
        schema.remove("format");
        schema.insert("minimum".into(), 0.into());
    }
    schemars::transform::transform_subschemas(&mut kubernetes_formats, schema);
}

/// What the nodes did with a Route, summarised by `routing-agent controller` from the
/// [`NodeRouteStatus`] objects. Per-node details live there.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_formats)]
pub struct RouteStatus {
    /// The generation of the spec this summary is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `ready/selected`, for `kubectl get routes`.
    pub nodes: String,
    /// Nodes the selector picks.
    #[serde(default)]
    pub selected: u32,
    /// Selected nodes that report the route applied for this generation.
    #[serde(default)]
    pub ready: u32,
    /// Selected nodes that report a failure for this generation.
    #[serde(default)]
    pub failed: u32,
    /// Selected nodes with no report for this generation yet (agent not running there, or
    /// not caught up).
    #[serde(default)]
    pub pending: u32,
    /// Failures, at most 20 (sorted by node name); `failed` has the count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<NodeFailure>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeFailure {
    pub node: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A condition (the shape of metav1.Condition, without its required-field rules).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Valid`: the spec parses. `Ready`: applied on every selected node.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339, when `status` last changed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition_time: String,
}

/// What one node's agent did with the Routes, and how it sees the gateways. Named after
/// the node; written by that node's agent only, and only when something changed.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "networking.doks.digitalocean.com",
    version = "v1alpha1",
    kind = "NodeRouteStatus",
    plural = "noderoutestatuses",
    singular = "noderoutestatus",
    shortname = "nrs",
    derive = "PartialEq",
    status = "NodeRoutes",
    printcolumn = r#"{"name":"Applied","type":"integer","jsonPath":".status.applied"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failed"}"#,
    printcolumn = r#"{"name":"Gateways-Down","type":"integer","jsonPath":".status.gatewaysDown"}"#,
    printcolumn = r#"{"name":"Failing-Closed","type":"integer","jsonPath":".status.failingClosed","description":"Destinations whose traffic is refused: no gateway can be used"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeRouteStatusSpec {
    /// The node (also the object's name).
    pub node_name: String,
}

/// A node's view.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_formats)]
pub struct NodeRoutes {
    /// Routes applied on this node.
    #[serde(default)]
    pub applied: u32,
    /// Routes that select this node (or are invalid) and are not (fully) applied.
    #[serde(default)]
    pub failed: u32,
    /// Gateways withdrawn from their routes on this node.
    #[serde(default)]
    pub gateways_down: u32,
    /// Destinations whose traffic is refused on this node because no gateway of theirs
    /// can be used (fail-closed).
    #[serde(default)]
    pub failing_closed: u32,
    /// Every Route that selects this node, and every invalid Route; sorted by name.
    #[serde(default)]
    pub routes: Vec<NodeRoute>,
    /// Every gateway of the selected Routes; sorted by address.
    #[serde(default)]
    pub gateways: Vec<NodeGateway>,
    /// Default-route overrides active on this node, per family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_route: Vec<NodeDefaultRoute>,
}

/// An active default-route override: what stays on the node's own uplink.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeDefaultRoute {
    /// `IPv4` or `IPv6`.
    pub family: String,
    /// The node's own default gateway, which the protected destinations keep using.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub original_gateway: String,
    /// Destinations kept on the original gateway (control plane, metadata, nameservers,
    /// --protected-cidr).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protected: Vec<String>,
    /// Symmetric routing rules (`priority: from <address> lookup <table>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub symmetric_rules: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeRoute {
    pub name: String,
    /// `StaticRoute` for the static route operator's objects the agent honours; absent for
    /// a Route.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// The Route's generation this entry is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// `Applied` or `Failed`.
    pub state: String,
    /// Failed: `Invalid`, `Conflict`, `FailingClosed`, `FallingThrough`,
    /// `GatewayUnreachable`, `KernelRefused`, `SymmetricRoutingConflict`, `UnknownUplink`
    /// or `NotInstalled`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Destinations of this Route in this node's kernel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
    /// Destinations with no usable gateway whose traffic is refused (fail-closed: an
    /// `unreachable` route of the agent's answers it), with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing_closed: Vec<NodeNoGateway>,
    /// Destinations with no usable gateway whose traffic falls through to the node's own
    /// routes (the Route fails open), with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub falling_through: Vec<NodeNoGateway>,
}

/// A destination with no usable gateway.
#[derive(
    Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct NodeNoGateway {
    pub destination: String,
    /// `AllGatewaysDown`, `InterfaceDown` or `GatewayUnreachable`.
    pub reason: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeGateway {
    pub address: String,
    /// `Up` or `Down` (withdrawn from its routes, probed until it answers).
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// RFC 3339, when `state` last changed as this agent saw it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub since: String,
}

pub const APPLIED: &str = "Applied";
pub const FAILED: &str = "Failed";
pub const UP: &str = "Up";
pub const DOWN: &str = "Down";

/// Both CRDs as one multi-document YAML (what `routing-agent crd` prints).
pub fn yaml() -> String {
    use kube::CustomResourceExt as _;
    let mut out = String::new();
    for (i, crd) in [Route::crd(), NodeRouteStatus::crd()].iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(crd).expect("a CRD serialises"));
    }
    out
}
