//! kuard compatibility: kuard's `--keygen-*` flags, and its fixed-count keygen
//! workload (also what `keygen --count N` runs without a queue).
//!
//! kuard parses flags with Go's pflag: `--flag=v` and `--flag v` both work for
//! numbers and strings, a bare bool flag means true, and bools take a value only as
//! `--flag=false`. The fixed workload generates one key at a time (or
//! `--concurrency` at a time), stops after `--keygen-num-to-gen` keys or
//! `--keygen-time-to-run` seconds, checked between keys as kuard does, and logs
//! kuard's lines: `(ID 0) Workload starting`, `(ID 0 3/10) Item done: SHA256:…`,
//! `(ID 0) Workload exiting`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tracing::info;

use crate::handler::keygen::Key;
use crate::shutdown::{Shutdown, SignalExit};

/// kuard's keygen flags, accepted as kuard documents them.
#[derive(clap::Args, Clone, Debug, Default)]
#[command(next_help_heading = "kuard keygen flags")]
pub struct KuardFlags {
    /// Enable KeyGen workload
    #[arg(
        long,
        global = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = parse_go_bool,
        value_name = "BOOL"
    )]
    pub keygen_enable: bool,

    /// The number of keys to generate. Set to 0 for infinite
    #[arg(
        long,
        global = true,
        default_value_t = 0,
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub keygen_num_to_gen: i64,

    /// The target run time in seconds. Set to 0 for infinite
    #[arg(
        long,
        global = true,
        default_value_t = 0,
        value_name = "SECONDS",
        allow_negative_numbers = true
    )]
    pub keygen_time_to_run: i64,

    /// The MemQ server to draw work items from. If MemQ is used, other limits are
    /// ignored. (A workq coordinator's HTTP face: http://HOST:8080/memq/server)
    #[arg(long, global = true, default_value = "", value_name = "URL")]
    pub keygen_memq_server: String,

    /// The MemQ server queue to use. If MemQ is used, other limits are ignored.
    #[arg(long, global = true, default_value = "", value_name = "QUEUE")]
    pub keygen_memq_queue: String,

    /// Exit after workload is complete
    #[arg(
        long,
        global = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = parse_go_bool,
        value_name = "BOOL"
    )]
    pub keygen_exit_on_complete: bool,

    /// Exit code when workload complete
    #[arg(
        long,
        global = true,
        default_value_t = 0,
        value_name = "CODE",
        allow_negative_numbers = true
    )]
    pub keygen_exit_code: i32,
}

impl KuardFlags {
    /// True when any flag other than `--keygen-enable` differs from kuard's default.
    pub fn any_set(&self) -> bool {
        self.keygen_num_to_gen != 0
            || self.keygen_time_to_run != 0
            || !self.keygen_memq_server.is_empty()
            || !self.keygen_memq_queue.is_empty()
            || self.keygen_exit_on_complete
            || self.keygen_exit_code != 0
    }

    /// kuard's memq mode: both memq flags set.
    pub fn memq(&self) -> bool {
        !self.keygen_memq_server.is_empty() && !self.keygen_memq_queue.is_empty()
    }

    /// The process exit code for `--keygen-exit-code`, truncated as a Unix exit
    /// status is (Go's `os.Exit(256)` exits 0 too).
    pub fn exit_code(&self) -> u8 {
        self.keygen_exit_code as u8
    }
}

/// Go's `strconv.ParseBool`, which pflag uses for bool flags.
pub fn parse_go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("invalid boolean '{text}' (use true or false)")),
    }
}

/// A fixed-size keygen run (kuard's fixed mode, or `keygen --count N`).
#[derive(Clone, Debug)]
pub struct Fixed {
    /// Keys to generate; 0 means no limit.
    pub num_to_gen: u64,
    /// Stop starting keys after this long; `None` means no limit.
    pub time_to_run: Option<Duration>,
    pub bits: usize,
    /// Write key pairs as `key-N` / `key-N.pub` here.
    pub out: Option<PathBuf>,
    /// Keys generated at once (on blocking threads).
    pub concurrency: u32,
}

/// How a fixed run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FixedEnd {
    Complete,
    Signalled(SignalExit),
}

/// Runs the workload until its limit, or until a signal (the key in progress is then
/// dropped, as in kuard: no item is lost, since none was leased).
pub async fn run_fixed(work: Fixed, shutdown: &Shutdown) -> anyhow::Result<FixedEnd> {
    info!("(ID 0) Workload starting");
    let start = Instant::now();
    let end_time = work.time_to_run.map(|d| start + d);
    let mut started: u64 = 0;
    let mut generated: u64 = 0;
    let mut running: JoinSet<(u64, Result<Key, String>)> = JoinSet::new();
    loop {
        let time_up = end_time.is_some_and(|end| Instant::now() >= end);
        let count_reached = work.num_to_gen > 0 && started >= work.num_to_gen;
        if !time_up && !count_reached && running.len() < work.concurrency.max(1) as usize {
            started += 1;
            let n = started;
            let bits = work.bits;
            running.spawn(async move {
                (
                    n,
                    Key::generate_blocking(bits, format!("workq-keygen-{n}")).await,
                )
            });
            continue;
        }
        if running.is_empty() {
            break;
        }
        let finished = tokio::select! {
            _ = shutdown.draining() => {
                return Ok(FixedEnd::Signalled(shutdown.signal().unwrap_or(SignalExit(143))));
            }
            finished = running.join_next() => finished,
        };
        let Some(finished) = finished else { continue };
        let (n, key) = finished?;
        generated += 1;
        let desc = match key {
            Ok(key) => {
                if let Some(dir) = &work.out {
                    let dir = dir.clone();
                    let fingerprint = key.fingerprint();
                    tokio::task::spawn_blocking(move || key.write_pair(&dir, &format!("key-{n}")))
                        .await?
                        .map_err(|e| anyhow::anyhow!("writing key-{n}: {e}"))?;
                    fingerprint
                } else {
                    key.fingerprint()
                }
            }
            // kuard logs a failed key as done, with the error as its description.
            Err(e) => format!("Error generating key: {e}"),
        };
        let count = if work.num_to_gen > 0 {
            format!(" {generated}/{}", work.num_to_gen)
        } else {
            format!(" {generated}/Inf")
        };
        let time_left = end_time
            .map(|end| format!(" {}", rel_time(Instant::now(), end)))
            .unwrap_or_default();
        info!("(ID 0{count}{time_left}) Item done: {desc}");
    }
    info!("(ID 0) Workload exiting");
    Ok(FixedEnd::Complete)
}

/// go-humanize's `RelTime(now, end, "left", "overdue")`, which kuard appends to each
/// line when `--keygen-time-to-run` is set: `25 seconds left`, `1 minute overdue`.
pub fn rel_time(now: Instant, end: Instant) -> String {
    let (diff, label) = if now > end {
        (now - end, "overdue")
    } else {
        (end - now, "left")
    };
    const SECOND: u64 = 1;
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    const WEEK: u64 = 7 * DAY;
    const MONTH: u64 = 30 * DAY;
    const YEAR: u64 = 12 * MONTH;
    // (below this many seconds, format, divisor); None = no number.
    let magnitudes: [(u64, &str, Option<u64>); 16] = [
        (SECOND, "now", None),
        (2 * SECOND, "1 second", None),
        (MINUTE, "seconds", Some(SECOND)),
        (2 * MINUTE, "1 minute", None),
        (HOUR, "minutes", Some(MINUTE)),
        (2 * HOUR, "1 hour", None),
        (DAY, "hours", Some(HOUR)),
        (2 * DAY, "1 day", None),
        (WEEK, "days", Some(DAY)),
        (2 * WEEK, "1 week", None),
        (MONTH, "weeks", Some(WEEK)),
        (2 * MONTH, "1 month", None),
        (YEAR, "months", Some(MONTH)),
        (18 * MONTH, "1 year", None),
        (2 * YEAR, "2 years", None),
        (u64::MAX, "years", Some(YEAR)),
    ];
    // go-humanize compares with nanosecond durations: "below 1 s" is "now".
    let nanos = diff.as_nanos();
    let secs = diff.as_secs();
    let (_, unit, divisor) = magnitudes
        .iter()
        .find(|(limit, _, _)| nanos < u128::from(*limit) * 1_000_000_000)
        .copied()
        .unwrap_or(magnitudes[15]);
    match (unit, divisor) {
        ("now", _) => "now".to_string(),
        (unit, Some(div)) => format!("{} {unit} {label}", secs / div),
        (unit, None) => format!("{unit} {label}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_bools() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false));
        }
        assert!(parse_go_bool("yes").is_err());
    }

    #[test]
    fn relative_times_read_like_go_humanize() {
        let now = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(rel_time(now, now + Duration::from_millis(400)), "now");
        assert_eq!(rel_time(now, now + s(1)), "1 second left");
        assert_eq!(rel_time(now, now + s(25)), "25 seconds left");
        assert_eq!(rel_time(now, now + s(90)), "1 minute left");
        assert_eq!(rel_time(now, now + s(600)), "10 minutes left");
        assert_eq!(rel_time(now, now + s(3 * 3600)), "3 hours left");
        assert_eq!(rel_time(now + s(5), now), "5 seconds overdue");
    }

    #[tokio::test]
    async fn fixed_run_stops_at_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let work = Fixed {
            num_to_gen: 3,
            time_to_run: None,
            bits: 1024,
            out: Some(dir.path().to_path_buf()),
            concurrency: 2,
        };
        let end = run_fixed(work, &Shutdown::manual()).await.unwrap();
        assert_eq!(end, FixedEnd::Complete);
        for n in 1..=3 {
            assert!(dir.path().join(format!("key-{n}")).exists(), "key-{n}");
            assert!(
                dir.path().join(format!("key-{n}.pub")).exists(),
                "key-{n}.pub"
            );
        }
        assert!(!dir.path().join("key-4").exists());
    }

    #[tokio::test]
    async fn fixed_run_with_zero_time_to_run_stops_before_any_key() {
        let work = Fixed {
            num_to_gen: 0,
            time_to_run: Some(Duration::ZERO),
            bits: 1024,
            out: None,
            concurrency: 1,
        };
        assert_eq!(
            run_fixed(work, &Shutdown::manual()).await.unwrap(),
            FixedEnd::Complete
        );
    }
}
