//! `bench-compare`: workq against beanstalkd, Redis and NATS JetStream on one
//! machine, in one run, under the same closed-loop workloads, in memory and durable.
//!
//! It starts every server itself on 127.0.0.1 (free ports, temp dirs), installing
//! beanstalkd, redis-server and nats-server from Debian's packages when missing,
//! drives the peers with its own clients (`beanstalk`, `redis`, `nats`, `peer`) and
//! workq with `queue-cli bench` (`workq`), prints items/s and latency percentiles
//! per system and the workq/peer ratios, and checks the targets of issue 7. Every
//! server is killed by pid when its section ends (or when this process unwinds);
//! every peer run is bounded by a time budget.

mod beanstalk;
mod nats;
mod peer;
mod redis;
mod sample;
mod servers;
mod workq;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

use crate::nats::Storage;
use crate::peer::{Measured, Peer, Shape};
use crate::servers::Server;

/// Compare workq with beanstalkd, Redis and NATS JetStream side by side (see
/// BENCHMARKS.md).
///
/// Sections: `single` (32 clients, one item per operation: enqueue, then drain of
/// the same items), `batch` (8 clients, 100 items per request), `e2e` (8 producers
/// offering --rate items/s and 8 consumers; enqueue→ack latency), `scale` (workq
/// only: 1,000,000 queued items; RSS and restart recovery strict, drain rate at 1M
/// vs 10k in memory).
/// Durability: `memory` (beanstalkd, Redis without persistence, a JetStream memory
/// stream, workq --in-memory) and `durable` (beanstalkd -b with -f 50 and -f 0,
/// Redis appendfsync always, a JetStream file stream, workq --durability strict).
#[derive(Parser, Debug)]
#[command(name = "bench-compare", version, max_term_width = 100)]
struct Args {
    /// Items per one-item-per-operation run (section single).
    #[arg(long, default_value_t = 100_000)]
    items: u64,

    /// Items per batch run (section batch).
    #[arg(long, default_value_t = 1_000_000)]
    batch_items: u64,

    /// Items per e2e run (at --rate that is items/rate seconds).
    #[arg(long, default_value_t = 20_000)]
    e2e_items: u64,

    /// Offered load of the e2e runs, items/s over all producers.
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,

    /// Longest a peer enqueue or drain run may take (slow modes such as
    /// beanstalkd -f 0 stop there and report the rate they reached).
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    budget: u64,

    /// Which durability modes to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["memory", "durable"])]
    durability: Vec<Durability>,

    /// Which sections to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["single", "batch", "e2e"])]
    sections: Vec<Section>,

    /// Bytes per payload.
    #[arg(long, default_value_t = 64)]
    payload_size: usize,

    /// Run each section this many times, every system taking its turn in each round,
    /// and report each row's median round (by items/s; by p99 for e2e rows). This
    /// machine's noise moves single runs by ±20%.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    rounds: u32,

    /// Where workq-coordinator and queue-cli are [default: this binary's directory].
    #[arg(long)]
    bin_dir: Option<PathBuf>,

    /// table for people, json for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Durability {
    Memory,
    Durable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    Single,
    Batch,
    E2e,
    Scale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

impl Durability {
    fn name(self) -> &'static str {
        match self {
            Durability::Memory => "memory",
            Durability::Durable => "durable",
        }
    }
}

/// One system measured under one workload.
#[derive(Clone, Debug)]
struct Row {
    durability: &'static str,
    workload: &'static str,
    clients: String,
    batch: usize,
    system: String,
    measured: Measured,
    /// Items/s and p99 (µs) of every round, in run order (filled by [`median_rounds`]).
    round_rates: Vec<f64>,
    round_p99s: Vec<u32>,
}

impl Row {
    /// One round's row ([`median_rounds`] fills in the rounds).
    fn new(
        durability: &'static str,
        workload: &'static str,
        clients: String,
        batch: usize,
        system: String,
        measured: Measured,
    ) -> Row {
        Row {
            durability,
            workload,
            clients,
            batch,
            system,
            measured,
            round_rates: Vec::new(),
            round_p99s: Vec::new(),
        }
    }

    fn group(&self) -> (&str, &str, &str, usize) {
        (self.durability, self.workload, &self.clients, self.batch)
    }

    fn is_workq(&self) -> bool {
        self.system.starts_with("workq")
    }

    fn json(&self) -> Value {
        let m = &self.measured;
        json!({
            "durability": self.durability,
            "workload": self.workload,
            "clients": self.clients,
            "batch": self.batch,
            "system": self.system,
            "items": m.items,
            "seconds": (m.seconds * 1000.0).round() / 1000.0,
            "items_per_sec": m.items_per_sec().round(),
            "latency_us": m.latency.json(),
            "cut_short": m.cut_short,
            "verified": m.problems.is_empty(),
            "problems": m.problems,
            "round_items_per_sec": self.round_rates,
            "round_p99_us": self.round_p99s,
        })
    }
}

/// A target of issue 7 and whether this run met it.
#[derive(Debug)]
struct Target {
    name: String,
    measured: String,
    met: Option<bool>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("bench-compare has no parent directory")?
            .to_path_buf(),
    };
    sample::now_us();
    // Destructors kill the servers on every normal and error exit; a signal would
    // skip them, so it kills the servers first.
    tokio::spawn(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        servers::kill_all();
        eprintln!("bench-compare: interrupted; servers stopped");
        std::process::exit(130);
    });
    servers::ensure_installed()?;
    let machine = machine();
    let started = Instant::now();
    let mut rows = Vec::new();
    let side_by_side = args.sections.iter().any(|s| *s != Section::Scale);
    for &durability in args.durability.iter().filter(|_| side_by_side) {
        run_durability(&args, &bin_dir, durability, &mut rows).await?;
    }
    let rows = median_rounds(rows);
    let scale = if args.sections.contains(&Section::Scale) {
        Some(scale(&args, &bin_dir)?)
    } else {
        None
    };
    let targets = targets(&rows, scale.as_ref(), args.rate);
    let load_after = loadavg();
    match args.output {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "machine": machine,
                "load_after": load_after,
                "seconds": started.elapsed().as_secs(),
                "payload_size": args.payload_size,
                "rounds": args.rounds,
                "runs": rows.iter().map(Row::json).collect::<Vec<_>>(),
                "notes": notes(&rows),
                "scale": scale,
                "targets": targets.iter().map(|t| json!({
                    "target": t.name, "measured": t.measured, "met": t.met
                })).collect::<Vec<_>>(),
            }))?
        ),
        Format::Table => {
            println!(
                "machine: {} × {}; workq worker threads: {}; load average before {}, after {}; \
                 payload {} bytes; {}s; {}",
                machine["nproc"],
                machine["cpu"].as_str().unwrap_or("?"),
                machine["workq_worker_threads"].as_str().unwrap_or("?"),
                machine["load_before"].as_str().unwrap_or("?"),
                load_after,
                args.payload_size,
                started.elapsed().as_secs(),
                match args.rounds {
                    1 => "one round".to_string(),
                    n => format!("each row the median of {n} rounds"),
                }
            );
            print_rows(&rows);
            for note in notes(&rows) {
                println!("note: {note}");
            }
            print_ratios(&rows);
            if let Some(scale) = &scale {
                println!("\nscale (workq): {scale}");
            }
            println!("\ntargets (issue 7):");
            for t in &targets {
                let verdict = match t.met {
                    Some(true) => "met",
                    Some(false) => "NOT met",
                    None => "not measured",
                };
                println!("  {:<62} {:<9} {}", t.name, verdict, t.measured);
            }
        }
    }
    Ok(())
}

/// Folds the rounds of each row (same durability, workload, clients, batch and system)
/// into one: the round with the median rate, or for e2e rows, whose rate is the offered
/// one, the median p99 (the lower middle of an even count). It carries the problems of
/// every round, so one failed check fails the row, and the rates of all rounds. Rows
/// keep the order of their first round.
fn median_rounds(rows: Vec<Row>) -> Vec<Row> {
    let mut groups: Vec<Vec<Row>> = Vec::new();
    for row in rows {
        let same = |g: &&mut Vec<Row>| g[0].group() == row.group() && g[0].system == row.system;
        match groups.iter_mut().find(same) {
            Some(group) => group.push(row),
            None => groups.push(vec![row]),
        }
    }
    groups
        .into_iter()
        .map(|mut rounds| {
            let rates = rounds
                .iter()
                .map(|r| r.measured.items_per_sec().round())
                .collect();
            let p99s = rounds.iter().map(|r| r.measured.latency.p99).collect();
            let problems = rounds
                .iter()
                .flat_map(|r| r.measured.problems.iter().cloned())
                .collect();
            let key = |r: &Row| match r.workload {
                "e2e" => f64::from(r.measured.latency.p99),
                _ => r.measured.items_per_sec(),
            };
            rounds.sort_by(|a, b| key(a).total_cmp(&key(b)));
            let mut median = rounds.swap_remove((rounds.len() - 1) / 2);
            median.measured.problems = problems;
            median.round_rates = rates;
            median.round_p99s = p99s;
            median
        })
        .collect()
}

fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // The coordinator reads it (`--worker-threads`); it is inherited from this process.
    let workq_threads = std::env::var("WORKQ_WORKER_THREADS").unwrap_or_else(|_| "default".into());
    json!({"nproc": nproc, "cpu": cpu, "load_before": loadavg(), "workq_worker_threads": workq_threads})
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The peers of one durability mode, started fresh.
fn start_peers(durability: Durability) -> Result<Vec<(Server, Peer)>> {
    fn with(server: Server, peer: impl FnOnce(SocketAddr) -> Peer) -> (Server, Peer) {
        let peer = peer(server.addr);
        (server, peer)
    }
    Ok(match durability {
        Durability::Memory => vec![
            with(servers::beanstalkd(None)?, Peer::Beanstalkd),
            with(servers::redis(false)?, Peer::Redis),
            with(servers::nats(false)?, |addr| {
                Peer::Nats(addr, Storage::Memory)
            }),
        ],
        Durability::Durable => vec![
            with(servers::beanstalkd(Some(50))?, Peer::Beanstalkd),
            with(servers::beanstalkd(Some(0))?, Peer::Beanstalkd),
            with(servers::redis(true)?, Peer::Redis),
            with(servers::nats(true)?, |addr| Peer::Nats(addr, Storage::File)),
        ],
    })
}

async fn run_durability(
    args: &Args,
    bin_dir: &Path,
    durability: Durability,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let peers = start_peers(durability)?;
    let workq = servers::workq(bin_dir, durability == Durability::Durable)?;
    let d = durability.name();
    let budget = Duration::from_secs(args.budget);
    let workq_timeout = Duration::from_secs(600);
    let mut run = 0u32;
    let mut namespace = || {
        run += 1;
        format!("bench-{}-{run}", std::process::id())
    };
    for &section in &args.sections {
        let (clients, batch, items) = match section {
            Section::Single => (32, 1, args.items),
            Section::Batch => (8, 100, args.batch_items),
            Section::E2e | Section::Scale => (0, 1, 0),
        };
        for round in 1..=args.rounds {
            let of_rounds = match args.rounds {
                1 => String::new(),
                n => format!(" (round {round}/{n})"),
            };
            if matches!(section, Section::Single | Section::Batch) {
                let shape = Shape {
                    clients,
                    batch,
                    payload_size: args.payload_size,
                };
                for (server, peer) in &peers {
                    let ns = namespace();
                    eprintln!(
                        "{d}: {} enqueue+drain c{clients} b{batch}{of_rounds}",
                        server.label
                    );
                    let (enq, counts) = peer::enqueue(*peer, &ns, items, shape, budget).await?;
                    let drained =
                        peer::drain(*peer, &ns, items, clients, &counts, shape, budget).await?;
                    for (workload, measured) in [("enqueue", enq), ("drain", drained)] {
                        rows.push(Row::new(
                            d,
                            workload,
                            clients.to_string(),
                            batch,
                            server.label.clone(),
                            measured,
                        ));
                    }
                }
                for mode in ["unary", "stream", "wire"] {
                    for workload in ["enqueue", "drain"] {
                        eprintln!(
                            "{d}: {} {mode} {workload} c{clients} b{batch}{of_rounds}",
                            workq.label
                        );
                        let flags = [
                            "--workload",
                            workload,
                            "--mode",
                            mode,
                            "--items",
                            &items.to_string(),
                            "--concurrency",
                            &clients.to_string(),
                            "--batch",
                            &batch.to_string(),
                            "--payload-size",
                            &args.payload_size.to_string(),
                        ]
                        .map(String::from);
                        let measured = workq::bench(bin_dir, &workq.url(), &flags, workq_timeout)?;
                        rows.push(Row::new(
                            d,
                            workload,
                            clients.to_string(),
                            batch,
                            format!("workq {mode}"),
                            measured,
                        ));
                    }
                }
            }
            if section == Section::E2e {
                let (producers, consumers) = (8, 8);
                let shape = Shape {
                    clients: consumers,
                    batch: 1,
                    payload_size: args.payload_size,
                };
                let e2e_budget =
                    Duration::from_secs_f64(args.e2e_items as f64 / args.rate) + budget;
                for (server, peer) in &peers {
                    eprintln!(
                        "{d}: {} e2e {producers}+{consumers} at {}/s{of_rounds}",
                        server.label, args.rate
                    );
                    let ns = namespace();
                    let measured = peer::e2e(
                        *peer,
                        &ns,
                        args.e2e_items,
                        producers,
                        shape,
                        args.rate,
                        e2e_budget,
                    )
                    .await?;
                    rows.push(Row::new(
                        d,
                        "e2e",
                        format!("{producers}+{consumers}"),
                        1,
                        server.label.clone(),
                        measured,
                    ));
                }
                for mode in ["unary", "stream", "wire"] {
                    eprintln!("{d}: {} {mode} e2e{of_rounds}", workq.label);
                    let flags = [
                        "--workload",
                        "e2e",
                        "--mode",
                        mode,
                        "--items",
                        &args.e2e_items.to_string(),
                        "--producers",
                        &producers.to_string(),
                        "--consumers",
                        &consumers.to_string(),
                        "--rate",
                        &args.rate.to_string(),
                        "--payload-size",
                        &args.payload_size.to_string(),
                    ]
                    .map(String::from);
                    let measured = workq::bench(bin_dir, &workq.url(), &flags, workq_timeout)?;
                    rows.push(Row::new(
                        d,
                        "e2e",
                        format!("{producers}+{consumers}"),
                        1,
                        format!("workq {mode}"),
                        measured,
                    ));
                }
            }
        }
    }
    // Servers are killed by pid as they drop here.
    drop(peers);
    drop(workq);
    Ok(())
}

/// Target 4: a million queued items. RSS and restart recovery on a strict
/// coordinator (the durable configuration); the drain-rate comparison on an
/// in-memory one, so it shows how the engine scales rather than the disk.
fn scale(args: &Args, bin_dir: &Path) -> Result<Value> {
    const MILLION: u64 = 1_000_000;
    let timeout = Duration::from_secs(900);
    let payload_size = args.payload_size.to_string();
    let load = [
        "--workload",
        "enqueue",
        "--queue",
        "scale",
        "--items",
        "1000000",
        "--batch",
        "1000",
        "--concurrency",
        "4",
        "--mode",
        "stream",
        "--pipeline",
        "4",
        "--payload-size",
        &payload_size,
    ]
    .map(String::from);

    let mut strict = servers::workq(bin_dir, true)?;
    eprintln!("scale: enqueue 1,000,000 items into a strict coordinator");
    workq::bench(bin_dir, &strict.url(), &load, timeout)?;
    let rss_strict = strict.rss_kib()?;
    eprintln!("scale: restart the strict coordinator");
    let listening = strict.restart_workq(bin_dir)?;
    let polled = Instant::now();
    let deadline = polled + Duration::from_secs(120);
    while workq::ready(bin_dir, &strict.url(), "scale") != Some(MILLION) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the restarted coordinator did not show 1,000,000 ready items within 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let recovered = listening + polled.elapsed();
    let rss_restarted = strict.rss_kib()?;
    strict.stop();
    drop(strict);

    let mut memory = servers::workq(bin_dir, false)?;
    eprintln!("scale: enqueue 1,000,000 items into an in-memory coordinator");
    workq::bench(bin_dir, &memory.url(), &load, timeout)?;
    let rss_memory = memory.rss_kib()?;
    let deleted = std::process::Command::new(bin_dir.join("queue-cli"))
        .args(["--server", &memory.url(), "delete", "scale"])
        .output()?;
    anyhow::ensure!(deleted.status.success(), "delete the scale queue failed");
    let mut drains = Vec::new();
    for items in [10_000u64, MILLION] {
        eprintln!("scale: drain {items} (in memory, stream, 32 consumers)");
        let flags = [
            "--workload",
            "drain",
            "--mode",
            "stream",
            "--items",
            &items.to_string(),
            "--concurrency",
            "32",
            "--payload-size",
            &payload_size,
        ]
        .map(String::from);
        drains.push(workq::bench(bin_dir, &memory.url(), &flags, timeout)?);
    }
    memory.stop();
    Ok(json!({
        "rss_mib_strict_1m_queued": rss_strict / 1024,
        "rss_mib_strict_after_restart": rss_restarted / 1024,
        "rss_mib_in_memory_1m_queued": rss_memory / 1024,
        "restart_recovery_seconds": (recovered.as_secs_f64() * 100.0).round() / 100.0,
        "drain_items_per_sec_10k": drains[0].items_per_sec().round(),
        "drain_items_per_sec_1m": drains[1].items_per_sec().round(),
        "verified": drains.iter().all(|d| d.problems.is_empty()),
    }))
}

fn rate(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.0}k", x / 1_000.0)
    } else {
        format!("{x:.0}")
    }
}

fn ms(us: u32) -> String {
    format!("{:.2}ms", f64::from(us) / 1_000.0)
}

fn print_rows(rows: &[Row]) {
    println!(
        "\n{:<8} {:<8} {:<7} {:<5} {:<19} {:>9} {:>9} {:>9} {:>9}  CHECK",
        "MODE", "WORKLOAD", "CLIENTS", "BATCH", "SYSTEM", "ITEMS/S", "P50", "P99", "P99.9"
    );
    for r in rows {
        let m = &r.measured;
        let check = if !m.problems.is_empty() {
            format!("FAILED: {}", m.problems.join("; "))
        } else if m.cut_short {
            format!(
                "ok ({} items in the {}s budget)",
                m.items,
                m.seconds.round()
            )
        } else {
            "ok".to_string()
        };
        // The measure each round was ranked by.
        let ranked: Vec<String> = match r.workload {
            "e2e" => r.round_p99s.iter().map(|&p99| ms(p99)).collect(),
            _ => r.round_rates.iter().map(|&x| rate(x)).collect(),
        };
        let rounds = match ranked.len() {
            0 | 1 => String::new(),
            _ => format!("  rounds: {}", ranked.join(" ")),
        };
        println!(
            "{:<8} {:<8} {:<7} {:<5} {:<19} {:>9} {:>9} {:>9} {:>9}  {check}{rounds}",
            r.durability,
            r.workload,
            r.clients,
            r.batch,
            r.system,
            rate(m.items_per_sec()),
            ms(m.latency.p50),
            ms(m.latency.p99),
            ms(m.latency.p999),
        );
    }
}

/// What a reader needs to know about rows in this run, one line each.
fn notes(rows: &[Row]) -> Vec<&'static str> {
    let mut notes = Vec::new();
    if rows.iter().any(|r| r.system == servers::NATS_FILE) {
        notes.push(servers::NATS_FILE_NOTE);
    }
    notes
}

/// The best workq row of a group: most items/s, or for e2e the lowest p99.
fn best_workq<'a>(rows: &'a [Row], group: (&str, &str, &str, usize)) -> Option<&'a Row> {
    let candidates = rows.iter().filter(|r| r.is_workq() && r.group() == group);
    if group.1 == "e2e" {
        candidates.min_by_key(|r| r.measured.latency.p99)
    } else {
        candidates.max_by(|a, b| {
            a.measured
                .items_per_sec()
                .total_cmp(&b.measured.items_per_sec())
        })
    }
}

fn print_ratios(rows: &[Row]) {
    println!("\nworkq (best mode) / peer, same run:");
    for peer in rows.iter().filter(|r| !r.is_workq()) {
        let Some(best) = best_workq(rows, peer.group()) else {
            continue;
        };
        let (b, p) = (&best.measured, &peer.measured);
        let text = if peer.workload == "e2e" {
            format!(
                "p99 {} vs {} ({:.2}×)",
                ms(b.latency.p99),
                ms(p.latency.p99),
                f64::from(b.latency.p99) / f64::from(p.latency.p99.max(1))
            )
        } else {
            format!(
                "{} vs {} items/s ({:.2}×)",
                rate(b.items_per_sec()),
                rate(p.items_per_sec()),
                b.items_per_sec() / p.items_per_sec().max(1.0)
            )
        };
        println!(
            "  {:<8} {:<8} c{:<5} b{:<4} {} vs {:<19} {text}",
            peer.durability, peer.workload, peer.clients, peer.batch, best.system, peer.system
        );
    }
}

fn find<'a>(
    rows: &'a [Row],
    durability: &str,
    workload: &str,
    batch: usize,
    system: &str,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.durability == durability
            && r.workload == workload
            && r.batch == batch
            && r.system == system
    })
}

fn targets(rows: &[Row], scale: Option<&Value>, rate_offered: f64) -> Vec<Target> {
    let mut out = Vec::new();
    let best = |d: &str, w: &str, b: usize| {
        rows.iter()
            .find(|r| r.durability == d && r.workload == w && r.batch == b)
            .and_then(|r| best_workq(rows, r.group()))
    };
    // items/s of workq's best against `factor` × the fastest of `peers`.
    let mut throughput = |name: &str, d: &str, w: &str, b: usize, peers: &[&str], factor: f64| {
        let workq = best(d, w, b);
        let peer = peers
            .iter()
            .filter_map(|p| find(rows, d, w, b, p))
            .max_by(|a, c| {
                a.measured
                    .items_per_sec()
                    .total_cmp(&c.measured.items_per_sec())
            });
        let (measured, met) = match (workq, peer) {
            (Some(q), Some(p)) => {
                let ratio = q.measured.items_per_sec() / p.measured.items_per_sec().max(1.0);
                (
                    format!(
                        "{} {} vs {} {} = {ratio:.2}×",
                        q.system,
                        rate(q.measured.items_per_sec()),
                        p.system,
                        rate(p.measured.items_per_sec())
                    ),
                    Some(ratio >= factor),
                )
            }
            _ => ("not run".to_string(), None),
        };
        out.push(Target {
            name: name.to_string(),
            measured,
            met,
        });
    };
    throughput(
        "1. memory drain c32 b1 ≥ 1.5× beanstalkd",
        "memory",
        "drain",
        1,
        &["beanstalkd"],
        1.5,
    );
    throughput(
        "1. memory enqueue c32 b1 ≥ 1.0× max(beanstalkd, redis)",
        "memory",
        "enqueue",
        1,
        &["beanstalkd", "redis"],
        1.0,
    );
    for w in ["enqueue", "drain"] {
        throughput(
            &format!("2. strict {w} c32 b1 ≥ 1.0× beanstalkd -f50"),
            "durable",
            w,
            1,
            &["beanstalkd -f50"],
            1.0,
        );
        throughput(
            &format!("2. strict {w} c32 b1 ≥ 1.0× redis aof-always"),
            "durable",
            w,
            1,
            &["redis aof-always"],
            1.0,
        );
        throughput(
            &format!("2. strict {w} c32 b1 ≥ 5× beanstalkd -f0"),
            "durable",
            w,
            1,
            &["beanstalkd -f0"],
            5.0,
        );
    }
    throughput(
        "3. memory enqueue c8 b100 ≥ 1.0× redis LPUSH×100",
        "memory",
        "enqueue",
        100,
        &["redis"],
        1.0,
    );
    throughput(
        "3. strict enqueue c8 b100 ≥ 1.0× redis aof-always",
        "durable",
        "enqueue",
        100,
        &["redis aof-always"],
        1.0,
    );
    let drain_batch = best("memory", "drain", 100);
    out.push(Target {
        name: "3. memory drain c8 b100 ≥ 500k items/s".into(),
        measured: drain_batch.map_or("not run".into(), |r| {
            format!("{} {} items/s", r.system, rate(r.measured.items_per_sec()))
        }),
        met: drain_batch.map(|r| r.measured.items_per_sec() >= 500_000.0),
    });
    match scale {
        Some(s) => {
            let rss = s["rss_mib_strict_1m_queued"].as_u64().unwrap_or(u64::MAX);
            let rss_memory = s["rss_mib_in_memory_1m_queued"]
                .as_u64()
                .unwrap_or(u64::MAX);
            let recovery = s["restart_recovery_seconds"].as_f64().unwrap_or(f64::MAX);
            let (small, large) = (
                s["drain_items_per_sec_10k"].as_f64().unwrap_or(0.0),
                s["drain_items_per_sec_1m"].as_f64().unwrap_or(0.0),
            );
            out.push(Target {
                name: "4. 1M queued in ≤ 200 MiB RSS".into(),
                measured: format!("strict {rss} MiB, in memory {rss_memory} MiB"),
                met: Some(rss <= 200 && rss_memory <= 200),
            });
            out.push(Target {
                name: "4. restart recovers 1M in ≤ 5 s".into(),
                measured: format!("{recovery:.2} s"),
                met: Some(recovery <= 5.0),
            });
            out.push(Target {
                name: "4. drain rate at 1M within 20% of at 10k (in memory)".into(),
                measured: format!("{} vs {} items/s", rate(large), rate(small)),
                met: Some(large >= 0.8 * small),
            });
        }
        None => out.push(Target {
            name: "4. scale (1M queued: RSS, restart, drain rate)".into(),
            measured: "run with --sections scale".into(),
            met: None,
        }),
    }
    let e2e = |d: &str| best(d, "e2e", 1);
    let beanstalkd = find(rows, "memory", "e2e", 1, "beanstalkd");
    out.push(Target {
        name: format!("5. e2e {rate_offered}/s p99 ≤ beanstalkd in memory"),
        measured: match (e2e("memory"), beanstalkd) {
            (Some(q), Some(b)) => format!(
                "{} {} vs {}",
                q.system,
                ms(q.measured.latency.p99),
                ms(b.measured.latency.p99)
            ),
            _ => "not run".into(),
        },
        met: e2e("memory")
            .zip(beanstalkd)
            .map(|(q, b)| q.measured.latency.p99 <= b.measured.latency.p99),
    });
    out.push(Target {
        name: format!("5. e2e {rate_offered}/s p99 ≤ 5 ms strict"),
        measured: e2e("durable").map_or("not run".into(), |q| {
            format!("{} {}", q.system, ms(q.measured.latency.p99))
        }),
        met: e2e("durable").map(|q| q.measured.latency.p99 <= 5_000),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Percentiles;

    fn row(system: &str, workload: &'static str, items_per_sec: u64, p99: u32) -> Row {
        let measured = Measured {
            items: items_per_sec,
            seconds: 1.0,
            latency: Percentiles {
                p99,
                ..Percentiles::default()
            },
            cut_short: false,
            problems: Vec::new(),
        };
        Row::new("durable", workload, "32".into(), 1, system.into(), measured)
    }

    #[test]
    fn each_row_is_its_median_round_and_keeps_every_rounds_problems() {
        let mut lost = row("a", "enqueue", 300, 0);
        lost.measured.problems.push("1 item lost".into());
        let rows = vec![
            row("a", "enqueue", 100, 0),
            row("b", "enqueue", 300, 0),
            row("a", "e2e", 2000, 5000),
            lost,
            row("b", "enqueue", 100, 0),
            row("a", "e2e", 2000, 1000),
            row("a", "enqueue", 200, 0),
            row("b", "enqueue", 200, 0),
            row("a", "e2e", 1990, 3000),
        ];
        let folded = median_rounds(rows);
        let summary: Vec<_> = folded
            .iter()
            .map(|r| {
                (
                    r.system.as_str(),
                    r.workload,
                    r.measured.items,
                    r.measured.latency.p99,
                    r.round_rates.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a", "enqueue", 200, 0, vec![100.0, 300.0, 200.0]),
                ("b", "enqueue", 200, 0, vec![300.0, 100.0, 200.0]),
                ("a", "e2e", 1990, 3000, vec![2000.0, 2000.0, 1990.0]),
            ]
        );
        assert_eq!(folded[2].round_p99s, vec![5000, 1000, 3000]);
        assert_eq!(folded[0].measured.problems, vec!["1 item lost".to_string()]);
        assert!(folded[1].measured.problems.is_empty());
    }
}
