//! Wire types spoken by codefleet: the public HTTP contract (`api`), its errors (`problem`), the
//! input rules both the gateway and the agents enforce (`validate`), the cluster messages between
//! gateway and agents (`cluster`) and the framed protocol between an agent and the supervisor
//! inside each sandbox (`sandbox`), the events of a streamed job (`stream`), batches (`batch`); plus the rules both sides share for node and session ids
//! (`ids`), language versions (`version`), bearer tokens (`auth`) and calendar dates (`time`).
//!
//! This crate has no async, HTTP or Docker dependencies: it is plain data and pure functions.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod batch;
pub mod cluster;
pub mod ids;
pub mod judge;
pub mod problem;
pub mod sandbox;
pub mod stream;
pub mod submission;
pub mod time;
pub mod validate;
pub mod version;

pub use api::*;
pub use problem::{ErrorCode, Problem};
