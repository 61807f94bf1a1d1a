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

    // Trickles its headers a byte at a time, each byte well inside the timeout: the
    // clock runs from the request's first byte, so it is closed all the same.
    let trickle = TcpStream::connect(server.http).await.unwrap();
    let (mut reader, mut writer) = trickle.into_split();
    let trickling = tokio::spawn(async move {
        writer.write_all(b"GET /healthz HTTP/1.1\r\n").await?;
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.write_all(b"X").await?;
        }
        std::io::Result::Ok(())
    });
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await
        .expect("the server closes a connection whose request trickles in");
    assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
    trickling.abort();

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

/// The HTTP port answers HTTP/2 with prior knowledge (h2c), as the README says, with
/// the same routes and the same token check as HTTP/1.1.
#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let server = Server::start_with(Auth::with_token("s3cret")).await;
    let tcp = TcpStream::connect(server.http).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(connection);
    let mut get = async |path: &str, token: Option<&str>| {
        let mut request = axum::http::Request::get(format!("http://{}{path}", server.http));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let (answer, _) = h2.send_request(request.body(()).unwrap(), true).unwrap();
        let answer = answer.await.unwrap();
        let status = answer.status().as_u16();
        let mut body = answer.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        (status, String::from_utf8(text).unwrap())
    };
    assert_eq!(get("/healthz", None).await.0, 200);
    let (status, text) = get("/memq/server/stats", None).await;
    assert_eq!(
        (status, text.contains("missing token")),
        (401, true),
        "{text}"
    );
    let (status, text) = get("/memq/server/stats", Some("s3cret")).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"kind\":\"stats\""), "{text}");
    drop(h2);
    driver.abort();
    server.stop().await;
}
