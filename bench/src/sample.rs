//! The payload and the latency arithmetic, shared by every peer client. The payload
//! layout is `queue-cli bench`'s: the item's index (u64 LE), its enqueue time in
//! microseconds on this process's clock (u64 LE), then filler to the payload size.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Microseconds since the process's clock started.
pub fn now_us() -> u64 {
    EPOCH.elapsed().as_micros() as u64
}

/// How late tokio's timer may wake a sleep: it fires on millisecond ticks, rounding
/// a deadline up to the next one.
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Waits for a paced request's time `at` and returns the instant its items' latency
/// counts from, as `queue-cli bench` does for workq. A producer that was free before
/// `at` (`free_at`) sent as soon as the timer woke it: what the timer added (up to
/// [`TIMER_SLACK`]) belongs to the load generator, so the items count from the moment
/// they left, which becomes `woke`. A producer still busy at `at` was held up by the
/// system under test, and its items count from `at` (no coordinated omission), unless
/// `at` passed while its timer was late (before `woke`): then they count from the
/// wake-up.
pub async fn pace(at: Instant, free_at: Instant, woke: &mut Instant) -> Instant {
    if free_at > at {
        return at.max(*woke);
    }
    tokio::time::sleep_until(at.into()).await;
    *woke = Instant::now().min(at + TIMER_SLACK);
    *woke
}

/// The clock's reading at `at`.
pub fn us_at(at: Instant) -> u64 {
    at.saturating_duration_since(*EPOCH).as_micros() as u64
}

pub fn encode(index: u64, at_us: u64, size: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(size.max(16));
    payload.extend_from_slice(&index.to_le_bytes());
    payload.extend_from_slice(&at_us.to_le_bytes());
    payload.resize(size.max(16), b'x');
    payload
}

pub fn decode(payload: &[u8]) -> Option<(u64, u64)> {
    let index = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let at_us = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((index, at_us))
}

/// Saturating microseconds.
pub fn micros(us: u64) -> u32 {
    u32::try_from(us).unwrap_or(u32::MAX)
}

/// Nearest-rank percentiles of samples in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub p50: u32,
    pub p99: u32,
    pub p999: u32,
    pub max: u32,
}

impl Percentiles {
    pub fn of(samples: &mut [u32]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let rank = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Percentiles {
            p50: rank(0.50),
            p99: rank(0.99),
            p999: rank(0.999),
            max: samples[n - 1],
        }
    }

    pub fn from_json(value: &Value) -> Percentiles {
        let get = |k: &str| value[k].as_u64().map_or(0, micros);
        Percentiles {
            p50: get("p50"),
            p99: get("p99"),
            p999: get("p999"),
            max: get("max"),
        }
    }

    pub fn json(&self) -> Value {
        json!({"p50": self.p50, "p99": self.p99, "p999": self.p999, "max": self.max})
    }
}

/// Checks that each of `0..n` was acked exactly once; returns the problems found.
pub fn check_acks(n: u64, acked: &[u64]) -> Vec<String> {
    let mut counts = vec![0u32; n as usize];
    let mut stray = 0;
    for &index in acked {
        match counts.get_mut(index as usize) {
            Some(c) => *c += 1,
            None => stray += 1,
        }
    }
    let missing = counts.iter().filter(|&&c| c == 0).count();
    let twice = counts.iter().filter(|&&c| c > 1).count();
    let mut problems = Vec::new();
    if missing > 0 {
        problems.push(format!("{missing} items never acked"));
    }
    if twice > 0 {
        problems.push(format!("{twice} items acked more than once"));
    }
    if stray > 0 {
        problems.push(format!("{stray} acked items were not this run's"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip_and_percentiles() {
        assert_eq!(decode(&encode(7, 99, 64)), Some((7, 99)));
        assert_eq!(encode(7, 99, 64).len(), 64);
        let mut samples: Vec<u32> = (1..=1000).collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!((p.p50, p.p99, p.p999, p.max), (500, 990, 999, 1000));
    }

    #[tokio::test]
    async fn paced_items_count_from_their_time_unless_the_producer_was_free_earlier() {
        let at = Instant::now() + Duration::from_millis(3);
        let mut woke = Instant::now();
        assert_eq!(pace(at, at + Duration::from_millis(5), &mut woke).await, at);
        // The timer wakes after `at`, so the items count from later than `at`.
        let from = pace(at, Instant::now(), &mut woke).await;
        assert!(from > at && from <= at + TIMER_SLACK);
        assert_eq!(woke, from);
        // A request that fell due while the timer was late counts from the wake-up;
        // one that fell due after it, while the producer was busy, from its time.
        let busy = woke + Duration::from_millis(5);
        let due_while_late = woke - Duration::from_micros(1);
        assert_eq!(pace(due_while_late, busy, &mut woke).await, from);
        let later = woke + Duration::from_micros(100);
        assert_eq!(pace(later, busy, &mut woke).await, later);
    }

    #[test]
    fn acks_are_checked_per_item() {
        assert!(check_acks(3, &[2, 0, 1]).is_empty());
        assert_eq!(
            check_acks(3, &[0, 0, 5]),
            vec![
                "2 items never acked",
                "1 items acked more than once",
                "1 acked items were not this run's"
            ]
        );
    }
}
