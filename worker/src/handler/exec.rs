//! The `exec` handler: runs `CMD ARGS…` once per item.
//!
//! The payload goes to the command's stdin; `WORKQ_QUEUE`, `WORKQ_ITEM_ID`,
//! `WORKQ_ATTEMPT` (and `WORKQ_WORKER_ID`) are set in its environment. Exit 0 acks the
//! item with the tail of stdout (at most 64 KiB) as its result; an exit code listed in
//! `--permanent-failure-codes` fails it permanently (DEAD); any other failure is
//! retried with the stderr tail as the error.
//!
//! Each command runs in its own process group, and the worker owns that group: when
//! the item times out (`--item-timeout`), is cancelled (lease lost, shutdown) or the
//! command exits leaving background processes behind, the whole group gets SIGKILL,
//! so nothing an item started outlives it.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Item, Outcome};

/// Most bytes of stdout kept as the item's result (the tail, when there is more).
pub const RESULT_TAIL_BYTES: usize = 64 * 1024;
/// Most bytes of stderr kept for the error text: enough for a stack trace's end,
/// small enough to keep in every failed item.
pub const ERROR_TAIL_BYTES: usize = 4 * 1024;

/// The command to run per item and how to judge its exit.
#[derive(Debug)]
pub struct Exec {
    pub program: String,
    pub args: Vec<String>,
    /// Exit codes that mean "this item can never succeed".
    pub permanent_failure_codes: Vec<i32>,
    /// Kill the command (its whole process group) after this long.
    pub item_timeout: Option<Duration>,
}

impl Exec {
    pub async fn run(&self, item: &Item) -> Outcome {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(&self.args)
            .env("WORKQ_QUEUE", &item.queue)
            .env("WORKQ_ITEM_ID", item.id.to_string())
            .env("WORKQ_ATTEMPT", item.attempt.to_string())
            .env("WORKQ_WORKER_ID", &item.worker_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => return spawn_failure(&self.program, e),
        };
        // Declared after `child`, so on cancellation it drops (and kills the group)
        // while the leader is still unreaped and its pid cannot have been reused.
        let mut group = Group::new(child.id());
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let payload = item.payload.as_slice();

        let work = async {
            let feed = async {
                if let Some(mut stdin) = stdin {
                    // The command may exit without reading its input: that is its call.
                    let _ = stdin.write_all(payload).await;
                    let _ = stdin.shutdown().await;
                }
            };
            let wait = async {
                let status = child.wait().await;
                // Background processes the command left behind would hold its pipes
                // open; they die with the item.
                if group.kill() {
                    tracing::warn!(
                        item = item.id,
                        "killed processes the command left running in its process group"
                    );
                }
                group.disarm();
                status
            };
            let (status, out, err, ()) = tokio::join!(
                wait,
                read_tail(stdout, RESULT_TAIL_BYTES),
                read_tail(stderr, ERROR_TAIL_BYTES),
                feed
            );
            (status, out, err)
        };

        let finished = match self.item_timeout {
            Some(limit) => tokio::time::timeout(limit, work).await.ok(),
            None => Some(work.await),
        };
        let Some((status, stdout, stderr)) = finished else {
            group.kill();
            let limit = self.item_timeout.unwrap_or_default();
            return Outcome::Retry(format!(
                "timed out after {} (--item-timeout); killed its process group",
                workq_proto::duration::format(limit)
            ));
        };
        let status = match status {
            Ok(status) => status,
            Err(e) => return Outcome::Retry(format!("waiting for {}: {e}", self.program)),
        };
        match (status.code(), status.signal()) {
            (Some(0), _) => Outcome::Done(stdout),
            (Some(code), _) => {
                let error = with_stderr(format!("exit code {code}"), &stderr);
                if self.permanent_failure_codes.contains(&code) {
                    Outcome::Permanent(error)
                } else {
                    Outcome::Retry(error)
                }
            }
            (None, signal) => {
                let name = signal
                    .and_then(|s| Signal::try_from(s).ok())
                    .map_or_else(|| format!("{signal:?}"), |s| s.as_str().to_string());
                Outcome::Retry(with_stderr(format!("killed by {name}"), &stderr))
            }
        }
    }
}

fn spawn_failure(program: &str, error: std::io::Error) -> Outcome {
    match error.kind() {
        // Every item would fail the same way: stop the worker, keep the items.
        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
            Outcome::Fatal(format!("cannot run {program}: {error}"))
        }
        // Not a program this system runs (a script without a `#!` line, another
        // architecture's binary): the same for every item too.
        _ if error.raw_os_error() == Some(nix::libc::ENOEXEC) => Outcome::Fatal(format!(
            "cannot run {program}: {error} (a script needs a #! line, a binary this machine's architecture)"
        )),
        // Out of processes, memory, file descriptors: this worker's problem, not the item's.
        _ => Outcome::Release(format!("cannot start {program}: {error}")),
    }
}

fn with_stderr(head: String, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        head
    } else {
        format!("{head}: {text}")
    }
}

/// Reads a pipe to its end, keeping only the last `limit` bytes.
async fn read_tail(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Vec<u8> {
    let mut tail = Vec::new();
    let Some(mut pipe) = pipe else {
        return tail;
    };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&chunk[..n]);
                // Trim in batches so a chatty command costs amortised O(1) per byte.
                if tail.len() > 2 * limit {
                    tail.drain(..tail.len() - limit);
                }
            }
        }
    }
    if tail.len() > limit {
        tail.drain(..tail.len() - limit);
    }
    tail
}

/// The process group of one running command; SIGKILLs the group when dropped armed.
struct Group {
    pgid: Option<Pid>,
}

impl Group {
    fn new(leader: Option<u32>) -> Group {
        Group {
            pgid: leader.map(|pid| Pid::from_raw(pid as i32)),
        }
    }

    /// SIGKILLs every process in the group; true if there was any.
    fn kill(&mut self) -> bool {
        let Some(pgid) = self.pgid else {
            return false;
        };
        let killed = killpg(pgid, Signal::SIGKILL).is_ok();
        if killed {
            reap_orphans(pgid);
        }
        killed
    }

    /// The leader has been reaped: its id may be reused, so never signal it again.
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// As PID 1 (a container's entrypoint) the worker inherits every orphan, including
/// the background processes of a killed group, and nobody else will reap them. Reap
/// the zombies of that group only: tokio reaps the commands themselves (each the
/// leader of its own group), so this never takes another item's exit status.
fn reap_orphans(pgid: Pid) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    if std::process::id() != 1 {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let group = Pid::from_raw(-pgid.as_raw());
    runtime.spawn(async move {
        // SIGKILL takes effect quickly but not instantly: look for a few seconds.
        for _ in 0..50 {
            loop {
                match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(_) => continue,
                    // ECHILD: none of our children is left in the group.
                    Err(_) => return,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Checks at start-up that `program` can be run, so a typo is a usage error rather
/// than a fatal error on the first item.
pub fn check_program(program: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return if runnable(Path::new(program)) {
            Ok(())
        } else {
            Err(format!("{program} is not an executable file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| runnable(&dir.join(program))) {
        Ok(())
    } else {
        Err(format!("{program} was not found in PATH"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(payload: &str) -> Item {
        Item {
            queue: "q".into(),
            id: 42,
            attempt: 3,
            payload: payload.as_bytes().to_vec(),
            worker_id: "w-1".into(),
        }
    }

    fn sh(script: &str) -> Exec {
        Exec {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            permanent_failure_codes: vec![3, 4],
            item_timeout: None,
        }
    }

    #[tokio::test]
    async fn payload_on_stdin_and_item_in_the_environment() {
        let exec = sh(r#"read p; echo "$p $WORKQ_QUEUE $WORKQ_ITEM_ID $WORKQ_ATTEMPT""#);
        match exec.run(&item("hello")).await {
            Outcome::Done(out) => assert_eq!(out, b"hello q 42 3\n"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn result_is_the_last_64_kib_of_stdout() {
        // 100,000 bytes of digits ending in a marker line.
        let exec = sh("head -c 100000 /dev/zero | tr '\\0' 7; echo; echo END");
        let Outcome::Done(out) = exec.run(&item("")).await else {
            panic!("exec failed");
        };
        assert_eq!(out.len(), RESULT_TAIL_BYTES);
        assert!(out.ends_with(b"7\nEND\n"));
    }

    #[tokio::test]
    async fn permanent_codes_and_other_codes() {
        match sh("echo bad input >&2; exit 3").run(&item("")).await {
            Outcome::Permanent(e) => assert_eq!(e, "exit code 3: bad input"),
            other => panic!("{other:?}"),
        }
        match sh("echo flaky >&2; exit 1").run(&item("")).await {
            Outcome::Retry(e) => assert_eq!(e, "exit code 1: flaky"),
            other => panic!("{other:?}"),
        }
        match sh("kill -9 $$").run(&item("")).await {
            Outcome::Retry(e) => assert_eq!(e, "killed by SIGKILL"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let mut exec = sh(&format!(
            "sleep 60 & echo $! > {}; wait",
            pid_file.display()
        ));
        exec.item_timeout = Some(Duration::from_millis(300));
        match exec.run(&item("")).await {
            Outcome::Retry(e) => assert!(e.contains("timed out"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_gone(&pid_file).await;
    }

    #[tokio::test]
    async fn background_leftovers_die_with_the_item() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let exec = sh(&format!(
            "sleep 60 & echo $! > {}; echo ok",
            pid_file.display()
        ));
        match exec.run(&item("")).await {
            Outcome::Done(out) => assert_eq!(out, b"ok\n"),
            other => panic!("{other:?}"),
        }
        assert_gone(&pid_file).await;
    }

    #[tokio::test]
    async fn a_missing_command_is_fatal_not_the_items_fault() {
        let exec = Exec {
            program: "/nonexistent/workq-test-cmd".into(),
            args: vec![],
            permanent_failure_codes: vec![],
            item_timeout: None,
        };
        assert!(matches!(exec.run(&item("")).await, Outcome::Fatal(_)));
        assert!(check_program("/nonexistent/workq-test-cmd").is_err());
        assert!(check_program("workq-no-such-command-anywhere").is_err());
        assert!(check_program("sh").is_ok());
    }

    /// Waits until `pid` no longer exists (zombies count as gone: they were killed).
    /// The process whose pid the item's command wrote to `pid_file` is gone (or a
    /// zombie) within 10 s.
    async fn assert_gone(pid_file: &std::path::Path) {
        let pid = std::fs::read_to_string(pid_file).unwrap();
        let pid: i32 = pid.trim().parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
            if stat.is_empty() || state == Some('Z') {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} still running: {stat}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
