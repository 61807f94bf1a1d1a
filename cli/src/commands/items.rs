//! Inspecting items: `items`, `item`, `requeue`, `results`.

use anyhow::Result;
use clap::{ArgGroup, Args};
use serde_json::json;
use workq_proto::{Client, pb};

use crate::connect::Global;
use crate::output::{
    Format, Table, age, cell_text, count, insert_bytes, item_json, outln, print_fields, print_json,
    state_name, until,
};

/// Items per ListItems call; the coordinator's maximum.
const PAGE: u32 = 1000;

/// Widest payload or result shown in a table cell.
const CELL: usize = 48;

/// List a queue's items, oldest id first, optionally in one state.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli items keygen
  queue-cli items keygen --state dead -o json
  queue-cli items keygen --limit 50 --after 1200

JSON (-o json): {\"items\": [ITEM...], \"next_after_id\": ID} where next_after_id is 0
when there are no more items, and each ITEM is as `item -o json` prints it.")]
pub struct ItemsArgs {
    /// Queue name.
    pub queue: String,

    /// Only items in this state: ready, delayed, leased, done or dead.
    #[arg(long, value_parser = parse_state, value_name = "STATE")]
    pub state: Option<pb::ItemState>,

    /// Show at most N items; 0 shows them all.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub limit: u64,

    /// Start after this item id (for paging).
    #[arg(long, default_value_t = 0, value_name = "ID")]
    pub after: u64,
}

/// Show one item: state, attempts, lease, payload, result and last error.
#[derive(Args, Debug)]
#[command(after_help = "\
Example:
  queue-cli item keygen 42

JSON (-o json): {\"id\", \"queue\", \"state\", \"priority\", \"key\", \"attempts\",
\"enqueued_at_ms\", \"ready_at_ms\", \"lease_deadline_at_ms\", \"worker_id\",
\"done_at_ms\", \"last_error\", \"payload\", \"result\"}; payload and result are strings,
or null with a \"payload_base64\"/\"result_base64\" field when not UTF-8.")]
pub struct ItemArgs {
    /// Queue name.
    pub queue: String,
    /// Item id.
    pub id: u64,
}

/// Move DEAD items back to READY with their attempts reset.
#[derive(Args, Debug)]
#[command(
    group(ArgGroup::new("which").required(true).args(["ids", "dead"])),
    override_usage = "queue-cli requeue [OPTIONS] <QUEUE> <ID>...\n       \
                      queue-cli requeue [OPTIONS] <QUEUE> --dead",
    after_help = "\
Examples:
  queue-cli requeue keygen 17 42
  queue-cli requeue keygen --dead

JSON (-o json): {\"queue\": NAME, \"requeued\": N}"
)]
pub struct RequeueArgs {
    /// Queue name.
    pub queue: String,

    /// Ids of DEAD items to requeue.
    #[arg(value_name = "ID")]
    pub ids: Vec<u64>,

    /// Requeue every DEAD item.
    #[arg(long)]
    pub dead: bool,
}

/// Print the results of DONE items (what workers passed to ack), oldest id first.
///
/// DONE items, and so their results, are kept for the queue's retention period.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  queue-cli results keygen
  queue-cli results keygen -o json | jq -r '.results[].result'

JSON (-o json): {\"results\": [{\"id\", \"done_at_ms\", \"payload\", \"result\"}...]};
payload and result are strings, or null with a \"*_base64\" field when not UTF-8.")]
pub struct ResultsArgs {
    /// Queue name.
    pub queue: String,

    /// Show at most N results; 0 (the default) shows them all.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub limit: u64,
}

fn parse_state(text: &str) -> Result<pb::ItemState, String> {
    pb::ItemState::from_short_name(text)
        .ok_or_else(|| format!("unknown state '{text}' (use ready, delayed, leased, done or dead)"))
}

/// Pages through ListItems; returns up to `limit` items (0 = all) and the id to pass
/// as `--after` for more (0 when there are no more).
async fn list_items(
    client: &mut Client,
    queue: &str,
    state: pb::ItemState,
    mut after: u64,
    limit: u64,
) -> Result<(Vec<pb::Item>, u64)> {
    let mut items = Vec::new();
    loop {
        let want = if limit == 0 {
            PAGE
        } else {
            (limit - items.len() as u64).min(u64::from(PAGE)) as u32
        };
        let page = client
            .list_items(pb::ListItemsRequest {
                queue: queue.to_string(),
                state: state as i32,
                after_id: after,
                limit: want,
                omit_payloads: false,
            })
            .await?
            .into_inner();
        items.extend(page.items);
        after = page.next_after_id;
        if after == 0 || (limit != 0 && items.len() as u64 >= limit) {
            return Ok((items, after));
        }
    }
}

pub async fn items(global: &Global, args: ItemsArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let state = args.state.unwrap_or(pb::ItemState::Unspecified);
    let (items, next) = list_items(&mut client, &args.queue, state, args.after, args.limit).await?;
    match global.output {
        Format::Json => print_json(&json!({
            "items": items.iter().map(item_json).collect::<Vec<_>>(),
            "next_after_id": next,
        })),
        Format::Table => {
            if items.is_empty() {
                eprintln!("no items");
            } else {
                let mut table = Table::new(&[
                    "ID", "STATE", "PRIORITY", "ATTEMPTS", "AGE", "WORKER", "KEY", "PAYLOAD",
                ]);
                for item in &items {
                    table.row(vec![
                        item.id.to_string(),
                        state_name(item.state).to_string(),
                        item.priority.to_string(),
                        item.attempts.to_string(),
                        age(item.enqueued_at_ms),
                        dash(&item.worker_id),
                        dash(&item.key),
                        cell_text(&item.payload, CELL),
                    ]);
                }
                table.print();
            }
            if next != 0 {
                eprintln!("more items: add --after {next}");
            }
        }
    }
    Ok(())
}

pub async fn item(global: &Global, args: ItemArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let item = client
        .get_item(pb::GetItemRequest {
            queue: args.queue,
            id: args.id,
        })
        .await?
        .into_inner();
    match global.output {
        Format::Json => print_json(&item_json(&item)),
        Format::Table => {
            let mut fields = vec![
                ("Id", item.id.to_string()),
                ("Queue", item.queue.clone()),
                ("State", state_name(item.state).to_string()),
                ("Priority", item.priority.to_string()),
                ("Key", dash(&item.key)),
                ("Attempts", item.attempts.to_string()),
                ("Enqueued", format!("{} ago", age(item.enqueued_at_ms))),
            ];
            if item.ready_at_ms != 0 && item.state == pb::ItemState::Delayed as i32 {
                fields.push(("Ready", until(item.ready_at_ms)));
            }
            if !item.worker_id.is_empty() {
                fields.push(("Worker", item.worker_id.clone()));
            }
            if item.lease_deadline_at_ms != 0 {
                fields.push(("Lease expires", until(item.lease_deadline_at_ms)));
            }
            if item.done_at_ms != 0 {
                fields.push(("Done", format!("{} ago", age(item.done_at_ms))));
            }
            if !item.last_error.is_empty() {
                fields.push(("Last error", item.last_error.clone()));
            }
            fields.push(("Payload", cell_text(&item.payload, 4096)));
            if !item.result.is_empty() {
                fields.push(("Result", cell_text(&item.result, 4096)));
            }
            print_fields(&fields);
        }
    }
    Ok(())
}

pub async fn requeue(global: &Global, args: RequeueArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let response = client
        .requeue(pb::RequeueRequest {
            queue: args.queue.clone(),
            ids: args.ids,
            all_dead: args.dead,
        })
        .await?
        .into_inner();
    match global.output {
        Format::Json => print_json(&json!({"queue": args.queue, "requeued": response.requeued})),
        Format::Table => outln!(
            "requeued {} in queue '{}'",
            count(response.requeued, "item"),
            args.queue
        ),
    }
    Ok(())
}

pub async fn results(global: &Global, args: ResultsArgs) -> Result<()> {
    let mut client = global.connect().await?;
    let (items, _) =
        list_items(&mut client, &args.queue, pb::ItemState::Done, 0, args.limit).await?;
    match global.output {
        Format::Json => {
            let results: Vec<_> = items
                .iter()
                .map(|item| {
                    let mut value = json!({"id": item.id, "done_at_ms": item.done_at_ms});
                    insert_bytes(&mut value, "payload", &item.payload);
                    insert_bytes(&mut value, "result", &item.result);
                    value
                })
                .collect();
            print_json(&json!({ "results": results }));
        }
        Format::Table if items.is_empty() => eprintln!("no results"),
        Format::Table => {
            let mut table = Table::new(&["ID", "DONE", "PAYLOAD", "RESULT"]);
            for item in &items {
                table.row(vec![
                    item.id.to_string(),
                    format!("{} ago", age(item.done_at_ms)),
                    cell_text(&item.payload, CELL),
                    cell_text(&item.result, 4096),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_string()
    }
}
