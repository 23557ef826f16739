//! The pure core: `(Routes, this Node, node facts, gateway health) → desired kernel state`,
//! and the status that describes it. No I/O, no clock (times are passed in), no kernel;
//! nothing here imports the adapters. Every rule is unit-tested here.
//!
//! - [`crd`]: the `Route` and `NodeRouteStatus` types (the one source of the CRDs);
//! - [`owner`]: which object (Route or StaticRoute) a share of the plan comes from;
//! - [`route`]: validation and normalisation of one Route, errors naming the field;
//! - [`selector`]: core/v1 NodeSelector evaluation;
//! - [`desired`]: what planning produces;
//! - [`plan`]: Routes + this node → desired routes, conflicts, withdrawals;
//! - [`default_route`]: `0.0.0.0/0` / `::/0` overrides and what they must protect;
//! - [`health`]: the per-gateway state machine (counters, neighbours, probes → verdicts);
//! - [`report`]: this node's `NodeRouteStatus` and the Events a change is worth;
//! - [`summary`]: a Route's cluster-wide status from the nodes' reports (the controller);
//! - [`migrate`]: the Route that takes over from a StaticRoute (`routing-agent migrate`).
pub mod crd;
pub mod default_route;
pub mod desired;
pub mod health;
pub mod migrate;
pub mod owner;
pub mod plan;
pub mod report;
pub mod route;
pub mod selector;
pub mod summary;
