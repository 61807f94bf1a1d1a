//! Shared by the `http_*` tests: an in-process coordinator on port 0 and a tiny
//! HTTP/1.1 client that shows status, headers and body bytes exactly as sent.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use workq_coordinator::auth::Auth;
use workq_coordinator::clock::Clock;
use workq_coordinator::store::Store;
use workq_coordinator::{Engine, server};

/// A coordinator served from this test process, in memory.
pub struct Server {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub engine: Arc<Engine>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(Auth::disabled()).await
    }

    pub async fn start_with(auth: Auth) -> Server {
        Self::start_on(Store::memory(), auth).await
    }

    pub async fn start_on(store: Store, auth: Auth) -> Server {
        Self::start_serving(store, auth, server::Serving::default()).await
    }

    pub async fn start_serving(store: Store, auth: Auth, serving: server::Serving) -> Server {
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let engine = Engine::open(store, Clock::system()).expect("engine");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(server::run_with(
            grpc,
            http,
            engine.clone(),
            auth,
            shutdown,
            serving,
        ));
        Server {
            http: http_addr,
            grpc: grpc_addr,
            engine,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Fires the shutdown future and waits for a clean stop.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("server stops within 30s")
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], b"").await
    }

    pub async fn post(&self, path: &str, body: &[u8]) -> Reply {
        self.send("POST", path, &[], body).await
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        request(self.http, method, path, headers, body).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A test that panicked before `stop` still must not leave a server running.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A response as it came off the wire.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    // The body goes while the reply is read: a server that refuses a body past its
    // limit answers and closes before the body is all sent, and the reply must be
    // read before the rest of the body hits the closed socket.
    let (mut reader, mut writer) = stream.into_split();
    let body = body.to_vec();
    let sending = tokio::spawn(async move {
        let _ = writer.write_all(&body).await;
        writer
    });
    let mut data = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut data))
        .await
        .expect("reply within 30s");
    if let Err(e) = read {
        assert!(!data.is_empty(), "read reply: {e}");
    }
    drop(sending.await);
    parse_reply(&data)
}

/// Sends raw bytes (for malformed requests) and reads whatever comes back.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_reply(&mut stream).await
}

pub async fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut data = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut data))
        .await
        .expect("reply within 30s")
        .expect("read reply");
    parse_reply(&data)
}

pub fn parse_reply(data: &[u8]) -> Reply {
    let split = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(data)));
    let head = std::str::from_utf8(&data[..split]).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("header line");
            (name.trim().to_string(), value.trim().to_string())
        })
        .collect();
    let mut body = data[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size_text = std::str::from_utf8(&data[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Polls `check` until it is true, panicking with `what` after 30 s.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
