//! The Job spec shared by `job run` and `job manifest`: the flags, and the defaults
//! and validation the API server applies to a `batch/v1` Job (`SetDefaults_Job`).
//!
//! Both verbs resolve their flags through [`Spec::resolve`], so the local runner and
//! the generated manifest can never disagree about what a flag combination means.
//! That includes what a `workq-worker` command adds to a Job (k8s-jobs.md §8, §13):
//! `restartPolicy: Never`, a pod failure policy that fails the Job on the worker's
//! fatal and usage exit codes, and a grace period above the worker's own `--grace`.

use std::path::Path;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Kubernetes' limit on a Job name: it ends up in the `batch.kubernetes.io/job-name`
/// label, whose values are at most 63 characters.
const MAX_NAME_LEN: usize = 63;

/// Kubernetes' limit on `completions` for Indexed Jobs (validation of `spec.completions`).
const MAX_INDEXED_COMPLETIONS: u32 = 100_000;

/// `terminationGracePeriodSeconds` when `--grace` is not given: Kubernetes' default.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The worker's binary name; a Job whose command runs it is a worker Job.
pub const WORKER: &str = "workq-worker";
/// The container name of a worker Job, which its pod failure policy names.
const WORKER_CONTAINER: &str = "worker";
/// The worker's `--grace` default (PRODUCT.md: 25 s, under Kubernetes' 30 s).
const WORKER_DEFAULT_GRACE: Duration = Duration::from_secs(25);
/// Margin between the worker's own grace and the pod's: the worker needs a moment
/// after its grace to release leases and exit before the SIGKILL.
const GRACE_MARGIN: Duration = Duration::from_secs(5);
/// The worker's exit codes for a fatal error (1) and a usage error (2): retrying a pod
/// cannot fix either, so they fail the Job at once instead of burning the back-off.
const WORKER_FATAL_EXIT_CODES: &[i32] = &[1, 2];

/// The flags that describe a Job, common to `job run` and `job manifest`.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Job name: a DNS subdomain (lowercase letters, digits, '-' and '.') of at most 63
    /// characters. Pods are named after it.
    pub name: String,

    /// Successful pods needed to complete the Job (default 1). Leave it unset and set
    /// --parallelism for work-queue mode: the Job completes when one pod has succeeded
    /// and none is still running, and no pod is created after the first success.
    // Negative numbers are taken as values, so that they get the number's error
    // rather than clap's tip to pass them after `--` (which would make them part of
    // the pod's command).
    #[arg(long, allow_negative_numbers = true)]
    pub completions: Option<u32>,

    /// Pods running at once (default 1).
    #[arg(long, allow_negative_numbers = true)]
    pub parallelism: Option<u32>,

    /// NonIndexed: any success counts. Indexed: pod i gets JOB_COMPLETION_INDEX=i, and
    /// the Job needs one success per index 0..completions-1.
    #[arg(long, value_enum, ignore_case = true, default_value_t = CompletionMode::NonIndexed)]
    pub completion_mode: CompletionMode,

    /// Never: a failed pod is replaced by a new pod (new name) after the Job back-off.
    /// OnFailure: the failed pod is restarted in place (same name) after the kubelet's
    /// restart back-off. Default Never, as `kubectl create job`.
    #[arg(long, value_enum, ignore_case = true, default_value_t = RestartPolicy::Never)]
    pub restart_policy: RestartPolicy,

    /// Failures tolerated before the Job fails with BackoffLimitExceeded. Never: the
    /// Job fails on failed pod number limit+1. OnFailure: when the restarts reach the
    /// limit (the controller compares restartCount >= backoffLimit).
    #[arg(long, default_value_t = 6, allow_negative_numbers = true)]
    pub backoff_limit: u32,

    /// Fail the Job with DeadlineExceeded once it has been active this long (e.g. 90s,
    /// 10m), however many pods it created; running pods are stopped.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub active_deadline: Option<Duration>,

    /// Termination grace period: pods being stopped get SIGTERM, then SIGKILL after
    /// this long; 0s sends SIGKILL at once (terminationGracePeriodSeconds). Default
    /// 30s, Kubernetes' default; for a workq-worker command, at least the worker's own
    /// --grace (25s unless given) plus 5s, and a shorter --grace is refused.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub grace: Option<Duration>,

    /// The pod's command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `spec.completionMode`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionMode {
    #[value(name = "NonIndexed")]
    NonIndexed,
    #[value(name = "Indexed")]
    Indexed,
}

/// `spec.template.spec.restartPolicy` (a Job allows only these two).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    #[value(name = "Never")]
    Never,
    #[value(name = "OnFailure")]
    OnFailure,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "Never",
            RestartPolicy::OnFailure => "OnFailure",
        }
    }
}

/// A Job spec after defaulting and validation.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    /// `None` is work-queue mode.
    pub completions: Option<u32>,
    pub parallelism: u32,
    pub indexed: bool,
    pub restart_policy: RestartPolicy,
    pub backoff_limit: u32,
    pub active_deadline: Option<Duration>,
    /// The effective termination grace period (for a worker Job, above the worker's).
    pub grace: Duration,
    pub command: Vec<String>,
    /// The pod's (only) container, as the manifest names it and policy messages cite it.
    pub container: String,
    /// Set when the command is `workq-worker`.
    pub worker: Option<Worker>,
    /// `spec.podFailurePolicy` (worker Jobs only).
    pub pod_failure_policy: Option<PodFailurePolicy>,
}

/// What the Job needs to know about a `workq-worker` command.
#[derive(Debug, Clone)]
pub struct Worker {
    /// The worker's own `--grace`.
    pub grace: Duration,
    /// It leases from a queue (`--queue`), so it talks to a coordinator; `keygen
    /// --count N` without a queue does not.
    pub leases: bool,
}

/// `spec.podFailurePolicy`: rules evaluated in order on a failed pod, first match wins
/// (k8s-jobs.md §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFailurePolicy {
    pub rules: Vec<PodFailureRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodFailureRule {
    /// `action: Ignore` on the `DisruptionTarget` condition: evictions, preemption and
    /// node drains. Local pods are never disrupted, so `job run` never matches it.
    IgnoreDisruption,
    /// `action: FailJob` on the container exiting with one of these codes
    /// (`operator: In`; sorted, no 0).
    FailJobOnExitCodes { container: String, codes: Vec<i32> },
}

/// A [`PodFailurePolicy`] rule that matched a pod's exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMatch {
    /// The rule's position in the policy, as Kubernetes' message gives it.
    pub index: usize,
    pub container: String,
}

impl PodFailurePolicy {
    /// The worker's: disruptions are not its fault; its fatal and usage exits cannot be
    /// fixed by a retry.
    fn worker() -> PodFailurePolicy {
        PodFailurePolicy {
            rules: vec![
                PodFailureRule::IgnoreDisruption,
                PodFailureRule::FailJobOnExitCodes {
                    container: WORKER_CONTAINER.into(),
                    codes: WORKER_FATAL_EXIT_CODES.to_vec(),
                },
            ],
        }
    }

    /// The first `FailJob` rule matching a container that exited with `code`; exit 0
    /// matches nothing (containers that succeeded are skipped).
    pub fn fail_job(&self, code: i32) -> Option<RuleMatch> {
        if code == 0 {
            return None;
        }
        self.rules
            .iter()
            .enumerate()
            .find_map(|(index, rule)| match rule {
                PodFailureRule::FailJobOnExitCodes { container, codes }
                    if codes.contains(&code) =>
                {
                    Some(RuleMatch {
                        index,
                        container: container.clone(),
                    })
                }
                _ => None,
            })
    }
}

impl Spec {
    /// Applies the API server's defaults and rejects what it would reject.
    pub fn resolve(args: &JobArgs) -> Result<Spec, String> {
        validate_name(&args.name)?;
        // SetDefaults_Job: both unset → both 1; only parallelism unset → 1; only
        // completions unset → it stays unset (work-queue mode).
        let (completions, parallelism) = match (args.completions, args.parallelism) {
            (None, None) => (Some(1), 1),
            (completions, parallelism) => (completions, parallelism.unwrap_or(1)),
        };
        let indexed = args.completion_mode == CompletionMode::Indexed;
        if indexed {
            match completions {
                None => {
                    return Err("--completion-mode Indexed needs --completions \
                                (indexes run from 0 to completions-1)"
                        .into());
                }
                Some(n) if n > MAX_INDEXED_COMPLETIONS => {
                    return Err(format!(
                        "--completions {n} is too large for an Indexed Job \
                         (at most {MAX_INDEXED_COMPLETIONS})"
                    ));
                }
                Some(_) => {}
            }
        }
        if args.command.is_empty() || args.command[0].is_empty() {
            return Err("give the pod's command after `--`, e.g. `-- sh -c 'echo hi'`".into());
        }
        if args.active_deadline == Some(Duration::ZERO) {
            return Err("--active-deadline must be positive (omit it for no deadline)".into());
        }
        let worker = is_worker(&args.command[0])
            .then(|| worker(&args.command[1..]))
            .transpose()?;
        if worker.is_some() && args.restart_policy == RestartPolicy::OnFailure {
            return Err(
                "a workq-worker Job needs --restart-policy Never: its podFailurePolicy \
                 requires it, and a restarted worker is a new worker anyway"
                    .into(),
            );
        }
        let grace = match (&worker, args.grace) {
            (None, grace) => grace.unwrap_or(DEFAULT_GRACE),
            (Some(worker), None) => DEFAULT_GRACE.max(worker.grace + GRACE_MARGIN),
            (Some(worker), Some(grace)) => {
                let needed = worker.grace + GRACE_MARGIN;
                if grace < needed {
                    return Err(format!(
                        "--grace {} is too short for the worker's --grace {}: the pods \
                         would be killed before the worker has released its items; give \
                         --grace {} or more (its --grace plus {}), or omit it",
                        show(grace),
                        show(worker.grace),
                        show(needed),
                        show(GRACE_MARGIN)
                    ));
                }
                grace
            }
        };
        let container = if worker.is_some() {
            WORKER_CONTAINER.to_string()
        } else {
            args.name.replace('.', "-")
        };
        Ok(Spec {
            name: args.name.clone(),
            completions,
            parallelism,
            indexed,
            restart_policy: args.restart_policy,
            backoff_limit: args.backoff_limit,
            active_deadline: args.active_deadline,
            grace,
            command: args.command.clone(),
            container,
            pod_failure_policy: worker.as_ref().map(|_| PodFailurePolicy::worker()),
            worker,
        })
    }
}

/// True when the command runs `workq-worker` (by name or by path).
fn is_worker(program: &str) -> bool {
    Path::new(program)
        .file_name()
        .and_then(|name| name.to_str())
        == Some(WORKER)
}

/// Reads what matters to the Job from the worker's arguments.
fn worker(args: &[String]) -> Result<Worker, String> {
    let grace = match worker_flag(args, "--grace") {
        None => WORKER_DEFAULT_GRACE,
        Some(None) => return Err("the worker's --grace needs a value".into()),
        Some(Some(value)) => {
            workq_proto::duration::parse(value).map_err(|e| format!("the worker's --grace: {e}"))?
        }
    };
    Ok(Worker {
        grace,
        leases: worker_flag(args, "--queue").is_some(),
    })
}

/// A worker flag among its arguments, as `--flag VALUE` or `--flag=VALUE`: `None` when
/// absent, `Some(None)` when given without a value. The worker's flags are global, so
/// they may come before or after the handler; everything after `--` belongs to the
/// command an `exec` handler runs.
fn worker_flag<'a>(args: &'a [String], flag: &str) -> Option<Option<&'a str>> {
    let mut iter = args.iter().take_while(|a| a.as_str() != "--");
    while let Some(arg) = iter.next() {
        if arg == flag {
            return Some(iter.next().map(String::as_str));
        }
        if let Some(value) = arg.strip_prefix(flag).and_then(|v| v.strip_prefix('=')) {
            return Some(Some(value));
        }
    }
    None
}

/// A duration as a user would type it: `3s` for whole seconds, else compact (`1.5s`).
fn show(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        workq_proto::duration::format(d)
    }
}

/// A DNS-1123 subdomain of at most 63 characters, as Kubernetes requires of Job names.
fn validate_name(name: &str) -> Result<(), String> {
    let hint = "a Job name is lowercase letters, digits, '-' and '.', starting and ending \
                with a letter or digit, at most 63 characters";
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("invalid Job name '{name}': {hint}"));
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        let ok = !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-';
        if !ok {
            return Err(format!("invalid Job name '{name}': {hint}"));
        }
    }
    Ok(())
}

/// Parses a human duration (`90s`, `10m`, `250ms`) for clap.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    workq_proto::duration::parse(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(completions: Option<u32>, parallelism: Option<u32>) -> JobArgs {
        JobArgs {
            name: "pi".into(),
            completions,
            parallelism,
            completion_mode: CompletionMode::NonIndexed,
            restart_policy: RestartPolicy::Never,
            backoff_limit: 6,
            active_deadline: None,
            grace: None,
            command: vec!["true".into()],
        }
    }

    fn worker_args(worker_flags: &[&str]) -> JobArgs {
        let mut a = args(None, Some(2));
        a.command = std::iter::once("/usr/local/bin/workq-worker")
            .chain(worker_flags.iter().copied())
            .map(String::from)
            .collect();
        a
    }

    #[test]
    fn defaults_follow_set_defaults_job() {
        let both_unset = Spec::resolve(&args(None, None)).unwrap();
        assert_eq!(
            (both_unset.completions, both_unset.parallelism),
            (Some(1), 1)
        );
        let only_completions = Spec::resolve(&args(Some(10), None)).unwrap();
        assert_eq!(
            (only_completions.completions, only_completions.parallelism),
            (Some(10), 1)
        );
        let work_queue = Spec::resolve(&args(None, Some(5))).unwrap();
        assert_eq!((work_queue.completions, work_queue.parallelism), (None, 5));
    }

    #[test]
    fn indexed_needs_completions() {
        let mut a = args(None, Some(3));
        a.completion_mode = CompletionMode::Indexed;
        assert!(Spec::resolve(&a).unwrap_err().contains("--completions"));
        a.completions = Some(3);
        assert!(Spec::resolve(&a).unwrap().indexed);
    }

    #[test]
    fn names_are_dns_subdomains() {
        for good in ["pi", "keygen-1", "a.b-c", &"x".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Pi", "-a", "a-", "a..b", "a_b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_worker_job_gets_the_fail_job_policy_on_its_fatal_exit_codes() {
        let spec = Spec::resolve(&worker_args(&["--queue", "q", "keygen"])).unwrap();
        assert_eq!(spec.container, "worker");
        assert!(spec.worker.as_ref().is_some_and(|w| w.leases));
        let policy = spec.pod_failure_policy.expect("a worker Job has a policy");
        for code in [1, 2] {
            assert_eq!(
                policy.fail_job(code),
                Some(RuleMatch {
                    index: 1,
                    container: "worker".into()
                }),
                "exit {code}"
            );
        }
        for code in [0, 3, 127, 137, 143] {
            assert_eq!(policy.fail_job(code), None, "exit {code}");
        }
        let other = Spec::resolve(&args(None, None)).unwrap();
        assert!(other.worker.is_none() && other.pod_failure_policy.is_none());
        let mut lookalike = args(None, None);
        lookalike.command = vec!["workq-worker-wrapper".into()];
        assert!(Spec::resolve(&lookalike).unwrap().worker.is_none());
    }

    #[test]
    fn a_worker_job_refuses_on_failure() {
        let mut a = worker_args(&["keygen"]);
        a.restart_policy = RestartPolicy::OnFailure;
        let error = Spec::resolve(&a).unwrap_err();
        assert!(error.contains("needs --restart-policy Never"), "{error}");
        a.command = vec!["sh".into()];
        assert!(Spec::resolve(&a).is_ok(), "other Jobs may use OnFailure");
    }

    #[test]
    fn a_default_grace_is_raised_above_the_workers_and_a_short_explicit_one_refused() {
        let grace = |job_grace: Option<u64>, worker_flags: &[&str]| {
            let mut a = worker_args(worker_flags);
            a.grace = job_grace.map(Duration::from_secs);
            Spec::resolve(&a).map(|spec| spec.grace)
        };
        let secs = Duration::from_secs;
        assert_eq!(grace(None, &["keygen"]), Ok(secs(30)), "25s + 5s");
        assert_eq!(grace(None, &["--grace", "40s", "keygen"]), Ok(secs(45)));
        assert_eq!(grace(None, &["--grace=10s", "keygen"]), Ok(secs(30)));
        assert_eq!(grace(Some(60), &["--grace", "40s", "keygen"]), Ok(secs(60)));
        assert_eq!(grace(Some(45), &["--grace", "40s", "keygen"]), Ok(secs(45)));
        let error = grace(Some(3), &["exec", "--", "sleep", "8"]).unwrap_err();
        assert!(
            error.contains("--grace 3s") && error.contains("worker's --grace 25s"),
            "names both values: {error}"
        );
        assert!(error.contains("--grace 30s or more"), "{error}");
        assert!(grace(Some(44), &["--grace", "40s", "keygen"]).is_err());
        assert!(grace(Some(0), &["keygen"]).is_err());
        let mut other = args(None, None);
        other.grace = Some(Duration::ZERO);
        assert_eq!(Spec::resolve(&other).unwrap().grace, Duration::ZERO);
        other.grace = None;
        assert_eq!(Spec::resolve(&other).unwrap().grace, secs(30));
    }

    #[test]
    fn worker_flags_are_read_before_its_exec_command() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            worker(&args(&["keygen"])).unwrap().grace,
            WORKER_DEFAULT_GRACE
        );
        assert_eq!(
            worker(&args(&["--grace", "55s", "exec", "--", "x"]))
                .unwrap()
                .grace,
            Duration::from_secs(55)
        );
        assert_eq!(
            worker(&args(&["--grace=1m", "keygen"])).unwrap().grace,
            Duration::from_secs(60)
        );
        let exec = worker(&args(&[
            "exec", "--", "cmd", "--grace", "99s", "--queue", "q",
        ]))
        .unwrap();
        assert_eq!(
            exec.grace, WORKER_DEFAULT_GRACE,
            "flags of the exec'd command are not the worker's"
        );
        assert!(!exec.leases);
        assert!(worker(&args(&["keygen", "--grace"])).is_err());
    }
}
