//! `queue-cli job run`: carries out the [`Controller`]'s decisions with local
//! processes and turns their exits, the clock and signals back into controller events.
//!
//! One loop owns everything mutable here: the controller and the table of running
//! process groups. Pod tasks only report exits over a channel, so there is no lock.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::controller::{Action, Controller, Outcome, Timing};
use super::pod::{self, Exit, Launch, Output};
use super::spec::{JobArgs, Spec, parse_duration};
use crate::output::Format;

/// How often the live status line is refreshed (its clock ticks in seconds).
const STATUS_REFRESH: Duration = Duration::from_millis(500);

#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli job run consumers --parallelism 5 -- workq-worker --queue keygen keygen

A workq-worker command gets what `job manifest` gives it on a cluster: restart policy
Never, a pod failure policy that fails the Job (reason PodFailurePolicy) when a pod
exits 1 or 2, and a grace period of at least the worker's --grace plus 5s.

JSON (-o json): pods' output all goes to stderr, and stdout gets one document at the
end: {\"name\", \"status\" (Complete, Failed or Interrupted), \"reason\", \"message\"
(null when Complete), \"completions\" (null in work-queue mode), \"parallelism\",
\"created\", \"succeeded\", \"failed\", \"active\", \"restarts\", \"duration_ms\",
\"completed_indexes\" (Indexed only, e.g. \"0-2,4\")}")]
pub struct RunArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// Keep each pod's output (stdout and stderr) in DIR/<pod>.log; a container
    /// restarted in place (OnFailure) writes DIR/<pod>.restart-<n>.log.
    #[arg(long, value_name = "DIR")]
    pub logs_dir: Option<PathBuf>,

    /// First delay of the Job back-off (a new pod after a failure: base·2^(n−1),
    /// capped at 60×base = 10 min) and of the kubelet's in-place restart back-off
    /// (capped at 30×base = 300 s). Kubernetes fixes it at 10s; lower it to iterate
    /// faster locally.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub backoff_base: Duration,
}

/// Runs the Job to its end. Exit 0 Complete, 1 Failed, 2 bad flags, 129/130/143 when
/// stopped by SIGHUP/SIGINT/SIGTERM (every pod is stopped first).
pub async fn run(args: RunArgs, format: Format) -> ExitCode {
    let spec = match Spec::resolve(&args.job) {
        Ok(spec) => spec,
        Err(message) => return usage_error(&message),
    };
    if spec.parallelism == 0 {
        return usage_error(
            "--parallelism 0 pauses a Job; run locally it would never start a pod (use 1 or more)",
        );
    }
    if let Err(message) = check_command(&spec.command[0]) {
        return usage_error(&message);
    }
    if args.backoff_base.is_zero() {
        return usage_error("--backoff-base must be positive");
    }
    if let Some(dir) = &args.logs_dir
        && let Err(error) = std::fs::create_dir_all(dir)
    {
        eprintln!("error: cannot create --logs-dir {}: {error}", dir.display());
        return ExitCode::from(1);
    }
    let mut sigint = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(error) => return runtime_error(&format!("cannot handle SIGINT: {error}")),
    };
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => return runtime_error(&format!("cannot handle SIGTERM: {error}")),
    };
    // A closed terminal hangs up only its foreground process group, the runner: the
    // pods, in groups of their own, would be left running without this.
    let mut sighup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => return runtime_error(&format!("cannot handle SIGHUP: {error}")),
    };

    let output = Output::new(format == Format::Json);
    let timing = Timing {
        base: args.backoff_base,
    };
    let mut runner = Runner {
        controller: Controller::new(spec, timing, Instant::now().into_std()),
        running: HashMap::new(),
        kill_at: None,
        announced_backoff: None,
        output,
        logs_dir: args.logs_dir,
        exits: mpsc::unbounded_channel(),
    };
    let outcome = loop {
        let now = Instant::now();
        for action in runner.controller.sync(now.into_std()) {
            runner.act(action, now);
        }
        if let Some(outcome) = runner.controller.finished() {
            break outcome;
        }
        runner.announce_backoff(now);
        runner.show_status(now);
        let wakeup = [
            runner
                .controller
                .next_wakeup(now.into_std())
                .map(Instant::from_std),
            runner.kill_at,
            runner.output.is_live().then(|| now + STATUS_REFRESH),
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            Some(exit) = runner.exits.1.recv() => runner.exited(exit),
            _ = sleep_until(wakeup) => runner.kill_overdue(),
            _ = sigint.recv() => runner.interrupt("SIGINT"),
            _ = sigterm.recv() => runner.interrupt("SIGTERM"),
            _ = sighup.recv() => runner.interrupt("SIGHUP"),
        }
    };
    runner.output.clear_status();
    let report = match format {
        Format::Table => summary(&runner.controller, outcome),
        Format::Json => {
            let document = summary_json(&runner.controller, outcome);
            format!(
                "{}\n",
                serde_json::to_string_pretty(&document).expect("JSON values always serialize")
            )
        }
    };
    runner.output.report(&report);
    match outcome {
        Outcome::Complete => ExitCode::SUCCESS,
        Outcome::Failed(_) => ExitCode::from(1),
        // 128 + the signal's number, as a shell reports a process killed by it.
        Outcome::Interrupted("SIGHUP") => ExitCode::from(129),
        Outcome::Interrupted("SIGINT") => ExitCode::from(130),
        Outcome::Interrupted(_) => ExitCode::from(143),
    }
}

struct Runner {
    controller: Controller,
    /// Process group of every pod whose process is running, by pod name.
    running: HashMap<String, Pid>,
    /// When the pods being stopped get SIGKILL.
    kill_at: Option<Instant>,
    /// The Job back-off last reported, so each is reported once.
    announced_backoff: Option<std::time::Instant>,
    output: Output,
    logs_dir: Option<PathBuf>,
    exits: (mpsc::UnboundedSender<Exit>, mpsc::UnboundedReceiver<Exit>),
}

impl Runner {
    fn job(&self) -> &str {
        &self.controller.spec().name
    }

    fn act(&mut self, action: Action, now: Instant) {
        match action {
            Action::Create { pod, index } => {
                let at = index.map(|i| format!(" (index {i})")).unwrap_or_default();
                self.output
                    .event(&format!("job/{}: created pod {pod}{at}", self.job()));
                self.start(pod, index, 0);
            }
            Action::Restart {
                pod,
                index,
                restart,
            } => {
                self.output.event(&format!(
                    "job/{}: restarting pod {pod} in place (restart {restart})",
                    self.job()
                ));
                self.start(pod, index, restart);
            }
            Action::StopAll => {
                let grace = self.controller.spec().grace;
                if grace.is_zero() {
                    // terminationGracePeriodSeconds 0: no SIGTERM, SIGKILL at once.
                    self.output.event(&format!(
                        "job/{}: stopping {} pod(s): SIGKILL (grace 0s)",
                        self.job(),
                        self.running.len()
                    ));
                    self.kill_all();
                    return;
                }
                self.output.event(&format!(
                    "job/{}: stopping {} pod(s): SIGTERM, SIGKILL after {}",
                    self.job(),
                    self.running.len(),
                    workq_proto::duration::format(grace)
                ));
                for pgid in self.running.values() {
                    let _ = killpg(*pgid, Signal::SIGTERM);
                }
                self.kill_at = Some(now + grace);
            }
            Action::Deleted { pod } => {
                self.output.event(&format!(
                    "job/{}: pod {pod} failed (deleted while waiting for its restart)",
                    self.job()
                ));
            }
        }
    }

    fn start(&mut self, pod: String, index: Option<u32>, restart: u32) {
        let spec = self.controller.spec();
        let launch = Launch {
            job: &spec.name,
            pod: &pod,
            index,
            restart,
            command: &spec.command,
            logs_dir: self.logs_dir.as_deref(),
        };
        if let Some(pgid) = pod::start(launch, &self.output, &self.exits.0) {
            self.running.insert(pod, pgid);
        }
    }

    fn exited(&mut self, exit: Exit) {
        self.running.remove(&exit.pod);
        let now = Instant::now();
        let how = if exit.code == 0 {
            "succeeded".to_string()
        } else {
            format!("failed (exit code {})", exit.code)
        };
        self.output
            .event(&format!("job/{}: pod {} {how}", self.job(), exit.pod));
        self.controller.exited(&exit.pod, exit.code, now.into_std());
    }

    /// Says once per failure when the Job back-off holds pod creation.
    fn announce_backoff(&mut self, now: Instant) {
        let until = self.controller.backoff_until();
        if until == self.announced_backoff || self.controller.status() != "Running" {
            return;
        }
        self.announced_backoff = until;
        if let Some(left) = self.controller.backoff_remaining(now.into_std()) {
            self.output.event(&format!(
                "job/{}: back-off {} before the next pod",
                self.job(),
                workq_proto::duration::format(left)
            ));
        }
    }

    /// SIGKILL for pods still running once the grace period is over.
    fn kill_overdue(&mut self) {
        if self.kill_at.is_some_and(|at| Instant::now() >= at) {
            self.kill_all();
        }
    }

    fn kill_all(&mut self) {
        for pgid in self.running.values() {
            let _ = killpg(*pgid, Signal::SIGKILL);
        }
        self.kill_at = None;
    }

    /// First signal: stop the pods gracefully. A signal while pods are being stopped
    /// (a second one, or one after the Job failed or completed): kill them now.
    fn interrupt(&mut self, signal: &'static str) {
        if self.kill_at.is_some() {
            self.output.event(&format!(
                "job/{}: {signal} while the pods are stopping: killing them now",
                self.job()
            ));
            self.kill_all();
            return;
        }
        self.output
            .event(&format!("job/{}: {signal}: stopping the Job", self.job()));
        self.controller.interrupt(signal);
        // A Job already stopping its pods keeps its clock; otherwise `act` starts it.
    }

    fn show_status(&self, now: Instant) {
        if !self.output.is_live() {
            return;
        }
        let c = &self.controller;
        let mut line = format!(
            "job/{}  {}  active {}  completions {}",
            c.spec().name,
            c.status(),
            c.active(),
            c.completions_column()
        );
        if c.failed() > 0 {
            line.push_str(&format!("  failed {}", c.failed()));
        }
        if c.restarts() > 0 {
            line.push_str(&format!("  restarts {}", c.restarts()));
        }
        if let Some(left) = c.backoff_remaining(now.into_std()) {
            line.push_str(&format!(
                "  back-off {}",
                workq_proto::duration::format(left)
            ));
        }
        line.push_str(&format!(
            "  {}",
            workq_proto::duration::format(c.duration(now.into_std()))
        ));
        self.output.set_status(line);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The `kubectl get jobs`-like table, then the reason and details.
fn summary(controller: &Controller, outcome: Outcome) -> String {
    let now = Instant::now().into_std();
    let rows = [
        ["NAME", "STATUS", "COMPLETIONS", "DURATION"].map(String::from),
        [
            controller.spec().name.clone(),
            controller.status().to_string(),
            controller.completions_column(),
            workq_proto::duration::format(controller.duration(now)),
        ],
    ];
    let mut text = table(&rows);
    if let (Some(reason), Some(message)) = (reason(outcome), controller.message()) {
        text.push_str(&format!("reason: {reason}: {message}\n"));
    }
    if controller.spec().indexed {
        let indexes = controller.completed_indexes();
        let shown = if indexes.is_empty() { "none" } else { &indexes };
        text.push_str(&format!("completed indexes: {shown}\n"));
    }
    let mut pods = format!(
        "pods: {} created, {} succeeded, {} failed",
        controller.created(),
        controller.succeeded(),
        controller.failed()
    );
    if controller.restarts() > 0 {
        pods.push_str(&format!(", {} restarts", controller.restarts()));
    }
    text.push_str(&pods);
    text.push('\n');
    text
}

/// The end of the Job for scripts (`-o json`); the shape is in `job run --help`.
fn summary_json(controller: &Controller, outcome: Outcome) -> Value {
    let spec = controller.spec();
    let now = Instant::now().into_std();
    let mut document = json!({
        "name": spec.name,
        "status": controller.status(),
        "reason": reason(outcome),
        "message": controller.message(),
        "completions": spec.completions,
        "parallelism": spec.parallelism,
        "created": controller.created(),
        "succeeded": controller.succeeded(),
        "failed": controller.failed(),
        "active": controller.active(),
        "restarts": controller.restarts(),
        "duration_ms": controller.duration(now).as_millis() as u64,
    });
    if spec.indexed {
        document["completed_indexes"] = json!(controller.completed_indexes());
    }
    document
}

/// The reason of the Job's end, `None` when it is Complete.
fn reason(outcome: Outcome) -> Option<&'static str> {
    match outcome {
        Outcome::Complete => None,
        Outcome::Failed(reason) => Some(reason.as_str()),
        Outcome::Interrupted(_) => Some("Interrupted"),
    }
}

/// Left-aligned columns separated by three spaces, as kubectl prints them.
fn table(rows: &[[String; 4]]) -> String {
    let mut widths = [0usize; 4];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Refuses a command that cannot start. On a cluster that pod would fail and be
/// retried with back-off up to the backoff limit, minutes later; here we can tell
/// before the first pod.
fn check_command(program: &str) -> Result<(), String> {
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(Path::new(program))
    } else {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| executable(&dir.join(program)))
        })
    };
    if found {
        Ok(())
    } else {
        Err(format!("command '{program}' not found or not executable"))
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn runtime_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(1)
}
