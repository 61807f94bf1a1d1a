//! The HTTP face closes connections that go quiet: a client that connects and says
//! nothing, one that stops half-way through its headers, and a keep-alive connection
//! left idle after its answer. None of them can hold a file descriptor for ever.

mod http_common;

use std::time::Duration;

use http_common::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use workq_coordinator::auth::Auth;
use workq_coordinator::server::Serving;
use workq_coordinator::store::Store;

/// Reads until the server closes the connection; what it sent before that.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.expect("the server closes a quiet connection");
    seen
}

#[tokio::test]
async fn quiet_connections_are_closed() {
    let serving = Serving {
        http_idle_timeout: Duration::from_millis(500),
        ..Serving::default()
    };
    let server = Server::start_serving(Store::memory(), Auth::disabled(), serving).await;

    // Says nothing at all.
    let mut silent = TcpStream::connect(server.http).await.unwrap();
    assert!(until_closed(&mut silent).await.is_empty());

    // Stops half-way through its headers.
    let mut partial = TcpStream::connect(server.http).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(until_closed(&mut partial).await.is_empty());

    // A whole request is answered on a kept-alive connection, which then goes quiet.
    let mut kept = TcpStream::connect(server.http).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(until_closed(&mut kept).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The port still serves.
    assert_eq!(server.get("/healthz").await.status, 200);
    server.stop().await;
}
