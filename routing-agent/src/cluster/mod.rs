//! What goes back to the Kubernetes cluster, and the cluster-wide controller.
//!
//! - [`publish`]: this node's `NodeRouteStatus` (server-side apply, on change only) and its
//!   Events;
//! - [`events`]: a small core/v1 Event writer;
//! - [`controller`]: `routing-agent controller`: Route status summaries and the deletion
//!   finalizer;
//! - [`migrate`]: `routing-agent migrate`: StaticRoutes moved over to Routes.
//!
//! Routes coming *from* the cluster are a [`crate::source`].
pub mod controller;
pub mod events;
pub mod migrate;
pub mod publish;
