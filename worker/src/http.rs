//! A minimal HTTP/1.1 client over a tokio `TcpStream`, `http://` only: just enough to
//! POST to kuard's memq API (one request per connection, `Connection: close`).
//!
//! It reads `Content-Length`, chunked and close-delimited bodies, and caps what it
//! reads, so a misbehaving server cannot make the worker buffer without bound.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest response body accepted: a memq message is one item's payload (≤ 1 MiB
/// by default) as a JSON string, escaped.
const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Whole-request time limit. kuard has none and can hang forever on a dead peer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed `http://host[:port]/path` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// The path, without a trailing slash (may be empty).
    pub path: String,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url, String> {
        let rest = text.strip_prefix("http://").ok_or_else(|| {
            if text.starts_with("https://") {
                format!("'{text}': only http:// is supported for memq servers")
            } else {
                format!("'{text}' is not an http:// URL")
            }
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("'{text}' has no usable host"));
        }
        let bad_port = |port: &str| format!("'{text}' has a bad port '{port}'");
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("'{text}' has an unclosed '['"))?;
            match after.strip_prefix(':') {
                Some(port) => (host, port.parse::<u16>().map_err(|_| bad_port(port))?),
                None if after.is_empty() => (host, 80),
                None => return Err(format!("'{text}' has no usable host")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, port.parse::<u16>().map_err(|_| bad_port(port))?),
                None => (authority, 80),
            }
        };
        if host.is_empty() {
            return Err(format!("'{text}' has no host"));
        }
        let path = path.split(['?', '#']).next().unwrap_or("");
        Ok(Url {
            host: host.to_string(),
            port,
            path: path.trim_end_matches('/').to_string(),
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.host_header(), self.path)
    }
}

/// A response: status code, reason phrase and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub body: Vec<u8>,
}

/// POSTs `body` to `url` and reads the whole response.
pub async fn post(url: &Url, bearer: Option<&str>, body: &[u8]) -> std::io::Result<Response> {
    tokio::time::timeout(REQUEST_TIMEOUT, post_inner(url, bearer, body))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
            )
        })?
}

async fn post_inner(url: &Url, bearer: Option<&str>, body: &[u8]) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect((url.host.as_str(), url.port)).await?;
    stream.set_nodelay(true)?;
    let path = if url.path.is_empty() { "/" } else { &url.path };
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: workq-worker/{}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        url.host_header(),
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;

    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    // Read until the end of the head.
    let head_end = loop {
        if let Some(i) = find(&raw, b"\r\n\r\n") {
            break i + 4;
        }
        if raw.len() > MAX_HEAD_BYTES {
            return Err(bad("response head too large"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed before a complete response head"));
        }
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = parse_head(&raw[..head_end])?;
    let mut body = raw.split_off(head_end);
    // No body for 1xx, 204 and 304, whatever the headers say.
    if head.status == 204 || head.status == 304 || head.status < 200 {
        return Ok(Response {
            status: head.status,
            reason: head.reason,
            body: Vec::new(),
        });
    }
    match head.framing {
        Framing::Length(len) => {
            if len > MAX_BODY_BYTES {
                return Err(bad("response body too large"));
            }
            while body.len() < len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(bad("connection closed in the middle of the body"));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        Framing::Chunked | Framing::Close => {
            loop {
                if body.len() > MAX_BODY_BYTES * 2 {
                    return Err(bad("response body too large"));
                }
                if head.framing == Framing::Chunked && dechunk(&body)?.is_some() {
                    break;
                }
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            if head.framing == Framing::Chunked {
                body = dechunk(&body)?
                    .ok_or_else(|| bad("connection closed in the middle of a chunked body"))?;
            }
        }
    }
    Ok(Response {
        status: head.status,
        reason: head.reason,
        body,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

#[derive(Debug)]
struct Head {
    status: u16,
    reason: String,
    framing: Framing,
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(raw: &[u8]) -> std::io::Result<Head> {
    let text = std::str::from_utf8(raw).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not an HTTP/1.x response"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let mut framing = Framing::Close;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().ends_with("chunked")
        {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let len = value
                .parse::<usize>()
                .map_err(|_| bad("bad Content-Length"))?;
            framing = Framing::Length(len);
        }
    }
    Ok(Head {
        status,
        reason,
        framing,
    })
}

/// Decodes a chunked body; `None` while it is still incomplete.
fn dechunk(mut raw: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(raw, b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&raw[..line_end]).map_err(|_| bad("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            // Trailers (if any) end with an empty line; we need not wait for them.
            return Ok(Some(out));
        }
        if raw.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn parses_urls() {
        let url = Url::parse("http://queue:8080/memq/server/").unwrap();
        assert_eq!(
            url,
            Url {
                host: "queue".into(),
                port: 8080,
                path: "/memq/server".into()
            }
        );
        assert_eq!(url.to_string(), "http://queue:8080/memq/server");
        assert_eq!(Url::parse("http://example").unwrap().port, 80);
        assert_eq!(Url::parse("http://[::1]:9/x").unwrap().host, "::1");
        assert!(
            Url::parse("https://queue:8080")
                .unwrap_err()
                .contains("only http://")
        );
        assert!(Url::parse("queue:8080").is_err());
        assert!(Url::parse("http://queue:http/").is_err());
    }

    #[test]
    fn decodes_chunked_bodies() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n").unwrap(),
            Some(b"hello world".to_vec())
        );
        assert_eq!(dechunk(b"5\r\nhel").unwrap(), None);
        assert!(dechunk(b"zz\r\n").is_err());
    }

    /// Serves one canned response and returns the request it got.
    async fn serve_once(response: &'static [u8]) -> (Url, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&request, b"\r\n\r\n").is_none() {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            socket.write_all(response).await.unwrap();
            socket.shutdown().await.unwrap();
            String::from_utf8(request).unwrap()
        });
        let url = Url::parse(&format!(
            "http://127.0.0.1:{port}/memq/server/queues/q/dequeue"
        ))
        .unwrap();
        (url, task)
    }

    #[tokio::test]
    async fn reads_content_length_bodies_and_sends_a_plain_post() {
        let (url, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await;
        let response = post(&url, Some("s3cret"), b"").await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"{}");
        let request = server.await.unwrap();
        assert!(
            request.starts_with("POST /memq/server/queues/q/dequeue HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Content-Length: 0\r\n"), "{request}");
        assert!(
            request.contains("Authorization: Bearer s3cret\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn no_content_and_errors() {
        let (url, _server) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let response = post(&url, None, b"").await.unwrap();
        assert_eq!((response.status, response.body.len()), (204, 0));

        let (url, _server) = serve_once(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\nf\r\ndoes not exist\n\r\n0\r\n\r\n",
        )
        .await;
        let response = post(&url, None, b"").await.unwrap();
        assert_eq!(response.status, 400);
        assert_eq!(response.reason, "Bad Request");
        assert_eq!(response.body, b"does not exist\n");
    }
}
