//! `queue-cli job run`: the Job controller's semantics with short shell commands as
//! pods. Pods record what they see (HOSTNAME, JOB_COMPLETION_INDEX, their pids) in
//! files of the test's temp dir; the tests read those files and the summary.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tempfile::TempDir;
use workq_tests::{Process, bin_path, wait_for};

/// Upper bound for a whole Job run in these tests; they take well under a second or
/// two when things work.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A temp dir for one test: pods write into it, and it holds the runner's output.
struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The shell-quoted path, for use inside `sh -c` scripts.
    fn sh(&self, name: &str) -> String {
        format!("'{}'", self.path(name).display())
    }

    fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(name))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Starts `queue-cli job run ARGS` in the background, output to files.
    fn spawn_job(&self, args: &[&str]) -> Process {
        self.spawn_cli(&["job", "run"], args)
    }

    /// Starts `queue-cli VERB ARGS` in the background, output to files.
    fn spawn_cli(&self, verb: &[&str], args: &[&str]) -> Process {
        let stdout = std::fs::File::create(self.path("runner.stdout")).unwrap();
        let stderr = std::fs::File::create(self.path("runner.stderr")).unwrap();
        Process::spawn(
            Command::new(bin_path("queue-cli"))
                .args(verb)
                .args(args)
                .current_dir(self.dir.path())
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr),
        )
    }

    /// Runs `queue-cli job run ARGS` to its end.
    fn run_job(&self, args: &[&str]) -> Run {
        self.run_cli(&["job", "run"], args)
    }

    /// Runs `queue-cli VERB ARGS` to its end.
    fn run_cli(&self, verb: &[&str], args: &[&str]) -> Run {
        let mut process = self.spawn_cli(verb, args);
        let code = process.wait_exit(RUN_TIMEOUT);
        self.finished(code)
    }

    /// A stand-in `workq-worker` running `script` (a Job knows a worker Job by the
    /// file name of its command); returns its path.
    fn fake_worker(&self, script: &str) -> String {
        let dir = self.path("bin");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("workq-worker");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn finished(&self, code: Option<i32>) -> Run {
        let run = Run {
            code,
            stdout: std::fs::read_to_string(self.path("runner.stdout")).unwrap(),
            stderr: std::fs::read_to_string(self.path("runner.stderr")).unwrap(),
        };
        eprintln!("--- stdout\n{}--- stderr\n{}", run.stdout, run.stderr);
        run
    }
}

/// The one JSON document a `-o json` run printed on stdout.
fn json_document(run: &Run) -> Value {
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", run.stdout))
}

/// The summary row for `name`: its STATUS and COMPLETIONS columns.
fn summary_row(run: &Run, name: &str) -> (String, String) {
    let header = run.stdout.lines().find(|l| l.starts_with("NAME "));
    let columns: Vec<&str> = header
        .map(|h| h.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        columns,
        ["NAME", "STATUS", "COMPLETIONS", "DURATION"],
        "summary header in:\n{}",
        run.stdout
    );
    let row = run
        .stdout
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no summary row for {name} in:\n{}", run.stdout));
    let cells: Vec<&str> = row
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    (cells[1].to_string(), cells[2].to_string())
}

/// True while `pid` is a live process (a zombie waiting for its reaper is dead).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (up to 10 s) until none of the pod processes `pids` is alive.
fn wait_all_gone(pids: &[i32]) {
    wait_for(
        "every pod process to be gone",
        Duration::from_secs(10),
        || pids.iter().all(|pid| !alive(*pid)),
    );
}

fn pids(scratch: &Scratch, name: &str) -> Vec<i32> {
    scratch
        .lines(name)
        .iter()
        .map(|line| line.trim().parse().expect("a pid per line"))
        .collect()
}

#[test]
fn fixed_completions_never_exceed_parallelism_and_reach_exactly_the_completions() {
    let s = Scratch::new();
    let script = format!(
        "echo start $HOSTNAME >> {events}; sleep 0.2; echo end $HOSTNAME >> {events}",
        events = s.sh("events")
    );
    let run = s.run_job(&[
        "keys",
        "--completions",
        "7",
        "--parallelism",
        "3",
        "--",
        "sh",
        "-c",
        &script,
    ]);

    assert_eq!(run.code, Some(0));
    assert_eq!(summary_row(&run, "keys"), ("Complete".into(), "7/7".into()));
    let events = s.lines("events");
    let mut running = HashSet::new();
    let mut max_overlap = 0;
    for event in &events {
        match event.split_once(' ') {
            Some(("start", pod)) => assert!(running.insert(pod), "{pod} started twice"),
            Some(("end", pod)) => assert!(running.remove(pod), "{pod} ended unstarted"),
            _ => panic!("bad event line {event:?}"),
        }
        max_overlap = max_overlap.max(running.len());
    }
    assert!(
        max_overlap <= 3,
        "{max_overlap} pods ran at once with parallelism 3"
    );
    let starts: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e.strip_prefix("start "))
        .collect();
    assert_eq!(
        starts.len(),
        7,
        "exactly 7 pods, each with its own name: {starts:?}"
    );
    for pod in starts {
        assert!(
            pod.len() == "keys-".len() + 5 && pod.starts_with("keys-"),
            "pod name {pod} is <job>-<5 random>"
        );
    }
}

#[test]
fn pod_output_is_prefixed_with_the_pod_name_and_kept_per_pod() {
    let s = Scratch::new();
    let run = s.run_job(&[
        "hello",
        "--logs-dir",
        "logs",
        "--",
        "sh",
        "-c",
        "echo out $JOB_NAME; echo err >&2",
    ]);

    assert_eq!(run.code, Some(0));
    let line = run
        .stdout
        .lines()
        .find(|l| l.ends_with("] out hello"))
        .expect("the pod's stdout line, with JOB_NAME");
    let pod = line
        .strip_prefix('[')
        .and_then(|l| l.split_once(']'))
        .map(|(pod, _)| pod)
        .expect("[pod-name] prefix");
    assert!(run.stderr.contains(&format!("[{pod}] err")));
    let log = std::fs::read_to_string(s.path("logs").join(format!("{pod}.log"))).unwrap();
    assert!(
        log.contains("out hello\n") && log.contains("err\n"),
        "{log:?}"
    );
}

#[test]
fn failing_command_with_backoff_limit_1_fails_the_job_after_two_failures() {
    let s = Scratch::new();
    let script = format!("echo $HOSTNAME >> {}; exit 3", s.sh("attempts"));
    let run = s.run_job(&[
        "doomed",
        "--backoff-limit",
        "1",
        "--backoff-base",
        "100ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);

    assert_eq!(run.code, Some(1));
    assert_eq!(summary_row(&run, "doomed"), ("Failed".into(), "0/1".into()));
    assert!(run.stdout.contains("reason: BackoffLimitExceeded"));
    let attempts = s.lines("attempts");
    assert_eq!(attempts.len(), 2, "limit 1 fails on the second failure");
    assert_ne!(attempts[0], attempts[1], "Never: each retry is a new pod");
}

/// A command that fails on its first run and succeeds on the next; each run records
/// its HOSTNAME.
fn fail_once(s: &Scratch) -> String {
    format!(
        "echo $HOSTNAME >> {hosts}; if [ -e {ok} ]; then exit 0; fi; touch {ok}; exit 1",
        hosts = s.sh("hosts"),
        ok = s.sh("ok")
    )
}

#[test]
fn on_failure_restarts_the_same_pod_in_place() {
    let s = Scratch::new();
    let script = fail_once(&s);
    let run = s.run_job(&[
        "inplace",
        "--restart-policy",
        "OnFailure",
        "--backoff-base",
        "100ms",
        "--logs-dir",
        "logs",
        "--",
        "sh",
        "-c",
        &script,
    ]);

    assert_eq!(run.code, Some(0));
    assert_eq!(
        summary_row(&run, "inplace"),
        ("Complete".into(), "1/1".into())
    );
    let hosts = s.lines("hosts");
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0], hosts[1], "same pod name after the restart");
    let logs = s.path("logs");
    assert!(logs.join(format!("{}.log", hosts[0])).exists());
    assert!(logs.join(format!("{}.restart-1.log", hosts[0])).exists());
}

#[test]
fn never_replaces_the_failed_pod_with_a_new_one() {
    let s = Scratch::new();
    let script = fail_once(&s);
    let run = s.run_job(&[
        "renew",
        "--restart-policy",
        "Never",
        "--backoff-base",
        "100ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);

    assert_eq!(run.code, Some(0));
    assert_eq!(
        summary_row(&run, "renew"),
        ("Complete".into(), "1/1".into())
    );
    let hosts = s.lines("hosts");
    assert_eq!(hosts.len(), 2);
    assert_ne!(hosts[0], hosts[1], "a new pod, with a new name");
    assert!(run.stdout.contains("2 created, 1 succeeded, 1 failed"));
}

#[test]
fn active_deadline_stops_a_long_job_and_leaves_no_process_behind() {
    let s = Scratch::new();
    // The pods ignore SIGTERM, so only the SIGKILL after the grace period stops them;
    // each records its shell's pid and its background sleep's pid.
    let script = format!(
        "trap '' TERM; sleep 300 & echo $$ >> {pids}; echo $! >> {pids}; wait",
        pids = s.sh("pids")
    );
    let run = s.run_job(&[
        "slow",
        "--parallelism",
        "2",
        "--completions",
        "2",
        "--active-deadline",
        "1s",
        "--grace",
        "300ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);

    assert_eq!(run.code, Some(1));
    assert_eq!(summary_row(&run, "slow"), ("Failed".into(), "0/2".into()));
    assert!(run.stdout.contains("reason: DeadlineExceeded"));
    assert!(
        run.stdout
            .contains("pods: 2 created, 0 succeeded, 2 failed"),
        "pods stopped by the Job count as failed"
    );
    assert_eq!(run.stderr.matches("failed (exit code 137)").count(), 2);
    let pids = pids(&s, "pids");
    assert_eq!(pids.len(), 4, "both pods ran");
    wait_all_gone(&pids);
}

#[test]
fn indexed_mode_runs_each_index_once_and_exports_it() {
    let s = Scratch::new();
    let script = format!(
        "echo $JOB_COMPLETION_INDEX $HOSTNAME >> {}; echo ran",
        s.sh("indexes")
    );
    let run = s.run_job(&[
        "shard",
        "--completions",
        "5",
        "--parallelism",
        "2",
        "--completion-mode",
        "Indexed",
        "--",
        "sh",
        "-c",
        &script,
    ]);

    assert_eq!(run.code, Some(0));
    assert_eq!(
        summary_row(&run, "shard"),
        ("Complete".into(), "5/5".into())
    );
    assert!(run.stdout.contains("completed indexes: 0-4"));
    let mut seen: Vec<u32> = Vec::new();
    for line in s.lines("indexes") {
        let (index, host) = line.split_once(' ').expect("index and host");
        assert_eq!(host, format!("shard-{index}"), "the host is <job>-<index>");
        assert!(
            run.stdout.contains(&format!("[shard-{index}-")),
            "the pod is named <job>-<index>-<random>:\n{}",
            run.stdout
        );
        seen.push(index.parse().unwrap());
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2, 3, 4], "each index exactly once");
}

#[test]
fn work_queue_mode_creates_no_pods_after_the_first_success() {
    let s = Scratch::new();
    // One pod wins the mkdir and succeeds; the others wait for it to be done, then
    // fail. After the first success no pod is created, not even to replace failures.
    // The back-off base is long so that a replacement could only come from a bug.
    let script = format!(
        "echo $HOSTNAME >> {starts}; \
         if mkdir {lock} 2>/dev/null; then touch {done}; exit 0; fi; \
         while [ ! -e {done} ]; do sleep 0.05; done; sleep 0.3; exit 1",
        starts = s.sh("starts"),
        lock = s.sh("lock"),
        done = s.sh("done")
    );
    let run = s.run_job(&[
        "consumers",
        "--parallelism",
        "3",
        "--backoff-base",
        "5s",
        "--",
        "sh",
        "-c",
        &script,
    ]);

    assert_eq!(run.code, Some(0));
    assert_eq!(
        summary_row(&run, "consumers"),
        ("Complete".into(), "1/1 of 3".into())
    );
    assert_eq!(s.lines("starts").len(), 3, "only the first 3 pods ever ran");
    assert!(run.stdout.contains("3 created, 1 succeeded, 2 failed"));
}

#[test]
fn ctrl_c_stops_every_pod_and_leaves_no_process_behind() {
    let s = Scratch::new();
    let script = format!(
        "sleep 300 & echo $$ >> {pids}; echo $! >> {pids}; wait",
        pids = s.sh("pids")
    );
    let mut job = s.spawn_job(&["forever", "--parallelism", "3", "--", "sh", "-c", &script]);
    wait_for("3 pods to record their pids", RUN_TIMEOUT, || {
        s.lines("pids").len() == 6
    });
    let pids = pids(&s, "pids");
    assert!(pids.iter().all(|pid| alive(*pid)));

    job.signal(Signal::SIGINT);
    let code = job.wait_exit(RUN_TIMEOUT);
    let run = s.finished(code);

    assert_eq!(run.code, Some(130));
    assert!(run.stdout.contains("Interrupted"), "summary says why");
    assert!(
        run.stdout
            .contains("pods: 3 created, 0 succeeded, 3 failed"),
        "stopped pods count as failed"
    );
    wait_all_gone(&pids);
}

#[test]
fn bad_flags_are_usage_errors() {
    let s = Scratch::new();
    let run = s.run_job(&["Bad_Name", "--", "true"]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("invalid Job name"));
    let run = s.run_job(&[
        "idx",
        "--completion-mode",
        "Indexed",
        "--parallelism",
        "2",
        "--",
        "true",
    ]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("needs --completions"));
    let run = s.run_job(&["typo", "--", "no-such-command-here"]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("'no-such-command-here' not found"));
    // A negative number is the flag's bad value, not something to pass after `--`.
    for (flag, value) in [
        ("--parallelism", "-1"),
        ("--completions", "-2"),
        ("--backoff-limit", "-1"),
        ("--active-deadline", "-5s"),
    ] {
        let run = s.run_job(&["neg", flag, value, "--", "true"]);
        assert_eq!(run.code, Some(2), "{flag} {value}");
        assert!(
            run.stderr
                .contains(&format!("invalid value '{value}' for '{flag}")),
            "{flag} {value}: {}",
            run.stderr
        );
        assert!(!run.stderr.contains("use '--"), "{}", run.stderr);
    }
}

#[test]
fn sigterm_stops_every_pod_and_exits_143() {
    let s = Scratch::new();
    let script = format!("echo $$ >> {pids}; exec sleep 300", pids = s.sh("pids"));
    let mut job = s.spawn_job(&["stopme", "--parallelism", "2", "--", "sh", "-c", &script]);
    wait_for("2 pods to record their pids", RUN_TIMEOUT, || {
        s.lines("pids").len() == 2
    });
    let pids = pids(&s, "pids");

    job.signal(Signal::SIGTERM);
    let code = job.wait_exit(RUN_TIMEOUT);
    let run = s.finished(code);

    assert_eq!(run.code, Some(143));
    assert!(
        run.stdout
            .contains("reason: Interrupted: stopped by SIGTERM")
    );
    wait_all_gone(&pids);
}

#[test]
fn a_worker_usage_error_fails_the_job_at_once_by_its_pod_failure_policy() {
    let s = Scratch::new();
    let worker = bin_path("workq-worker").display().to_string();
    let run = s.run_job(&[
        "pfp",
        "--backoff-limit",
        "3",
        "--backoff-base",
        "100ms",
        "--",
        &worker,
        "--bogus-flag",
    ]);

    assert_eq!(run.code, Some(1));
    assert_eq!(summary_row(&run, "pfp"), ("Failed".into(), "0/1".into()));
    let reason = run
        .stdout
        .lines()
        .find(|l| l.starts_with("reason: "))
        .expect("a reason line");
    assert!(
        reason.starts_with("reason: PodFailurePolicy: Container worker for pod default/pfp-")
            && reason.ends_with("failed with exit code 2 matching FailJob rule at index 1"),
        "{reason}"
    );
    assert!(
        run.stdout
            .contains("pods: 1 created, 0 succeeded, 1 failed"),
        "no retry of a usage error"
    );
}

#[test]
fn a_fatal_worker_exit_stops_the_other_pods_and_json_reports_it() {
    let s = Scratch::new();
    // The first pod exits 1 (fatal) once the second one runs; the second would run
    // for 5 minutes unless stopped.
    let worker = s.fake_worker(&format!(
        "echo $$ >> {pids}\n\
         if mkdir {lock} 2>/dev/null; then\n\
           while [ $(wc -l < {pids}) -lt 2 ]; do sleep 0.05; done\n\
           echo 'fatal: bad token' >&2; exit 1\n\
         fi\n\
         exec sleep 300",
        pids = s.sh("pids"),
        lock = s.sh("lock")
    ));
    // With --backoff-limit 0 the Job would fail anyway, with BackoffLimitExceeded:
    // the reason tells the policy's rule from the limit.
    let run = s.run_cli(
        &["-o", "json", "job", "run"],
        &[
            "fatal",
            "--parallelism",
            "2",
            "--backoff-limit",
            "0",
            "--",
            &worker,
            "--queue",
            "q",
        ],
    );

    assert_eq!(run.code, Some(1));
    let job = json_document(&run);
    assert_eq!(job["name"], "fatal");
    assert_eq!(job["status"], "Failed");
    assert_eq!(job["reason"], "PodFailurePolicy");
    let message = job["message"].as_str().expect("a message");
    assert!(
        message.contains("failed with exit code 1 matching FailJob rule at index 1"),
        "{message}"
    );
    assert_eq!(
        (
            &job["created"],
            &job["succeeded"],
            &job["failed"],
            &job["active"]
        ),
        (&2.into(), &0.into(), &2.into(), &0.into()),
        "the stopped pod counts as failed too: {job}"
    );
    assert!(
        run.stderr.contains("failed (exit code 143)"),
        "{}",
        run.stderr
    );
    let pids = pids(&s, "pids");
    assert_eq!(pids.len(), 2);
    wait_all_gone(&pids);
}

#[test]
fn a_worker_job_is_refused_with_on_failure_or_a_grace_below_the_workers_in_both_verbs() {
    let s = Scratch::new();
    let worker = s.fake_worker(&format!("touch {}", s.sh("started")));
    for (flags, wanted) in [
        (
            vec!["--restart-policy", "OnFailure"],
            vec!["needs --restart-policy Never"],
        ),
        (
            vec!["--grace", "3s"],
            vec!["--grace 3s", "worker's --grace 25s", "--grace 30s or more"],
        ),
    ] {
        let job = [
            &["w"][..],
            &flags,
            &["--", worker.as_str(), "exec", "--", "true"],
        ]
        .concat();
        let run = s.run_job(&job);
        assert_eq!(run.code, Some(2), "{flags:?}");
        for text in &wanted {
            assert!(run.stderr.contains(text), "{flags:?}: {}", run.stderr);
        }
        assert!(!s.path("started").exists(), "{flags:?}: no pod started");

        let manifest = [&["w", "--image", "workq:1"][..], &job[1..]].concat();
        let generated = s.run_cli(&["job", "manifest"], &manifest);
        assert_eq!(generated.code, Some(2), "{flags:?}");
        assert_eq!(
            generated.stderr, run.stderr,
            "the same message in both verbs"
        );
    }
}

#[test]
fn a_worker_job_gets_a_grace_above_the_workers_by_default() {
    let s = Scratch::new();
    let worker = s.fake_worker("exec sleep 300");
    let run = s.run_job(&[
        "graceful",
        "--active-deadline",
        "500ms",
        "--",
        &worker,
        "--grace",
        "40s",
        "keygen",
    ]);

    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("SIGTERM, SIGKILL after 45s"),
        "the worker's 40s plus 5s, as in the manifest: {}",
        run.stderr
    );
}

#[test]
fn a_pod_exiting_0_while_being_stopped_counts_as_succeeded() {
    let s = Scratch::new();
    // One pod traps SIGTERM and exits 0, the other is ended by it.
    let script = format!(
        "if mkdir {lock} 2>/dev/null; then trap 'exit 0' TERM; fi; \
         echo $$ >> {pids}; while :; do sleep 0.1; done",
        lock = s.sh("lock"),
        pids = s.sh("pids")
    );
    let mut job = s.spawn_job(&[
        "clean",
        "--completions",
        "2",
        "--parallelism",
        "2",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    wait_for("2 pods to record their pids", RUN_TIMEOUT, || {
        s.lines("pids").len() == 2
    });

    job.signal(Signal::SIGINT);
    let code = job.wait_exit(RUN_TIMEOUT);
    let run = s.finished(code);

    assert_eq!(run.code, Some(130));
    assert_eq!(
        summary_row(&run, "clean"),
        ("Interrupted".into(), "1/2".into())
    );
    assert!(
        run.stdout
            .contains("pods: 2 created, 1 succeeded, 1 failed")
    );
    assert_eq!(run.stderr.matches(" succeeded\n").count(), 1);
    assert_eq!(run.stderr.matches("failed (exit code 143)").count(), 1);
}

#[test]
fn grace_0s_kills_at_once_without_sigterm() {
    let s = Scratch::new();
    let script = format!(
        "trap 'echo TERM >> {got}; exit 0' TERM; echo $$ >> {pids}; \
         while :; do sleep 0.1; done",
        got = s.sh("got"),
        pids = s.sh("pids")
    );
    let mut job = s.spawn_job(&["nograce", "--grace", "0s", "--", "sh", "-c", &script]);
    wait_for("the pod to record its pid", RUN_TIMEOUT, || {
        s.lines("pids").len() == 1
    });

    job.signal(Signal::SIGINT);
    let code = job.wait_exit(RUN_TIMEOUT);
    let run = s.finished(code);

    assert_eq!(run.code, Some(130));
    assert!(run.stderr.contains("failed (exit code 137)"), "SIGKILLed");
    assert!(!s.path("got").exists(), "the pod never saw a SIGTERM");
    assert!(
        run.stdout
            .contains("pods: 1 created, 0 succeeded, 1 failed")
    );
}

#[test]
fn json_output_is_one_document_on_stdout_with_pod_output_on_stderr() {
    let s = Scratch::new();
    let run = s.run_cli(
        &["-o", "json", "job", "run"],
        &[
            "js",
            "--completions",
            "2",
            "--completion-mode",
            "Indexed",
            "--",
            "sh",
            "-c",
            "echo out-line; echo err-line >&2",
        ],
    );

    assert_eq!(run.code, Some(0));
    let job = json_document(&run);
    assert_eq!(job["name"], "js");
    assert_eq!(job["status"], "Complete");
    assert!(job["reason"].is_null() && job["message"].is_null(), "{job}");
    assert_eq!(job["completions"], 2);
    assert_eq!(job["parallelism"], 1);
    assert_eq!(
        (
            &job["created"],
            &job["succeeded"],
            &job["failed"],
            &job["active"]
        ),
        (&2.into(), &2.into(), &0.into(), &0.into()),
        "{job}"
    );
    assert_eq!(job["completed_indexes"], "0-1");
    assert!(job["duration_ms"].is_u64(), "{job}");
    assert_eq!(run.stderr.matches("] out-line\n").count(), 2);
    assert_eq!(run.stderr.matches("] err-line\n").count(), 2);

    let manifest = s.run_cli(
        &["-o", "json", "job", "manifest"],
        &["js", "--image", "w", "--", "true"],
    );
    assert_eq!(manifest.code, Some(2));
    assert!(manifest.stdout.is_empty());
    assert!(
        manifest
            .stderr
            .contains("job manifest prints YAML; -o json is not supported")
    );
}
