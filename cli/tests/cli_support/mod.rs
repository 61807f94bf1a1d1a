//! Shared by the `cli_*` tests: a real coordinator on an ephemeral port and helpers
//! that run `queue-cli` against it and read its output.

#![allow(dead_code)]

use std::time::Duration;

use assert_cmd::Command;
use serde_json::Value;
use workq_tests::{Coordinator, bin_path};

/// Longest any single CLI run may take before the test fails (lease long-polls
/// included); assert_cmd kills the process when it is exceeded.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A coordinator plus the CLI pointed at it.
pub struct Env {
    pub coordinator: Coordinator,
    /// Holds the token file for as long as the coordinator runs.
    _token_dir: Option<tempfile::TempDir>,
}

impl Env {
    /// An in-memory coordinator on 127.0.0.1, port 0.
    pub fn start() -> Env {
        Env {
            coordinator: Coordinator::start_with(&["--in-memory"]),
            _token_dir: None,
        }
    }

    /// One with a data dir (strict durability), for restarts.
    pub fn start_on_disk() -> Env {
        Env {
            coordinator: Coordinator::start(),
            _token_dir: None,
        }
    }

    /// One that wants `token` on every call.
    pub fn start_with_token(token: &str) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("write token file");
        let coordinator = Coordinator::start_with(&[
            "--in-memory",
            "--token-file",
            token_file.to_str().expect("utf-8 path"),
        ]);
        Env {
            coordinator,
            _token_dir: Some(dir),
        }
    }

    pub fn url(&self) -> &str {
        &self.coordinator.grpc_url
    }

    /// `queue-cli` with WORKQ_SERVER set to this coordinator and no token.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(bin_path("queue-cli"));
        command
            .env("WORKQ_SERVER", self.url())
            .env_remove("WORKQ_TOKEN")
            .timeout(RUN_TIMEOUT);
        command
    }

    /// Runs `queue-cli ARGS`, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.cli().args(args).output().expect("run queue-cli");
        assert!(
            output.status.success(),
            "queue-cli {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 stdout")
    }

    /// Runs `queue-cli -o json ARGS`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let stdout = self.ok(&all);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("queue-cli {args:?} printed invalid JSON ({e}):\n{stdout}"))
    }

    /// Runs `queue-cli ARGS`, asserts it fails with `code`, returns the stderr line.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        fails_with(self.cli().args(args), code, args)
    }

    /// `stats Q -o json`'s `stats` object.
    pub fn stats(&self, queue: &str) -> Value {
        self.json(&["stats", queue])["stats"].clone()
    }

    /// Leases one item (waiting up to 10 s), returning the lease object.
    pub fn lease_one(&self, queue: &str) -> Value {
        let response = self.json(&["lease", queue, "--wait", "10s"]);
        let leases = response["leases"].as_array().expect("leases array");
        assert_eq!(leases.len(), 1, "expected one lease, got {response}");
        leases[0].clone()
    }
}

/// Runs a prepared command, asserts exit `code` and exactly one line on stderr
/// without Rust debug noise; returns that line.
pub fn fails_with(command: &mut Command, code: i32, args: &[&str]) -> String {
    let output = command.output().expect("run queue-cli");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(
        output.status.code(),
        Some(code),
        "queue-cli {args:?}: expected exit {code}, got {}\nstdout: {}\nstderr: {stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
    );
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("Backtrace")
            && !stderr.contains("Status {"),
        "queue-cli {args:?} leaked internals:\n{stderr}"
    );
    if code == 1 {
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "queue-cli {args:?}: expected one error line, got:\n{stderr}"
        );
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
    stderr.trim_end().to_string()
}

/// Where each header of a `kubectl get`-style table starts, in characters (a cell
/// cut short ends in a 3-byte `…`, so bytes would not line up).
pub fn column_starts(header: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut previous = ' ';
    for (i, c) in header.chars().enumerate() {
        if c != ' ' && previous == ' ' {
            starts.push(i);
        }
        previous = c;
    }
    starts
}

/// Asserts every row of `table` has a cell starting at each header's column, and
/// returns the rows as cells.
pub fn parse_table(table: &str) -> Vec<Vec<String>> {
    let mut lines = table.lines();
    let header = lines.next().expect("table header");
    let starts = column_starts(header);
    let mut rows = vec![
        header
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    for line in lines {
        let chars: Vec<char> = line.chars().collect();
        let mut cells = Vec::new();
        for (n, &start) in starts.iter().enumerate() {
            let end = starts
                .get(n + 1)
                .copied()
                .unwrap_or(chars.len())
                .min(chars.len());
            assert!(
                start < chars.len() && chars[start] != ' ',
                "row {line:?} has no cell under column {n} of {header:?}"
            );
            if start > 0 {
                assert_eq!(chars[start - 1], ' ', "misaligned row {line:?}");
            }
            cells.push(
                chars[start..end]
                    .iter()
                    .collect::<String>()
                    .trim()
                    .to_string(),
            );
        }
        rows.push(cells);
    }
    rows
}
