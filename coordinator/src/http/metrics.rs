//! `GET /metrics`: Prometheus text exposition (format 0.0.4), written by hand from the
//! engine's stats at scrape time, plus the process-wide latency histograms that the
//! request handlers record into.
//!
//! Who writes what: queue gauges and counters are read from the engine (the single
//! writer of queue state) on each scrape, so they can never drift from what `stats`
//! shows. The histograms [`LEASE`] and [`ACK`] are written by the gRPC service and the
//! memq face with [`Histogram::start_timer`]; they are lock-free atomics, so recording
//! costs a few atomic adds on the hot path.
//!
//! Label cardinality stays bounded: the only label with user-chosen values is `queue`
//! (one per existing queue), plus the fixed `state` and `le` sets.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;

/// Bucket upper bounds in microseconds: 0.5 ms to 60 s (the longest lease long-poll).
const BOUNDS_MICROS: [u64; 16] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// A fixed-bucket latency histogram; counts per bucket are cumulated when rendered.
#[derive(Debug)]
pub struct Histogram {
    /// One slot per bound, and a last one for +Inf.
    buckets: [AtomicU64; BOUNDS_MICROS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BOUNDS_MICROS.len() + 1],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let slot = BOUNDS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(BOUNDS_MICROS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time until the returned guard is dropped (error paths included).
    pub fn start_timer(&'static self) -> Timer {
        Timer {
            histogram: self,
            started: Instant::now(),
        }
    }

    /// Runs `call` and records how long it took: `LEASE.time(engine.lease(..)).await`.
    pub async fn time<F: std::future::Future>(&'static self, call: F) -> F::Output {
        let _timer = self.start_timer();
        call.await
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match BOUNDS_MICROS.get(i) {
                Some(&micros) => seconds(micros),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_sum {}", seconds(sum));
        // The count is the +Inf bucket, so the two always agree within one scrape.
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

/// Observes the elapsed time into its histogram when dropped.
#[derive(Debug)]
pub struct Timer {
    histogram: &'static Histogram,
    started: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed());
    }
}

/// Unary lease calls (gRPC `Lease`, memq dequeue), including any long-poll wait.
/// `Work` session polls are not timed: they wait by design.
pub static LEASE: Histogram = Histogram::new();
/// Completions (gRPC `Ack`, `Settle` batches in and out of `Work` sessions, the ack
/// half of a memq dequeue): time until the settlement is durable.
pub static ACK: Histogram = Histogram::new();

fn seconds(micros: u64) -> String {
    format!("{}", micros as f64 / 1e6)
}

/// A Prometheus label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn render(State(state): State<AppState>) -> Response {
    let text = exposition(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The whole exposition text for one scrape.
pub async fn exposition(state: &AppState) -> String {
    let engine = &state.engine;
    let queues = engine.list_queues();
    let mut out = String::with_capacity(4096 + queues.len() * 2048);

    let _ = writeln!(out, "# HELP workq_queues Queues that exist.");
    let _ = writeln!(out, "# TYPE workq_queues gauge");
    let _ = writeln!(out, "workq_queues {}", queues.len());

    let _ = writeln!(out, "# HELP workq_queue_items Items in a queue, by state.");
    let _ = writeln!(out, "# TYPE workq_queue_items gauge");
    for q in &queues {
        let s = &q.stats;
        let name = label(&q.name);
        for (state, n) in [
            ("ready", s.ready),
            ("delayed", s.delayed),
            ("leased", s.leased),
            ("done", s.done),
            ("dead", s.dead),
        ] {
            let _ = writeln!(
                out,
                "workq_queue_items{{queue=\"{name}\",state=\"{state}\"}} {n}"
            );
        }
    }

    type Gauge = fn(&crate::engine::Stats) -> String;
    let gauges: [(&str, &str, Gauge); 6] = [
        (
            "workq_queue_sealed",
            "1 when the queue is sealed (no more items will come).",
            |s| u8::from(s.sealed).to_string(),
        ),
        (
            "workq_queue_drained",
            "1 when no READY, DELAYED or LEASED items remain.",
            |s| u8::from(s.drained).to_string(),
        ),
        (
            "workq_queue_oldest_ready_age_seconds",
            "Age of the oldest READY item.",
            |s| seconds(s.oldest_ready_age_ms * 1000),
        ),
        (
            "workq_queue_completion_rate",
            "Completions per second over the last minute.",
            |s| format!("{}", s.rate_1m),
        ),
        (
            "workq_queue_eta_seconds",
            "Estimated time until drained at the recent completion rate (0: unknown or drained).",
            |s| seconds(s.eta_ms * 1000),
        ),
        (
            "workq_workers",
            "Workers connected to the queue (holding leases or seen in the last minute).",
            |s| s.workers.to_string(),
        ),
    ];
    for (metric, help, value) in gauges {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} gauge");
        for q in &queues {
            let _ = writeln!(
                out,
                "{metric}{{queue=\"{}\"}} {}",
                label(&q.name),
                value(&q.stats)
            );
        }
    }

    type Counter = fn(&crate::engine::queue::Counters) -> u64;
    let counters: [(&str, &str, Counter); 8] = [
        ("workq_enqueued_total", "Items enqueued.", |c| c.enqueued),
        (
            "workq_deliveries_total",
            "Leases handed out (memq dequeues included).",
            |c| c.deliveries,
        ),
        (
            "workq_completed_total",
            "Items acknowledged as done.",
            |c| c.completed,
        ),
        ("workq_failed_total", "Failures reported by workers.", |c| {
            c.failed
        }),
        (
            "workq_expired_total",
            "Leases that expired before an ack.",
            |c| c.expired,
        ),
        ("workq_dead_total", "Items moved to DEAD.", |c| c.dead),
        (
            "workq_purged_total",
            "Items discarded by purge (memq drain).",
            |c| c.purged,
        ),
        (
            "workq_deduplicated_total",
            "Enqueues answered with an existing item's id (dedup key).",
            |c| c.deduplicated,
        ),
    ];
    for (metric, help, value) in counters {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} counter");
        for q in &queues {
            let _ = writeln!(
                out,
                "{metric}{{queue=\"{}\"}} {}",
                label(&q.name),
                value(&q.stats.counters)
            );
        }
    }

    schedules(&mut out, &engine.all_schedules().await);

    LEASE.render(
        &mut out,
        "workq_lease_duration_seconds",
        "Unary lease calls (gRPC Lease, memq dequeue), including long-poll waiting.",
    );
    ACK.render(
        &mut out,
        "workq_ack_duration_seconds",
        "Ack and Settle calls (one observation per batch), until the settlement is durable.",
    );

    let store = engine.store();
    let _ = writeln!(
        out,
        "# HELP workq_store_healthy 1 while the store can promise durability."
    );
    let _ = writeln!(out, "# TYPE workq_store_healthy gauge");
    let _ = writeln!(out, "workq_store_healthy {}", u8::from(store.healthy()));
    if let Some(flush) = store.flush_stats() {
        let flushes = flush.flushes.load(Ordering::Relaxed);
        let total = flush.total_micros.load(Ordering::Relaxed);
        let max = flush.max_micros.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP workq_store_flush_duration_seconds Storage flushes (group commits) and their total time."
        );
        let _ = writeln!(out, "# TYPE workq_store_flush_duration_seconds summary");
        let _ = writeln!(
            out,
            "workq_store_flush_duration_seconds_sum {}",
            seconds(total)
        );
        let _ = writeln!(out, "workq_store_flush_duration_seconds_count {flushes}");
        let _ = writeln!(
            out,
            "# HELP workq_store_flush_max_seconds The longest storage flush since start."
        );
        let _ = writeln!(out, "# TYPE workq_store_flush_max_seconds gauge");
        let _ = writeln!(out, "workq_store_flush_max_seconds {}", seconds(max));
        let snapshots = flush.snapshots.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP workq_store_snapshot_duration_seconds Snapshots written and their total time."
        );
        let _ = writeln!(out, "# TYPE workq_store_snapshot_duration_seconds summary");
        let _ = writeln!(
            out,
            "workq_store_snapshot_duration_seconds_sum {}",
            seconds(flush.snapshot_micros.load(Ordering::Relaxed))
        );
        let _ = writeln!(
            out,
            "workq_store_snapshot_duration_seconds_count {snapshots}"
        );
        for (name, help, value) in [
            (
                "workq_store_snapshot_bytes",
                "Size of the newest snapshot.",
                &flush.snapshot_bytes,
            ),
            (
                "workq_store_log_bytes",
                "Log written since the newest snapshot began (what a restart replays).",
                &flush.log_bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
    }
    out
}

/// Each schedule's ticks by outcome and its next tick: alert on failed or missed runs,
/// or on a next run that does not move.
fn schedules(out: &mut String, schedules: &[crate::engine::schedules::ScheduleView]) {
    let _ = writeln!(
        out,
        "# HELP workq_schedule_runs_total Schedule ticks by outcome (enqueued, skipped, missed, failed)."
    );
    let _ = writeln!(out, "# TYPE workq_schedule_runs_total counter");
    for s in schedules {
        let r = &s.record;
        for (outcome, n) in [
            ("enqueued", r.enqueued_runs),
            ("skipped", r.skipped_runs),
            ("missed", r.missed_runs),
            ("failed", r.failed_runs),
        ] {
            let _ = writeln!(
                out,
                "workq_schedule_runs_total{{schedule=\"{}\",queue=\"{}\",outcome=\"{outcome}\"}} {n}",
                label(&r.name),
                label(&r.queue)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP workq_schedule_next_run_timestamp_seconds When the schedule ticks next (0 while suspended)."
    );
    let _ = writeln!(
        out,
        "# TYPE workq_schedule_next_run_timestamp_seconds gauge"
    );
    for s in schedules {
        let _ = writeln!(
            out,
            "workq_schedule_next_run_timestamp_seconds{{schedule=\"{}\"}} {}",
            label(&s.record.name),
            s.next_run_ms.unwrap_or(0) / 1000
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_cumulate_buckets() {
        static H: Histogram = Histogram::new();
        H.observe(Duration::from_micros(400));
        H.observe(Duration::from_millis(3));
        H.observe(Duration::from_secs(120));
        let mut out = String::new();
        H.render(&mut out, "t", "test");
        assert!(out.contains("t_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"0.0025\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("t_count 3\n"), "{out}");
        assert!(out.contains("t_sum 120.0034\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
