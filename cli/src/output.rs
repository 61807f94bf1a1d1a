//! Rendering: `kubectl get`-style aligned tables for people, and the stable JSON
//! shapes scripts rely on. Every command's JSON is built here from the `workq.v1`
//! messages, so field names stay the proto's snake_case names in one place.
//!
//! JSON conventions (documented in `--help`): durations are milliseconds in `*_ms`
//! fields, timestamps Unix milliseconds in `*_at_ms` fields (0 = unset), lease tokens
//! are strings (opaque 64-bit numbers that JSON tools would round), payloads and
//! results are UTF-8 strings, or `null` plus a `*_base64` field when not UTF-8.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use serde_json::{Value, json};
use workq_proto::duration;
use workq_proto::pb;

/// `-o table|json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON document per command, stable for scripts.
    Json,
}

/// A table printed like `kubectl get`: upper-case headers, columns padded to the
/// widest cell, three spaces apart, the last column unpadded.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let last = row.len() - 1;
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i < last {
                    let pad = widths[i] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        out!("{}", self.render());
    }
}

/// Writes to stdout, as `print!` does. A reader that has gone away (`queue-cli … |
/// head`) ends the command quietly with exit 141, as SIGPIPE ends other Unix tools:
/// Rust ignores SIGPIPE, and `print!` would panic on the broken pipe. SIGPIPE itself
/// stays ignored, so that a coordinator closing its socket is an error to report.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `print!` to stdout through [`write_out`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!($($arg)*))
    };
}

/// `println!` to stdout through [`write_out`].
macro_rules! outln {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};

/// Key/value lines for one object (`stats`, `item`), like `kubectl describe`.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, value) in fields {
        outln!("{:<width$} {value}", format!("{key}:"), width = width);
    }
}

/// Pretty JSON on stdout.
pub fn print_json(value: &Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values always serialize")
    );
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `12s` since a timestamp, `-` when unset.
pub fn age(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    duration::format(Duration::from_millis(now_ms().saturating_sub(at_ms)))
}

/// `in 25s` until a timestamp, `-` when unset.
pub fn until(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let now = now_ms();
    if at_ms <= now {
        "now".into()
    } else {
        format!(
            "in {}",
            duration::format(Duration::from_millis(at_ms - now))
        )
    }
}

/// A millisecond count as `30s`, `5m00s`; `-` for 0 when 0 means unknown/unset.
pub fn millis(ms: u64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        duration::format(Duration::from_millis(ms))
    }
}

/// Completions per second, `12.5/s`.
pub fn rate(per_sec: f64) -> String {
    if per_sec >= 100.0 {
        format!("{per_sec:.0}/s")
    } else {
        format!("{per_sec:.1}/s")
    }
}

/// `n` and the noun, plural unless `n` is 1: "1 item", "3 items".
pub fn count(n: u64, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

pub fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.into()
}

/// Bytes shown in a table cell: lossy UTF-8, control characters escaped, cut at
/// `max` characters with `…`.
pub fn cell_text(bytes: &[u8], max: usize) -> String {
    let text: String = String::from_utf8_lossy(bytes)
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if text.chars().count() > max {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        text
    }
}

/// Inserts `name` (a UTF-8 string, or `null`) and, for non-UTF-8 bytes,
/// `name_base64` into a JSON object.
pub fn insert_bytes(object: &mut Value, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => object[name] = json!(text),
        Err(_) => {
            object[name] = Value::Null;
            object[format!("{name}_base64")] = json!(base64(bytes));
        }
    }
}

/// Standard base64 with padding (RFC 4648), for payloads that are not UTF-8.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn state_name(state: i32) -> &'static str {
    pb::ItemState::try_from(state)
        .unwrap_or(pb::ItemState::Unspecified)
        .short_name()
}

// ---- JSON shapes ------------------------------------------------------------------

pub fn options_json(o: &pb::QueueOptions) -> Value {
    json!({
        "lease_timeout_ms": o.lease_timeout_ms,
        "max_attempts": o.max_attempts,
        "backoff_base_ms": o.backoff_base_ms,
        "backoff_cap_ms": o.backoff_cap_ms,
        "max_payload_bytes": o.max_payload_bytes,
        "max_depth": o.max_depth,
        "retention_ms": o.retention_ms,
    })
}

pub fn stats_json(s: &pb::QueueStats) -> Value {
    json!({
        "queue": s.queue,
        "ready": s.ready,
        "delayed": s.delayed,
        "leased": s.leased,
        "done": s.done,
        "dead": s.dead,
        "sealed": s.sealed,
        "drained": s.drained,
        "total_enqueued": s.total_enqueued,
        "total_deliveries": s.total_deliveries,
        "total_completed": s.total_completed,
        "total_failed": s.total_failed,
        "total_expired": s.total_expired,
        "total_dead": s.total_dead,
        "total_purged": s.total_purged,
        "total_deduplicated": s.total_deduplicated,
        "oldest_ready_age_ms": s.oldest_ready_age_ms,
        "rate_10s": s.rate_10s,
        "rate_1m": s.rate_1m,
        "eta_ms": s.eta_ms,
        "workers": s.workers,
        "at_ms": s.at_ms,
    })
}

pub fn queue_json(q: &pb::QueueInfo) -> Value {
    json!({
        "name": q.name,
        "created_at_ms": q.created_at_ms,
        "options": options_json(&q.options.unwrap_or_default()),
        "stats": stats_json(&q.stats.clone().unwrap_or_default()),
    })
}

pub fn item_json(i: &pb::Item) -> Value {
    let mut value = json!({
        "id": i.id,
        "queue": i.queue,
        "state": state_name(i.state),
        "priority": i.priority,
        "key": i.key,
        "attempts": i.attempts,
        "enqueued_at_ms": i.enqueued_at_ms,
        "ready_at_ms": i.ready_at_ms,
        "lease_deadline_at_ms": i.lease_deadline_at_ms,
        "worker_id": i.worker_id,
        "done_at_ms": i.done_at_ms,
        "last_error": i.last_error,
    });
    insert_bytes(&mut value, "payload", &i.payload);
    insert_bytes(&mut value, "result", &i.result);
    value
}

pub fn lease_json(l: &pb::Lease) -> Value {
    let mut value = json!({
        "id": l.id,
        "token": l.token.to_string(),
        "attempt": l.attempt,
        "priority": l.priority,
        "key": l.key,
        "deadline_at_ms": l.deadline_at_ms,
        "enqueued_at_ms": l.enqueued_at_ms,
    });
    insert_bytes(&mut value, "payload", &l.payload);
    value
}

pub fn worker_json(w: &pb::Worker) -> Value {
    json!({
        "id": w.id,
        "queue": w.queue,
        "last_seen_at_ms": w.last_seen_at_ms,
        "in_flight": w.in_flight,
        "completed": w.completed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align_like_kubectl() {
        let mut table = Table::new(&["NAME", "READY", "SEALED"]);
        table.row(vec!["keygen".into(), "100".into(), "no".into()]);
        table.row(vec!["q".into(), "7".into(), "yes".into()]);
        assert_eq!(
            table.render(),
            "NAME     READY   SEALED\nkeygen   100     no\nq        7       yes\n"
        );
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn non_utf8_payloads_get_a_base64_field() {
        let mut value = json!({});
        insert_bytes(&mut value, "payload", &[0xff, 0x00]);
        assert_eq!(value["payload"], Value::Null);
        assert_eq!(value["payload_base64"], "/wA=");
        insert_bytes(&mut value, "result", b"ok");
        assert_eq!(value["result"], "ok");
    }

    #[test]
    fn cells_are_cut_and_escaped() {
        assert_eq!(cell_text(b"a\nb", 10), "a\\nb");
        assert_eq!(cell_text(b"abcdefgh", 5), "abcd…");
    }
}
