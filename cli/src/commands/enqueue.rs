//! `enqueue`: items from arguments, a file, stdin or a `{i}` template, sent in
//! batches, with a progress bar on large inputs.
//!
//! Items are read and sent as a stream, so a file of millions of lines needs memory
//! for one batch only. One batch is always held back until the input ends, so that
//! `--seal` rides on the last batch and the coordinator applies it atomically with
//! the last items.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};
use workq_proto::client::{MAX_MESSAGE_BYTES, is_transport_status, was_never_sent};
use workq_proto::{Client, pb};

use super::{opt_ms, parse_duration};
use crate::connect::Global;
use crate::output::{Format, count, outln, print_json};

/// Items per request unless `--batch-size` says otherwise.
const DEFAULT_BATCH: usize = 1000;

/// A batch is also sent before its payloads would pass this size, well under the
/// 64 MiB message limit even when payloads are large (a larger item goes alone).
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The largest item (payload and key) one request can carry: the message limit less
/// room for the request's own fields. No queue accepts payloads this large (32 MiB
/// at most), but past this the coordinator cannot even say so.
const MAX_ITEM_BYTES: usize = MAX_MESSAGE_BYTES - 64 * 1024;

/// Add items to a queue: one per argument, one per line of a file or of stdin, or
/// N copies of a template where `{i}` becomes the item's index (0, 1, …).
///
/// Empty lines are skipped. Items are sent in batches (--batch-size); each batch is
/// accepted or refused as a whole. Prints how many items were enqueued and how many
/// were deduplicated (a --key that matched an existing item).
#[derive(Args, Debug)]
#[command(
    group(ArgGroup::new("source").required(true).args(["payloads", "file", "stdin", "payload"])),
    override_usage = "queue-cli enqueue [OPTIONS] <QUEUE> <PAYLOAD>...\n       \
                      queue-cli enqueue [OPTIONS] <QUEUE> --file <FILE>\n       \
                      queue-cli enqueue [OPTIONS] <QUEUE> --stdin\n       \
                      queue-cli enqueue [OPTIONS] <QUEUE> --payload <TEMPLATE> [--count <N>]",
    after_help = "\
Examples:
  queue-cli enqueue keygen --count 100 --payload 'work-item-{i}'
  queue-cli enqueue keygen alpha beta gamma --seal
  seq 1 100000 | queue-cli enqueue numbers --stdin --key 'n-{i}'
  queue-cli enqueue urls --file urls.txt --priority 5 --delay 1m

JSON (-o json): {\"queue\": NAME, \"enqueued\": N, \"deduplicated\": N,
\"sealed\": BOOL, \"ids\": [ID...]} with one id per input item, in input order."
)]
pub struct EnqueueArgs {
    /// Queue to add to.
    pub queue: String,

    /// Payloads, one item each.
    #[arg(value_name = "PAYLOAD")]
    pub payloads: Vec<String>,

    /// Read items from FILE, one per line.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Read items from standard input, one per line.
    #[arg(long)]
    pub stdin: bool,

    /// Payload template for --count; `{i}` becomes the item's index.
    #[arg(long, value_name = "TEMPLATE")]
    pub payload: Option<String>,

    /// How many items to make from --payload (at least 1) [default: 1].
    #[arg(long, value_name = "N", requires = "payload")]
    #[arg(value_parser = parse_count)]
    #[arg(conflicts_with_all = ["payloads", "file", "stdin"])]
    pub count: Option<u64>,

    /// Priority of every item: higher is leased first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,

    /// Make items READY only after this long (30s, 5m, 1h).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub delay: Option<Duration>,

    /// Dedup key template; `{i}` becomes the item's index. While an item with the
    /// same key exists in the queue, no second one is added.
    #[arg(long, value_name = "TEMPLATE")]
    pub key: Option<String>,

    /// Seal the queue after the last item (atomically with it).
    #[arg(long)]
    pub seal: bool,

    /// Items per request (1 to 10000).
    #[arg(long, default_value_t = DEFAULT_BATCH, value_parser = parse_batch_size, value_name = "N")]
    pub batch_size: usize,

    /// Never show a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

fn parse_count(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number, at least 1".into()),
    }
}

fn parse_batch_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err("must be a number from 1 to 10000".into()),
    }
}

pub async fn run(global: &Global, args: EnqueueArgs) -> Result<()> {
    // Open the input before connecting, so a wrong path fails without a round trip.
    let file = match &args.file {
        Some(path) => Some(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let mut client = global.connect().await?;
    let mut sender = Sender::new(&args, progress_bar(global, &args));

    if args.stdin {
        let stdin = BufReader::new(tokio::io::stdin());
        sender
            .send_lines(&mut client, stdin)
            .await
            .context_after(&sender)?;
    } else if let Some(file) = file {
        sender
            .send_lines(&mut client, BufReader::new(file))
            .await
            .context_after(&sender)?;
    } else if let Some(template) = &args.payload {
        for i in 0..args.count.unwrap_or(1) {
            let payload = template.replace("{i}", &i.to_string()).into_bytes();
            sender
                .push(&mut client, payload)
                .await
                .context_after(&sender)?;
        }
    } else {
        for payload in &args.payloads {
            let payload = payload.clone().into_bytes();
            sender
                .push(&mut client, payload)
                .await
                .context_after(&sender)?;
        }
    }
    sender.finish(&mut client).await.context_after(&sender)?;
    sender.progress.finish_and_clear();
    sender.report(global, &args.queue);
    Ok(())
}

/// A bar with a known total for arguments and `--count`, a counting spinner for
/// files and stdin; hidden for small inputs, when stdout is not a terminal, or with
/// `--no-progress`.
fn progress_bar(global: &Global, args: &EnqueueArgs) -> ProgressBar {
    let interactive =
        std::io::stdout().is_terminal() && !args.no_progress && global.output == Format::Table;
    if !interactive {
        return ProgressBar::hidden();
    }
    let total = if args.payload.is_some() {
        Some(args.count.unwrap_or(1))
    } else if !args.payloads.is_empty() {
        Some(args.payloads.len() as u64)
    } else {
        None
    };
    match total {
        Some(total) if total <= args.batch_size as u64 => ProgressBar::hidden(),
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template("{wide_bar} {human_pos}/{human_len} items  ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        ),
        None => {
            let bar = ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {human_pos} items enqueued  {elapsed}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        }
    }
}

/// Accumulates items into batches and sends them, holding one full batch back so
/// the last request can carry `seal`.
struct Sender {
    queue: String,
    priority: i32,
    delay_ms: u64,
    key: Option<String>,
    seal: bool,
    batch_size: usize,
    batch: Vec<pb::NewItem>,
    batch_bytes: usize,
    /// Items read so far; also the next item's `{i}`.
    read: u64,
    ids: Vec<u64>,
    enqueued: u64,
    deduplicated: u64,
    progress: ProgressBar,
}

impl Sender {
    fn new(args: &EnqueueArgs, progress: ProgressBar) -> Sender {
        Sender {
            queue: args.queue.clone(),
            priority: args.priority,
            delay_ms: opt_ms(args.delay),
            key: args.key.clone(),
            seal: args.seal,
            batch_size: args.batch_size,
            batch: Vec::with_capacity(args.batch_size),
            batch_bytes: 0,
            read: 0,
            ids: Vec::new(),
            enqueued: 0,
            deduplicated: 0,
            progress,
        }
    }

    /// Adds one item, first sending the held batch if the item would overfill it.
    async fn push(&mut self, client: &mut Client, payload: Vec<u8>) -> Result<()> {
        let key = self
            .key
            .as_ref()
            .map(|template| template.replace("{i}", &self.read.to_string()))
            .unwrap_or_default();
        let bytes = payload.len() + key.len();
        if bytes > MAX_ITEM_BYTES {
            anyhow::bail!(
                "the item with index {} is {bytes} bytes, more than one request can \
                 carry ({MAX_ITEM_BYTES} bytes)",
                self.read
            );
        }
        let full = self.batch.len() >= self.batch_size || self.batch_bytes + bytes > BATCH_BYTES;
        if full && !self.batch.is_empty() {
            self.send(client, false).await?;
        }
        self.batch_bytes += bytes;
        self.batch.push(pb::NewItem {
            payload: payload.into(),
            priority: self.priority,
            delay_ms: self.delay_ms,
            key,
        });
        self.read += 1;
        Ok(())
    }

    /// One item per line; `\n` or `\r\n` endings; empty lines skipped. Lines are
    /// bytes, so payloads need not be UTF-8.
    async fn send_lines(
        &mut self,
        client: &mut Client,
        mut input: impl AsyncBufRead + Unpin,
    ) -> Result<()> {
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            number += 1;
            // Read no more than the largest item and its line ending, so one huge
            // line cannot take the memory of the machine.
            let n = (&mut input)
                .take(MAX_ITEM_BYTES as u64 + 2)
                .read_until(b'\n', &mut line)
                .await
                .context("cannot read input")?;
            if n == 0 {
                return Ok(());
            }
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            // A `\r\n` ending, or a `\r` left on a last line without its `\n`.
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > MAX_ITEM_BYTES {
                anyhow::bail!(
                    "line {number} is more than {MAX_ITEM_BYTES} bytes, more than one \
                     request can carry"
                );
            }
            if !line.is_empty() {
                self.push(client, line.clone()).await?;
            }
        }
    }

    /// Sends what is left (with `seal`), or seals on its own when there were no items.
    /// An input with no items at all still asks the coordinator for the queue, so a
    /// wrong name fails as it would with items.
    async fn finish(&mut self, client: &mut Client) -> Result<()> {
        if !self.batch.is_empty() {
            return self.send(client, self.seal).await;
        }
        let queue = self.queue.clone();
        if self.seal {
            client.seal_queue(pb::SealQueueRequest { queue }).await?;
        } else if self.read == 0 {
            client.get_queue(pb::GetQueueRequest { queue }).await?;
        }
        Ok(())
    }

    async fn send(&mut self, client: &mut Client, seal: bool) -> Result<()> {
        let items = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let count = items.len() as u64;
        let request = pb::EnqueueRequest {
            queue: self.queue.clone(),
            items,
            seal,
        };
        let response = match client.enqueue(request).await {
            Ok(response) => response.into_inner(),
            // The connection broke after the request may have left: the coordinator
            // may have taken it, and only a key tells a second copy from a new item.
            Err(status) if is_transport_status(&status) && !was_never_sent(&status) => {
                let first = self.read - count;
                let which = match count {
                    1 => format!("the item with index {first}"),
                    _ => format!("the {count} items with index {first} to {}", self.read - 1),
                };
                let rerun = if self.key.is_some() {
                    "a rerun with the same --key adds only what is missing"
                } else {
                    "without a --key, a rerun can add them twice"
                };
                return Err(anyhow::Error::new(status)
                    .context(format!("{which} may or may not be in ({rerun})")));
            }
            Err(status) => return Err(self.in_input_terms(status, count).into()),
        };
        for result in response.results {
            self.ids.push(result.id);
            if result.deduplicated {
                self.deduplicated += 1;
            } else {
                self.enqueued += 1;
            }
        }
        self.progress.inc(count);
        Ok(())
    }

    /// The coordinator names an item it refuses by its index in the request ("item
    /// 3: …", workq.proto's `EnqueueRequest`); the user knows it by its index in the
    /// whole input, which differs from the second batch on.
    fn in_input_terms(&self, status: tonic::Status, count: u64) -> tonic::Status {
        let first = self.read - count;
        let in_request = status
            .message()
            .strip_prefix("item ")
            .and_then(|rest| rest.split_once(": "))
            .and_then(|(i, why)| Some((i.parse::<u64>().ok()?, why)));
        match in_request {
            Some((i, why)) if status.code() == tonic::Code::InvalidArgument && i < count => {
                tonic::Status::new(
                    status.code(),
                    format!("the item with index {}: {why}", first + i),
                )
            }
            _ => status,
        }
    }

    fn report(&self, global: &Global, queue: &str) {
        match global.output {
            Format::Json => print_json(&json!({
                "queue": queue,
                "enqueued": self.enqueued,
                "deduplicated": self.deduplicated,
                "sealed": self.seal,
                "ids": self.ids,
            })),
            Format::Table => {
                let mut line = format!(
                    "enqueued {} to queue '{queue}', {} deduplicated",
                    count(self.enqueued, "item"),
                    self.deduplicated
                );
                if let [id] = self.ids.as_slice() {
                    line.push_str(&format!(" (id {id})"));
                }
                if self.seal {
                    line.push_str("; queue sealed");
                }
                outln!("{line}");
            }
        }
    }
}

/// Says how far a failed enqueue got, so the user knows what is already in.
trait ContextAfter<T> {
    fn context_after(self, sender: &Sender) -> Result<T>;
}

impl<T> ContextAfter<T> for Result<T> {
    fn context_after(self, sender: &Sender) -> Result<T> {
        self.map_err(|error| {
            sender.progress.finish_and_clear();
            let accepted = sender.ids.len();
            if accepted == 0 {
                error
            } else {
                error.context(format!(
                    "stopped after {} accepted ({} enqueued, {} deduplicated)",
                    match accepted {
                        1 => "1 item was".to_string(),
                        n => format!("{n} items were"),
                    },
                    sender.enqueued,
                    sender.deduplicated
                ))
            }
        })
    }
}
