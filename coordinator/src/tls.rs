//! TLS on both ports (`--tls-cert`, `--tls-key`): one certificate chain and key, read
//! and checked once at start.
//!
//! - The gRPC port hands every connection to tonic, which makes the handshake
//!   ([`Tls::grpc`]). The wire protocol is plain TCP and is not offered there: a
//!   client that speaks it first gets no TLS handshake and is closed.
//! - The HTTP port accepts through [`TlsListener`]: handshakes run in tasks of their
//!   own, as tonic's do, so a client that connects and stays silent holds up no one.
//!   On both ports a handshake that takes over [`HANDSHAKE_TIMEOUT`] is dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tonic::transport::{Identity, ServerTlsConfig};

/// How long a client may take to finish its TLS handshake on the HTTP port.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The coordinator's certificate chain and key.
#[derive(Clone)]
pub struct Tls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
        Tls::from_pem(cert_pem, key_pem).with_context(|| {
            format!(
                "cannot serve TLS with --tls-cert {} and --tls-key {}",
                cert.display(),
                key.display()
            )
        })
    }

    /// [`Tls::from_files`] on the files' contents.
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> anyhow::Result<Tls> {
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .context("the certificate file is not PEM")?;
        if chain.is_empty() {
            bail!("the certificate file holds no CERTIFICATE block");
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .context("the key file holds no PEM private key")?;
        let mut config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the key does not fit the certificate")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            cert_pem,
            key_pem,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// tonic's configuration for the gRPC port (tonic runs each handshake in a task
    /// of its own, with the same time limit).
    pub fn grpc(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Serves TLS on `listener` for the HTTP port.
    pub fn listen(&self, listener: TcpListener) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
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

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
