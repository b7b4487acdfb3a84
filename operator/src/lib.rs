//! LocalModel operator: places ModelReplicas of each LocalModel on live node agents, keeps a
//! Service and EndpointSlices pointing at the Ready ones, and reports status.
//!
//! The decisions are pure functions ([`placement`], [`replicas`], [`status`], [`endpoints`],
//! [`liveness`], [`inventory`]), table-tested without an API server; [`controller`] wires them
//! to the API server, and [`leader`] makes sure only one process writes.

pub mod controller;
pub mod endpoints;
pub mod inventory;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod placement;
pub mod replicas;
pub mod status;
