//! The sled backend, with group commit.
//!
//! sled keeps writes in memory until a flush (crates.md §4), so in strict mode a
//! client is answered only after a flush that covers its write. One flusher task owns
//! flushing: writers record a ticket (a counter bumped after their batch is applied),
//! then wait on a `watch` of the highest durable ticket. The flusher takes the current
//! ticket, flushes once on a blocking thread, and publishes it — every writer that
//! arrived before the flush started is covered by that single fsync. Under load the
//! flushes run back to back and each covers all the writes queued meanwhile, so strict
//! mode costs one flush per burst, not one per request.
//!
//! Relaxed mode answers at once and flushes at least every 500 ms.
//!
//! Layout: one tree, keys `q<name>` for queue records and `i<id: u64 BE>` for items,
//! so a batch touching both is one atomic `apply_batch`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{Notify, watch};

use super::{FlushStats, ItemRecord, Op, QueueRecord, Snapshot, Ticket};
use crate::error::{Error, Result};

/// How long relaxed mode may hold unflushed writes.
const RELAXED_FLUSH_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Acknowledge only after the write is flushed (group commit).
    Strict,
    /// Acknowledge at once; flush at least every 500 ms.
    Relaxed,
}

pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    durability: Durability,
    /// Tickets handed out: bumped after each applied batch.
    written: AtomicU64,
    /// Highest ticket known to be flushed.
    durable: watch::Sender<u64>,
    kick: Arc<Notify>,
    healthy: AtomicBool,
    started: AtomicBool,
    stats: FlushStats,
}

fn storage_error(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{context}: {e}"))
}

impl SledStore {
    pub fn open(dir: &Path, durability: Durability, cache_bytes: u64) -> Result<SledStore> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // We flush ourselves: on demand (strict) or on our own timer (relaxed).
            .flush_every_ms(None)
            .open()
            .map_err(|e| storage_error(&format!("cannot open data dir {}", dir.display()), e))?;
        let (durable, _) = watch::channel(0);
        Ok(SledStore {
            inner: Arc::new(Inner {
                db,
                durability,
                written: AtomicU64::new(0),
                durable,
                kick: Arc::new(Notify::new()),
                healthy: AtomicBool::new(true),
                started: AtomicBool::new(false),
                stats: FlushStats::default(),
            }),
        })
    }

    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    pub fn load(&self) -> Result<Snapshot> {
        let mut snapshot = Snapshot::default();
        for entry in self.inner.db.iter() {
            let (key, value) = entry.map_err(|e| storage_error("reading the data dir", e))?;
            match key.first() {
                Some(b'q') => snapshot.queues.push(
                    QueueRecord::decode(&*value)
                        .map_err(|e| storage_error("corrupt queue record", e))?,
                ),
                Some(b'i') => snapshot.items.push(
                    ItemRecord::decode(&*value)
                        .map_err(|e| storage_error("corrupt item record", e))?,
                ),
                _ => {}
            }
        }
        Ok(snapshot)
    }

    pub fn next_id(&self) -> u64 {
        // sled persists the id generator so ids keep increasing across crashes; +1
        // keeps 0 free to mean "none".
        self.inner
            .db
            .generate_id()
            .map(|id| id + 1)
            .unwrap_or_else(|e| {
                self.inner.healthy.store(false, Ordering::SeqCst);
                tracing::error!(error = %e, "id generation failed");
                u64::MAX
            })
    }

    pub fn write(&self, ops: Vec<Op>) -> Result<Ticket> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                Op::PutQueue(record) => {
                    batch.insert(queue_key(&record.name), record.encode_to_vec())
                }
                Op::DeleteQueue(name) => batch.remove(queue_key(&name)),
                Op::PutItem(record) => {
                    batch.insert(&item_key(record.id)[..], record.encode_to_vec())
                }
                Op::DeleteItem(id) => batch.remove(&item_key(id)[..]),
            }
        }
        if let Err(e) = self.inner.db.apply_batch(batch) {
            self.inner.healthy.store(false, Ordering::SeqCst);
            return Err(storage_error("write failed", e));
        }
        // Bumped only after the batch is applied: any flush that starts after a
        // ticket is read covers every batch with that ticket or lower.
        Ok(Ticket(
            self.inner.written.fetch_add(1, Ordering::SeqCst) + 1,
        ))
    }

    pub fn last_ticket(&self) -> Ticket {
        Ticket(self.inner.written.load(Ordering::SeqCst))
    }

    pub async fn sync(&self, ticket: Ticket) -> Result<()> {
        if self.inner.durability == Durability::Relaxed {
            return Ok(());
        }
        if *self.inner.durable.borrow() >= ticket.0 {
            return Ok(());
        }
        if !self.inner.started.load(Ordering::SeqCst) {
            // No flusher (e.g. before start-up finished): flush inline.
            return self.flush_now().await;
        }
        let mut rx = self.inner.durable.subscribe();
        self.inner.kick.notify_one();
        let inner = &self.inner;
        let result = rx
            .wait_for(|durable| *durable >= ticket.0 || !inner.healthy.load(Ordering::SeqCst))
            .await;
        if result.is_err() || !self.healthy() {
            return Err(Error::Storage(
                "flush failed; see the coordinator log".into(),
            ));
        }
        Ok(())
    }

    pub fn request_flush(&self) {
        self.inner.kick.notify_one();
    }

    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::SeqCst)
    }

    pub fn flush_stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// Starts the flusher task (strict: on demand; relaxed: every 500 ms).
    pub fn start(&self) {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return;
        }
        // The task holds the store weakly, so dropping the store closes the database.
        let weak = Arc::downgrade(&self.inner);
        let kick = self.inner.kick.clone();
        let durability = self.inner.durability;
        tokio::spawn(async move {
            loop {
                match durability {
                    Durability::Strict => kick.notified().await,
                    Durability::Relaxed => tokio::time::sleep(RELAXED_FLUSH_EVERY).await,
                }
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = flush_once(&inner).await {
                    tracing::error!(error = %e, "flush failed: acknowledged writes may not be durable");
                }
            }
        });
    }

    async fn flush_now(&self) -> Result<()> {
        flush_once(&self.inner).await
    }

    pub async fn close(&self) -> Result<()> {
        flush_once(&self.inner).await
    }
}

/// Flushes everything written so far and publishes the covered ticket.
async fn flush_once(inner: &Arc<Inner>) -> Result<()> {
    let target = inner.written.load(Ordering::SeqCst);
    if target <= *inner.durable.borrow() {
        return Ok(());
    }
    let db = inner.db.clone();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| storage_error("flush task", e))?;
    let micros = started.elapsed().as_micros() as u64;
    inner.stats.flushes.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .total_micros
        .fetch_add(micros, Ordering::Relaxed);
    inner.stats.max_micros.fetch_max(micros, Ordering::Relaxed);
    match result {
        Ok(_) => {
            inner.durable.send_if_modified(|durable| {
                if target > *durable {
                    *durable = target;
                    true
                } else {
                    false
                }
            });
            Ok(())
        }
        Err(e) => {
            inner.healthy.store(false, Ordering::SeqCst);
            // Wake waiters so they report the failure instead of hanging.
            inner.durable.send_modify(|_| {});
            Err(storage_error("flush failed", e))
        }
    }
}

fn queue_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(b'q');
    key.extend_from_slice(name.as_bytes());
    key
}

fn item_key(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'i';
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Let the flusher notice the store is gone and end.
        self.inner.kick.notify_one();
    }
}
