//! Storage: where queue and item records live between restarts.
//!
//! The engine keeps the working state in memory and writes every mutation here as one
//! atomic batch, then waits for [`Store::sync`] before answering the client. Two
//! backends:
//! - [`Store::memory`]: nothing on disk (kuard-like, `--in-memory`);
//! - [`Store::open_sled`]: a sled database under `--data-dir`, with group commit.
//!
//! Ownership: the engine is the only writer. Batches from different queues may
//! interleave; each batch is atomic and holds a whole item record, so replaying the
//! database always yields a consistent set of queues and items.

pub mod record;
mod sled_store;
mod wal;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
pub use record::{ItemRecord, QueueRecord};
pub use sled_store::{DEFAULT_CHECKPOINT_EVERY, Durability, SledStore};

/// One change inside an atomic batch.
#[derive(Debug, Clone)]
pub enum Op {
    PutQueue(QueueRecord),
    DeleteQueue(String),
    PutItem(ItemRecord),
    DeleteItem(u64),
}

/// Everything on disk, read once at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub queues: Vec<QueueRecord>,
    pub items: Vec<ItemRecord>,
}

/// A position in the write order; [`Store::sync`] waits until it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// Flush timing, for `/metrics`.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: AtomicU64,
    pub total_micros: AtomicU64,
    pub max_micros: AtomicU64,
}

pub enum Store {
    Memory { ids: AtomicU64 },
    Sled(SledStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl Store {
    pub fn memory() -> Store {
        Store::Memory {
            ids: AtomicU64::new(1),
        }
    }

    /// Opens (or creates) a sled database in `dir`. `cache_bytes` bounds sled's cache.
    pub fn open_sled(
        dir: &std::path::Path,
        durability: Durability,
        cache_bytes: u64,
    ) -> Result<Store> {
        Ok(Store::Sled(SledStore::open(dir, durability, cache_bytes)?))
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Store::Memory { .. } => "in-memory",
            Store::Sled(s) => match s.durability() {
                Durability::Strict => "sled (strict durability)",
                Durability::Relaxed => "sled (relaxed durability)",
            },
        }
    }

    pub fn is_persistent(&self) -> bool {
        matches!(self, Store::Sled(_))
    }

    /// Reads every record (start-up only).
    pub fn load(&self) -> Result<Snapshot> {
        match self {
            Store::Memory { .. } => Ok(Snapshot::default()),
            Store::Sled(s) => s.load(),
        }
    }

    /// A fresh id, unique and increasing for the life of the data dir. Used for item
    /// ids and lease tokens alike, so a token is never reused, even across restarts.
    pub fn next_id(&self) -> u64 {
        match self {
            Store::Memory { ids } => ids.fetch_add(1, Ordering::Relaxed),
            Store::Sled(s) => s.next_id(),
        }
    }

    /// Applies a batch atomically (in memory for sled until flushed).
    pub fn write(&self, ops: Vec<Op>) -> Result<Ticket> {
        match self {
            Store::Memory { .. } => Ok(Ticket(0)),
            Store::Sled(s) => s.write(ops),
        }
    }

    /// The ticket of the last write so far.
    pub fn last_ticket(&self) -> Ticket {
        match self {
            Store::Memory { .. } => Ticket(0),
            Store::Sled(s) => s.last_ticket(),
        }
    }

    /// Waits until the write `ticket` (and every earlier one) is as durable as the
    /// durability mode promises. Concurrent callers share one flush.
    pub async fn sync(&self, ticket: Ticket) -> Result<()> {
        match self {
            Store::Memory { .. } => Ok(()),
            Store::Sled(s) => s.sync(ticket).await,
        }
    }

    /// Asks for a flush without waiting for it (background changes such as expiry).
    pub fn request_flush(&self) {
        if let Store::Sled(s) = self {
            s.request_flush();
        }
    }

    /// Starts the background flusher; call once from inside the runtime.
    pub fn start(&self) {
        if let Store::Sled(s) = self {
            s.start();
        }
    }

    /// Final flush at shutdown.
    pub async fn close(&self) -> Result<()> {
        match self {
            Store::Memory { .. } => Ok(()),
            Store::Sled(s) => s.close().await,
        }
    }

    /// False once a write or flush has failed: the store can no longer promise durability.
    pub fn healthy(&self) -> bool {
        match self {
            Store::Memory { .. } => true,
            Store::Sled(s) => s.healthy(),
        }
    }

    pub fn flush_stats(&self) -> Option<&FlushStats> {
        match self {
            Store::Memory { .. } => None,
            Store::Sled(s) => Some(s.flush_stats()),
        }
    }
}
