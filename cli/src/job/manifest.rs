//! `queue-cli job manifest`: prints the `batch/v1` Job that does on a cluster what
//! `job run` does locally, from the same flags.
//!
//! The YAML is written by hand: the shape is fixed and small, every user-supplied
//! string goes through [`scalar`], which quotes anything YAML could read as something
//! other than a string.
//!
//! A Job whose command is `workq-worker` gets what a work-queue Job needs on a real
//! cluster (k8s-jobs.md §8, §9, §13). [`Spec::resolve`] decides it, for `job run`
//! too: `restartPolicy: Never`, a `podFailurePolicy` that ignores disruptions and
//! fails the Job on the worker's fatal and usage exit codes, and a grace period above
//! the worker's `--grace`. Only the manifest adds `WORKQ_SERVER` plus `WORKQ_TOKEN`
//! (from a Secret) to the environment, and the worker's labels and security context.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches};

use super::spec::{JobArgs, PodFailureRule, Spec, WORKER};
use crate::output::{Format, out};

/// Where the examples' Service publishes the coordinator's gRPC port.
const DEFAULT_SERVER: &str = "http://workq:7070";
/// Where `--ca-secret`'s certificate is mounted in the pods.
const CA_DIR: &str = "/etc/workq-ca";

#[derive(Args, Debug)]
pub struct ManifestArgs {
    #[command(flatten)]
    pub job: JobArgs,

    /// Container image holding the command (the workq image holds workq-coordinator,
    /// workq-worker and queue-cli).
    #[arg(long, value_name = "IMAGE")]
    pub image: String,

    #[command(flatten)]
    pub server: ServerFlag,

    /// Secret whose key `token` is passed to the pods as WORKQ_TOKEN (worker Jobs, or
    /// with --server).
    #[arg(long, value_name = "NAME", default_value = "workq-token")]
    pub token_secret: String,

    /// Pass no WORKQ_TOKEN (for a coordinator running without --token-file).
    #[arg(long)]
    pub no_token: bool,

    /// Secret whose key `ca.crt` (as cert-manager writes it) the pods trust for an
    /// https:// coordinator: mounted read-only and named by WORKQ_CA_CERT.
    #[arg(long, value_name = "NAME")]
    pub ca_secret: Option<String>,

    /// CPU request of each pod, e.g. 500m.
    #[arg(long, value_name = "QUANTITY")]
    pub cpu_request: Option<String>,

    /// Memory request of each pod, e.g. 64Mi.
    #[arg(long, value_name = "QUANTITY")]
    pub memory_request: Option<String>,
}

/// `--server URL`: the coordinator URL passed to the pods as WORKQ_SERVER.
///
/// queue-cli also has a global `--server` (with env WORKQ_SERVER and a localhost
/// default) for talking to a coordinator from here. Only a URL typed on the command
/// line belongs in a manifest: a local WORKQ_SERVER (say, a port-forward) or the
/// localhost default means nothing inside the cluster. Hence this hand-written flag,
/// which looks at where the value came from.
#[derive(Debug, Clone, Default)]
pub struct ServerFlag(pub Option<String>);

const SERVER_ID: &str = "server";

impl FromArgMatches for ServerFlag {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let typed = matches.value_source(SERVER_ID) == Some(ValueSource::CommandLine);
        Ok(ServerFlag(
            typed
                .then(|| matches.get_one::<String>(SERVER_ID).cloned())
                .flatten(),
        ))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for ServerFlag {
    fn augment_args(command: clap::Command) -> clap::Command {
        command.arg(
            Arg::new(SERVER_ID)
                .long("server")
                .value_name("URL")
                .action(ArgAction::Set)
                .help(
                    "Coordinator URL passed to the pods as WORKQ_SERVER [default for \
                     worker Jobs: http://workq:7070, the examples' Service]",
                ),
        )
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

pub fn run(args: ManifestArgs, format: Format) -> ExitCode {
    if format == Format::Json {
        eprintln!("error: job manifest prints YAML; -o json is not supported");
        return ExitCode::from(2);
    }
    let invocation = redact_tokens(std::env::args().skip(1))
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>();
    match render(&args, &format!("queue-cli {}", invocation.join(" "))) {
        Ok(yaml) => {
            out!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

/// The Job manifest, headed by a comment with the command that generated it.
pub fn render(args: &ManifestArgs, invocation: &str) -> Result<String, String> {
    let spec = Spec::resolve(&args.job)?;
    if args.image.trim().is_empty() {
        return Err("--image must name a container image".into());
    }
    let worker = spec.worker.is_some();
    let container = &spec.container;
    // A worker leasing from a queue talks to the coordinator; `keygen --count N`
    // without --queue does not, and needs neither the URL nor the token.
    let leases = spec.worker.as_ref().is_some_and(|w| w.leases);
    let server = args
        .server
        .0
        .clone()
        .or_else(|| leases.then(|| DEFAULT_SERVER.to_string()));
    let ca_secret = match (&args.ca_secret, &server) {
        (None, _) => None,
        (Some(secret), Some(url)) if url.starts_with("https://") => Some(secret),
        (Some(_), _) => {
            return Err(
                "--ca-secret is for a coordinator serving TLS: pass --server \
                        https://HOST:PORT"
                    .into(),
            );
        }
    };
    let mut y = String::new();
    let w = &mut y;
    let _ = writeln!(w, "# Generated by: {invocation}");
    let _ = writeln!(w, "apiVersion: batch/v1");
    let _ = writeln!(w, "kind: Job");
    let _ = writeln!(w, "metadata:");
    let _ = writeln!(w, "  name: {}", scalar(&spec.name));
    let labels = labels(worker);
    let _ = writeln!(w, "  labels:");
    for (key, value) in &labels {
        let _ = writeln!(w, "    {key}: {}", scalar(value));
    }
    let _ = writeln!(w, "spec:");
    if let Some(completions) = spec.completions {
        let _ = writeln!(w, "  completions: {completions}");
    }
    let _ = writeln!(w, "  parallelism: {}", spec.parallelism);
    if spec.indexed {
        let _ = writeln!(w, "  completionMode: Indexed");
    }
    let _ = writeln!(w, "  backoffLimit: {}", spec.backoff_limit);
    if let Some(deadline) = spec.active_deadline {
        let _ = writeln!(w, "  activeDeadlineSeconds: {}", ceil_secs(deadline));
    }
    if let Some(policy) = &spec.pod_failure_policy {
        let _ = writeln!(w, "  podFailurePolicy:");
        let _ = writeln!(w, "    rules:");
        for rule in &policy.rules {
            match rule {
                PodFailureRule::IgnoreDisruption => {
                    let _ = writeln!(
                        w,
                        "      # Evictions, preemption and node drains are not the worker's fault:"
                    );
                    let _ = writeln!(w, "      # they must not use up the backoff limit.");
                    let _ = writeln!(w, "      - action: Ignore");
                    let _ = writeln!(w, "        onPodConditions:");
                    let _ = writeln!(w, "          - type: DisruptionTarget");
                    // Newer API versions default it to "True"; older schemas (1.31)
                    // require it.
                    let _ = writeln!(w, "            status: \"True\"");
                }
                PodFailureRule::FailJobOnExitCodes { container, codes } => {
                    let _ = writeln!(
                        w,
                        "      # Exit 1 (fatal) and 2 (usage) cannot be fixed by a retry."
                    );
                    let _ = writeln!(w, "      - action: FailJob");
                    let _ = writeln!(w, "        onExitCodes:");
                    let _ = writeln!(w, "          containerName: {}", scalar(container));
                    let _ = writeln!(w, "          operator: In");
                    let codes: Vec<String> = codes.iter().map(i32::to_string).collect();
                    let _ = writeln!(w, "          values: [{}]", codes.join(", "));
                }
            }
        }
    }
    let _ = writeln!(w, "  template:");
    let _ = writeln!(w, "    metadata:");
    let _ = writeln!(w, "      labels:");
    for (key, value) in &labels {
        let _ = writeln!(w, "        {key}: {}", scalar(value));
    }
    let _ = writeln!(w, "    spec:");
    let _ = writeln!(w, "      restartPolicy: {}", spec.restart_policy.as_str());
    let _ = writeln!(
        w,
        "      terminationGracePeriodSeconds: {}",
        ceil_secs(spec.grace)
    );
    let _ = writeln!(w, "      containers:");
    let _ = writeln!(w, "        - name: {}", scalar(container));
    let _ = writeln!(w, "          image: {}", scalar(&args.image));
    let _ = writeln!(w, "          command:");
    let command0 = if worker { WORKER } else { &spec.command[0] };
    let _ = writeln!(w, "            - {}", scalar(command0));
    if spec.command.len() > 1 {
        let _ = writeln!(w, "          args:");
        for arg in &spec.command[1..] {
            let _ = writeln!(w, "            - {}", scalar(arg));
        }
    }
    if let Some(server) = &server {
        let _ = writeln!(w, "          env:");
        let _ = writeln!(w, "            - name: WORKQ_SERVER");
        let _ = writeln!(w, "              value: {}", scalar(server));
        if !args.no_token {
            let _ = writeln!(w, "            - name: WORKQ_TOKEN");
            let _ = writeln!(w, "              valueFrom:");
            let _ = writeln!(w, "                secretKeyRef:");
            let _ = writeln!(w, "                  name: {}", scalar(&args.token_secret));
            let _ = writeln!(w, "                  key: token");
        }
        if ca_secret.is_some() {
            let _ = writeln!(w, "            - name: WORKQ_CA_CERT");
            let _ = writeln!(w, "              value: {CA_DIR}/ca.crt");
        }
    }
    if ca_secret.is_some() {
        let _ = writeln!(w, "          volumeMounts:");
        let _ = writeln!(w, "            - name: workq-ca");
        let _ = writeln!(w, "              mountPath: {CA_DIR}");
        let _ = writeln!(w, "              readOnly: true");
    }
    if args.cpu_request.is_some() || args.memory_request.is_some() {
        let _ = writeln!(w, "          resources:");
        let _ = writeln!(w, "            requests:");
        if let Some(cpu) = &args.cpu_request {
            let _ = writeln!(w, "              cpu: {}", scalar(cpu));
        }
        if let Some(memory) = &args.memory_request {
            let _ = writeln!(w, "              memory: {}", scalar(memory));
        }
    }
    if worker {
        // The workq image runs as a non-root user with a numeric uid; the worker needs
        // no privileges and writes nothing to its filesystem.
        let _ = writeln!(w, "          securityContext:");
        let _ = writeln!(w, "            runAsNonRoot: true");
        let _ = writeln!(w, "            allowPrivilegeEscalation: false");
        let _ = writeln!(w, "            capabilities:");
        let _ = writeln!(w, "              drop: [ALL]");
    }
    if let Some(secret) = ca_secret {
        let _ = writeln!(w, "      volumes:");
        let _ = writeln!(w, "        - name: workq-ca");
        let _ = writeln!(w, "          secret:");
        let _ = writeln!(w, "            secretName: {}", scalar(secret));
        let _ = writeln!(w, "            items:");
        let _ = writeln!(w, "              - key: ca.crt");
        let _ = writeln!(w, "                path: ca.crt");
    }
    Ok(y)
}

fn labels(worker: bool) -> Vec<(&'static str, &'static str)> {
    if worker {
        vec![
            ("app.kubernetes.io/name", "workq"),
            ("app.kubernetes.io/component", "worker"),
        ]
    } else {
        vec![("app.kubernetes.io/part-of", "workq")]
    }
}

/// Whole seconds, rounded up (a 1.5 s deadline must not become 1 s).
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A YAML scalar that reads back as exactly this string: plain when that is
/// unambiguous, otherwise double-quoted (JSON string syntax is valid YAML).
pub fn scalar(s: &str) -> String {
    if is_plain_safe(s) {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("\"{}\"", s.escape_default()))
    }
}

fn is_plain_safe(s: &str) -> bool {
    let bytes = s.as_bytes();
    let Some(&first) = bytes.first() else {
        return false;
    };
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_./:=@+-".contains(&b);
    if !bytes.iter().all(|&b| allowed(b)) || s.ends_with(':') {
        return false;
    }
    // Anything that could be read as a number, a timestamp or a document marker.
    let after_dashes = s.trim_start_matches('-');
    let plain_start = match first {
        b'-' => after_dashes.starts_with(|c: char| c.is_ascii_alphabetic()),
        b'.' => bytes.get(1) == Some(&b'/'),
        // `@` and `` ` `` are reserved indicators and cannot start a plain scalar.
        b'+' | b':' | b'@' => false,
        _ => !first.is_ascii_digit(),
    };
    if !plain_start {
        return false;
    }
    // YAML 1.1 booleans and nulls (Kubernetes' parser still honours some of them),
    // and its "value" key, `=`.
    let lower = s.to_ascii_lowercase();
    !matches!(
        lower.as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "="
    )
}

/// The arguments with every `--token` value replaced: a manifest is shared and
/// committed, and takes its token from a Secret anyway.
fn redact_tokens(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut value_next = false;
    for arg in args {
        if value_next {
            out.push("REDACTED".into());
            value_next = false;
        } else if arg == "--token" {
            out.push(arg);
            value_next = true;
        } else if arg.starts_with("--token=") {
            out.push("--token=REDACTED".into());
        } else {
            out.push(arg);
        }
    }
    out
}

/// Quotes an argument for the "Generated by" comment so it can be pasted in a shell,
/// on the comment's one line: control characters (a newline) are escaped in bash's
/// `$'…'` quoting.
fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=@%+,-".contains(&b));
    if safe {
        arg.to_string()
    } else if arg.chars().any(char::is_control) {
        let mut quoted = String::from("$'");
        for c in arg.chars() {
            match c {
                '\\' => quoted.push_str("\\\\"),
                '\'' => quoted.push_str("\\'"),
                '\n' => quoted.push_str("\\n"),
                '\t' => quoted.push_str("\\t"),
                '\r' => quoted.push_str("\\r"),
                c if c.is_control() => quoted.push_str(&format!("\\u{:04x}", c as u32)),
                c => quoted.push(c),
            }
        }
        quoted.push('\'');
        quoted
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_by_comment_stays_one_line_and_shows_no_token() {
        let args = [
            "--token",
            "s3cret",
            "job",
            "manifest",
            "--token=s3cret",
            "--",
            "sh",
            "-c",
            "echo one\necho 'two'",
        ]
        .map(String::from);
        let line = redact_tokens(args.into_iter())
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            line,
            r"--token REDACTED job manifest --token=REDACTED -- sh -c $'echo one\necho \'two\''"
        );
    }

    #[test]
    fn scalars_that_yaml_would_retype_are_quoted() {
        for plain in [
            "keygen",
            "--queue",
            "workq-worker",
            "http://workq:7070",
            "/bin/sh",
            "-c",
        ] {
            assert_eq!(scalar(plain), plain);
        }
        for quoted in [
            "10",
            "1.5",
            "true",
            "No",
            "",
            "--",
            "-",
            "a b",
            "x: y",
            "#c",
            "-1",
            ".5",
            "a:",
            "@payload.json",
            "@",
            "=",
        ] {
            assert!(scalar(quoted).starts_with('"'), "{quoted} must be quoted");
        }
        assert_eq!(scalar("say \"hi\""), r#""say \"hi\"""#);
    }

    fn render_flags(flags: &[&str]) -> Result<String, String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ManifestArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("manifest").chain(flags.iter().copied()),
        )
        .map_err(|e| e.to_string())?;
        render(&cli.args, "test")
    }

    #[test]
    fn the_policy_and_grace_are_the_resolved_specs() {
        let y = render_flags(&[
            "g",
            "--image",
            "w",
            "--",
            "workq-worker",
            "--grace",
            "40s",
            "keygen",
        ])
        .unwrap();
        assert!(y.contains("      - action: FailJob\n        onExitCodes:\n          containerName: worker\n          operator: In\n          values: [1, 2]\n"), "{y}");
        assert!(y.contains("terminationGracePeriodSeconds: 45\n"), "{y}");
        let y = render_flags(&[
            "g",
            "--grace",
            "50s",
            "--image",
            "w",
            "--",
            "workq-worker",
            "--grace",
            "40s",
            "keygen",
        ])
        .unwrap();
        assert!(y.contains("terminationGracePeriodSeconds: 50\n"), "{y}");
    }

    #[test]
    fn an_explicit_grace_below_the_workers_is_refused_not_raised() {
        let error = render_flags(&[
            "g7",
            "--grace",
            "3s",
            "--image",
            "w",
            "--",
            "workq-worker",
            "--queue",
            "q7",
            "exec",
            "--",
            "sleep",
            "8",
        ])
        .unwrap_err();
        assert!(
            error.contains("--grace 3s") && error.contains("worker's --grace 25s"),
            "{error}"
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("--parallelism"), "--parallelism");
        assert_eq!(shell_quote("echo hi"), "'echo hi'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
