//! workq's coordinator: queues, leases, storage, the gRPC API and the HTTP face.
//!
//! - [`engine`]: the queue state machine (pure core in `engine::queue`) and the engine
//!   that owns it, persists it and runs its timers;
//! - [`store`]: memory, or a write-ahead log with group commit and snapshots;
//! - [`grpc`]: the `workq.v1` service, mapping domain errors to status codes;
//! - [`auth`]: bearer-token checks shared by gRPC and HTTP;
//! - [`wire`]: the streaming calls framed straight on TCP, on the gRPC port;
//! - [`tls`]: TLS on both ports;
//! - [`server`]: wires it together over listeners the caller binds.

pub mod auth;
pub mod clock;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod http;
pub mod server;
pub mod store;
pub mod stream;
pub mod tls;
pub mod wire;
pub mod x509;

pub use engine::Engine;
pub use error::{Error, Result};
