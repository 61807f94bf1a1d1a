//! One module per verb group, as the house style has it (pueue's
//! `client/commands/*.rs`). Each command connects, makes its calls and prints through
//! `crate::output`; errors travel up as `anyhow::Error` and `main` prints one line.

pub mod enqueue;
pub mod items;
pub mod lease;
mod outage;
pub mod queue;
pub mod schedule;
pub mod watch;
pub mod workers;

use std::time::Duration;

/// clap value parser for `30s`, `5m`, `1h`, `250ms`, `1h30m` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    workq_proto::duration::parse(text)
}

/// As [`parse_duration`], refusing zero: for the flags whose proto field reads 0 as
/// "the default" (a lease timeout, a backoff, a retention, a retry delay).
pub fn parse_positive(text: &str) -> Result<Duration, String> {
    workq_proto::duration::parse_positive(text)
}

/// Milliseconds for a proto `*_ms` field.
pub fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds for an optional flag; 0 (the proto's "default") when absent. The
/// flag's parser refuses zero, so a given flag never reads as absent.
pub fn opt_ms(duration: Option<Duration>) -> u64 {
    duration.map(ms).unwrap_or(0)
}
