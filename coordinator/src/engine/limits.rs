//! Every input has a limit (PRODUCT.md "Security"). The numbers live here, with why.

use super::queue::Options;
use crate::error::{Error, Result};

/// Items in one enqueue call: large enough for fast bulk loads, small enough that one
/// call cannot hold a queue's lock for long.
pub const MAX_BATCH_ITEMS: usize = 10_000;
/// Items in one lease call.
pub const MAX_LEASE_ITEMS: u32 = 1_000;
/// Payload bytes in one lease answer: a lease call (or a session's push) stops adding
/// items past this, so the answer stays well inside the 64 MiB message limit even with
/// 32 MiB payloads (the first item always goes, whatever its size).
pub const MAX_LEASE_BYTES: usize = 16 * 1024 * 1024;
/// Longest long-poll: well under common proxy idle timeouts (60 s).
pub const MAX_WAIT_MS: u64 = 60_000;
/// Lease lengths: short enough for tests, at most SQS's 12 h visibility limit.
pub const MIN_LEASE_MS: u64 = 100;
pub const MAX_LEASE_MS: u64 = 12 * 3_600_000;
/// Delays and retry delays: up to a week.
pub const MAX_DELAY_MS: u64 = 7 * 86_400_000;
/// Dedup keys and worker ids.
pub const MAX_KEY_BYTES: usize = 512;
pub const MAX_WORKER_ID_BYTES: usize = 253;
/// Results are kept in memory for the retention period: bounded like payloads.
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
/// Error texts are diagnostics: longer ones are truncated, not refused.
pub const MAX_ERROR_BYTES: usize = 8 * 1024;
/// The largest payload a queue may be configured to accept.
pub const MAX_PAYLOAD_LIMIT: u64 = 32 * 1024 * 1024;
pub const MAX_ATTEMPTS_LIMIT: u32 = 1_000;
pub const MAX_RETENTION_MS: u64 = 90 * 86_400_000;
/// Page size for listing items.
pub const MAX_LIST_LIMIT: u32 = 1_000;
/// Payload, result and error bytes in one page of items: a page ends early past this
/// (its next cursor says where to go on), so a page of large items stays well inside
/// the 64 MiB message limit. The first item always goes, whatever its size.
pub const MAX_LIST_BYTES: usize = 16 * 1024 * 1024;
/// Ids in one requeue call.
pub const MAX_REQUEUE_IDS: usize = 10_000;
/// Payload bytes one schedule tick may enqueue (count × payload): what one enqueue
/// call can carry, so a schedule cannot make the coordinator hold more per tick than
/// any client could send.
pub const MAX_TICK_BYTES: u64 = 64 * 1024 * 1024;

/// PRODUCT.md: 1–128 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
pub fn check_queue_name(name: &str) -> Result<()> {
    check_name("queue", name)
}

/// Schedule names follow the queue names' rules.
pub fn check_schedule_name(name: &str) -> Result<()> {
    check_name("schedule", name)
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    let fail = |reason: &str| {
        Err(Error::InvalidArgument(format!(
            "invalid {kind} name '{}': {reason}",
            name.escape_debug()
        )))
    };
    if name.is_empty() {
        return fail("it is empty (use 1-128 characters of A-Z a-z 0-9 . _ -)");
    }
    if name.len() > 128 {
        return fail("it is longer than 128 characters");
    }
    if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return fail("it must start with a letter or digit");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return fail(&format!(
            "'{}' is not allowed (use A-Z a-z 0-9 . _ -)",
            bad.escape_debug()
        ));
    }
    Ok(())
}

/// Options as sent by a client: `None` = keep the current (or default) value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionsPatch {
    pub lease_timeout_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub backoff_base_ms: Option<u64>,
    pub backoff_cap_ms: Option<u64>,
    pub max_payload_bytes: Option<u64>,
    /// `Some(0)` = unlimited.
    pub max_depth: Option<u64>,
    pub retention_ms: Option<u64>,
}

impl OptionsPatch {
    /// Applies the patch to `base` and validates the result as a whole.
    pub fn apply(&self, base: &Options) -> Result<Options> {
        let options = Options {
            lease_timeout_ms: self.lease_timeout_ms.unwrap_or(base.lease_timeout_ms),
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            backoff_base_ms: self.backoff_base_ms.unwrap_or(base.backoff_base_ms),
            backoff_cap_ms: self.backoff_cap_ms.unwrap_or(base.backoff_cap_ms),
            max_payload_bytes: self.max_payload_bytes.unwrap_or(base.max_payload_bytes),
            max_depth: self.max_depth.unwrap_or(base.max_depth),
            retention_ms: self.retention_ms.unwrap_or(base.retention_ms),
        };
        check_options(&options)?;
        Ok(options)
    }
}

pub fn check_options(o: &Options) -> Result<()> {
    check_lease_ms("lease timeout", o.lease_timeout_ms)?;
    if o.max_attempts == 0 || o.max_attempts > MAX_ATTEMPTS_LIMIT {
        return Err(Error::invalid(format!(
            "max attempts must be 1-{MAX_ATTEMPTS_LIMIT}, got {}",
            o.max_attempts
        )));
    }
    if o.backoff_base_ms == 0 || o.backoff_base_ms > MAX_DELAY_MS {
        return Err(Error::invalid(format!(
            "backoff base must be 1ms-7d, got {}ms",
            o.backoff_base_ms
        )));
    }
    if o.backoff_cap_ms < o.backoff_base_ms || o.backoff_cap_ms > MAX_DELAY_MS {
        return Err(Error::invalid(format!(
            "backoff cap must be between the backoff base ({}ms) and 7d, got {}ms",
            o.backoff_base_ms, o.backoff_cap_ms
        )));
    }
    if o.max_payload_bytes == 0 || o.max_payload_bytes > MAX_PAYLOAD_LIMIT {
        return Err(Error::invalid(format!(
            "max payload must be 1 byte-{} MiB, got {} bytes",
            MAX_PAYLOAD_LIMIT / 1024 / 1024,
            o.max_payload_bytes
        )));
    }
    if o.retention_ms == 0 || o.retention_ms > MAX_RETENTION_MS {
        return Err(Error::invalid(format!(
            "retention must be 1ms-90d, got {}ms",
            o.retention_ms
        )));
    }
    Ok(())
}

pub fn check_lease_ms(what: &str, ms: u64) -> Result<()> {
    if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&ms) {
        return Err(Error::invalid(format!(
            "{what} must be between {MIN_LEASE_MS}ms and 12h, got {ms}ms"
        )));
    }
    Ok(())
}

pub fn check_delay_ms(what: &str, ms: u64) -> Result<()> {
    if ms > MAX_DELAY_MS {
        return Err(Error::invalid(format!(
            "{what} must be at most 7d, got {ms}ms"
        )));
    }
    Ok(())
}

pub fn check_worker_id(worker: &str) -> Result<()> {
    if worker.is_empty() {
        return Err(Error::invalid(
            "worker id is required (the pod name, or any stable name for this worker)",
        ));
    }
    if worker.len() > MAX_WORKER_ID_BYTES {
        return Err(Error::invalid(format!(
            "worker id is longer than {MAX_WORKER_ID_BYTES} bytes"
        )));
    }
    if worker.chars().any(char::is_control) {
        // Tables, logs and terminals print it as it is.
        return Err(Error::invalid(
            "worker id must not hold control characters (newlines, escapes and the like)",
        ));
    }
    Ok(())
}

/// Truncates an error text to `MAX_ERROR_BYTES` on a character boundary.
pub fn truncate_error(mut text: String) -> String {
    if text.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("…[truncated]");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_follow_the_spec() {
        for good in ["a", "keygen", "Q1", "0day", "a.b_c-d", &"x".repeat(128)] {
            assert!(check_queue_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "_x",
            "a b",
            "a/b",
            "é",
            &"x".repeat(129),
        ] {
            let err = check_queue_name(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}");
            assert!(err.to_string().contains("invalid queue name"), "{err}");
        }
    }

    #[test]
    fn options_are_validated_as_a_whole() {
        let base = Options::default();
        assert!(OptionsPatch::default().apply(&base).is_ok());
        let bad = [
            OptionsPatch {
                lease_timeout_ms: Some(5),
                ..Default::default()
            },
            OptionsPatch {
                lease_timeout_ms: Some(MAX_LEASE_MS + 1),
                ..Default::default()
            },
            OptionsPatch {
                max_attempts: Some(0),
                ..Default::default()
            },
            OptionsPatch {
                backoff_cap_ms: Some(10),
                ..Default::default()
            },
            OptionsPatch {
                max_payload_bytes: Some(MAX_PAYLOAD_LIMIT + 1),
                ..Default::default()
            },
            OptionsPatch {
                retention_ms: Some(0),
                ..Default::default()
            },
        ];
        for patch in bad {
            assert!(patch.apply(&base).is_err(), "{patch:?}");
        }
    }

    #[test]
    fn long_errors_are_truncated_on_a_char_boundary() {
        let text = "é".repeat(MAX_ERROR_BYTES);
        let cut = truncate_error(text);
        assert!(cut.len() <= MAX_ERROR_BYTES + 20);
        assert!(cut.ends_with("[truncated]"));
    }
}
