//! kuard's memq consumer mode (`--keygen-memq-server URL --keygen-memq-queue Q`):
//! consume over the memq HTTP API exactly as kuard's keygen worker does, so the book's
//! consumer Job runs unchanged against a workq coordinator's HTTP face.
//!
//! The loop, as in kuard: `POST {URL}/queues/{Q}/dequeue`;
//! - 200: generate one key and log `Item done: SHA256:…` (the message is not used,
//!   and nothing is reported back: memq's dequeue is at-most-once);
//! - 204: the queue is empty; with `--keygen-exit-on-complete` exit at once with
//!   `--keygen-exit-code`, else log `Queue is empty. Retrying after 1s.` and sleep;
//! - a network error or any status ≥ 300: log
//!   `Error talking to server: …. Retrying after 1s.` and sleep, forever.
//!
//! Unlike kuard, SIGTERM is handled: the worker exits 143 at once (the key being
//! generated is lost either way; the item was already taken off the queue).

use std::path::PathBuf;
use std::time::Duration;

use tracing::info;

use crate::handler::keygen::Key;
use crate::http::{self, Url};
use crate::shutdown::{Shutdown, SignalExit};

/// kuard's fixed retry delay.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A memq consumer's settings.
#[derive(Clone, Debug)]
pub struct Memq {
    /// The memq API root, e.g. `http://queue:8080/memq/server`.
    pub server: Url,
    pub queue: String,
    pub exit_on_complete: bool,
    pub exit_code: u8,
    pub bits: usize,
    /// Write each key pair here as `key-N` / `key-N.pub`.
    pub out: Option<PathBuf>,
    /// Sent as `Authorization: Bearer …` when the coordinator wants a token.
    pub token: Option<String>,
}

/// How a memq run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemqEnd {
    /// The queue answered 204 and `--keygen-exit-on-complete` is set.
    Complete(u8),
    Signalled(SignalExit),
}

/// What one dequeue call said.
#[derive(Debug, PartialEq, Eq)]
enum Dequeued {
    Message,
    Empty,
}

impl Memq {
    fn dequeue_url(&self) -> Url {
        Url {
            path: format!(
                "{}/queues/{}/dequeue",
                self.server.path,
                escape(&self.queue)
            ),
            ..self.server.clone()
        }
    }

    async fn dequeue(&self, url: &Url) -> Result<Dequeued, String> {
        let response = http::post(url, self.token.as_deref(), b"")
            .await
            .map_err(|e| format!("Post \"{url}\": {e}"))?;
        match response.status {
            204 => Ok(Dequeued::Empty),
            // kuard's client: every status ≥ 300 is an error, anything else a message.
            status if status >= 300 => Err(format!("HTTP Error: {status} {}", response.reason)),
            _ => Ok(Dequeued::Message),
        }
    }

    /// Runs until the queue is empty (with `--keygen-exit-on-complete`) or a signal.
    pub async fn run(&self, shutdown: &Shutdown) -> anyhow::Result<MemqEnd> {
        let signalled = || MemqEnd::Signalled(shutdown.signal().unwrap_or(SignalExit(143)));
        let url = self.dequeue_url();
        info!("MemQ Worker starting");
        let mut generated: u64 = 0;
        loop {
            let answer = tokio::select! {
                _ = shutdown.draining() => return Ok(signalled()),
                answer = self.dequeue(&url) => answer,
            };
            match answer {
                Ok(Dequeued::Message) => {
                    let key = tokio::select! {
                        _ = shutdown.draining() => return Ok(signalled()),
                        key = Key::generate_blocking(self.bits, format!("workq-memq-{}", generated + 1)) => key,
                    };
                    generated += 1;
                    let desc = match key {
                        Ok(key) => {
                            let fingerprint = key.fingerprint();
                            if let Some(dir) = &self.out {
                                let dir = dir.clone();
                                let name = format!("key-{generated}");
                                tokio::task::spawn_blocking(move || key.write_pair(&dir, &name))
                                    .await?
                                    .map_err(|e| anyhow::anyhow!("writing key-{generated}: {e}"))?;
                            }
                            fingerprint
                        }
                        Err(e) => format!("Error generating key: {e}"),
                    };
                    info!("Item done: {desc}");
                    continue;
                }
                Ok(Dequeued::Empty) => {
                    if self.exit_on_complete {
                        return Ok(MemqEnd::Complete(self.exit_code));
                    }
                    info!("Queue is empty. Retrying after 1s.");
                }
                Err(e) => info!("Error talking to server: {e}. Retrying after 1s."),
            }
            tokio::select! {
                _ = shutdown.draining() => return Ok(signalled()),
                _ = tokio::time::sleep(RETRY_AFTER) => {}
            }
        }
    }
}

/// Percent-encodes a queue name for use as one path segment.
fn escape(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker of queue `keygen` on the memq server at `server`.
    fn keygen_from(server: &str) -> Memq {
        Memq {
            server: Url::parse(server).unwrap(),
            queue: "keygen".into(),
            exit_on_complete: true,
            exit_code: 0,
            bits: 1024,
            out: None,
            token: None,
        }
    }

    #[test]
    fn dequeue_url_is_kuards() {
        let memq = keygen_from("http://queue:8080/memq/server");
        assert_eq!(
            memq.dequeue_url().to_string(),
            "http://queue:8080/memq/server/queues/keygen/dequeue"
        );
        assert_eq!(escape("a b/c"), "a%20b%2Fc");
    }

    #[tokio::test]
    async fn unreachable_server_reads_like_kuards_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let memq = keygen_from(&format!("http://127.0.0.1:{port}/memq/server"));
        let err = memq.dequeue(&memq.dequeue_url()).await.unwrap_err();
        assert!(
            err.starts_with(&format!(
                "Post \"http://127.0.0.1:{port}/memq/server/queues/keygen/dequeue\": "
            )),
            "{err}"
        );
    }
}
