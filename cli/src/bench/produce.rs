//! Producers: enqueue a range of bench items in batches, either closed loop (the next
//! request leaves when the previous answer is in, or up to `pipeline` answers are
//! outstanding on a stream) or paced at a fixed offered rate (open loop: a request
//! leaves at its scheduled time whether or not earlier ones were answered).

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::task::JoinSet;
use workq_proto::in_place::{NewItemRef, write_enqueue_request};
use workq_proto::{Client, pb};

use super::Mode;
use super::calls;
use super::latency::sample;
use super::payload;

/// What one producer did.
#[derive(Debug, Default)]
pub struct Produced {
    /// The id the coordinator gave each item, in no particular order.
    pub ids: Vec<u64>,
    /// Round trip of each request, in microseconds.
    pub latencies: Vec<u32>,
}

impl Produced {
    pub fn merge(&mut self, other: Produced) {
        self.ids.extend(other.ids);
        self.latencies.extend(other.latencies);
    }
}

/// How a producer shapes its requests.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub payload_size: usize,
    pub mode: Mode,
    /// Requests outstanding at once on a stream (closed loop only).
    pub pipeline: usize,
    /// Dedup keys: item `i` of the run gets the key `{run:x}-{i}`, the run a number
    /// of its own so that runs into one `--queue` do not deduplicate each other.
    pub keys: Option<u64>,
}

/// A fixed schedule: request `j` leaves at `start + offset + j * interval`.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub start: Instant,
    pub offset: Duration,
    pub interval: Duration,
}

/// How late tokio's timer may wake a sleep: it fires on millisecond ticks, rounding
/// a deadline up to the next one.
const TIMER_SLACK: Duration = Duration::from_millis(1);

impl Pace {
    fn at(&self, request: u64) -> Instant {
        self.start + self.offset + self.interval.mul_f64(request as f64)
    }

    /// Waits for request `request`'s time and returns the instant its items' latency
    /// counts from. A producer that was free before that time (`free_at`) sent as
    /// soon as the timer woke it: what the timer added (up to [`TIMER_SLACK`]) is the
    /// load generator's, not the queue's, so the items count from the moment they
    /// left, which becomes `woke`. A producer still busy at that time was held up by
    /// the queue, and its items count from their scheduled time (no coordinated
    /// omission), unless that time passed while its timer was late (`woke`, the last
    /// time it let the producer go): a producer with requests less than a tick apart
    /// is then behind by its own timer, and they count from the wake-up.
    async fn wait(&self, request: u64, free_at: Instant, woke: &mut Instant) -> Instant {
        let at = self.at(request);
        if free_at > at {
            return at.max(*woke);
        }
        tokio::time::sleep_until(at.into()).await;
        *woke = Instant::now().min(at + TIMER_SLACK);
        *woke
    }
}

/// The items `range` of one request, each stamped `at_us`.
pub struct Batch<'a> {
    queue: &'a str,
    range: Range<u64>,
    at_us: u64,
    shape: Shape,
}

impl Batch<'_> {
    /// The batch's payloads in one buffer, `size` bytes each: one allocation per
    /// request, not one per item.
    fn payloads(&self) -> (Vec<u8>, usize) {
        let size = self.shape.payload_size.max(payload::MIN_SIZE);
        let mut payloads = Vec::with_capacity(size * (self.range.end - self.range.start) as usize);
        for index in self.range.clone() {
            payload::append(&mut payloads, index, self.at_us, size);
        }
        (payloads, size)
    }

    fn key(&self, index: u64) -> String {
        self.shape
            .keys
            .map_or_else(String::new, |run| format!("{run:x}-{index}"))
    }

    /// The batch as a message, for gRPC. Each payload is a slice of the one buffer
    /// (prost's encoding clones each payload's `Bytes`, which would move a `Vec`'s
    /// bytes behind a shared header: a second allocation per item).
    pub fn request(&self) -> pb::EnqueueRequest {
        let (payloads, size) = self.payloads();
        let payloads = bytes::Bytes::from(payloads);
        pb::EnqueueRequest {
            queue: self.queue.to_string(),
            items: self
                .range
                .clone()
                .zip((0..).step_by(size))
                .map(|(index, at)| pb::NewItem {
                    payload: payloads.slice(at..at + size),
                    key: self.key(index),
                    ..Default::default()
                })
                .collect(),
            seal: false,
        }
    }

    /// The batch encoded straight into `out`, for the wire: the bytes of
    /// [`Batch::request`] without building it (no message, no `Bytes` per payload,
    /// no reference counts taken and dropped per item).
    pub fn write(&self, out: &mut Vec<u8>) {
        let (payloads, size) = self.payloads();
        let keys: Vec<String> = match self.shape.keys {
            Some(_) => self.range.clone().map(|index| self.key(index)).collect(),
            None => Vec::new(),
        };
        let items = payloads
            .chunks(size)
            .enumerate()
            .map(|(i, payload)| NewItemRef {
                payload,
                key: keys.get(i).map_or("", String::as_str),
                ..Default::default()
            });
        write_enqueue_request(self.queue, items, false, out);
    }
}

/// A request for the items `range`, each stamped `at_us` (unary calls).
fn request(queue: &str, range: Range<u64>, at_us: u64, shape: Shape) -> pb::EnqueueRequest {
    batch(queue, range, at_us, shape).request()
}

fn batch(queue: &str, range: Range<u64>, at_us: u64, shape: Shape) -> Batch<'_> {
    Batch {
        queue,
        range,
        at_us,
        shape,
    }
}

/// The batches of `items`, in order.
fn batches(items: Range<u64>, batch: usize) -> impl Iterator<Item = Range<u64>> {
    let batch = batch.max(1) as u64;
    (items.start..items.end)
        .step_by(batch as usize)
        .map(move |start| start..(start + batch).min(items.end))
}

fn check_answer(response: &pb::EnqueueResponse, expected: usize) -> Result<()> {
    if response.results.len() != expected {
        bail!(
            "the coordinator answered {} results for a batch of {expected} items",
            response.results.len()
        );
    }
    Ok(())
}

/// Enqueues `items` closed loop on one connection.
pub async fn closed(
    mut client: Client,
    queue: &str,
    items: Range<u64>,
    shape: Shape,
) -> Result<Produced> {
    let mut produced = Produced::default();
    match shape.mode {
        Mode::Unary => {
            for range in batches(items, shape.batch) {
                let expected = (range.end - range.start) as usize;
                let started = Instant::now();
                let req = request(queue, range, payload::now_us(), shape);
                let response = client.enqueue(req).await.context("enqueue")?.into_inner();
                produced
                    .latencies
                    .push(sample(started.elapsed().as_micros() as u64));
                check_answer(&response, expected)?;
                produced.ids.extend(response.results.iter().map(|r| r.id));
            }
        }
        Mode::Stream | Mode::Wire => {
            let window = shape.pipeline.max(1);
            let (mut tx, mut responses) = calls::enqueue_stream(&mut client, shape.mode).await?;
            let mut pending = batches(items, shape.batch);
            // (sent at, items in the request) of each unanswered request, in order.
            let mut outstanding: VecDeque<(Instant, usize)> = VecDeque::with_capacity(window);
            loop {
                while outstanding.len() < window {
                    let Some(range) = pending.next() else { break };
                    let expected = (range.end - range.start) as usize;
                    let batch = batch(queue, range, payload::now_us(), shape);
                    outstanding.push_back((Instant::now(), expected));
                    tx.send_batch(&batch).await?;
                }
                let Some((sent, expected)) = outstanding.pop_front() else {
                    break;
                };
                let response = responses
                    .message()
                    .await
                    .context("enqueue stream")?
                    .ok_or_else(|| anyhow!("the enqueue stream ended before every answer"))?;
                produced
                    .latencies
                    .push(sample(sent.elapsed().as_micros() as u64));
                check_answer(&response, expected)?;
                produced.ids.extend(response.results.iter().map(|r| r.id));
            }
            tx.close().await?;
            if let Some(extra) = responses.message().await.context("enqueue stream")? {
                bail!("the enqueue stream answered more than was asked: {extra:?}");
            }
        }
    }
    Ok(produced)
}

/// Enqueues `items` open loop on one connection, each request at its scheduled time
/// and stamped with that time (or, when the producer was idle, with when the timer
/// let it leave: see [`Pace::wait`]), so a coordinator that falls behind shows up in
/// the consumers' latencies instead of slowing the offered rate (no coordinated
/// omission).
pub async fn paced(
    mut client: Client,
    queue: &str,
    items: Range<u64>,
    shape: Shape,
    pace: Pace,
) -> Result<Produced> {
    let mut produced = Produced::default();
    match shape.mode {
        Mode::Unary => {
            // One task per request on clones of one client: they share the connection
            // as concurrent HTTP/2 streams, so a slow answer does not delay the next send.
            let mut tasks = JoinSet::new();
            let mut woke = pace.start;
            for (j, range) in batches(items, shape.batch).enumerate() {
                let at = pace.wait(j as u64, Instant::now(), &mut woke).await;
                let expected = (range.end - range.start) as usize;
                let req = request(queue, range, payload::us_at(at), shape);
                let mut client = client.clone();
                tasks.spawn(async move {
                    let started = Instant::now();
                    let response = client.enqueue(req).await.context("enqueue")?.into_inner();
                    let took = sample(started.elapsed().as_micros() as u64);
                    check_answer(&response, expected)?;
                    Ok::<_, anyhow::Error>((response, took))
                });
            }
            while let Some(done) = tasks.join_next().await {
                let (response, took) = done.context("producer task")??;
                produced.latencies.push(took);
                produced.ids.extend(response.results.iter().map(|r| r.id));
            }
        }
        Mode::Stream | Mode::Wire => {
            let (mut tx, mut responses) = calls::enqueue_stream(&mut client, shape.mode).await?;
            let queue = queue.to_string();
            let sender = tokio::spawn(async move {
                let mut sent = Vec::new();
                let (mut free_at, mut woke) = (pace.start, pace.start);
                for (j, range) in batches(items, shape.batch).enumerate() {
                    let at = pace.wait(j as u64, free_at, &mut woke).await;
                    let expected = (range.end - range.start) as usize;
                    let batch = batch(&queue, range, payload::us_at(at), shape);
                    let sent_at = Instant::now();
                    if tx.send_batch(&batch).await.is_err() {
                        break;
                    }
                    free_at = Instant::now();
                    sent.push((sent_at, expected));
                }
                // Ends the call: the coordinator answers the rest, then ends it.
                let _ = tx.close().await;
                sent
            });
            let mut answered = Vec::new();
            while let Some(response) = responses.message().await.context("enqueue stream")? {
                answered.push((Instant::now(), response));
            }
            let sent = sender.await.context("producer task")?;
            if sent.len() != answered.len() {
                bail!(
                    "the enqueue stream answered {} of {} requests",
                    answered.len(),
                    sent.len()
                );
            }
            for ((sent_at, expected), (answered_at, response)) in sent.into_iter().zip(answered) {
                check_answer(&response, expected)?;
                let took = answered_at.saturating_duration_since(sent_at);
                produced.latencies.push(sample(took.as_micros() as u64));
                produced.ids.extend(response.results.iter().map(|r| r.id));
            }
        }
    }
    Ok(produced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_written_for_the_wire_is_the_request_prost_writes() {
        use prost::Message;
        for keys in [None, Some(0xabc)] {
            for payload_size in [0, 64, 200] {
                let shape = Shape {
                    batch: 100,
                    payload_size,
                    mode: Mode::Wire,
                    pipeline: 1,
                    keys,
                };
                let batch = batch("bench-q", 1_000..1_100, 123_456, shape);
                let mut written = Vec::new();
                batch.write(&mut written);
                assert_eq!(written, batch.request().encode_to_vec(), "{shape:?}");
                assert_eq!(batch.request().items.len(), 100);
            }
        }
    }

    #[test]
    fn batches_cover_the_range_once() {
        let all: Vec<Range<u64>> = batches(10..35, 10).collect();
        assert_eq!(all, vec![10..20, 20..30, 30..35]);
        assert_eq!(batches(0..3, 1).count(), 3);
        assert_eq!(batches(5..5, 100).count(), 0);
    }

    #[tokio::test]
    async fn paced_items_count_from_their_time_unless_the_producer_was_free_earlier() {
        let start = Instant::now() + Duration::from_millis(3);
        let pace = Pace {
            start,
            offset: Duration::ZERO,
            interval: Duration::from_millis(2),
        };
        let mut woke = start;
        // Still busy with the request before at its time: held up by the queue, so
        // the items count from their scheduled time.
        let busy_until = pace.at(1) + Duration::from_millis(5);
        assert_eq!(pace.wait(1, busy_until, &mut woke).await, pace.at(1));
        // Free before its time: the items count from when the timer let them leave,
        // never before their time, and at most the timer's slack after it.
        // (The timer wakes on a millisecond tick after the time, so "when it left" is
        // later than the scheduled time, not equal to it.)
        let from = pace.wait(2, Instant::now(), &mut woke).await;
        assert!(from > pace.at(2) && from <= pace.at(2) + TIMER_SLACK);
        assert_eq!(woke, from);
    }

    /// Requests closer than the timer's tick: one that fell due while the producer's
    /// timer was late counts from the wake-up, not from its time (the load
    /// generator's lateness, not the queue's); one that fell due after it, while the
    /// producer was busy, counts from its time.
    #[tokio::test]
    async fn a_late_timer_is_the_load_generators_not_the_queues() {
        let start = Instant::now();
        let pace = Pace {
            start,
            offset: Duration::ZERO,
            interval: Duration::from_micros(200),
        };
        // The timer let request 0 go 700 µs late; it was sent by 900 µs.
        let mut woke = pace.at(0) + Duration::from_micros(700);
        let free_at = pace.at(0) + Duration::from_micros(900);
        // Request 1 (at 200 µs) and 3 (at 600 µs) fell due while the timer was late.
        assert_eq!(pace.wait(1, free_at, &mut woke).await, woke);
        assert_eq!(pace.wait(3, free_at, &mut woke).await, woke);
        // Request 4 (at 800 µs) fell due after the wake-up, while the send was on.
        assert_eq!(pace.wait(4, free_at, &mut woke).await, pace.at(4));
        assert_eq!(woke, pace.at(0) + Duration::from_micros(700));
    }
}
