//! A "pod": one child process in its own process group, with its output streamed line
//! by line behind `[pod-name]` and kept in a log file.
//!
//! Each pod's task owns its child: it pumps the output, waits for the exit, then kills
//! whatever is left in the process group (a container's processes all die with its
//! main process) and reports the exit code to the runner over a channel. The runner
//! only ever signals the group by its id.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc::UnboundedSender;

/// Longest line forwarded in one piece; longer lines are split so that a process
/// writing without newlines cannot make the runner buffer without bound.
const MAX_LINE_BYTES: u64 = 64 * 1024;

/// How long output may keep flowing after a pod's process group was killed: only a
/// process that left the group (setsid) can still hold the pipe open by then.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Exit code reported for a pod whose command could not be started, as a shell does.
const CANNOT_START: i32 = 127;

/// A pod's process ended.
#[derive(Debug)]
pub struct Exit {
    pub pod: String,
    /// The exit code, or 128 + N when killed by signal N (as a container runtime
    /// reports it: 143 for SIGTERM, 137 for SIGKILL).
    pub code: i32,
}

/// Where pod output and runner messages go. Clones share the status line.
#[derive(Clone, Debug)]
pub struct Output {
    /// The live status line on stderr; hidden (drawing nothing) when stderr is not a
    /// terminal. Everything else is printed through `suspend`, so it never garbles it.
    bar: ProgressBar,
    /// Pods' stdout goes to stderr too, so that stdout holds only the report (the one
    /// JSON document of `-o json`).
    stdout_is_report_only: bool,
}

impl Output {
    pub fn new(stdout_is_report_only: bool) -> Output {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
            bar.set_style(style);
        }
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Output {
            bar,
            stdout_is_report_only,
        }
    }

    pub fn is_live(&self) -> bool {
        !self.bar.is_hidden()
    }

    pub fn set_status(&self, status: String) {
        self.bar.set_message(status);
    }

    pub fn clear_status(&self) {
        self.bar.finish_and_clear();
    }

    /// A runner message on stderr.
    pub fn event(&self, message: &str) {
        self.bar.suspend(|| eprintln!("{message}"));
    }

    /// A report on stdout (the final summary).
    pub fn report(&self, text: &str) {
        self.bar.suspend(|| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        });
    }

    fn pod_line(&self, pod: &str, stream: Stream, line: &[u8]) {
        let mut buf = Vec::with_capacity(pod.len() + line.len() + 4);
        buf.push(b'[');
        buf.extend_from_slice(pod.as_bytes());
        buf.extend_from_slice(b"] ");
        buf.extend_from_slice(line);
        buf.push(b'\n');
        // A closed stdout (e.g. `| head`) must not stop the Job: write errors are ignored.
        let stream = if self.stdout_is_report_only {
            Stream::Stderr
        } else {
            stream
        };
        self.bar.suspend(|| match stream {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&buf);
                let _ = out.flush();
            }
            Stream::Stderr => {
                let _ = std::io::stderr().lock().write_all(&buf);
            }
        });
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Everything needed to start one container of a pod.
#[derive(Debug)]
pub struct Launch<'a> {
    pub job: &'a str,
    pub pod: &'a str,
    pub index: Option<u32>,
    /// 0 for a new pod, N for its N-th in-place restart.
    pub restart: u32,
    pub command: &'a [String],
    pub logs_dir: Option<&'a Path>,
}

/// The log file of one container: `<logs-dir>/<pod>.log`, and
/// `<logs-dir>/<pod>.restart-<n>.log` for its restarts.
pub fn log_path(logs_dir: &Path, pod: &str, restart: u32) -> PathBuf {
    if restart == 0 {
        logs_dir.join(format!("{pod}.log"))
    } else {
        logs_dir.join(format!("{pod}.restart-{restart}.log"))
    }
}

/// Starts the pod's process in its own process group and returns the group id. The
/// exit always arrives on `exits`, also when the command cannot be started (code 127).
pub fn start(launch: Launch<'_>, output: &Output, exits: &UnboundedSender<Exit>) -> Option<Pid> {
    let pod = launch.pod.to_string();
    let log = match launch
        .logs_dir
        .map(|dir| open_log(dir, &pod, launch.restart))
    {
        Some(Ok(file)) => Some(Arc::new(Mutex::new(file))),
        Some(Err(message)) => {
            output.event(&message);
            None
        }
        None => None,
    };
    let mut command = Command::new(&launch.command[0]);
    command
        .args(&launch.command[1..])
        .env("JOB_NAME", launch.job)
        // Kubernetes names an Indexed Job's pod's host `<job>-<index>` (the pod itself
        // is `<job>-<index>-<random>`); any other pod's host is its name.
        .env(
            "HOSTNAME",
            match launch.index {
                Some(index) => format!("{}-{index}", launch.job),
                None => pod.clone(),
            },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that stopping the pod reaches every process it
        // started, and a Ctrl-C in the terminal reaches only the runner, which then
        // stops the pods in order.
        .process_group(0)
        // Should this task be dropped (runtime shutdown), the process goes too.
        .kill_on_drop(true);
    match launch.index {
        Some(index) => command.env("JOB_COMPLETION_INDEX", index.to_string()),
        None => command.env_remove("JOB_COMPLETION_INDEX"),
    };
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            output.event(&format!(
                "job/{}: pod {pod}: cannot start '{}': {error}",
                launch.job, launch.command[0]
            ));
            let _ = exits.send(Exit {
                pod,
                code: CANNOT_START,
            });
            return None;
        }
    };
    let pgid = Pid::from_raw(child.id()? as i32);
    let pumps = [
        child.stdout.take().map(|out| {
            tokio::spawn(pump(
                out,
                pod.clone(),
                Stream::Stdout,
                log.clone(),
                output.clone(),
            ))
        }),
        child.stderr.take().map(|err| {
            tokio::spawn(pump(
                err,
                pod.clone(),
                Stream::Stderr,
                log.clone(),
                output.clone(),
            ))
        }),
    ];
    let exits = exits.clone();
    tokio::spawn(async move {
        let code = match child.wait().await {
            Ok(status) => status
                .code()
                .or_else(|| status.signal().map(|signal| 128 + signal))
                .unwrap_or(1),
            Err(_) => 1,
        };
        // The main process is gone: tear the rest of the group down, as a container
        // runtime does, so nothing of this pod outlives it.
        let _ = killpg(pgid, Signal::SIGKILL);
        for pump in pumps.into_iter().flatten() {
            let abort = pump.abort_handle();
            if tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, pump)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let _ = exits.send(Exit { pod, code });
    });
    Some(pgid)
}

fn open_log(dir: &Path, pod: &str, restart: u32) -> Result<File, String> {
    let path = log_path(dir, pod, restart);
    File::create(&path).map_err(|e| format!("cannot write pod log {}: {e}", path.display()))
}

/// Forwards one output stream line by line, and copies it raw into the log file.
async fn pump(
    stream: impl AsyncRead + Unpin,
    pod: String,
    kind: Stream,
    log: Option<Arc<Mutex<File>>>,
    output: Output,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Some(log) = &log
            && let Ok(mut file) = log.lock()
        {
            let _ = file.write_all(&line);
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        output.pod_line(&pod, kind, text);
    }
}
