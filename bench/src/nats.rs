//! A minimal async NATS client (the client protocol's text commands: INFO,
//! CONNECT, PING/PONG, SUB, PUB, MSG, HMSG, +OK/-ERR) and a work queue on NATS
//! JetStream, driven through JetStream's API subjects on one stream per run:
//!
//! - setup: `$JS.API.STREAM.CREATE.<run>` (subject `<run>.jobs`, retention
//!   `workqueue`, memory or file storage) and one durable pull consumer,
//!   `$JS.API.CONSUMER.DURABLE.CREATE.<run>.workers` (explicit acks, an ack wait of
//!   600 s like the others' lease times). Both requests are idempotent.
//! - enqueue: `PUB <run>.jobs <inbox>`; JetStream's PubAck (JSON with the item's
//!   stream sequence) confirms the item is stored. B items: B pipelined publishes,
//!   then their B PubAcks.
//! - lease: a pull request on `$JS.API.CONSUMER.MSG.NEXT.<run>.workers`: the
//!   server sends up to B messages, and when it has fewer a status message ends the
//!   request (404 No Messages, or 408 Request Timeout at its expiry or when some
//!   came). The drain asks `{"batch":B,"no_wait":true,"expires":10ms}` and, when
//!   that brings nothing, `$JS.API.CONSUMER.INFO` whether any message is still
//!   undelivered (see [`NO_WAIT_EXPIRES`]); e2e consumers ask
//!   `{"batch":B,"expires":1s}`.
//! - complete: `+ACK` published to the message's ack subject with a reply inbox;
//!   the server's empty answer confirms the ack was processed (nats.go's `AckSync`),
//!   which on a work-queue stream removes the item. B items: B pipelined acks, then
//!   their B answers.
//!
//! Each connection subscribes once to its own inbox (`_INBOX.<id>.*`); every
//! request gets a fresh reply subject under it, so answers are matched to requests
//! by their last token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The run's one durable pull consumer.
const DURABLE: &str = "workers";

/// Ack wait of the consumer: far longer than any run, so no message is redelivered
/// (beanstalkd's TTR and Redis's lease key are 600 s too).
const ACK_WAIT_NS: u64 = 600 * 1_000_000_000;

/// Leased-but-unacked messages the consumer allows: far above clients × batch of
/// any section (32 × 1, 8 × 100), so it never throttles a run.
const MAX_ACK_PENDING: u64 = 100_000;

/// Longest wait for an answer beyond a pull request's own expiry. No answer in
/// that time fails the run (rather than hanging it).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The id of a connection's one subscription, its inbox.
const SID: u64 = 1;

/// How long past its own expiry a pull request may stay unanswered before the client
/// stops waiting for it. Its messages, should they still come, are taken by later
/// requests (every delivered message is leased, whichever request it answers).
const PULL_PATIENCE: Duration = Duration::from_secs(1);

/// How long a drain's pull request waits for messages at most. The drain asks
/// `no_wait` (answer with what is there), but nats-server 2.9 never ends a `no_wait`
/// request that was queued while messages were pending and then got none of them
/// (nats-server issue 7457, fixed in 2025 by PR 7466; seen here as a drain client
/// hanging at the end of the queue), so the request also expires. A request that
/// expires empty may only have been slow, so the client then asks the consumer
/// whether any message is still undelivered before it calls the queue empty.
const NO_WAIT_EXPIRES: Duration = Duration::from_millis(10);

/// Makes every connection's inbox unique within this process.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Where JetStream keeps a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    Memory,
    File,
}

impl Storage {
    fn name(self) -> &'static str {
        match self {
            Storage::Memory => "memory",
            Storage::File => "file",
        }
    }
}

/// The control line of a MSG or HMSG (the payload follows it).
#[derive(Debug, PartialEq, Eq)]
struct MsgLine {
    subject: String,
    sid: u64,
    reply: Option<String>,
    /// Bytes of headers at the start of the payload (0 for MSG).
    header_len: usize,
    /// Bytes of headers and payload together.
    total_len: usize,
}

/// `MSG <subject> <sid> [reply-to] <#bytes>` or
/// `HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>`.
fn parse_msg_line(line: &str) -> Result<MsgLine> {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    let (sizes, args) = match words.split_first() {
        Some((&"MSG", args)) => (1, args),
        Some((&"HMSG", args)) => (2, args),
        _ => bail!("not a MSG or HMSG line: '{line}'"),
    };
    let reply = match args.len().checked_sub(sizes) {
        Some(2) => None,
        Some(3) => Some(args[2].to_string()),
        _ => bail!("malformed message line '{line}'"),
    };
    let sizes = &args[args.len() - sizes..];
    let total_len: usize = sizes[sizes.len() - 1]
        .parse()
        .with_context(|| format!("size in '{line}'"))?;
    let header_len: usize = if sizes.len() == 2 {
        sizes[0]
            .parse()
            .with_context(|| format!("header size in '{line}'"))?
    } else {
        0
    };
    ensure!(
        header_len <= total_len,
        "headers longer than the message: '{line}'"
    );
    Ok(MsgLine {
        subject: args[0].to_string(),
        sid: args[1]
            .parse()
            .with_context(|| format!("sid in '{line}'"))?,
        reply,
        header_len,
        total_len,
    })
}

/// A status in a header block (`NATS/1.0 404 No Messages\r\n…`): JetStream's way to
/// end a pull request, and the server's "no responders" (503).
#[derive(Debug, PartialEq, Eq)]
struct Status {
    code: u16,
    description: String,
}

/// The status of a header block, None when it carries only headers (`NATS/1.0`).
fn parse_status(headers: &[u8]) -> Option<Status> {
    let text = std::str::from_utf8(headers).ok()?;
    let first = text.lines().next()?.strip_prefix("NATS/1.0")?.trim();
    let (code, description) = first.split_once(' ').unwrap_or((first, ""));
    Some(Status {
        code: code.parse().ok()?,
        description: description.trim().to_string(),
    })
}

/// One message received on the inbox.
#[derive(Debug)]
struct Message {
    subject: String,
    reply: Option<String>,
    status: Option<Status>,
    payload: Vec<u8>,
}

enum Incoming {
    Msg(Message),
    Ping,
    Pong,
}

/// Reads the connection into `incoming` until it closes or breaks; runs as its own
/// task, so waiting for the next message can time out without losing a half-read one.
async fn read_incoming(
    mut reader: BufReader<OwnedReadHalf>,
    incoming: mpsc::UnboundedSender<Result<Incoming>>,
) {
    let mut line = Vec::with_capacity(128);
    loop {
        let next = read_one(&mut reader, &mut line).await;
        let failed = next.is_err();
        if let Some(next) = next.transpose()
            && (incoming.send(next).is_err() || failed)
        {
            return;
        }
    }
}

/// The next message, PING or PONG; `None` for lines that need nothing (INFO, +OK).
async fn read_one(
    reader: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> Result<Option<Incoming>> {
    let line = read_line(reader, line).await?;
    if line.starts_with("MSG ") || line.starts_with("HMSG ") {
        let head = parse_msg_line(&line)?;
        ensure!(
            head.sid == SID,
            "message for subscription {} in '{line}'",
            head.sid
        );
        let mut data = vec![0; head.total_len + 2];
        reader.read_exact(&mut data).await?;
        ensure!(
            data.ends_with(b"\r\n"),
            "message without CRLF after '{line}'"
        );
        data.truncate(head.total_len);
        let payload = data.split_off(head.header_len);
        Ok(Some(Incoming::Msg(Message {
            subject: head.subject,
            reply: head.reply,
            status: parse_status(&data),
            payload,
        })))
    } else if line == "PING" {
        Ok(Some(Incoming::Ping))
    } else if line == "PONG" {
        Ok(Some(Incoming::Pong))
    } else if line.starts_with("-ERR") {
        bail!("nats-server: {line}")
    } else if line == "+OK" || line.starts_with("INFO ") {
        Ok(None)
    } else {
        bail!("unexpected line from nats-server: '{line}'")
    }
}

async fn read_line(reader: &mut BufReader<OwnedReadHalf>, line: &mut Vec<u8>) -> Result<String> {
    line.clear();
    if reader.read_until(b'\n', line).await? == 0 {
        bail!("nats-server closed the connection");
    }
    Ok(String::from_utf8_lossy(line).trim_end().to_string())
}

/// Appends `PUB <subject> [reply] <#bytes>\r\n<payload>\r\n`.
fn publish(out: &mut Vec<u8>, subject: &str, reply: Option<&str>, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    if let Some(reply) = reply {
        out.push(b' ');
        out.extend_from_slice(reply.as_bytes());
    }
    out.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

pub struct Nats {
    incoming: mpsc::UnboundedReceiver<Result<Incoming>>,
    writer: OwnedWriteHalf,
    out: Vec<u8>,
    /// Messages delivered for a pull request the client had stopped waiting for,
    /// kept for the next pull.
    stash: Vec<(String, Vec<u8>)>,
    /// `_INBOX.<id>.`: reply subjects are this and a number.
    inbox: String,
    next_token: u64,
    stream: String,
    subject: String,
    next_subject: String,
}

impl Nats {
    /// Connects (headers on, verbose off), subscribes to the connection's inbox and
    /// waits for the PONG that confirms both. The run's stream is `stream`.
    pub async fn connect(addr: SocketAddr, stream: &str) -> Result<Nats> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to nats-server at {addr}"))?;
        tcp.set_nodelay(true)?;
        let (read, write) = tcp.into_split();
        let mut reader = BufReader::with_capacity(64 * 1024, read);
        let info = read_line(&mut reader, &mut Vec::new()).await?;
        let (tx, incoming) = mpsc::unbounded_channel();
        tokio::spawn(read_incoming(reader, tx));
        let id = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        let mut conn = Nats {
            incoming,
            writer: write,
            out: Vec::with_capacity(64 * 1024),
            stash: Vec::new(),
            inbox: format!("_INBOX.bench{}c{id}.", std::process::id()),
            next_token: 0,
            stream: stream.to_string(),
            subject: format!("{stream}.jobs"),
            next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{DURABLE}"),
        };
        let info: Value = info
            .strip_prefix("INFO ")
            .and_then(|json| serde_json::from_str(json).ok())
            .with_context(|| format!("nats-server greeted with '{info}', not INFO"))?;
        ensure!(
            info["headers"] == json!(true),
            "nats-server does not support headers"
        );
        ensure!(
            info["jetstream"] == json!(true),
            "nats-server runs without JetStream (-js)"
        );
        let connect = json!({
            "verbose": false,
            "pedantic": false,
            "headers": true,
            "no_responders": true,
            "protocol": 1,
            "lang": "rust",
            "version": env!("CARGO_PKG_VERSION"),
            "name": "bench-compare",
        });
        conn.out
            .extend_from_slice(format!("CONNECT {connect}\r\n").as_bytes());
        conn.out
            .extend_from_slice(format!("SUB {}* {SID}\r\n", conn.inbox).as_bytes());
        conn.out.extend_from_slice(b"PING\r\n");
        conn.flush().await?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        match conn.next_before(deadline, || "PONG".into()).await? {
            Incoming::Pong => Ok(conn),
            Incoming::Msg(msg) => bail!("message on {} before PONG", msg.subject),
            Incoming::Ping => unreachable!("next answers PINGs"),
        }
    }

    /// Creates the run's stream and its durable pull consumer; a no-op when they
    /// exist with the same configuration.
    pub async fn setup(&mut self, storage: Storage) -> Result<()> {
        let stream = json!({
            "name": self.stream,
            "subjects": [self.subject],
            "retention": "workqueue",
            "storage": storage.name(),
            "num_replicas": 1,
        });
        let subject = format!("$JS.API.STREAM.CREATE.{}", self.stream);
        self.api(&subject, stream.to_string().as_bytes()).await?;
        let consumer = json!({
            "stream_name": self.stream,
            "config": {
                "durable_name": DURABLE,
                "deliver_policy": "all",
                "ack_policy": "explicit",
                "ack_wait": ACK_WAIT_NS,
                "max_deliver": -1,
                "max_ack_pending": MAX_ACK_PENDING,
                "replay_policy": "instant",
            },
        });
        let subject = format!("$JS.API.CONSUMER.DURABLE.CREATE.{}.{DURABLE}", self.stream);
        self.api(&subject, consumer.to_string().as_bytes()).await?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        self.writer.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// The next message or PONG; answers the server's PINGs. Cancel-safe.
    async fn next(&mut self) -> Result<Incoming> {
        loop {
            match self.incoming.recv().await {
                Some(Ok(Incoming::Ping)) => self.writer.write_all(b"PONG\r\n").await?,
                Some(next) => return next,
                None => bail!("nats-server closed the connection"),
            }
        }
    }

    /// The next message or PONG; fails at `deadline`, saying what was awaited.
    async fn next_before(
        &mut self,
        deadline: Instant,
        awaited: impl FnOnce() -> String,
    ) -> Result<Incoming> {
        match tokio::time::timeout_at(deadline, self.next()).await {
            Ok(incoming) => incoming,
            Err(_) => bail!("nats-server did not answer in time: {}", awaited()),
        }
    }

    /// A fresh reply subject and its token.
    fn reply_subject(&mut self) -> (u64, String) {
        let token = self.next_token;
        self.next_token += 1;
        (token, format!("{}{token}", self.inbox))
    }

    fn token_of(&self, subject: &str) -> Option<u64> {
        subject.strip_prefix(&self.inbox)?.parse().ok()
    }

    /// Keeps a message an abandoned pull request got, for the next pull.
    fn stash_lease(&mut self, msg: Message) -> Result<()> {
        match msg.reply {
            Some(ack) if ack.starts_with("$JS.ACK.") => {
                self.stash.push((ack, msg.payload));
                Ok(())
            }
            _ => bail!("unexpected message on {}", msg.subject),
        }
    }

    /// Reads the answers to the `n` requests whose reply tokens start at `first`,
    /// returned in request order. Statuses addressed to earlier requests are
    /// skipped; any other message fails.
    async fn answers(&mut self, first: u64, n: usize) -> Result<Vec<Message>> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut answers: Vec<Option<Message>> = (0..n).map(|_| None).collect();
        let mut missing = n;
        while missing > 0 {
            let awaited = || format!("{missing} of {n} answers (reply tokens from {first})");
            let Incoming::Msg(msg) = self.next_before(deadline, awaited).await? else {
                continue;
            };
            let slot = self
                .token_of(&msg.subject)
                .and_then(|t| t.checked_sub(first))
                .and_then(|i| answers.get_mut(usize::try_from(i).ok()?));
            match slot {
                Some(slot @ None) => {
                    *slot = Some(msg);
                    missing -= 1;
                }
                Some(Some(_)) => bail!("two answers on {}", msg.subject),
                None if msg.status.is_some() => {}
                None => self.stash_lease(msg)?,
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// One JetStream API request; fails on a status (503: JetStream not listening)
    /// or an `error` in the answer.
    async fn api(&mut self, subject: &str, body: &[u8]) -> Result<Value> {
        let (token, reply) = self.reply_subject();
        publish(&mut self.out, subject, Some(&reply), body);
        self.flush().await?;
        let answer = self.answers(token, 1).await?.pop().context("no answer")?;
        if let Some(status) = answer.status {
            bail!(
                "JetStream answered {subject} with status {} {}",
                status.code,
                status.description
            );
        }
        let value: Value = serde_json::from_slice(&answer.payload)
            .with_context(|| format!("JetStream's answer to {subject}"))?;
        if let Some(error) = value.get("error") {
            bail!("JetStream refused {subject}: {error}");
        }
        Ok(value)
    }

    /// Publishes every payload to the stream and waits for their PubAcks (one
    /// pipelined round trip).
    pub async fn enqueue(&mut self, payloads: &[Vec<u8>]) -> Result<()> {
        let first = self.next_token;
        for payload in payloads {
            let (_, reply) = self.reply_subject();
            publish(&mut self.out, &self.subject, Some(&reply), payload);
        }
        self.flush().await?;
        for answer in self.answers(first, payloads.len()).await? {
            if let Some(status) = answer.status {
                bail!(
                    "publish answered with status {} {}",
                    status.code,
                    status.description
                );
            }
            let ack: Value = serde_json::from_slice(&answer.payload).context("PubAck")?;
            if ack.get("error").is_some() || ack.get("seq").is_none() {
                bail!("JetStream did not store a publish: {ack}");
            }
        }
        Ok(())
    }

    /// Pulls up to `max` messages: at once (`wait_secs` 0: no_wait) or waiting up to
    /// `wait_secs` for them (expires). Returns (ack subject, payload) pairs.
    pub async fn lease(&mut self, max: usize, wait_secs: u32) -> Result<Vec<(String, Vec<u8>)>> {
        if wait_secs > 0 {
            let expires = Duration::from_secs(wait_secs.into());
            let request = json!({"batch": max, "expires": expires.as_nanos() as u64});
            return self.pull(max, &request, expires).await;
        }
        let request =
            json!({"batch": max, "no_wait": true, "expires": NO_WAIT_EXPIRES.as_nanos() as u64});
        loop {
            let leased = self.pull(max, &request, NO_WAIT_EXPIRES).await?;
            if !leased.is_empty() {
                return Ok(leased);
            }
            // Messages delivered before the consumer's info was read come before its
            // answer, into the stash; with none undelivered, no more can come.
            if self.undelivered().await? == 0 {
                let n = self.stash.len().min(max);
                return Ok(self.stash.drain(..n).collect());
            }
        }
    }

    /// Messages of the stream not yet delivered to the consumer (ready items).
    async fn undelivered(&mut self) -> Result<u64> {
        let subject = format!("$JS.API.CONSUMER.INFO.{}.{DURABLE}", self.stream);
        let info = self.api(&subject, b"").await?;
        info["num_pending"]
            .as_u64()
            .with_context(|| format!("no num_pending in the consumer's info: {info}"))
    }

    /// One pull request for up to `max` messages (the request's batch), expiring
    /// after `expires`: the messages that came before the server ended it.
    async fn pull(
        &mut self,
        max: usize,
        request: &Value,
        expires: Duration,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let (token, reply) = self.reply_subject();
        publish(
            &mut self.out,
            &self.next_subject,
            Some(&reply),
            request.to_string().as_bytes(),
        );
        self.flush().await?;
        let n = self.stash.len().min(max);
        let mut leased: Vec<_> = self.stash.drain(..n).collect();
        let deadline = Instant::now() + expires + PULL_PATIENCE;
        while leased.len() < max {
            // nats-server 2.9 can leave a request unanswered (see NO_WAIT_EXPIRES):
            // stop waiting and let the caller ask again.
            let Ok(next) = tokio::time::timeout_at(deadline, self.next()).await else {
                break;
            };
            let Incoming::Msg(msg) = next? else {
                continue;
            };
            let Some(status) = msg.status else {
                match msg.reply {
                    Some(ack) if ack.starts_with("$JS.ACK.") => leased.push((ack, msg.payload)),
                    _ => bail!("a message on {} without an ack subject", msg.subject),
                }
                continue;
            };
            if self.token_of(&msg.subject) != Some(token) {
                continue; // a status for an earlier request
            }
            match status.code {
                // No Messages, Request Timeout: the request ended with what came.
                404 | 408 => break,
                // Idle heartbeat.
                100 => {}
                code => bail!(
                    "pull request answered with status {code} {}",
                    status.description
                ),
            }
        }
        Ok(leased)
    }

    /// Acks the messages and waits until the server confirms each ack (one
    /// pipelined round trip).
    pub async fn ack(&mut self, ack_subjects: &[String]) -> Result<()> {
        let first = self.next_token;
        for subject in ack_subjects {
            let (_, reply) = self.reply_subject();
            publish(&mut self.out, subject, Some(&reply), b"+ACK");
        }
        self.flush().await?;
        for answer in self.answers(first, ack_subjects.len()).await? {
            if let Some(status) = answer.status {
                bail!(
                    "ack answered with status {} {}",
                    status.code,
                    status.description
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_and_hmsg_lines_parse() {
        assert_eq!(
            parse_msg_line("MSG run.jobs 1 $JS.ACK.run.workers.1.2.2.1700000000.0 64").unwrap(),
            MsgLine {
                subject: "run.jobs".into(),
                sid: 1,
                reply: Some("$JS.ACK.run.workers.1.2.2.1700000000.0".into()),
                header_len: 0,
                total_len: 64,
            }
        );
        assert_eq!(
            // The server leaves the reply field empty: two spaces.
            parse_msg_line("MSG _INBOX.b1c0.7 1  30").unwrap(),
            MsgLine {
                subject: "_INBOX.b1c0.7".into(),
                sid: 1,
                reply: None,
                header_len: 0,
                total_len: 30,
            }
        );
        assert_eq!(
            parse_msg_line("HMSG _INBOX.b1c0.8 1  28 28").unwrap(),
            MsgLine {
                subject: "_INBOX.b1c0.8".into(),
                sid: 1,
                reply: None,
                header_len: 28,
                total_len: 28,
            }
        );
        assert_eq!(
            parse_msg_line("HMSG a 2 reply.to 12 20").unwrap().reply,
            Some("reply.to".into())
        );
        for bad in [
            "MSG a 1",
            "MSG a 1 b c 4",
            "HMSG a 1 30 20",
            "MSG a x 4",
            "PUB a 4",
        ] {
            assert!(parse_msg_line(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_end_pull_requests() {
        assert_eq!(
            parse_status(b"NATS/1.0 404 No Messages\r\n\r\n"),
            Some(Status {
                code: 404,
                description: "No Messages".into()
            })
        );
        let timeout = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n";
        assert_eq!(parse_status(timeout).map(|s| s.code), Some(408));
        assert_eq!(
            parse_status(b"NATS/1.0 503\r\n\r\n"),
            Some(Status {
                code: 503,
                description: String::new()
            })
        );
        // Headers without a status, and no headers at all.
        assert_eq!(parse_status(b"NATS/1.0\r\nNats-Msg-Id: 1\r\n\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn publish_frames_a_payload() {
        let mut out = Vec::new();
        publish(&mut out, "run.jobs", Some("_INBOX.x.0"), b"abc");
        publish(&mut out, "$JS.API.INFO", None, b"");
        assert_eq!(
            out,
            b"PUB run.jobs _INBOX.x.0 3\r\nabc\r\nPUB $JS.API.INFO 0\r\n\r\n"
        );
    }
}
