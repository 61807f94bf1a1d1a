//! The Job controller: a pure state machine over an injected clock that decides which
//! pods to create, restart or stop, and when the Job is finished.
//!
//! It follows kubernetes/kubernetes `pkg/controller/job` (see k8s-jobs.md §1–§7): on
//! every [`Controller::sync`] the failure checks run before the success check (a
//! `FailJob` rule of the pod failure policy, the backoff limit, the deadline), a
//! finishing Job first stops its remaining pods (the interim `FailureTarget` /
//! `SuccessCriteriaMet`) and becomes `Complete` or `Failed` only once every pod is gone.
//! A pod stopped that way counts by its exit code, as a deleted pod's phase follows
//! it (§4, §9.6): succeeded on exit 0, failed otherwise.
//!
//! The controller is the single writer of Job state. The runner owns the processes: it
//! carries out the [`Action`]s, and reports each pod's exit with
//! [`Controller::exited`]. No I/O and no real clock here, so the semantics are unit
//! tested with hand-made instants.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use rand::RngExt;

use super::spec::{RestartPolicy, Spec};

/// The characters Kubernetes uses for generated name suffixes (`generateName`):
/// lowercase consonants and digits, so suffixes never spell words.
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
/// Length of the random pod-name suffix, as Kubernetes'.
const NAME_SUFFIX_LEN: usize = 5;
/// Kubernetes truncates a `generateName` prefix to 58 characters so that prefix plus
/// suffix fit a 63-character DNS label.
const MAX_NAME_PREFIX_LEN: usize = 63 - NAME_SUFFIX_LEN;

/// Back-off timings. Kubernetes hard-codes them from a 10 s base; the runner lets tests
/// scale every one of them with the base (`--backoff-base`), keeping their ratios.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// First delay of both back-offs (Kubernetes: 10 s).
    pub base: Duration,
}

impl Timing {
    /// The Job controller's cap on the pod re-creation back-off: 60 × base = 10 min,
    /// `MaxJobPodFailureBackOff` in the controller code. (The docs say "six minutes";
    /// the runner imitates what a cluster actually does.)
    const JOB_CAP_FACTOR: u32 = 60;
    /// The kubelet's cap on in-place container restarts: 30 × base = 300 s.
    const RESTART_CAP_FACTOR: u32 = 30;
    /// The kubelet forgets a container's back-off after 10 min (60 × base) of running.
    const RESTART_RESET_FACTOR: u32 = 60;

    /// Delay before the controller creates a pod after `failures` failures since the
    /// last success (`restartPolicy: Never`): base · 2^(n−1), capped.
    pub fn job_backoff(&self, failures: u32) -> Duration {
        doubling(self.base, failures, self.base * Self::JOB_CAP_FACTOR)
    }

    /// Delay before the kubelet restarts a container for the `step`-th time in a row
    /// (`restartPolicy: OnFailure`): base · 2^(step−1), capped.
    pub fn restart_backoff(&self, step: u32) -> Duration {
        doubling(self.base, step, self.base * Self::RESTART_CAP_FACTOR)
    }

    fn restart_reset(&self) -> Duration {
        self.base * Self::RESTART_RESET_FACTOR
    }
}

fn doubling(base: Duration, n: u32, cap: Duration) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(cap).min(cap)
}

/// What the runner must do after a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a new pod.
    Create { pod: String, index: Option<u32> },
    /// Start the pod's container again in place (`OnFailure`): same name, next restart.
    Restart {
        pod: String,
        index: Option<u32>,
        restart: u32,
    },
    /// Stop every running pod: SIGTERM, then SIGKILL after the grace period.
    StopAll,
    /// A pod with no process (`OnFailure`, waiting for its restart) was deleted by
    /// the finishing Job; it counts as failed.
    Deleted { pod: String },
}

/// Why a Job failed (`status.conditions[type=Failed].reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A `FailJob` rule of the pod failure policy matched a failed pod.
    PodFailurePolicy,
    BackoffLimitExceeded,
    DeadlineExceeded,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PodFailurePolicy => "PodFailurePolicy",
            Reason::BackoffLimitExceeded => "BackoffLimitExceeded",
            Reason::DeadlineExceeded => "DeadlineExceeded",
        }
    }
}

/// How the Job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    Failed(Reason),
    /// The runner was told to stop (Ctrl-C or SIGTERM); the name of the signal.
    Interrupted(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A process is running.
    Running,
    /// `OnFailure`: the container failed and waits for its restart back-off.
    BackOff { until: Instant },
    /// Told to stop; waiting for the process to exit.
    Terminating,
}

#[derive(Debug)]
struct Pod {
    index: Option<u32>,
    /// In-place restarts so far (`restartCount`).
    restarts: u32,
    /// Consecutive restarts for the kubelet back-off; reset after a long clean run.
    backoff_step: u32,
    phase: Phase,
    /// When the current container started.
    started: Instant,
}

/// The Job's state, changed only through [`Controller::sync`], [`Controller::exited`]
/// and [`Controller::interrupt`].
#[derive(Debug)]
pub struct Controller {
    spec: Spec,
    timing: Timing,
    start: Instant,
    pods: BTreeMap<String, Pod>,
    used_names: HashSet<String>,
    /// Successful pods; in Indexed mode, distinct succeeded indexes.
    succeeded: u32,
    succeeded_indexes: BTreeSet<u32>,
    /// Pods that ended in failure (`status.failed`; `Never` only).
    failed: u32,
    /// All in-place restarts over the Job's life (`OnFailure`), for display.
    restarts: u32,
    /// Pods created (restarts not included).
    created: u32,
    failures_since_success: u32,
    last_failure: Option<Instant>,
    /// The condition message of a matched `FailJob` rule, naming the pod and its exit.
    fail_job: Option<String>,
    /// The interim condition: the Job will end this way once its pods are gone.
    target: Option<Outcome>,
    stop_sent: bool,
    finished: Option<(Outcome, Instant)>,
}

impl Controller {
    pub fn new(spec: Spec, timing: Timing, now: Instant) -> Controller {
        Controller {
            spec,
            timing,
            start: now,
            pods: BTreeMap::new(),
            used_names: HashSet::new(),
            succeeded: 0,
            succeeded_indexes: BTreeSet::new(),
            failed: 0,
            restarts: 0,
            created: 0,
            failures_since_success: 0,
            last_failure: None,
            fail_job: None,
            target: None,
            stop_sent: false,
            finished: None,
        }
    }

    /// Evaluates the Job at `now` and says what to do next. Call after every event and
    /// whenever [`Controller::next_wakeup`] passes.
    pub fn sync(&mut self, now: Instant) -> Vec<Action> {
        if self.finished.is_some() {
            return Vec::new();
        }
        if self.target.is_none() {
            self.target = self.evaluate(now);
        }
        if let Some(target) = self.target {
            return self.wind_down(target, now);
        }
        let mut actions = self.restart_due(now);
        actions.extend(self.create_wanted(now));
        actions
    }

    /// Failure checks first (pod failure policy, backoff limit, deadline), then success.
    fn evaluate(&self, now: Instant) -> Option<Outcome> {
        if self.fail_job.is_some() {
            return Some(Outcome::Failed(Reason::PodFailurePolicy));
        }
        if self.backoff_limit_exceeded() {
            return Some(Outcome::Failed(Reason::BackoffLimitExceeded));
        }
        if let Some(deadline) = self.spec.active_deadline
            && now.duration_since(self.start) >= deadline
        {
            return Some(Outcome::Failed(Reason::DeadlineExceeded));
        }
        let done = match self.spec.completions {
            // With no pod still running this is `Complete`; with some still running it
            // is `SuccessCriteriaMet`, and they are stopped first.
            Some(completions) => self.succeeded >= completions,
            // Work queue: the first success starts the wind-down, but running pods
            // are left to finish their work; complete when none remains.
            None => self.succeeded > 0 && self.pods.is_empty(),
        };
        done.then_some(Outcome::Complete)
    }

    fn backoff_limit_exceeded(&self) -> bool {
        if self.failed > self.spec.backoff_limit {
            return true;
        }
        // With OnFailure the controller sums restartCount over the pods that still
        // exist: `sum >= backoffLimit`, or `sum > 0` when the limit is 0.
        let restarts: u32 = self.pods.values().map(|pod| pod.restarts).sum();
        match self.spec.backoff_limit {
            0 => restarts > 0,
            limit => restarts >= limit,
        }
    }

    fn wind_down(&mut self, target: Outcome, now: Instant) -> Vec<Action> {
        // Pods waiting for a restart have no process: they go away at once, failed
        // (their container's last exit was a failure).
        let waiting: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, pod)| matches!(pod.phase, Phase::BackOff { .. }))
            .map(|(name, _)| name.clone())
            .collect();
        let mut actions = Vec::new();
        for pod in waiting {
            self.pods.remove(&pod);
            self.failed += 1;
            actions.push(Action::Deleted { pod });
        }
        if self.pods.is_empty() {
            self.finished = Some((target, now));
            return actions;
        }
        if !self.stop_sent {
            self.stop_sent = true;
            for pod in self.pods.values_mut() {
                pod.phase = Phase::Terminating;
            }
            actions.push(Action::StopAll);
        }
        actions
    }

    /// `OnFailure`: containers whose restart back-off has passed start again.
    fn restart_due(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for (name, pod) in &mut self.pods {
            if let Phase::BackOff { until } = pod.phase
                && until <= now
            {
                pod.phase = Phase::Running;
                pod.started = now;
                actions.push(Action::Restart {
                    pod: name.clone(),
                    index: pod.index,
                    restart: pod.restarts,
                });
            }
        }
        actions
    }

    /// Creates pods up to the desired active count, unless the Job back-off holds.
    fn create_wanted(&mut self, now: Instant) -> Vec<Action> {
        if self.backoff_until().is_some_and(|until| now < until) {
            return Vec::new();
        }
        let active = self.pods.len() as u32;
        let wanted = self.wanted_active();
        let mut actions = Vec::new();
        let mut free_indexes = self.free_indexes();
        for _ in active..wanted {
            let index = if self.spec.indexed {
                match free_indexes.next() {
                    Some(index) => Some(index),
                    None => break,
                }
            } else {
                None
            };
            let pod = self.new_pod_name(index);
            self.pods.insert(
                pod.clone(),
                Pod {
                    index,
                    restarts: 0,
                    backoff_step: 0,
                    phase: Phase::Running,
                    started: now,
                },
            );
            self.created += 1;
            actions.push(Action::Create { pod, index });
        }
        actions
    }

    /// The desired number of active pods (`manageJob`).
    fn wanted_active(&self) -> u32 {
        match self.spec.completions {
            Some(completions) => self
                .spec
                .parallelism
                .min(completions.saturating_sub(self.succeeded)),
            // Work queue: `parallelism` until the first success, then no new pods at
            // all, not even to replace failures.
            None if self.succeeded == 0 => self.spec.parallelism,
            None => 0,
        }
    }

    /// Indexed mode: indexes with neither a success nor a pod, lowest first.
    fn free_indexes(&self) -> std::vec::IntoIter<u32> {
        if !self.spec.indexed {
            return Vec::new().into_iter();
        }
        let held: BTreeSet<u32> = self.pods.values().filter_map(|pod| pod.index).collect();
        (0..self.spec.completions.unwrap_or(0))
            .filter(|i| !self.succeeded_indexes.contains(i) && !held.contains(i))
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// `<job>-<5 random>`, or `<job>-<index>-<5 random>` in Indexed mode.
    fn new_pod_name(&mut self, index: Option<u32>) -> String {
        let mut prefix = match index {
            Some(index) => format!("{}-{index}-", self.spec.name),
            None => format!("{}-", self.spec.name),
        };
        prefix.truncate(MAX_NAME_PREFIX_LEN);
        let mut rng = rand::rng();
        loop {
            let suffix: String = (0..NAME_SUFFIX_LEN)
                .map(|_| NAME_ALPHABET[rng.random_range(0..NAME_ALPHABET.len())] as char)
                .collect();
            let name = format!("{prefix}{suffix}");
            if self.used_names.insert(name.clone()) {
                return name;
            }
        }
    }

    /// The end of the Job back-off after the latest failure, while failures since the
    /// last success are counted.
    pub fn backoff_until(&self) -> Option<Instant> {
        if self.failures_since_success == 0 {
            return None;
        }
        let last = self.last_failure?;
        Some(last + self.timing.job_backoff(self.failures_since_success))
    }

    /// A pod's process exited with `code` (128+N when killed by signal N).
    pub fn exited(&mut self, name: &str, code: i32, now: Instant) {
        let Some(pod) = self.pods.get_mut(name) else {
            return;
        };
        match pod.phase {
            // Stopped by the Job, which is finishing anyway: the pod counts by its exit
            // code and changes nothing else.
            Phase::Terminating => {
                let index = pod.index;
                self.pods.remove(name);
                if code == 0 {
                    self.count_success(index);
                } else {
                    self.failed += 1;
                }
            }
            Phase::BackOff { .. } => {}
            Phase::Running if code == 0 => {
                let index = pod.index;
                self.pods.remove(name);
                self.count_success(index);
                self.failures_since_success = 0;
            }
            Phase::Running => match self.spec.restart_policy {
                RestartPolicy::Never => {
                    self.pods.remove(name);
                    self.failed += 1;
                    self.failures_since_success += 1;
                    self.last_failure = Some(now);
                    if self.fail_job.is_none()
                        && let Some(rule) = self
                            .spec
                            .pod_failure_policy
                            .as_ref()
                            .and_then(|policy| policy.fail_job(code))
                    {
                        // Kubernetes' wording; local pods live in no namespace, so
                        // `default` stands in for one.
                        self.fail_job = Some(format!(
                            "Container {} for pod default/{name} failed with exit code \
                             {code} matching FailJob rule at index {}",
                            rule.container, rule.index
                        ));
                    }
                }
                RestartPolicy::OnFailure => {
                    pod.backoff_step =
                        if now.duration_since(pod.started) >= self.timing.restart_reset() {
                            1
                        } else {
                            pod.backoff_step + 1
                        };
                    pod.restarts += 1;
                    self.restarts += 1;
                    pod.phase = Phase::BackOff {
                        until: now + self.timing.restart_backoff(pod.backoff_step),
                    };
                }
            },
        }
    }

    fn count_success(&mut self, index: Option<u32>) {
        match index {
            Some(index) => {
                // Only the first success of an index counts.
                if self.succeeded_indexes.insert(index) {
                    self.succeeded += 1;
                }
            }
            None => self.succeeded += 1,
        }
    }

    /// Stop the Job because the runner got `signal` (e.g. "SIGINT"). A Job whose
    /// failure is decided already (a `FailureTarget`) keeps it and its reason, as the
    /// terminal `Failed` condition does in Kubernetes.
    pub fn interrupt(&mut self, signal: &'static str) {
        let decided = matches!(
            self.target,
            Some(Outcome::Interrupted(_) | Outcome::Failed(_))
        );
        if self.finished.is_none() && !decided {
            self.target = Some(Outcome::Interrupted(signal));
        }
    }

    /// The earliest instant at which a sync could change something without any event.
    /// The Job back-off counts only while it holds back a pod the Job wants: once it
    /// has passed, its end stays in the past until the next success, and waking for
    /// it would only wake again at once.
    pub fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        if self.finished.is_some() || self.target.is_some() {
            return None;
        }
        let restarts = self.pods.values().filter_map(|pod| match pod.phase {
            Phase::BackOff { until } => Some(until),
            _ => None,
        });
        let deadline = self.spec.active_deadline.map(|d| self.start + d);
        let backoff = self.backoff_remaining(now).map(|left| now + left);
        restarts.chain(deadline).chain(backoff).min()
    }

    /// Time left before the Job back-off lets new pods be created, while it holds back
    /// a pod the Job wants.
    pub fn backoff_remaining(&self, now: Instant) -> Option<Duration> {
        if self.target.is_some() || self.wanted_active() <= self.active() {
            return None;
        }
        self.backoff_until()
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn finished(&self) -> Option<Outcome> {
        self.finished.map(|(outcome, _)| outcome)
    }

    /// The message of the Job's `Failed` (or interim) condition, as the controller
    /// words it.
    pub fn message(&self) -> Option<String> {
        let outcome = self.finished().or(self.target)?;
        match outcome {
            Outcome::Complete => None,
            Outcome::Failed(Reason::PodFailurePolicy) => self.fail_job.clone(),
            Outcome::Failed(Reason::BackoffLimitExceeded) => {
                Some("Job has reached the specified backoff limit".into())
            }
            Outcome::Failed(Reason::DeadlineExceeded) => {
                Some("Job was active longer than specified deadline".into())
            }
            Outcome::Interrupted(signal) => Some(format!("stopped by {signal}")),
        }
    }

    /// `kubectl get jobs` STATUS (§12 order: Complete, Failed, Terminating,
    /// FailureTarget, Running).
    pub fn status(&self) -> &'static str {
        match (self.finished(), self.target) {
            (Some(Outcome::Complete), _) => "Complete",
            (Some(Outcome::Failed(_)), _) => "Failed",
            (Some(Outcome::Interrupted(_)), _) => "Interrupted",
            (None, Some(Outcome::Interrupted(_))) => "Terminating",
            (None, Some(Outcome::Failed(_))) => "FailureTarget",
            (None, Some(Outcome::Complete)) if !self.pods.is_empty() => "SuccessCriteriaMet",
            _ => "Running",
        }
    }

    /// From the start to the end of the Job, or to `now` while it runs.
    pub fn duration(&self, now: Instant) -> Duration {
        let end = self.finished.map(|(_, at)| at).unwrap_or(now);
        end.duration_since(self.start)
    }

    /// Pods that exist (running, restarting or terminating).
    pub fn active(&self) -> u32 {
        self.pods.len() as u32
    }

    pub fn succeeded(&self) -> u32 {
        self.succeeded
    }

    pub fn failed(&self) -> u32 {
        self.failed
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    pub fn created(&self) -> u32 {
        self.created
    }

    /// `status.completedIndexes` as an interval string (`"0-2,4"`).
    pub fn completed_indexes(&self) -> String {
        intervals(&self.succeeded_indexes)
    }

    /// `kubectl get jobs` COMPLETIONS: `3/10`; work queue `1/1 of 5` (or `1/1`).
    pub fn completions_column(&self) -> String {
        match self.spec.completions {
            Some(completions) => format!("{}/{completions}", self.succeeded),
            None if self.spec.parallelism > 1 => {
                format!("{}/1 of {}", self.succeeded, self.spec.parallelism)
            }
            None => format!("{}/1", self.succeeded),
        }
    }
}

/// Formats a set of indexes as Kubernetes' interval string: `0-2,4,7-9`.
pub fn intervals(indexes: &BTreeSet<u32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = indexes.iter().copied().peekable();
    while let Some(first) = iter.next() {
        let mut last = first;
        while iter.peek() == Some(&(last + 1)) {
            last += 1;
            iter.next();
        }
        out.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::spec::{CompletionMode, JobArgs};

    const BASE: Duration = Duration::from_secs(10);

    fn spec(completions: Option<u32>, parallelism: Option<u32>) -> JobArgs {
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

    fn controller(args: JobArgs, now: Instant) -> Controller {
        Controller::new(Spec::resolve(&args).unwrap(), Timing { base: BASE }, now)
    }

    fn created(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Create { pod, .. } => Some(pod.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fixed_completions_keep_at_most_parallelism_and_stop_at_completions() {
        let t0 = Instant::now();
        let mut c = controller(spec(Some(5), Some(2)), t0);
        let mut pods = created(&c.sync(t0));
        assert_eq!(pods.len(), 2);
        let mut total = 2;
        while let Some(pod) = pods.pop() {
            c.exited(&pod, 0, t0);
            let new = created(&c.sync(t0));
            assert!(c.active() <= 2);
            total += new.len();
            pods.extend(new);
        }
        assert_eq!(total, 5, "min(parallelism, completions − succeeded) pods");
        assert_eq!(c.finished(), Some(Outcome::Complete));
        assert_eq!(c.completions_column(), "5/5");
    }

    #[test]
    fn never_fails_on_the_failure_after_the_limit_with_doubling_backoff() {
        let t0 = Instant::now();
        let mut args = spec(None, None);
        args.backoff_limit = 2;
        let mut c = controller(args, t0);
        let first = created(&c.sync(t0));
        c.exited(&first[0], 1, t0);
        assert!(c.sync(t0).is_empty(), "the Job back-off holds");
        assert_eq!(c.next_wakeup(t0), Some(t0 + BASE));
        let t1 = t0 + BASE;
        let second = created(&c.sync(t1));
        assert_ne!(second, first, "Never: a new pod, new name");
        assert_eq!(
            c.next_wakeup(t1 + BASE),
            None,
            "a back-off that has passed is not woken for (the runner spun on it)"
        );
        c.exited(&second[0], 1, t1);
        assert_eq!(c.next_wakeup(t1), Some(t1 + 2 * BASE), "10 s · 2^(n−1)");
        let t2 = t1 + 2 * BASE;
        let third = created(&c.sync(t2));
        c.exited(&third[0], 1, t2);
        assert!(c.sync(t2).is_empty());
        assert_eq!(
            c.finished(),
            Some(Outcome::Failed(Reason::BackoffLimitExceeded))
        );
        assert_eq!(c.failed(), 3);
    }

    #[test]
    fn on_failure_restarts_in_place_and_counts_restarts_against_the_limit() {
        let t0 = Instant::now();
        let mut args = spec(None, None);
        args.restart_policy = RestartPolicy::OnFailure;
        args.backoff_limit = 2;
        let mut c = controller(args, t0);
        let pod = created(&c.sync(t0)).remove(0);
        c.exited(&pod, 1, t0);
        assert!(c.sync(t0).is_empty());
        let restart = c.sync(t0 + BASE);
        assert_eq!(
            restart,
            vec![Action::Restart {
                pod: pod.clone(),
                index: None,
                restart: 1
            }]
        );
        c.exited(&pod, 1, t0 + BASE);
        c.sync(t0 + BASE);
        assert_eq!(
            c.finished(),
            Some(Outcome::Failed(Reason::BackoffLimitExceeded))
        );
    }

    #[test]
    fn kubelet_backoff_doubles_and_resets_after_ten_minutes_of_running() {
        let t0 = Instant::now();
        let mut args = spec(None, None);
        args.restart_policy = RestartPolicy::OnFailure;
        args.backoff_limit = 10;
        let mut c = controller(args, t0);
        let pod = created(&c.sync(t0)).remove(0);
        c.exited(&pod, 1, t0);
        assert_eq!(c.next_wakeup(t0), Some(t0 + BASE));
        let t1 = t0 + BASE;
        c.sync(t1);
        c.exited(&pod, 1, t1);
        assert_eq!(c.next_wakeup(t1), Some(t1 + 2 * BASE), "10 s, 20 s, …");
        let t2 = t1 + 2 * BASE;
        c.sync(t2);
        let t3 = t2 + Duration::from_secs(600);
        c.exited(&pod, 1, t3);
        assert_eq!(
            c.next_wakeup(t3),
            Some(t3 + BASE),
            "reset after 10 min running"
        );
    }

    #[test]
    fn kubelet_backoff_is_capped_at_300s_and_job_backoff_at_10min() {
        let t = Timing { base: BASE };
        assert_eq!(t.restart_backoff(1), BASE);
        assert_eq!(t.restart_backoff(3), 4 * BASE);
        assert_eq!(t.restart_backoff(10), Duration::from_secs(300));
        assert_eq!(t.job_backoff(6), Duration::from_secs(320));
        assert_eq!(t.job_backoff(7), Duration::from_secs(600));
        assert_eq!(t.job_backoff(40), Duration::from_secs(600));
    }

    #[test]
    fn work_queue_creates_no_pod_after_the_first_success() {
        let t0 = Instant::now();
        let mut c = controller(spec(None, Some(3)), t0);
        let pods = created(&c.sync(t0));
        assert_eq!(pods.len(), 3);
        c.exited(&pods[0], 0, t0);
        assert!(c.sync(t0).is_empty());
        c.exited(&pods[1], 1, t0);
        assert!(
            created(&c.sync(t0 + BASE * 100)).is_empty(),
            "no replacement"
        );
        assert_eq!(c.status(), "Running");
        c.exited(&pods[2], 0, t0);
        c.sync(t0);
        assert_eq!(c.finished(), Some(Outcome::Complete));
        assert_eq!(c.completions_column(), "2/1 of 3");
    }

    #[test]
    fn deadline_fails_the_job_and_stops_pods_first() {
        let t0 = Instant::now();
        let mut args = spec(None, Some(2));
        args.active_deadline = Some(Duration::from_secs(5));
        let mut c = controller(args, t0);
        let pods = created(&c.sync(t0));
        assert_eq!(c.next_wakeup(t0), Some(t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(c.sync(t1), vec![Action::StopAll]);
        assert_eq!(c.status(), "FailureTarget");
        c.exited(&pods[0], 143, t1);
        c.sync(t1);
        assert_eq!(c.finished(), None, "a pod is still terminating");
        c.exited(&pods[1], 137, t1);
        c.sync(t1);
        assert_eq!(
            c.finished(),
            Some(Outcome::Failed(Reason::DeadlineExceeded))
        );
    }

    fn worker(parallelism: u32) -> JobArgs {
        let mut args = spec(None, Some(parallelism));
        args.command = vec!["workq-worker".into(), "--queue".into(), "q".into()];
        args
    }

    #[test]
    fn a_worker_exiting_2_fails_the_job_at_once_by_its_pod_failure_policy() {
        let t0 = Instant::now();
        let mut c = controller(worker(2), t0);
        let pods = created(&c.sync(t0));
        c.exited(&pods[0], 2, t0);
        assert_eq!(
            c.sync(t0),
            vec![Action::StopAll],
            "the other pod is stopped"
        );
        assert_eq!(c.status(), "FailureTarget");
        c.exited(&pods[1], 143, t0);
        assert!(c.sync(t0).is_empty());
        assert_eq!(
            c.finished(),
            Some(Outcome::Failed(Reason::PodFailurePolicy))
        );
        assert_eq!(
            c.message().unwrap(),
            format!(
                "Container worker for pod default/{} failed with exit code 2 matching \
                 FailJob rule at index 1",
                pods[0]
            )
        );
        assert_eq!((c.created(), c.failed()), (2, 2), "no replacement");
    }

    #[test]
    fn other_worker_failures_count_toward_the_backoff_limit() {
        let t0 = Instant::now();
        let mut c = controller(worker(1), t0);
        let pod = created(&c.sync(t0)).remove(0);
        c.exited(&pod, 137, t0);
        assert!(c.sync(t0).is_empty(), "back-off, then a new pod");
        assert_eq!(c.status(), "Running");
        assert_eq!(created(&c.sync(t0 + BASE)).len(), 1);
    }

    #[test]
    fn pods_stopped_by_the_job_count_by_their_exit_code() {
        let t0 = Instant::now();
        let mut args = spec(Some(3), Some(3));
        args.active_deadline = Some(Duration::from_secs(5));
        let mut c = controller(args, t0);
        let pods = created(&c.sync(t0));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(c.sync(t1), vec![Action::StopAll]);
        c.exited(&pods[0], 0, t1);
        c.exited(&pods[1], 143, t1);
        c.exited(&pods[2], 137, t1);
        c.sync(t1);
        assert_eq!(
            c.finished(),
            Some(Outcome::Failed(Reason::DeadlineExceeded))
        );
        assert_eq!((c.succeeded(), c.failed()), (1, 2));
        assert_eq!(c.completions_column(), "1/3");
    }

    #[test]
    fn a_signal_after_the_deadline_keeps_the_deadline_as_the_reason() {
        let t0 = Instant::now();
        let mut args = spec(None, None);
        args.active_deadline = Some(Duration::from_secs(5));
        let mut c = controller(args, t0);
        let pod = created(&c.sync(t0)).remove(0);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(c.sync(t1), vec![Action::StopAll]);
        c.interrupt("SIGINT");
        c.exited(&pod, 143, t1);
        c.sync(t1);
        assert_eq!(
            c.finished(),
            Some(Outcome::Failed(Reason::DeadlineExceeded))
        );
    }

    #[test]
    fn a_pod_waiting_for_its_restart_is_deleted_as_failed() {
        let t0 = Instant::now();
        let mut args = spec(None, None);
        args.restart_policy = RestartPolicy::OnFailure;
        let mut c = controller(args, t0);
        let pod = created(&c.sync(t0)).remove(0);
        c.exited(&pod, 1, t0);
        c.sync(t0);
        c.interrupt("SIGINT");
        assert_eq!(c.sync(t0), vec![Action::Deleted { pod }]);
        assert_eq!(c.finished(), Some(Outcome::Interrupted("SIGINT")));
        assert_eq!(c.failed(), 1);
        assert_eq!(c.message().as_deref(), Some("stopped by SIGINT"));
    }

    #[test]
    fn indexed_runs_each_index_once_and_reports_intervals() {
        let t0 = Instant::now();
        let mut args = spec(Some(4), Some(2));
        args.completion_mode = CompletionMode::Indexed;
        let mut c = controller(args, t0);
        let actions = c.sync(t0);
        let indexes: Vec<_> = actions
            .iter()
            .map(|a| match a {
                Action::Create { pod, index } => {
                    assert!(pod.starts_with(&format!("pi-{}-", index.unwrap())));
                    index.unwrap()
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(indexes, vec![0, 1]);
        let pods = created(&actions);
        c.exited(&pods[1], 0, t0);
        let next = c.sync(t0);
        assert!(matches!(next[0], Action::Create { index: Some(2), .. }));
        assert_eq!(c.completed_indexes(), "1");
    }

    #[test]
    fn interval_strings() {
        let set = |v: &[u32]| v.iter().copied().collect::<BTreeSet<_>>();
        assert_eq!(intervals(&set(&[])), "");
        assert_eq!(intervals(&set(&[0, 1, 2, 4])), "0-2,4");
        assert_eq!(intervals(&set(&[1, 3, 4, 5, 7])), "1,3-5,7");
    }
}
