//! Consumers: lease bench items and ack them, one request per step (unary `Lease`
//! then `Ack`, or `Settle` for batches) or on one `Work` stream (credit in, leases
//! out, acks and fresh credit in the same message).
//!
//! A consumer records the index of every item whose ack the coordinator confirmed,
//! so the run can check that each item was acked exactly once, and one latency per
//! item: for `drain` from the moment it asked for the item (lease call or credit)
//! to the confirmed ack, for `e2e` from the enqueue time stamped in the payload.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use tokio::sync::watch;
use workq_proto::{Client, pb};

use super::Mode;
use super::calls;
use super::latency::sample;
use super::payload;

/// How long one unary lease call long-polls. Short enough that a consumer notices
/// the end of an `e2e` run promptly even if a wake-up were missed.
const LEASE_WAIT_MS: u64 = 2_000;

/// Which latency a consumer records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// From asking for an item (lease call or credit) to its confirmed ack.
    LeaseToAck,
    /// From the enqueue time in the payload to the confirmed ack.
    EnqueueToAck,
}

/// When consumers stop.
#[derive(Clone, Debug)]
pub enum Until {
    /// When the coordinator says the queue is drained (`drain`: everything is queued
    /// before the consumers start).
    Drained,
    /// When all consumers together have acked the run's items (`e2e`: the queue is
    /// empty whenever consumers keep up with producers, so "drained" proves nothing).
    AllAcked(Arc<Finish>),
}

/// Counts acks across consumers and tells them when the run's items are all acked.
#[derive(Debug)]
pub struct Finish {
    target: u64,
    acked: AtomicU64,
    done: watch::Sender<bool>,
}

impl Finish {
    pub fn new(target: u64) -> Arc<Finish> {
        Arc::new(Finish {
            target,
            acked: AtomicU64::new(0),
            done: watch::channel(target == 0).0,
        })
    }

    fn add(&self, n: u64) {
        if self.acked.fetch_add(n, Ordering::AcqRel) + n >= self.target {
            self.done.send_replace(true);
        }
    }

    /// Resolves once every item is acked.
    async fn wait(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

/// What one consumer did.
#[derive(Debug, Default)]
pub struct Consumed {
    /// Payload index of every item whose ack was confirmed.
    pub acked: Vec<u64>,
    pub latencies: Vec<u32>,
    /// Acks refused because the lease was lost (expired and re-leased).
    pub lost: u64,
    /// Leased items whose payload was not a bench payload.
    pub foreign: u64,
}

impl Consumed {
    pub fn merge(&mut self, other: Consumed) {
        self.acked.extend(other.acked);
        self.latencies.extend(other.latencies);
        self.lost += other.lost;
        self.foreign += other.foreign;
    }

    fn record(&mut self, index: Option<(u64, u64)>, asked: Instant, measure: Measure) {
        let Some((index, stamped_us)) = index else {
            self.foreign += 1;
            return;
        };
        self.acked.push(index);
        let us = match measure {
            Measure::LeaseToAck => asked.elapsed().as_micros() as u64,
            Measure::EnqueueToAck => payload::now_us().saturating_sub(stamped_us),
        };
        self.latencies.push(sample(us));
    }
}

/// How a consumer works.
#[derive(Clone, Debug)]
pub struct Consumer {
    pub queue: String,
    pub worker_id: String,
    /// Items leased (or credited) at once; acked together with one call or message.
    pub batch: u32,
    pub mode: Mode,
    pub measure: Measure,
    pub until: Until,
}

impl Consumer {
    pub async fn run(self, client: Client) -> Result<Consumed> {
        match self.mode {
            Mode::Unary => self.unary(client).await,
            Mode::Stream | Mode::Wire => self.stream(client).await,
        }
    }

    fn ack(id: u64, token: u64) -> pb::Settlement {
        pb::Settlement {
            id,
            token,
            action: pb::SettleAction::Ack as i32,
            ..Default::default()
        }
    }

    async fn unary(self, mut client: Client) -> Result<Consumed> {
        let mut consumed = Consumed::default();
        loop {
            let asked = Instant::now();
            let call = client.lease(pb::LeaseRequest {
                queue: self.queue.clone(),
                worker_id: self.worker_id.clone(),
                max_items: self.batch,
                lease_timeout_ms: 0,
                wait_ms: LEASE_WAIT_MS,
            });
            let response = match &self.until {
                Until::Drained => call.await,
                Until::AllAcked(finish) => tokio::select! {
                    response = call => response,
                    () = finish.wait() => break,
                },
            }
            .context("lease")?
            .into_inner();
            if response.leases.is_empty() {
                if response.drained && matches!(self.until, Until::Drained) {
                    break;
                }
                continue;
            }
            let acked_before = consumed.acked.len();
            if self.batch == 1 && response.leases.len() == 1 {
                // One item per operation: the plain Ack call, as a simple worker does.
                let lease = &response.leases[0];
                let ack = client
                    .ack(pb::AckRequest {
                        queue: self.queue.clone(),
                        id: lease.id,
                        token: lease.token,
                        result: Vec::new(),
                    })
                    .await;
                match ack {
                    Ok(_) => consumed.record(payload::decode(&lease.payload), asked, self.measure),
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                        consumed.lost += 1
                    }
                    Err(status) => return Err(status).context("ack"),
                }
            } else {
                let settlements = response
                    .leases
                    .iter()
                    .map(|l| Self::ack(l.id, l.token))
                    .collect();
                let results = client
                    .settle(pb::SettleRequest {
                        queue: self.queue.clone(),
                        settlements,
                    })
                    .await
                    .context("settle")?
                    .into_inner()
                    .results;
                let payloads: HashMap<u64, &[u8]> = response
                    .leases
                    .iter()
                    .map(|l| (l.id, l.payload.as_slice()))
                    .collect();
                for result in results {
                    match payloads.get(&result.id) {
                        Some(bytes) if result.code == 0 => {
                            consumed.record(payload::decode(bytes), asked, self.measure)
                        }
                        _ => consumed.lost += 1,
                    }
                }
            }
            if let Until::AllAcked(finish) = &self.until {
                finish.add((consumed.acked.len() - acked_before) as u64);
            }
        }
        Ok(consumed)
    }

    async fn stream(self, mut client: Client) -> Result<Consumed> {
        let mut consumed = Consumed::default();
        let (mut requests, mut responses) = calls::work(&mut client, self.mode).await?;
        requests
            .send(pb::WorkRequest {
                queue: self.queue.clone(),
                worker_id: self.worker_id.clone(),
                credit: self.batch,
                ..Default::default()
            })
            .await?;
        // When each outstanding unit of credit was granted, oldest first: the lease
        // that uses it was asked for then.
        let mut granted: VecDeque<Instant> =
            std::iter::repeat_n(Instant::now(), self.batch as usize).collect();
        // Leases whose ack is on its way: id → (decoded payload, asked at).
        let mut settling: HashMap<u64, (Option<(u64, u64)>, Instant)> = HashMap::new();
        loop {
            let message = match &self.until {
                Until::Drained => responses.message().await,
                Until::AllAcked(finish) => tokio::select! {
                    message = responses.message() => message,
                    () = finish.wait() => break,
                },
            }
            .context("work stream")?
            .ok_or_else(|| anyhow!("the coordinator ended the work stream"))?;
            if !message.leases.is_empty() {
                let now = Instant::now();
                let mut settlements = Vec::with_capacity(message.leases.len());
                for lease in &message.leases {
                    let asked = granted.pop_front().unwrap_or(now);
                    settling.insert(lease.id, (payload::decode(&lease.payload), asked));
                    settlements.push(Self::ack(lease.id, lease.token));
                }
                let credit = settlements.len() as u32;
                granted.extend(std::iter::repeat_n(Instant::now(), credit as usize));
                requests
                    .send(pb::WorkRequest {
                        credit,
                        settlements,
                        ..Default::default()
                    })
                    .await?;
            }
            let acked_before = consumed.acked.len();
            for result in &message.settled {
                match settling.remove(&result.id) {
                    Some((decoded, asked)) if result.code == 0 => {
                        consumed.record(decoded, asked, self.measure)
                    }
                    _ => consumed.lost += 1,
                }
            }
            if let Until::AllAcked(finish) = &self.until {
                finish.add((consumed.acked.len() - acked_before) as u64);
            }
            if message.drained && matches!(self.until, Until::Drained) {
                break;
            }
        }
        Ok(consumed)
    }
}
