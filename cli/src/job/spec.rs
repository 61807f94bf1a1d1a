//! The Job spec shared by `job run` and `job manifest`: the flags, and the defaults
//! and validation the API server applies to a `batch/v1` Job (`SetDefaults_Job`).
//!
//! Both verbs resolve their flags through [`Spec::resolve`], so the local runner and
//! the generated manifest can never disagree about what a flag combination means.

use std::time::Duration;

use clap::{Args, ValueEnum};

/// Kubernetes' limit on a Job name: it ends up in the `batch.kubernetes.io/job-name`
/// label, whose values are at most 63 characters.
const MAX_NAME_LEN: usize = 63;

/// Kubernetes' limit on `completions` for Indexed Jobs (validation of `spec.completions`).
const MAX_INDEXED_COMPLETIONS: u32 = 100_000;

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
    /// this long (terminationGracePeriodSeconds; Kubernetes' default is 30s).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub grace: Duration,

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
    pub grace: Duration,
    pub command: Vec<String>,
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
        Ok(Spec {
            name: args.name.clone(),
            completions,
            parallelism,
            indexed,
            restart_policy: args.restart_policy,
            backoff_limit: args.backoff_limit,
            active_deadline: args.active_deadline,
            grace: args.grace,
            command: args.command.clone(),
        })
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
            grace: Duration::from_secs(30),
            command: vec!["true".into()],
        }
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
}
