//! workq's public API: the `workq.v1` gRPC types, a small client, and the helpers
//! every client shares (duration parsing, state names).
//!
//! The worker and the CLI depend on this crate only, never on the coordinator.

pub mod client;
pub mod duration;
pub mod in_place;
pub mod wire;

/// Generated `workq.v1` messages, client and server.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("workq.v1");
}

/// The encoded descriptor set of `workq.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("workq_descriptor");

pub use client::{Client, ClientError, ConnectOptions};

impl pb::ItemState {
    /// The lowercase name used by the CLI and the HTTP API (`ready`, `leased`, …).
    pub fn short_name(self) -> &'static str {
        match self {
            pb::ItemState::Unspecified => "unknown",
            pb::ItemState::Ready => "ready",
            pb::ItemState::Delayed => "delayed",
            pb::ItemState::Leased => "leased",
            pb::ItemState::Done => "done",
            pb::ItemState::Dead => "dead",
        }
    }

    /// Parses a short name back (`ready`, `DEAD`, …).
    pub fn from_short_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "ready" => pb::ItemState::Ready,
            "delayed" => pb::ItemState::Delayed,
            "leased" => pb::ItemState::Leased,
            "done" => pb::ItemState::Done,
            "dead" => pb::ItemState::Dead,
            _ => return None,
        })
    }
}
