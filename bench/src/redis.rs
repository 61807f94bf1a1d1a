//! A minimal async Redis client (RESP2) and the work-queue lease pattern of the
//! Kubernetes docs' "fine parallel processing using a work queue" example
//! (`rediswq.py`):
//!
//! - enqueue: `LPUSH main item`
//! - lease: `RPOPLPUSH main processing` (or `BRPOPLPUSH … timeout` when waiting),
//!   then `SETEX lease:<item> <secs> <session>`
//! - complete: `LREM processing 0 item`, then `DEL lease:<item>`
//!
//! As in `rediswq.py` each step is its own round trip for a single item (4 per
//! leased and completed item). A batch of B pipelines each step for all B items, and
//! enqueues B values with one `LPUSH`.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Lease length set with SETEX: longer than any run.
const LEASE_SECS: &[u8] = b"600";

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Nil,
    Simple(String),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
}

pub struct Redis {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    out: Vec<u8>,
    line: Vec<u8>,
    main: Vec<u8>,
    processing: Vec<u8>,
    session: Vec<u8>,
}

impl Redis {
    /// Connects; the run's lists are `<prefix>:main` and `<prefix>:processing`.
    pub async fn connect(addr: SocketAddr, prefix: &str, session: &str) -> Result<Redis> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to redis at {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(Redis {
            reader: BufReader::with_capacity(64 * 1024, read),
            writer: write,
            out: Vec::with_capacity(64 * 1024),
            line: Vec::with_capacity(128),
            main: format!("{prefix}:main").into_bytes(),
            processing: format!("{prefix}:processing").into_bytes(),
            session: session.as_bytes().to_vec(),
        })
    }

    fn command(&mut self, args: &[&[u8]]) {
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            self.out
                .extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            self.out.extend_from_slice(arg);
            self.out.extend_from_slice(b"\r\n");
        }
    }

    async fn flush(&mut self) -> Result<()> {
        self.writer.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    async fn read_reply(&mut self) -> Result<Reply> {
        self.line.clear();
        if self.reader.read_until(b'\n', &mut self.line).await? == 0 {
            bail!("redis closed the connection");
        }
        let line = String::from_utf8_lossy(&self.line).trim_end().to_string();
        let (kind, rest) = line.split_at(1);
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => bail!("redis error: {rest}"),
            ":" => Reply::Int(rest.parse()?),
            "$" => {
                let len: i64 = rest.parse()?;
                if len < 0 {
                    Reply::Nil
                } else {
                    let mut data = vec![0; len as usize + 2];
                    self.reader.read_exact(&mut data).await?;
                    data.truncate(len as usize);
                    Reply::Bulk(data)
                }
            }
            "*" => {
                let len: i64 = rest.parse()?;
                if len < 0 {
                    Reply::Nil
                } else {
                    let mut items = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        items.push(Box::pin(self.read_reply()).await?);
                    }
                    Reply::Array(items)
                }
            }
            _ => bail!("unexpected redis reply '{line}'"),
        })
    }

    /// Sends what was queued and reads `n` replies.
    async fn round_trip(&mut self, n: usize) -> Result<Vec<Reply>> {
        self.flush().await?;
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }

    pub async fn ping(&mut self) -> Result<()> {
        self.command(&[b"PING"]);
        match self.round_trip(1).await?.pop() {
            Some(Reply::Simple(s)) if s == "PONG" => Ok(()),
            other => bail!("redis answered {other:?} to PING"),
        }
    }

    /// `LPUSH main v1 … vB`: one command, one round trip.
    pub async fn enqueue(&mut self, payloads: &[Vec<u8>]) -> Result<()> {
        let main = self.main.clone();
        let mut args: Vec<&[u8]> = vec![b"LPUSH", &main];
        args.extend(payloads.iter().map(|p| p.as_slice()));
        self.command(&args);
        match self.round_trip(1).await?.pop() {
            Some(Reply::Int(_)) => Ok(()),
            other => bail!("redis answered {other:?} to LPUSH"),
        }
    }

    /// Leases up to `max` items: `RPOPLPUSH` each (`BRPOPLPUSH` with a timeout when
    /// `wait_secs` > 0 and one item is wanted), then `SETEX` a lease key for each.
    pub async fn lease(&mut self, max: usize, wait_secs: u32) -> Result<Vec<Vec<u8>>> {
        let (main, processing) = (self.main.clone(), self.processing.clone());
        if max == 1 && wait_secs > 0 {
            let timeout = wait_secs.to_string();
            self.command(&[b"BRPOPLPUSH", &main, &processing, timeout.as_bytes()]);
        } else {
            for _ in 0..max {
                self.command(&[b"RPOPLPUSH", &main, &processing]);
            }
        }
        let sent = if max == 1 && wait_secs > 0 { 1 } else { max };
        let mut items = Vec::with_capacity(max);
        for reply in self.round_trip(sent).await? {
            match reply {
                Reply::Bulk(item) => items.push(item),
                Reply::Nil => {}
                other => bail!("redis answered {other:?} to RPOPLPUSH"),
            }
        }
        if items.is_empty() {
            return Ok(items);
        }
        let session = self.session.clone();
        for item in &items {
            let key = lease_key(item);
            self.command(&[b"SETEX", &key, LEASE_SECS, &session]);
        }
        for reply in self.round_trip(items.len()).await? {
            if reply != Reply::Simple("OK".into()) {
                bail!("redis answered {reply:?} to SETEX");
            }
        }
        Ok(items)
    }

    /// Completes leased items: `LREM processing 0 item`, then `DEL lease:<item>`
    /// (two round trips, each pipelined over the batch).
    pub async fn complete(&mut self, items: &[Vec<u8>]) -> Result<()> {
        let processing = self.processing.clone();
        for item in items {
            self.command(&[b"LREM", &processing, b"0", item]);
        }
        for reply in self.round_trip(items.len()).await? {
            if reply != Reply::Int(1) {
                bail!("redis answered {reply:?} to LREM of a leased item");
            }
        }
        for item in items {
            let key = lease_key(item);
            self.command(&[b"DEL", &key]);
        }
        for reply in self.round_trip(items.len()).await? {
            if !matches!(reply, Reply::Int(_)) {
                bail!("redis answered {reply:?} to DEL");
            }
        }
        Ok(())
    }
}

/// `lease:<hex of the payload's first 16 bytes>` (the run's item index and stamp,
/// unique per item); `rediswq.py` hashes the whole item instead.
fn lease_key(item: &[u8]) -> Vec<u8> {
    let mut key = b"lease:".to_vec();
    for byte in item.iter().take(16) {
        key.extend_from_slice(format!("{byte:02x}").as_bytes());
    }
    key
}
