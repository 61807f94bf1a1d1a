//! `workq-worker`: leases items from a workq queue and runs a handler on each (one
//! worker per Job pod), or generates keys without a queue, or consumes a memq queue
//! the way kuard does.
//!
//! This file owns the command line: it parses it, picks one [`Mode`], runs it, and
//! maps the end to the exit codes a Kubernetes Job relies on: 0 only when the queue
//! is drained (or a standalone count is done), 1 fatal error, 2 usage, 143 SIGTERM.

mod handler;
mod http;
mod kuard;
mod link;
mod memq;
mod runner;
mod shutdown;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use workq_proto::ConnectOptions;

use handler::{Handler, exec::Exec, keygen::Keygen};
use kuard::{FixedEnd, KuardFlags};
use memq::MemqEnd;
use runner::{End, ExitOn};
use shutdown::Shutdown;

/// Exit code for fatal errors (bad token, coordinator gone past --connect-timeout…).
const EXIT_FATAL: u8 = 1;

/// A workq worker: leases items from a queue and runs a handler on each, until the
/// queue is drained.
///
/// Exit codes: 0 when the queue is drained (or a standalone count is done), 1 on a
/// fatal error, 2 on bad usage, 143 after SIGTERM (running items get --grace to
/// finish; the rest are released without counting an attempt).
#[derive(Parser, Debug)]
#[command(name = "workq-worker", version, max_term_width = 100)]
struct Args {
    /// Coordinator gRPC address.
    #[arg(long, env = "WORKQ_SERVER", default_value = workq_proto::client::DEFAULT_SERVER, global = true, help_heading = "Worker options")]
    server: String,

    /// Bearer token, when the coordinator was started with --token-file.
    #[arg(
        long,
        env = "WORKQ_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = "Worker options"
    )]
    token: Option<String>,

    /// PEM CA certificate(s) an https:// coordinator's certificate must chain to,
    /// instead of the system's (like curl's --cacert).
    #[arg(
        long,
        env = "WORKQ_CA_CERT",
        value_name = "PEM",
        global = true,
        help_heading = "Worker options"
    )]
    ca_cert: Option<std::path::PathBuf>,

    /// Queue to lease items from. Without it, `keygen` generates --count keys and exits.
    #[arg(long, global = true, help_heading = "Worker options")]
    queue: Option<String>,

    /// Items handled at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000), global = true, help_heading = "Worker options")]
    concurrency: u32,

    /// When to exit 0: once the queue is drained (no ready, delayed or leased items
    /// left anywhere), once it is drained and sealed, or never.
    #[arg(long, value_enum, default_value_t = ExitOn::Drained, global = true, help_heading = "Worker options")]
    exit_on: ExitOn,

    /// This worker's name in the coordinator's stats [default: $HOSTNAME, the pod
    /// name; else host-pid].
    #[arg(long, global = true, help_heading = "Worker options")]
    worker_id: Option<String>,

    /// Give up (exit 1) when the coordinator has been unreachable, or the queue
    /// missing, for this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration, global = true, help_heading = "Worker options")]
    connect_timeout: Duration,

    /// After SIGTERM, how long running items may take to finish before they are
    /// cancelled and released. Keep it under the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value = "25s", value_parser = parse_duration, global = true, help_heading = "Worker options")]
    grace: Duration,

    /// Lease length for our leases, instead of the queue's (extended in the
    /// background while an item runs).
    #[arg(long, value_parser = workq_proto::duration::parse_positive, global = true, help_heading = "Worker options")]
    lease_timeout: Option<Duration>,

    #[command(flatten)]
    kuard: KuardFlags,

    #[command(subcommand)]
    handler: Option<HandlerArgs>,
}

#[derive(Subcommand, Debug)]
enum HandlerArgs {
    /// Generate an RSA key pair (OpenSSH format) per item; the result is its SHA256
    /// fingerprint. Without --queue: generate --count keys and exit 0.
    Keygen {
        /// RSA key size.
        #[arg(long, default_value_t = handler::keygen::DEFAULT_BITS, value_parser = parse_bits)]
        bits: usize,
        /// Write each key pair here (private key mode 0600): `item-ID` with a queue,
        /// `key-N` without.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Keys to generate without a queue [default: 1].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
    },
    /// Run CMD ARGS… per item: payload on stdin; WORKQ_QUEUE, WORKQ_ITEM_ID,
    /// WORKQ_ATTEMPT in the environment; exit 0 acks with stdout's tail (≤ 64 KiB)
    /// as the result.
    Exec {
        /// Exit codes meaning the item can never succeed: it goes DEAD at once
        /// (comma-separated). Other non-zero codes are retried with backoff.
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "CODES",
            allow_negative_numbers = true
        )]
        permanent_failure_codes: Vec<i32>,
        /// Kill the command (its whole process group) after this long; the item is
        /// retried.
        #[arg(long, value_parser = workq_proto::duration::parse_positive, value_name = "DURATION")]
        item_timeout: Option<Duration>,
        /// The command and its arguments (after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    workq_proto::duration::parse(text)
}

fn parse_bits(text: &str) -> Result<usize, String> {
    let bits: usize = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number"))?;
    if !(1024..=16384).contains(&bits) || !bits.is_multiple_of(8) {
        return Err("RSA key size must be a multiple of 8 from 1024 to 16384".into());
    }
    Ok(bits)
}

/// What this run does, decided from the command line alone.
#[derive(Debug)]
enum Mode {
    /// Lease from `--queue` and run the handler.
    Queue {
        config: runner::Config,
        handler: Handler,
    },
    /// `keygen --count N`, or kuard's fixed-count workload.
    Fixed {
        work: kuard::Fixed,
        /// kuard without --keygen-exit-on-complete keeps running after the workload.
        exit: Option<u8>,
    },
    /// kuard's memq consumer.
    Memq(memq::Memq),
}

/// Picks the mode, or says what is wrong with the command line.
fn plan(args: &Args) -> Result<Mode, String> {
    let k = &args.kuard;
    let keygen_opts = match &args.handler {
        Some(HandlerArgs::Keygen { bits, out, count }) => Some((*bits, out.clone(), *count)),
        _ => None,
    };
    if let Some((_, Some(out), _)) = &keygen_opts {
        handler::keygen::prepare_out_dir(out)
            .map_err(|e| format!("--out {}: {e}", out.display()))?;
    }
    if k.keygen_enable {
        if args.queue.is_some() {
            return Err(
                "--keygen-enable (kuard's keygen workload) and --queue are two different \
                        modes: pick one"
                    .into(),
            );
        }
        if matches!(args.handler, Some(HandlerArgs::Exec { .. })) {
            return Err("--keygen-enable runs keygen; it does not combine with exec".into());
        }
        let (bits, out, count) = keygen_opts.unwrap_or((handler::keygen::DEFAULT_BITS, None, None));
        if count.is_some() {
            return Err("--count is for `keygen` without kuard flags; kuard's is \
                        --keygen-num-to-gen"
                .into());
        }
        if k.memq() {
            let server = http::Url::parse(&k.keygen_memq_server)
                .map_err(|e| format!("--keygen-memq-server {e}"))?;
            return Ok(Mode::Memq(memq::Memq {
                server,
                queue: k.keygen_memq_queue.clone(),
                exit_on_complete: k.keygen_exit_on_complete,
                exit_code: k.exit_code(),
                bits,
                out,
                token: args.token.clone().filter(|t| !t.is_empty()),
            }));
        }
        return Ok(Mode::Fixed {
            work: kuard::Fixed {
                num_to_gen: k.keygen_num_to_gen.max(0) as u64,
                time_to_run: (k.keygen_time_to_run > 0)
                    .then(|| Duration::from_secs(k.keygen_time_to_run as u64)),
                bits,
                out,
                concurrency: 1,
            },
            exit: k.keygen_exit_on_complete.then(|| k.exit_code()),
        });
    }
    if k.any_set() {
        return Err(
            "the --keygen-* flags take effect only with --keygen-enable (as in kuard)".into(),
        );
    }
    match (&args.queue, &args.handler) {
        (_, None) => Err(
            "no handler: give `keygen` or `exec -- CMD ARGS…` (or kuard's \
                          --keygen-enable)"
                .into(),
        ),
        (Some(queue), Some(handler_args)) => {
            let handler = match handler_args {
                HandlerArgs::Keygen { bits, out, count } => {
                    if count.is_some() {
                        return Err("--count is for `keygen` without --queue; with a queue, \
                                    one key is made per item"
                            .into());
                    }
                    Handler::Keygen(Keygen {
                        bits: *bits,
                        out: out.clone(),
                    })
                }
                HandlerArgs::Exec {
                    permanent_failure_codes,
                    item_timeout,
                    command,
                } => {
                    let (program, rest) = command.split_first().ok_or("exec needs a command")?;
                    handler::exec::check_program(program)?;
                    Handler::Exec(Exec {
                        program: program.clone(),
                        args: rest.to_vec(),
                        permanent_failure_codes: permanent_failure_codes.clone(),
                        item_timeout: *item_timeout,
                    })
                }
            };
            Ok(Mode::Queue {
                config: runner::Config {
                    queue: queue.clone(),
                    worker_id: worker_id(args.worker_id.as_deref()),
                    concurrency: args.concurrency,
                    exit_on: args.exit_on,
                    lease_timeout: args.lease_timeout,
                },
                handler,
            })
        }
        (None, Some(HandlerArgs::Keygen { bits, out, count })) => Ok(Mode::Fixed {
            work: kuard::Fixed {
                num_to_gen: count.unwrap_or(1),
                time_to_run: None,
                bits: *bits,
                out: out.clone(),
                concurrency: args.concurrency,
            },
            exit: Some(0),
        }),
        (None, Some(HandlerArgs::Exec { .. })) => Err("exec needs --queue".into()),
    }
}

/// `--worker-id`, else `$HOSTNAME` (the pod name in Kubernetes), else `host-pid` so
/// that several local workers stay apart in the stats.
fn worker_id(flag: Option<&str>) -> String {
    if let Some(id) = flag.filter(|id| !id.is_empty()) {
        return id.to_string();
    }
    if let Some(host) = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()) {
        return host;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

fn main() {
    let args = Args::parse();
    let mode = match plan(&args) {
        Ok(mode) => mode,
        Err(message) => Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            std::process::exit(EXIT_FATAL.into());
        }
    };
    let code = runtime.block_on(run(args, mode));
    // Exit without dropping the runtime: it would wait for abandoned key generations
    // on the blocking pool.
    std::process::exit(code.into());
}

async fn run(args: Args, mode: Mode) -> u8 {
    let shutdown = match Shutdown::listen(args.grace) {
        Ok(shutdown) => shutdown,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return EXIT_FATAL;
        }
    };
    match mode {
        Mode::Queue { config, handler } => {
            let options = match ConnectOptions::new(args.server.clone())
                .token(args.token.clone())
                .ca_cert_file(args.ca_cert.as_deref())
            {
                Ok(options) => options,
                Err(e) => {
                    tracing::error!("{e}");
                    return EXIT_FATAL;
                }
            };
            let link = link::Link::new(args.connect_timeout);
            match runner::run(options, config, handler, link, shutdown).await {
                Ok(End::Drained) => 0,
                Ok(End::Signalled(signal)) => signal.0,
                Err(e) => {
                    tracing::error!("{e:#}");
                    EXIT_FATAL
                }
            }
        }
        Mode::Fixed { work, exit } => match kuard::run_fixed(work, &shutdown).await {
            Ok(FixedEnd::Complete) => match exit {
                Some(code) => code,
                None => {
                    tracing::info!(
                        "workload complete; staying up as kuard does without \
                         --keygen-exit-on-complete (SIGTERM to stop)"
                    );
                    shutdown.draining().await;
                    shutdown.signal().map_or(143, |s| s.0)
                }
            },
            Ok(FixedEnd::Signalled(signal)) => signal.0,
            Err(e) => {
                tracing::error!("{e:#}");
                EXIT_FATAL
            }
        },
        Mode::Memq(memq) => match memq.run(&shutdown).await {
            Ok(MemqEnd::Complete(code)) => code,
            Ok(MemqEnd::Signalled(signal)) => signal.0,
            Err(e) => {
                tracing::error!("{e:#}");
                EXIT_FATAL
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Mode, String> {
        let args =
            Args::try_parse_from(std::iter::once("workq-worker").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        plan(&args)
    }

    #[test]
    fn kuard_flags_in_both_forms_with_bare_bools() {
        let spaced = parse(&[
            "--keygen-enable",
            "--keygen-exit-on-complete",
            "--keygen-num-to-gen",
            "10",
            "--keygen-exit-code",
            "3",
        ])
        .unwrap();
        let equals = parse(&[
            "--keygen-enable=true",
            "--keygen-exit-on-complete=1",
            "--keygen-num-to-gen=10",
            "--keygen-exit-code=3",
        ])
        .unwrap();
        for mode in [spaced, equals] {
            let Mode::Fixed { work, exit } = mode else {
                panic!("{mode:?}");
            };
            assert_eq!(work.num_to_gen, 10);
            assert_eq!(work.bits, 4096);
            assert_eq!(exit, Some(3));
        }
        let Mode::Fixed { work, exit } = parse(&[
            "--keygen-enable",
            "--keygen-time-to-run=30",
            "keygen",
            "--bits",
            "1024",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (work.num_to_gen, work.time_to_run, work.bits),
            (0, Some(Duration::from_secs(30)), 1024)
        );
        assert_eq!(
            exit, None,
            "kuard keeps running without --keygen-exit-on-complete"
        );
    }

    #[test]
    fn kuard_memq_mode_needs_both_memq_flags() {
        let Mode::Memq(memq) = parse(&[
            "--keygen-enable",
            "--keygen-exit-on-complete",
            "--keygen-memq-server=http://queue:8080/memq/server",
            "--keygen-memq-queue=keygen",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(memq.server.to_string(), "http://queue:8080/memq/server");
        assert_eq!(memq.queue, "keygen");
        assert!(memq.exit_on_complete);
        // Only one memq flag: fixed mode, as in kuard.
        assert!(matches!(
            parse(&["--keygen-enable", "--keygen-memq-queue", "keygen"]).unwrap(),
            Mode::Fixed { .. }
        ));
        // kuard flags without --keygen-enable do nothing in kuard; here they are an error.
        assert!(
            parse(&["--keygen-num-to-gen=3"])
                .unwrap_err()
                .contains("--keygen-enable")
        );
        assert!(parse(&["--keygen-enable=false"]).is_err());
    }

    #[test]
    fn queue_and_standalone_modes() {
        let Mode::Queue { config, handler } = parse(&[
            "--queue",
            "jobs",
            "--concurrency",
            "4",
            "--worker-id",
            "w1",
            "exec",
            "--permanent-failure-codes",
            "3,4",
            "--",
            "sh",
            "-c",
            "cat",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                config.queue.as_str(),
                config.concurrency,
                config.worker_id.as_str()
            ),
            ("jobs", 4, "w1")
        );
        let Handler::Exec(exec) = handler else {
            panic!()
        };
        assert_eq!(exec.program, "sh");
        assert_eq!(exec.args, ["-c", "cat"]);
        assert_eq!(exec.permanent_failure_codes, [3, 4]);

        // Global flags work after the handler too.
        assert!(matches!(
            parse(&["keygen", "--queue", "k"]).unwrap(),
            Mode::Queue { .. }
        ));
        let Mode::Fixed { work, exit } =
            parse(&["keygen", "--count", "5", "--bits", "1024"]).unwrap()
        else {
            panic!()
        };
        assert_eq!((work.num_to_gen, work.bits, exit), (5, 1024, Some(0)));

        assert!(
            parse(&["exec", "--", "true"])
                .unwrap_err()
                .contains("--queue")
        );
        assert!(parse(&["--queue", "q"]).unwrap_err().contains("no handler"));
        assert!(parse(&["--queue", "q", "keygen", "--count", "2"]).is_err());
        assert!(parse(&["--queue", "q", "exec", "--", "workq-no-such-cmd"]).is_err());
        assert!(parse(&["keygen", "--bits", "512"]).is_err());
    }
}
