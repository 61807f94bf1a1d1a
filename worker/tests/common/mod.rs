//! Shared fixtures for the worker's end-to-end tests: start `workq-worker` processes
//! with their output in a log file, and talk to the coordinator in the domain's words.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
pub use workq_tests::queue_stats as stats;
pub use workq_tests::{Client, Coordinator, Process, bin_path, pb, wait_for, wait_for_async};

/// Generous bound for anything that should happen "soon" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(60);

/// A running `workq-worker` whose stdout and stderr go to `log`.
pub struct Worker {
    pub id: String,
    pub process: Process,
    pub log: PathBuf,
}

impl Worker {
    /// Starts `workq-worker --worker-id ID ARGS…` against `server`, logging to
    /// `dir/ID.log`.
    pub fn start(server: &str, dir: &Path, id: &str, args: &[String]) -> Worker {
        let log = dir.join(format!("{id}.log"));
        let file = std::fs::File::create(&log).expect("worker log");
        let mut command = Command::new(bin_path("workq-worker"));
        command
            .arg("--server")
            .arg(server)
            .arg("--worker-id")
            .arg(id)
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("WORKQ_TOKEN")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        Worker {
            id: id.to_string(),
            process: Process::spawn(&mut command),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn signal(&self, sig: Signal) {
        self.process.signal(sig);
    }

    /// Waits for the exit code, printing the log if the worker does not exit.
    pub fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
        let log = self.log.clone();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.process.wait_exit(timeout)
        }));
        match result {
            Ok(code) => code,
            Err(panic) => {
                eprintln!(
                    "--- {} log ---\n{}",
                    self.id,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&mut self, text: &str) {
        let log = self.log.clone();
        let id = self.id.clone();
        wait_for(&format!("'{text}' in {id}'s log"), SOON, || {
            let contents = std::fs::read_to_string(&log).unwrap_or_default();
            if contents.contains(text) {
                return true;
            }
            if !self.process.is_running() {
                panic!("{id} exited before logging '{text}'; log:\n{contents}");
            }
            false
        });
    }

    /// The process state letter from /proc (`T` when stopped).
    pub fn state(&self) -> Option<char> {
        proc_state(self.pid())
    }
}

/// The state letter of `pid` from /proc (`R`, `S`, `T`, `Z`…); `None` when gone.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.chars().next()
}

/// True when `pid` is gone or a zombie (killed, waiting to be reaped).
pub fn is_dead(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z'))
}

/// A 127.0.0.1 port nothing listens on (bound, then closed again).
pub fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Queue options for tests; unset fields keep the coordinator's defaults.
pub fn options(lease_timeout_ms: u64, max_attempts: u32) -> pb::QueueOptions {
    pb::QueueOptions {
        lease_timeout_ms,
        max_attempts,
        // Retry quickly so retry paths finish within a test.
        backoff_base_ms: 50,
        backoff_cap_ms: 200,
        ..Default::default()
    }
}

pub async fn create_queue(client: &mut Client, queue: &str, options: pb::QueueOptions) {
    client
        .create_queue(pb::CreateQueueRequest {
            queue: queue.into(),
            options: Some(options),
            if_not_exists: false,
        })
        .await
        .expect("create queue");
}

/// Enqueues one item per payload; returns their ids in order.
pub async fn enqueue(client: &mut Client, queue: &str, payloads: &[&str]) -> Vec<u64> {
    let items = payloads
        .iter()
        .map(|p| pb::NewItem {
            payload: p.as_bytes().to_vec().into(),
            ..Default::default()
        })
        .collect();
    client
        .enqueue(pb::EnqueueRequest {
            queue: queue.into(),
            items,
            seal: false,
        })
        .await
        .expect("enqueue")
        .into_inner()
        .results
        .iter()
        .map(|r| r.id)
        .collect()
}

pub async fn item(client: &mut Client, queue: &str, id: u64) -> pb::Item {
    client
        .get_item(pb::GetItemRequest {
            queue: queue.into(),
            id,
        })
        .await
        .expect("get item")
        .into_inner()
}

pub fn state(item: &pb::Item) -> pb::ItemState {
    pb::ItemState::try_from(item.state).unwrap_or(pb::ItemState::Unspecified)
}

/// Polls until item `id` is in `wanted`, panicking with its last state after [`SOON`].
pub async fn wait_for_state(
    client: &mut Client,
    queue: &str,
    id: u64,
    wanted: pb::ItemState,
) -> pb::Item {
    let start = std::time::Instant::now();
    loop {
        let item = item(client, queue, id).await;
        if state(&item) == wanted {
            return item;
        }
        assert!(
            start.elapsed() < SOON,
            "item {id} never reached {wanted:?}; last seen: {item:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A shell script for `exec -- sh -c SCRIPT`.
pub fn sh(script: &str) -> Vec<String> {
    vec![
        "exec".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script.into(),
    ]
}

/// Worker arguments: `flags` then the handler (e.g. [`sh`]'s).
pub fn cmd(flags: &[&str], handler: Vec<String>) -> Vec<String> {
    flags.iter().map(|f| f.to_string()).chain(handler).collect()
}
