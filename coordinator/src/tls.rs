//! TLS on both ports (`--tls-cert`, `--tls-key`): one certificate chain and key, checked
//! at start and read again when the files change.
//!
//! - Every handshake runs in a task of its own and may take [`HANDSHAKE_TIMEOUT`] at
//!   most, so a client that connects and stays silent holds up no one.
//! - The gRPC port makes its handshakes before tonic sees the connection ([`Conn`]).
//!   The wire protocol is plain TCP and is not offered there: a client that speaks it
//!   first fails the handshake and is closed.
//! - The HTTP port accepts through [`TlsListener`].
//! - Certificates expire and get renewed (cert-manager rewrites a Secret's files in
//!   place): a handshake at least [`RELOAD_CHECK`] after the last look reads the files
//!   again. New files that parse and fit serve every later handshake; anything else
//!   keeps the current certificate and is logged once.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{ServerConfig, crypto::ring};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use workq_proto::client::describe_pem_error;

use crate::x509;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, at most, a handshake looks at the certificate files again.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The coordinator's certificate chain and key, and the acceptor that serves them.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tls { .. }")
    }
}

impl Tls {
    /// Reads a PEM certificate chain (the server's certificate first) and its PEM
    /// private key; fails with the file and the reason when either is unusable or
    /// the key does not belong to the certificate.
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<Tls> {
        let read = |path: &Path, flag: &str| {
            std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
        };
        let (cert_pem, key_pem) = (read(cert, "--tls-cert")?, read(key, "--tls-key")?);
        let current = certified(&cert_pem, &key_pem).with_context(|| {
            format!(
                "cannot serve TLS with --tls-cert {} and --tls-key {}",
                cert.display(),
                key.display()
            )
        })?;
        note_dates(
            cert,
            &current,
            DateTime::<Utc>::from(std::time::SystemTime::now()),
        );
        let certs = Certs {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(current)),
            files: Mutex::new(Files {
                checked: Instant::now(),
                served: (cert_pem, key_pem),
                refused: None,
            }),
        };
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(certs));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The server side of a handshake on `stream`, within [`HANDSHAKE_TIMEOUT`].
    pub async fn handshake(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream))
            .await
            .unwrap_or_else(|_| Err(handshake_timed_out()))
    }

    /// [`Tls::handshake`], unless the client opened with a plain HTTP/1 request
    /// (`curl http://` to a port serving TLS): that one is answered, in plain text,
    /// with a 400 that says to use `https://`, and `None` is returned. A plain HTTP/2
    /// client ("PRI * HTTP/2.0") is left to the handshake, which fails it, and to the
    /// client's own hint: gRPC clients read no HTTP/1 answer.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<Option<TlsStream<TcpStream>>> {
        let mut first = [0u8; 3];
        let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await;
        let Ok(peeked) = peeked else {
            return Err(handshake_timed_out());
        };
        let seen = &first[..peeked?];
        // A TLS record starts with its type (0x16 for a handshake), a request line
        // with its method in capitals.
        let http1 = seen.first().is_some_and(u8::is_ascii_uppercase) && seen != b"PRI";
        if !http1 {
            return self.handshake(stream).await.map(Some);
        }
        answer_plain_http(stream).await;
        Ok(None)
    }

    /// Serves TLS on `listener` for the HTTP port.
    pub fn listen(&self, listener: TcpListener) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(64);
        let tls = self.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = crate::server::next_connection(&listener).await;
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tls.accept(stream).await {
                        Ok(Some(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(None) => tracing::debug!(%peer, "plain HTTP on the TLS port"),
                        Err(e) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    }
                });
            }
        });
        Ok(TlsListener {
            incoming,
            local,
            accepting: accepting.abort_handle(),
        })
    }
}

fn handshake_timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
}

/// Answers a plain HTTP/1 request on a port serving TLS with a 400 that says which
/// URL to use, as nginx does. The request's head is read first (within a few
/// seconds, 16 KiB at most), so that closing with it unread does not reset the
/// connection before the client has the answer.
async fn answer_plain_http(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HEAD_LIMIT: usize = 16 << 10;
    let mut head = Vec::new();
    let read_head = async {
        let mut buf = [0u8; 4096];
        while head.len() < HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(5), read_head).await,
        Ok(true)
    ) {
        return;
    }
    let body = format!(
        "this port serves HTTPS: use {}\n",
        https_url_of(&head).unwrap_or_else(|| "https://".into())
    );
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let wrote = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), wrote).await;
}

/// `https://` and the Host and target of the request whose head is `head`, when both
/// are there and printable.
fn https_url_of(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let target = lines.next()?.split(' ').nth(1)?;
    let host = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("host").then(|| value.trim())
    })?;
    let printable =
        |s: &str| !s.is_empty() && s.len() <= 1024 && s.bytes().all(|b| b.is_ascii_graphic());
    (printable(host) && printable(target) && target.starts_with('/'))
        .then(|| format!("https://{host}{target}"))
}

/// The certificate and key of a PEM chain and a PEM key that belong together.
fn certified(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!(
                "the certificate file is not PEM: {}",
                describe_pem_error(&e)
            )
        })?;
    if chain.is_empty() {
        bail!("the certificate file holds no CERTIFICATE block");
    }
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(_) if is_encrypted(key_pem) => bail!(
            "the key is encrypted: workq needs an unencrypted key (decrypt it with \
             `openssl pkey -in KEY -out PLAIN`, and keep PLAIN as private as KEY)"
        ),
        Err(e) => bail!(
            "the key file holds no PEM private key: {}",
            describe_pem_error(&e)
        ),
    };
    let provider = ring::default_provider();
    match CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider) {
        Ok(certified) => Ok(certified),
        // The key fits a later certificate: the chain is in the wrong order.
        Err(e) => match (1..chain.len()).find(|&i| {
            CertifiedKey::from_der(vec![chain[i].clone()], key.clone_key(), &provider).is_ok()
        }) {
            Some(i) => bail!(
                "the key fits certificate {} of the certificate file, not the first: the \
                 server's own certificate must come first in --tls-cert, then the \
                 certificates that issued it",
                i + 1
            ),
            None => Err(e).context("the key does not fit the certificate"),
        },
    }
}

/// How long before its end a certificate being loaded is worth a warning. cert-manager
/// renews a certificate a third of its life before it ends (30 days for 90), so one
/// this close to its end is one whose renewal is failing.
pub const EXPIRY_WARNING: chrono::TimeDelta = chrono::TimeDelta::days(7);

/// What the dates of a certificate being loaded call for, at `now`: an error when
/// clients refuse it (expired, or not valid yet), a warning when it ends within
/// [`EXPIRY_WARNING`]. The certificate is served all the same: nothing else would let
/// clients in, and a renewed file is picked up without a restart.
pub fn dates_note(validity: &x509::Validity, now: DateTime<Utc>) -> (tracing::Level, String) {
    let day = |at: DateTime<Utc>| at.format("%Y-%m-%d %H:%M:%S UTC");
    if now > validity.not_after {
        (
            tracing::Level::ERROR,
            format!(
                "the TLS certificate expired on {}: clients refuse it until it is renewed \
                 (a renewed file is served without a restart)",
                day(validity.not_after)
            ),
        )
    } else if now < validity.not_before {
        (
            tracing::Level::ERROR,
            format!(
                "the TLS certificate is not valid until {}: clients refuse it until then \
                 (is this machine's clock right?)",
                day(validity.not_before)
            ),
        )
    } else if validity.not_after - now < EXPIRY_WARNING {
        let hours = (validity.not_after - now).num_hours();
        (
            tracing::Level::WARN,
            format!(
                "the TLS certificate expires on {}, in {}: renew it (a renewed file is \
                 served without a restart)",
                day(validity.not_after),
                if hours >= 48 {
                    format!("{} days", hours / 24)
                } else {
                    format!("{hours} hours")
                }
            ),
        )
    } else {
        (
            tracing::Level::INFO,
            format!(
                "the TLS certificate is valid until {}",
                day(validity.not_after)
            ),
        )
    }
}

/// Logs what [`dates_note`] says of the server's own certificate (the first of
/// the chain) in `path`.
fn note_dates(path: &Path, certified: &CertifiedKey, now: DateTime<Utc>) {
    let Some(validity) = certified.cert.first().and_then(|der| x509::validity(der)) else {
        tracing::debug!(cert = %path.display(), "cannot read the TLS certificate's dates");
        return;
    };
    let (level, note) = dates_note(&validity, now);
    let cert = path.display();
    match level {
        tracing::Level::ERROR => tracing::error!(%cert, "{note}"),
        tracing::Level::WARN => tracing::warn!(%cert, "{note}"),
        _ => tracing::info!(%cert, "{note}"),
    }
}

/// True when the key file holds an encrypted key, which rustls cannot read: PKCS#8
/// ("ENCRYPTED PRIVATE KEY") or OpenSSL's legacy encrypted PEM ("Proc-Type:
/// 4,ENCRYPTED").
fn is_encrypted(key_pem: &[u8]) -> bool {
    let text = String::from_utf8_lossy(key_pem);
    text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
}

/// The files, and the certificate every handshake gets.
struct Certs {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    files: Mutex<Files>,
}

/// What was last read from the files.
struct Files {
    checked: Instant,
    /// The contents being served.
    served: (Vec<u8>, Vec<u8>),
    /// Contents that did not make a certificate, so that they are logged once.
    refused: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certs")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Certs {
    /// Reads the files again if the last look is [`RELOAD_CHECK`] old, and serves
    /// what they hold from now on if it changed and makes a certificate.
    fn refresh(&self) {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if files.checked.elapsed() < RELOAD_CHECK {
            return;
        }
        files.checked = Instant::now();
        let (Ok(cert), Ok(key)) = (std::fs::read(&self.cert), std::fs::read(&self.key)) else {
            // Mid-rewrite, or gone: the next look tells.
            return;
        };
        let contents = (cert, key);
        if contents == files.served || files.refused.as_ref() == Some(&contents) {
            return;
        }
        match certified(&contents.0, &contents.1) {
            Ok(fresh) => {
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                note_dates(
                    &self.cert,
                    &fresh,
                    DateTime::<Utc>::from(std::time::SystemTime::now()),
                );
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
                files.served = contents;
                files.refused = None;
            }
            Err(e) => {
                files.refused = Some(contents);
                tracing::warn!(
                    cert = %self.cert.display(),
                    key = %self.key.display(),
                    "the TLS files changed but cannot be served, keeping the current \
                     certificate: {e:#}"
                );
            }
        }
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.refresh();
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A connection of the gRPC port as tonic gets it: plain, or past its TLS handshake.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    /// With how many bytes of the HTTP/2 preface, already read off the connection
    /// to check it, are still to be given to the reader.
    Tls(Box<TlsStream<TcpStream>>, usize),
}

impl Conn {
    /// A TLS connection whose HTTP/2 preface was read (and checked) already.
    pub fn tls_after_preface(stream: TlsStream<TcpStream>) -> Conn {
        Conn::Tls(Box::new(stream), crate::wire::HTTP2_PREFACE.len())
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(stream) => stream.connect_info(),
            Conn::Tls(stream, _) => stream.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Conn::Tls(_, unread @ 1..) => {
                let preface = crate::wire::HTTP2_PREFACE;
                let rest = &preface[preface.len() - *unread..];
                let n = rest.len().min(buf.remaining());
                buf.put_slice(&rest[..n]);
                *unread -= n;
                Poll::Ready(Ok(()))
            }
            Conn::Tls(stream, _) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Conn::Tls(stream, _) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Conn::Tls(stream, _) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(stream) => stream.is_write_vectored(),
            Conn::Tls(stream, _) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Conn::Tls(stream, _) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Conn::Tls(stream, _) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// The HTTP port's listener when it serves TLS: yields connections whose handshake
/// is done.
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::AbortHandle,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(accepted) => accepted,
            // The accept task holds a sender for as long as this listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_file_cut_short_is_said_to_be_so() {
        let cut = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n";
        let error = certified(cut, b"").expect_err("refused").to_string();
        assert_eq!(
            error,
            "the certificate file is not PEM: the CERTIFICATE block has no END line (is the \
             file cut short?)"
        );
    }

    #[test]
    fn a_certificate_is_judged_by_its_dates() {
        let at = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc)
        };
        let validity = x509::Validity {
            not_before: at("2026-01-01T00:00:00Z"),
            not_after: at("2026-04-01T00:00:00Z"),
        };
        let note = |now: &str| dates_note(&validity, at(now));

        let (level, text) = note("2026-04-02T00:00:00Z");
        assert_eq!(level, tracing::Level::ERROR);
        assert!(
            text.starts_with("the TLS certificate expired on 2026-04-01 00:00:00 UTC"),
            "{text}"
        );
        let (level, text) = note("2025-12-31T00:00:00Z");
        assert_eq!(level, tracing::Level::ERROR);
        assert!(text.contains("not valid until 2026-01-01"), "{text}");
        assert!(text.contains("clock"), "{text}");
        let (level, text) = note("2026-03-28T00:00:00Z");
        assert_eq!(level, tracing::Level::WARN);
        assert!(
            text.contains("expires on 2026-04-01 00:00:00 UTC, in 4 days"),
            "{text}"
        );
        let (level, text) = note("2026-03-31T12:00:00Z");
        assert_eq!(level, tracing::Level::WARN);
        assert!(text.contains("in 12 hours"), "{text}");
        let (level, text) = note("2026-02-01T00:00:00Z");
        assert_eq!(level, tracing::Level::INFO);
        assert_eq!(
            text,
            "the TLS certificate is valid until 2026-04-01 00:00:00 UTC"
        );
    }

    #[test]
    fn a_plain_request_is_pointed_at_its_https_url() {
        let head = b"GET /memq/server/stats?x=1 HTTP/1.1\r\nhost: coordinator:8080\r\n\r\n";
        assert_eq!(
            https_url_of(head).as_deref(),
            Some("https://coordinator:8080/memq/server/stats?x=1")
        );
        // No Host, or one a terminal should not print: no URL.
        assert_eq!(https_url_of(b"GET / HTTP/1.0\r\n\r\n"), None);
        assert_eq!(
            https_url_of(b"GET / HTTP/1.1\r\nHost: a\x1b[2Jb\r\n\r\n"),
            None
        );
        assert_eq!(https_url_of(b"\xff\xfe"), None);
    }

    #[test]
    fn encrypted_keys_are_recognised() {
        let pkcs8 =
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(is_encrypted(pkcs8));
        let legacy = b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
            DEK-Info: AES-256-CBC,00\n\nMIIE\n-----END RSA PRIVATE KEY-----\n";
        assert!(is_encrypted(legacy));
        let plain = b"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        assert!(!is_encrypted(plain));
    }
}
