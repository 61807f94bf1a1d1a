//! A minimal async beanstalkd client (the text protocol of beanstalkd's
//! `doc/protocol.txt`): `put`, `reserve-with-timeout` and `delete`, each optionally
//! pipelined so a batch of B costs one round trip, on one tube per run.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Time-to-run of every job: far longer than any run, so no job is re-reserved.
const TTR_SECS: u32 = 600;

pub struct Beanstalk {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    out: Vec<u8>,
    line: Vec<u8>,
}

impl Beanstalk {
    /// Connects and uses and watches `tube` only.
    pub async fn connect(addr: SocketAddr, tube: &str) -> Result<Beanstalk> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to beanstalkd at {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut conn = Beanstalk {
            reader: BufReader::with_capacity(64 * 1024, read),
            writer: write,
            out: Vec::with_capacity(64 * 1024),
            line: Vec::with_capacity(128),
        };
        for command in [
            format!("use {tube}\r\n"),
            format!("watch {tube}\r\n"),
            "ignore default\r\n".to_string(),
        ] {
            conn.out.extend_from_slice(command.as_bytes());
        }
        conn.flush().await?;
        for expected in ["USING", "WATCHING", "WATCHING"] {
            let line = conn.read_line().await?;
            if !line.starts_with(expected) {
                bail!("beanstalkd answered '{line}' to a tube command");
            }
        }
        Ok(conn)
    }

    async fn flush(&mut self) -> Result<()> {
        self.writer.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    async fn read_line(&mut self) -> Result<String> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            bail!("beanstalkd closed the connection");
        }
        Ok(String::from_utf8_lossy(&self.line).trim_end().to_string())
    }

    /// Puts every payload (one pipelined round trip).
    pub async fn put(&mut self, payloads: &[Vec<u8>]) -> Result<()> {
        for payload in payloads {
            self.out
                .extend_from_slice(format!("put 0 0 {TTR_SECS} {}\r\n", payload.len()).as_bytes());
            self.out.extend_from_slice(payload);
            self.out.extend_from_slice(b"\r\n");
        }
        self.flush().await?;
        for _ in payloads {
            let line = self.read_line().await?;
            if !line.starts_with("INSERTED") {
                bail!("beanstalkd answered '{line}' to put");
            }
        }
        Ok(())
    }

    /// Reserves up to `max` jobs (one pipelined round trip), each waiting up to
    /// `timeout_secs` (0: answer at once). Returns (job id, payload) pairs.
    pub async fn reserve(&mut self, max: usize, timeout_secs: u32) -> Result<Vec<(u64, Vec<u8>)>> {
        for _ in 0..max {
            self.out
                .extend_from_slice(format!("reserve-with-timeout {timeout_secs}\r\n").as_bytes());
        }
        self.flush().await?;
        let mut jobs = Vec::with_capacity(max);
        for _ in 0..max {
            let line = self.read_line().await?;
            let mut words = line.split(' ');
            match words.next() {
                Some("RESERVED") => {
                    let id: u64 = words.next().unwrap_or("").parse()?;
                    let bytes: usize = words.next().unwrap_or("").parse()?;
                    let mut data = vec![0; bytes + 2];
                    self.reader.read_exact(&mut data).await?;
                    data.truncate(bytes);
                    jobs.push((id, data));
                }
                Some("TIMED_OUT") | Some("DEADLINE_SOON") => {}
                _ => bail!("beanstalkd answered '{line}' to reserve"),
            }
        }
        Ok(jobs)
    }

    /// Deletes the jobs (one pipelined round trip).
    pub async fn delete(&mut self, ids: &[u64]) -> Result<()> {
        for id in ids {
            self.out
                .extend_from_slice(format!("delete {id}\r\n").as_bytes());
        }
        self.flush().await?;
        for _ in ids {
            let line = self.read_line().await?;
            if line != "DELETED" {
                bail!("beanstalkd answered '{line}' to delete");
            }
        }
        Ok(())
    }
}
