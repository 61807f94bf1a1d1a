//! `workers`: who is leasing, from which queue, how much is in flight.

use anyhow::Result;
use clap::Args;
use serde_json::json;
use workq_proto::pb;

use crate::connect::Global;
use crate::output::{Format, Table, age, print_json, worker_json};

/// List workers seen recently, with their items in flight and completions.
///
/// A worker is identified by the id it leases with (the pod name for workq-worker,
/// --worker-id for `queue-cli lease`).
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli workers
  queue-cli workers keygen -o json

JSON (-o json): {\"workers\": [{\"id\", \"queue\", \"last_seen_at_ms\", \"in_flight\",
\"completed\"}...]}")]
pub struct WorkersArgs {
    /// Only workers of this queue.
    pub queue: Option<String>,
}

pub async fn run(global: &Global, args: WorkersArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let mut workers = client
        .list_workers(pb::ListWorkersRequest {
            queue: args.queue.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .workers;
    workers.sort_by(|a, b| (&a.queue, &a.id).cmp(&(&b.queue, &b.id)));
    match global.output {
        Format::Json => print_json(&json!({
            "workers": workers.iter().map(worker_json).collect::<Vec<_>>(),
        })),
        Format::Table if workers.is_empty() => eprintln!("no workers"),
        Format::Table => {
            let mut table = Table::new(&["WORKER", "QUEUE", "IN-FLIGHT", "COMPLETED", "LAST-SEEN"]);
            for worker in &workers {
                table.row(vec![
                    worker.id.clone(),
                    worker.queue.clone(),
                    worker.in_flight.to_string(),
                    worker.completed.to_string(),
                    format!("{} ago", age(worker.last_seen_at_ms)),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}
