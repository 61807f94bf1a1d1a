//! The bench payload: which item this is and when it was meant to be enqueued, so a
//! consumer can count acks per item and measure enqueue→ack latency on its own.
//!
//! Layout (little-endian): bytes 0..8 the item's index in the run, 8..16 the
//! enqueue time in microseconds on the run's clock ([`now_us`]), then filler up to
//! the payload size. Producers and consumers live in one process, so one monotonic
//! clock serves both ends.

use std::sync::LazyLock;
use std::time::Instant;

/// The smallest payload that holds the index and the timestamp.
pub const MIN_SIZE: usize = 16;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Microseconds since the run's clock started.
pub fn now_us() -> u64 {
    EPOCH.elapsed().as_micros() as u64
}

/// The run clock's reading at `at` (0 for instants before the clock started).
pub fn us_at(at: Instant) -> u64 {
    at.saturating_duration_since(*EPOCH).as_micros() as u64
}

/// Appends a payload of `size` bytes (at least [`MIN_SIZE`]) for item `index` stamped
/// `at_us` to `out`, so that a batch's payloads can share one buffer.
pub fn append(out: &mut Vec<u8>, index: u64, at_us: u64, size: usize) {
    let end = out.len() + size.max(MIN_SIZE);
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&at_us.to_le_bytes());
    out.resize(end, b'x');
}

/// The index and timestamp of a bench payload; `None` for anything shorter.
pub fn decode(payload: &[u8]) -> Option<(u64, u64)> {
    let index = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let at_us = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((index, at_us))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_at_the_requested_size() {
        let mut payload = Vec::new();
        append(&mut payload, 42, 1_234_567, 64);
        assert_eq!(payload.len(), 64);
        assert_eq!(decode(&payload), Some((42, 1_234_567)));
        assert_eq!(decode(b"short"), None);
        let mut two = Vec::new();
        append(&mut two, 1, 5, 20);
        append(&mut two, 2, 6, 3);
        assert_eq!(two.len(), 20 + MIN_SIZE);
        assert_eq!(decode(&two[..20]), Some((1, 5)));
        assert_eq!(decode(&two[20..]), Some((2, 6)));
    }
}
