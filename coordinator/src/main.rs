//! `workq-coordinator`: the workq server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use workq_coordinator::auth::Auth;
use workq_coordinator::clock::Clock;
use workq_coordinator::store::{Durability, Store};
use workq_coordinator::tls::Tls;
use workq_coordinator::{Engine, server};

/// The workq coordinator: durable queues with leases, served over gRPC and HTTP.
///
/// Example: workq-coordinator --data-dir ./workq-data
#[derive(Parser, Debug)]
#[command(name = "workq-coordinator", version, about, long_about = None)]
struct Args {
    /// gRPC listen address (queue API, grpc.health.v1, reflection; the wire protocol
    /// on the same port). Use 0.0.0.0:7070 in a pod so Kubernetes gRPC probes can
    /// reach it.
    #[arg(long, default_value = "127.0.0.1:7070", env = "WORKQ_GRPC_ADDR")]
    grpc_addr: SocketAddr,

    /// HTTP listen address (kuard memq API, /metrics, /healthz, /readyz, dashboard).
    #[arg(long, default_value = "127.0.0.1:8080", env = "WORKQ_HTTP_ADDR")]
    http_addr: SocketAddr,

    /// Directory of the write-ahead log and snapshots. Created if missing.
    #[arg(
        long,
        default_value = "./workq-data",
        env = "WORKQ_DATA_DIR",
        conflicts_with = "in_memory"
    )]
    data_dir: PathBuf,

    /// Keep everything in memory (kuard-like): nothing survives a restart.
    #[arg(long)]
    in_memory: bool,

    /// strict: acknowledge a change only after it is flushed to disk (group commit).
    /// relaxed: acknowledge at once, flush at least every 500 ms.
    #[arg(long, value_enum, default_value = "strict")]
    durability: Durability,

    /// How often to snapshot the state while writes keep coming, once the log has
    /// grown to half the last snapshot (it also snapshots whenever the log outgrows
    /// the snapshot and 64 MiB). A restart reads the snapshot and the log after it,
    /// so a snapshot is written only once at least a third of that is garbage.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    checkpoint_every: std::time::Duration,

    /// Accepted and ignored: the sled cache of earlier versions (there is no sled now).
    #[arg(long, hide = true)]
    cache_mb: Option<u64>,

    /// After SIGTERM, how long calls may take to finish before they are cut and the
    /// log is synced a last time. Keep it under the pod's termination grace period.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    shutdown_grace: std::time::Duration,

    /// Close an HTTP connection once this long has passed since the coordinator last
    /// wrote to it and since the first byte of the request that followed (idle
    /// keep-alive connections, and clients that connect and say nothing, stop half-way
    /// through a request or trickle one in), so that such clients cannot use up the
    /// coordinator's file descriptors. A request must arrive whole within this long.
    #[arg(long, default_value = "60s", value_parser = parse_idle_timeout)]
    http_idle_timeout: std::time::Duration,

    /// File holding the bearer token every API call must present.
    #[arg(long, env = "WORKQ_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// Serve TLS on both ports with this PEM certificate chain (the coordinator's
    /// certificate first); needs --tls-key. The wire protocol is then not offered.
    #[arg(long, env = "WORKQ_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "WORKQ_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Write the bound addresses as JSON ({"grpc": "...", "http": "..."}) to this file
    /// once listening (useful with port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,

    /// Threads that serve calls (the async runtime's workers) [default: the CPUs this
    /// process may use]. The log's flusher thread comes on top. Fewer than the CPUs
    /// can pay where the coordinator shares its machine with busy clients: see
    /// BENCHMARKS.md.
    #[arg(long, value_name = "N", env = "WORKQ_WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,

    /// Log format: text for people, json for log collectors. Level from RUST_LOG.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.worker_threads {
        runtime.worker_threads(usize::from(threads));
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("workq-coordinator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("workq-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let auth = match &args.token_file {
        Some(path) => Auth::from_file(path)?,
        None => Auth::disabled(),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Tls::from_files(cert, key)?),
        _ => None,
    };
    if args.cache_mb.is_some() {
        tracing::warn!("--cache-mb is ignored: the store no longer uses sled");
    }
    let store = if args.in_memory {
        Store::memory()
    } else {
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
        let store = Store::open_disk(&args.data_dir, args.durability)?;
        if let Store::Disk(disk) = &store {
            disk.set_checkpoint_every(args.checkpoint_every);
        }
        store
    };
    let engine = Engine::open(store, Clock::system())?;

    let grpc = TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--grpc-addr)", args.grpc_addr))?;
    let http = TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} (--http-addr)", args.http_addr))?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    tracing::info!(%grpc_addr, %http_addr, store = engine.store().describe(), auth = auth.enabled(), tls = tls.is_some(), "listening");
    if let Some(path) = &args.addr_file {
        let json = format!("{{\"grpc\":\"{grpc_addr}\",\"http\":\"{http_addr}\"}}\n");
        // Write then rename, so readers never see a half-written file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let serving = server::Serving {
        grace: args.shutdown_grace,
        tls,
        http_idle_timeout: args.http_idle_timeout,
    };
    server::run_with(grpc, http, engine, auth, shutdown_signal(), serving).await
}

fn parse_idle_timeout(text: &str) -> Result<std::time::Duration, String> {
    match parse_duration(text)? {
        std::time::Duration::ZERO => Err("the idle timeout must be longer than 0s".into()),
        timeout => Ok(timeout),
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    workq_proto::duration::parse(text)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
