//! `queue-cli`: enqueue, inspect, administer, watch, load-test and run Jobs locally.
//!
//! One module per verb group under `commands/`; `output` renders tables and JSON;
//! `connect` turns the global flags into a client and coordinator errors into one line.

mod bench;
mod commands;
mod connect;
mod job;
mod output;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::commands::{enqueue, items, lease, queue, schedule, watch, workers};
use crate::connect::Global;

/// Command-line client for workq, a durable work queue for batch jobs.
///
/// Every command talks to a coordinator over gRPC (--server, default
/// http://127.0.0.1:7070). Errors are one line on stderr and exit code 1; usage
/// errors exit 2. With `-o json` each command prints one JSON document (the shape
/// is in the command's --help) and `watch` prints one JSON object per line.
#[derive(Parser, Debug)]
#[command(
    name = "queue-cli",
    version,
    about,
    max_term_width = 100,
    after_help = "\
Examples:
  queue-cli create keygen
  queue-cli enqueue keygen --count 100 --payload 'work-item-{i}' --seal
  queue-cli watch keygen --until sealed
  queue-cli schedule create nightly --queue keygen --cron '0 2 * * *' --count 100
  queue-cli list -o json"
)]
struct Cli {
    #[command(flatten)]
    global: Global,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    // ---- queue administration (commands/queue.rs) ----
    Create(queue::CreateArgs),
    Update(queue::UpdateArgs),
    Delete(queue::DeleteArgs),
    List(queue::ListArgs),
    Stats(queue::StatsArgs),
    Purge(queue::PurgeArgs),
    Seal(queue::SealArgs),
    Unseal(queue::UnsealArgs),

    // ---- producing and following (commands/enqueue.rs, commands/watch.rs) ----
    Enqueue(enqueue::EnqueueArgs),
    Watch(watch::WatchArgs),

    // ---- inspecting items (commands/items.rs, commands/workers.rs) ----
    Items(items::ItemsArgs),
    Item(items::ItemArgs),
    Requeue(items::RequeueArgs),
    Results(items::ResultsArgs),
    Workers(workers::WorkersArgs),

    // ---- the worker protocol by hand (commands/lease.rs) ----
    Lease(lease::LeaseArgs),
    Ack(lease::AckArgs),
    Fail(lease::FailArgs),
    Extend(lease::ExtendArgs),
    Release(lease::ReleaseArgs),

    // ---- schedules (commands/schedule.rs) ----
    /// Enqueue batches on a cron schedule: create, list, delete, suspend, resume.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),

    // ---- load generation (bench/) ----
    Bench(bench::BenchArgs),

    /// Run a command as local "pods" with the Kubernetes Job controller's semantics,
    /// or print the equivalent Job manifest.
    #[command(subcommand)]
    Job(job::JobCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli =
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    let mut global = cli.global;
    global.note_sources(&matches);
    let result = match cli.command {
        Command::Create(args) => queue::create(&global, args).await,
        Command::Update(args) => queue::update(&global, args).await,
        Command::Delete(args) => queue::delete(&global, args).await,
        Command::List(args) => queue::list(&global, args).await,
        Command::Stats(args) => queue::stats(&global, args).await,
        Command::Purge(args) => queue::purge(&global, args).await,
        Command::Seal(args) => queue::seal(&global, args).await,
        Command::Unseal(args) => queue::unseal(&global, args).await,
        Command::Enqueue(args) => enqueue::run(&global, args).await,
        Command::Watch(args) => watch::run(&global, args).await,
        Command::Items(args) => items::items(&global, args).await,
        Command::Item(args) => items::item(&global, args).await,
        Command::Requeue(args) => items::requeue(&global, args).await,
        Command::Results(args) => items::results(&global, args).await,
        Command::Workers(args) => workers::run(&global, args).await,
        Command::Lease(args) => lease::lease(&global, args).await,
        Command::Ack(args) => lease::ack(&global, args).await,
        Command::Fail(args) => lease::fail(&global, args).await,
        Command::Extend(args) => lease::extend(&global, args).await,
        Command::Release(args) => lease::release(&global, args).await,
        Command::Schedule(command) => schedule::run(&global, command).await,
        Command::Bench(args) => bench::run(&global, args).await,
        Command::Job(command) => return job::run(command, global.output).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", global.describe(&error));
            ExitCode::FAILURE
        }
    }
}
