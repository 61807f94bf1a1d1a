//! TLS with the real binaries. A coordinator started with `--tls-cert` and `--tls-key`
//! serves gRPC and HTTP over TLS only. Clients that trust its CA (`--ca-cert`) work:
//! the client library, `queue-cli` and `workq-worker`. The others are refused with the
//! reason. The wire protocol, plain TCP, is not offered.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use workq_proto::client::{TlsFailure, tls_failure};
use workq_proto::{Client, ConnectOptions};
use workq_tests::{
    Coordinator, Process, bin_path, create_queue, lease_one, pb, queue_stats, wait_for,
    wait_for_async,
};

/// A test CA and a certificate it signed for 127.0.0.1 and localhost, as PEM files,
/// another CA that signed nothing here, and an empty directory to stand for a system
/// without CA certificates (as workq's slim image is).
///
/// With the same key (`key.pem`), certificates that fail a client's check: one that
/// expired in 2020 (`expired.pem`), one for another name (`elsewhere.pem`), and
/// the server's certificate after the intermediate CA that issued it, the wrong
/// order for a chain (`chain-reversed.pem`).
struct Pki {
    dir: TempDir,
    ca_der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_params = |name: &str, constraints| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(constraints);
            params.distinguished_name.push(DnType::CommonName, name);
            params
        };
        let new_ca = |name: &str| {
            let params = ca_params(name, BasicConstraints::Unconstrained);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let (ca, other_ca) = (new_ca("workq test CA"), new_ca("another CA"));
        let key = KeyPair::generate().unwrap();
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let cert = CertificateParams::new(names.clone())
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let mut expired = CertificateParams::new(names.clone()).unwrap();
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2020, 2, 1);
        let expired = expired.signed_by(&key, &ca).unwrap();
        let elsewhere = CertificateParams::new(vec!["elsewhere.example".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let intermediate = CertifiedIssuer::signed_by(
            ca_params("workq test intermediate", BasicConstraints::Constrained(0)),
            KeyPair::generate().unwrap(),
            &ca,
        )
        .unwrap();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &intermediate)
            .unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        write("other-ca.pem", other_ca.pem());
        std::fs::create_dir(dir.path().join("no-system-cas")).unwrap();
        write("cert.pem", cert.pem());
        write("key.pem", key.serialize_pem());
        write(
            "other-key.pem",
            KeyPair::generate().unwrap().serialize_pem(),
        );
        write("expired.pem", expired.pem());
        write("elsewhere.pem", elsewhere.pem());
        write(
            "chain-reversed.pem",
            format!("{}{}", intermediate.pem(), leaf.pem()),
        );
        Pki {
            ca_der: ca.der().clone(),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// An in-memory coordinator serving TLS with this certificate.
    fn coordinator(&self) -> Coordinator {
        self.coordinator_with("cert.pem")
    }

    /// One serving the certificate `cert` of this directory, with `key.pem`.
    fn coordinator_with(&self, cert: &str) -> Coordinator {
        Coordinator::start_with(&[
            "--in-memory",
            "--tls-cert",
            &self.arg(cert),
            "--tls-key",
            &self.arg("key.pem"),
        ])
    }

    /// Options for `url` that trust this CA.
    fn trusting(&self, url: &str) -> ConnectOptions {
        ConnectOptions::new(url)
            .ca_cert_file(Some(&self.path("ca.pem")))
            .unwrap()
    }

    /// A TLS client that trusts this CA only.
    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

fn https_url(url: &str) -> String {
    url.replacen("http://", "https://", 1)
}

fn host_port(url: &str) -> &str {
    url.split_once("://").unwrap().1
}

#[tokio::test]
async fn a_client_that_trusts_the_ca_works_and_the_others_are_told_why() {
    let pki = Pki::new();
    let coordinator = pki.coordinator();
    let url = https_url(&coordinator.grpc_url);
    // A client that connects and never says a word holds up no one's handshake.
    let _silent = TcpStream::connect(host_port(&url)).unwrap();

    let options = ConnectOptions::new(&url)
        .ca_cert_file(Some(&pki.path("ca.pem")))
        .unwrap();
    let mut client = Client::connect(options).await.unwrap();
    create_queue(&mut client, "tls", 30_000).await;
    client
        .enqueue(pb::EnqueueRequest {
            queue: "tls".into(),
            items: vec![pb::NewItem {
                payload: b"over tls".to_vec().into(),
                ..Default::default()
            }],
            seal: false,
        })
        .await
        .unwrap();
    let lease = lease_one(&mut client, "tls", "w").await;
    assert_eq!(&lease.payload[..], b"over tls");
    client
        .ack(pb::AckRequest {
            queue: "tls".into(),
            id: lease.id,
            token: lease.token,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(queue_stats(&mut client, "tls").await.done, 1);

    // With another CA the certificate is not trusted.
    let other = ConnectOptions::new(&url)
        .ca_cert_file(Some(&pki.path("other-ca.pem")))
        .unwrap();
    let untrusted = Client::connect(other).await.unwrap_err();
    assert!(
        untrusted.to_string().contains("UnknownIssuer"),
        "{untrusted}"
    );
    // Plain HTTP/2 to the TLS port gets no answer.
    match Client::connect(ConnectOptions::new(&coordinator.grpc_url)).await {
        Err(e) => assert!(e.to_string().contains("cannot reach"), "{e}"),
        Ok(mut plain) => {
            let refused = plain.list_queues(pb::ListQueuesRequest {}).await;
            assert!(refused.is_err(), "a plain call was answered: {refused:?}");
        }
    }
    // A CA file that holds no certificate is refused before any connection.
    let bad = ConnectOptions::new(&url)
        .ca_cert_file(Some(&pki.path("key.pem")))
        .unwrap_err();
    assert!(bad.to_string().contains("no PEM CERTIFICATE"), "{bad}");
    // --ca-cert with http:// is a mistake, said as such.
    let mixed = ConnectOptions::new(&coordinator.grpc_url)
        .ca_cert_file(Some(&pki.path("ca.pem")))
        .unwrap();
    let mixed = Client::connect(mixed).await.unwrap_err();
    assert!(mixed.to_string().contains("use https://"), "{mixed}");

    // The wire protocol: refused by the client over https://, and a plain wire
    // hello gets no answer from the TLS port.
    let refused = client.wire_enqueue_stream().await.unwrap_err();
    assert!(refused.to_string().contains("no TLS"), "{refused}");
    let plain = Client::connect_lazy(ConnectOptions::new(&coordinator.grpc_url)).unwrap();
    let (mut tx, mut rx) = plain.wire_enqueue_stream().await.unwrap();
    let request = pb::EnqueueRequest {
        queue: "tls".into(),
        items: vec![pb::NewItem::default()],
        seal: false,
    };
    let _ = tx.send(&request).await;
    let answer = tokio::time::timeout(Duration::from_secs(15), rx.message()).await;
    assert!(
        matches!(answer, Ok(Err(_) | Ok(None))),
        "a plain wire call was answered: {answer:?}"
    );
    // The port still serves TLS clients after the plain attempts.
    assert_eq!(queue_stats(&mut client, "tls").await.done, 1);
}

/// A certificate the client does not accept gets the advice that fixes it, not
/// always "trust the CA"; only an expired one is worth waiting for (a renewal mends
/// it), the others are configuration mistakes.
#[tokio::test]
async fn each_certificate_failure_says_what_to_fix() {
    let pki = Pki::new();
    let trusted = pki.coordinator();
    let expired = pki.coordinator_with("expired.pem");
    let elsewhere = pki.coordinator_with("elsewhere.pem");
    let plain = Coordinator::start_with(&["--in-memory"]);
    let refused = async |options: ConnectOptions| match Client::connect(options).await {
        Ok(_) => panic!("the client accepted the certificate"),
        Err(error) => (error.to_string(), error),
    };

    let (text, error) = refused(pki.trusting(&https_url(&expired.grpc_url))).await;
    assert!(text.contains("certificate expired"), "{text}");
    assert!(
        text.contains("renew the coordinator's certificate"),
        "{text}"
    );
    assert!(!text.contains("--ca-cert"), "{text}");
    assert_eq!(error.tls_failure(), Some(TlsFailure::Expired));
    assert!(error.is_transient(), "{text}");

    let (text, error) = refused(pki.trusting(&https_url(&elsewhere.grpc_url))).await;
    assert!(text.contains("not valid for name"), "{text}");
    assert!(
        text.contains("dial a name or address the certificate lists"),
        "{text}"
    );
    assert!(text.contains("127.0.0.1 among its names"), "{text}");
    assert!(!text.contains("--ca-cert"), "{text}");
    assert_eq!(error.tls_failure(), Some(TlsFailure::WrongName));
    assert!(!error.is_transient(), "{text}");

    let other = ConnectOptions::new(https_url(&trusted.grpc_url))
        .ca_cert_file(Some(&pki.path("other-ca.pem")))
        .unwrap();
    let (text, error) = refused(other.clone()).await;
    assert!(
        text.contains("UnknownIssuer (trust the coordinator's CA with --ca-cert or WORKQ_CA_CERT)"),
        "{text}"
    );
    assert!(!error.is_transient(), "{text}");
    // On a (re)connection a channel makes by itself, the call's status says as much.
    let mut lazy = Client::connect_lazy(other).unwrap();
    let status = lazy
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        tls_failure(&status),
        Some(TlsFailure::Untrusted),
        "{status:?}"
    );
    assert!(!workq_proto::ClientError::from(status).is_transient());

    // https:// to a coordinator that does not serve TLS.
    let (text, error) = refused(pki.trusting(&https_url(&plain.grpc_url))).await;
    assert!(
        text.ends_with("(if the coordinator does not serve TLS, use http://)"),
        "{text}"
    );
    assert_eq!(error.tls_failure(), Some(TlsFailure::NotTls));
    assert!(!error.is_transient(), "{text}");
}

/// workq-worker exits 1 at once, as for a wrong token, on a TLS mistake that no wait
/// mends: a CA it does not trust, a certificate for another name, https:// to a
/// plain port. An expired certificate is waited for, within --connect-timeout.
#[test]
fn a_worker_stops_at_once_on_a_certificate_no_wait_mends() {
    let pki = Pki::new();
    let trusted = pki.coordinator();
    let expired = pki.coordinator_with("expired.pem");
    let elsewhere = pki.coordinator_with("elsewhere.pem");
    let plain = Coordinator::start_with(&["--in-memory"]);
    let worker = |url: &str, ca: &str, connect_timeout: &str| {
        let log = pki.path("worker.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut worker = Process::spawn(
            Command::new(bin_path("workq-worker"))
                .args(["--server", url, "--queue", "q"])
                .args(["--connect-timeout", connect_timeout])
                .env("WORKQ_CA_CERT", pki.path(ca))
                .env_remove("WORKQ_TOKEN")
                .args(["exec", "--", "cat"])
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out),
        );
        // Far less than --connect-timeout: it must not wait the outage out.
        let code = worker.wait_exit(Duration::from_secs(60));
        (code, std::fs::read_to_string(&log).unwrap())
    };
    for (url, ca, says) in [
        (&trusted.grpc_url, "other-ca.pem", "UnknownIssuer"),
        (&elsewhere.grpc_url, "ca.pem", "not valid for name"),
        (&plain.grpc_url, "ca.pem", "use http://"),
    ] {
        let (code, log) = worker(&https_url(url), ca, "10m");
        assert_eq!(code, Some(1), "{log}");
        assert!(log.contains(says), "{log}");
        assert!(!log.contains("retrying"), "{log}");
    }
    let (code, log) = worker(&https_url(&expired.grpc_url), "ca.pem", "1s");
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("certificate expired"), "{log}");
    assert!(
        log.contains("retrying") && log.contains("gave up after"),
        "{log}"
    );
}

/// A CA file whose CERTIFICATE block does not parse is named as the problem, not the
/// server's address, before any connection.
#[test]
fn a_ca_file_that_does_not_parse_is_named() {
    let pki = Pki::new();
    let coordinator = pki.coordinator();
    let url = https_url(&coordinator.grpc_url);
    let cert = std::fs::read_to_string(pki.path("ca.pem")).unwrap();
    for (name, text, says) in [
        (
            "bad-base64.pem",
            "-----BEGIN CERTIFICATE-----\nAAAAnotbase64!!!\n-----END CERTIFICATE-----\n"
                .to_string(),
            "not valid base64",
        ),
        (
            "cut-short.pem",
            cert[..cert.len() / 2].to_string(),
            "the CERTIFICATE block has no END line",
        ),
        (
            "no-certificate.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n".to_string(),
            "CERTIFICATE block 1 is not a certificate",
        ),
    ] {
        std::fs::write(pki.path(name), text).unwrap();
        let out = queue_cli(&pki, &url, Some(name), &["list"]);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let named = format!("error: invalid --ca-cert: {}: ", pki.arg(name));
        assert!(stderr.starts_with(&named), "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
    }
}

/// `bench --mode wire` against https:// is refused before the bench makes (or
/// preloads) its queue: the wire protocol has no TLS.
#[test]
fn a_wire_bench_against_tls_is_refused_before_it_starts() {
    let pki = Pki::new();
    let coordinator = pki.coordinator();
    let url = https_url(&coordinator.grpc_url);
    let args = ["bench", "--mode", "wire", "--workload", "drain"];
    let out = queue_cli(
        &pki,
        &url,
        Some("ca.pem"),
        &[&args[..], &["--queue", "wq", "--items", "10"]].concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("use --mode stream"), "{stderr}");
    assert!(!stderr.contains("invalid"), "{stderr}");
    let list = queue_cli(&pki, &url, Some("ca.pem"), &["list", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["queues"], serde_json::json!([]), "{list}");
}

/// A renewed certificate (the files rewritten in place, as cert-manager does) serves
/// the next handshakes on both ports without a restart; files that do not make a
/// certificate leave the one being served in place, and say so in the log.
#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let (pki, renewed) = (Pki::new(), Pki::new());
    let coordinator = pki.coordinator();
    let url = https_url(&coordinator.grpc_url);
    let trusting = |by: &Pki| {
        ConnectOptions::new(&url)
            .ca_cert_file(Some(&by.path("ca.pem")))
            .unwrap()
    };
    Client::connect(trusting(&pki)).await.unwrap();

    // The key first: a look between the two writes finds a pair that does not fit,
    // and keeps serving the old one.
    std::fs::copy(renewed.path("key.pem"), pki.path("key.pem")).unwrap();
    std::fs::copy(renewed.path("cert.pem"), pki.path("cert.pem")).unwrap();
    wait_for_async(
        "the renewed certificate",
        Duration::from_secs(15),
        || async { Client::connect(trusting(&renewed)).await.is_ok() },
    )
    .await;
    let old = Client::connect(trusting(&pki)).await.unwrap_err();
    assert!(
        old.to_string().contains("invalid peer certificate"),
        "{old}"
    );
    assert!(coordinator.log().contains("TLS certificate reloaded"));
    let http = tokio::net::TcpStream::connect(host_port(&coordinator.http_url))
        .await
        .unwrap();
    let server = ServerName::try_from("127.0.0.1").unwrap();
    renewed.connector().connect(server, http).await.unwrap();

    // Files that make no certificate: the renewed one stays, handshake after handshake.
    std::fs::write(pki.path("cert.pem"), "not a certificate").unwrap();
    let refused = "cannot be served, keeping the current certificate";
    wait_for_async(
        "the refusal in the log",
        Duration::from_secs(15),
        || async {
            Client::connect(trusting(&renewed)).await.unwrap();
            coordinator.log().contains(refused)
        },
    )
    .await;
    Client::connect(trusting(&renewed)).await.unwrap();
    assert_eq!(coordinator.log().matches(refused).count(), 1, "logged once");
}

/// A token travels inside the TLS connection and is checked as without TLS.
#[tokio::test]
async fn a_token_is_checked_over_tls() {
    let pki = Pki::new();
    std::fs::write(pki.path("token"), "s3cret\n").unwrap();
    let coordinator = Coordinator::start_with(&[
        "--in-memory",
        "--tls-cert",
        &pki.arg("cert.pem"),
        "--tls-key",
        &pki.arg("key.pem"),
        "--token-file",
        &pki.arg("token"),
    ]);
    let options = ConnectOptions::new(https_url(&coordinator.grpc_url))
        .ca_cert_file(Some(&pki.path("ca.pem")))
        .unwrap();
    let mut anonymous = Client::connect(options.clone()).await.unwrap();
    let refused = anonymous
        .list_queues(pb::ListQueuesRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut client = Client::connect(options.token(Some("s3cret".into())))
        .await
        .unwrap();
    create_queue(&mut client, "guarded", 30_000).await;
}

#[tokio::test]
async fn the_http_face_serves_tls_only() {
    let pki = Pki::new();
    let coordinator = pki.coordinator();
    let addr = host_port(&coordinator.http_url).to_string();
    // A client that connects and never says a word holds up no one's handshake.
    let _silent = TcpStream::connect(&addr).unwrap();

    // One HTTP/1.1 request over its own TLS connection; the whole answer.
    let https = |method: &str, path: &str, body: &str| {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: workq\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (addr, connector) = (addr.clone(), pki.connector());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let server = ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = connector.connect(server, tcp).await.unwrap();
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tls.read_to_string(&mut answer).await.unwrap();
            answer
        }
    };
    // Well before the silent client's handshake times out (10 s).
    let answer = tokio::time::timeout(Duration::from_secs(5), https("GET", "/healthz", ""))
        .await
        .expect("the handshake waited for the silent client");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // kuard's memq face over TLS; its worker is named after the client's host.
    let queue = "/memq/server/queues/k";
    for (method, path, body) in [
        ("PUT", queue.to_string(), ""),
        ("POST", format!("{queue}/enqueue"), "x"),
        ("POST", format!("{queue}/dequeue"), ""),
    ] {
        let answer = https(method, &path, body).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{method} {path}: {answer}"
        );
    }
    let options = ConnectOptions::new(https_url(&coordinator.grpc_url))
        .ca_cert_file(Some(&pki.path("ca.pem")))
        .unwrap();
    let mut client = Client::connect(options).await.unwrap();
    let workers = client
        .list_workers(pb::ListWorkersRequest { queue: "k".into() })
        .await
        .unwrap()
        .into_inner()
        .workers;
    let ids: Vec<&str> = workers.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["memq:127.0.0.1"]);

    // Plain HTTP, on either port: no answer but a 400 that says where to go.
    for port in [&coordinator.http_url, &coordinator.grpc_url] {
        let mut plain = TcpStream::connect(host_port(port)).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: workq:8080\r\nUser-Agent: t\r\n\r\n")
            .unwrap();
        let mut bytes = Vec::new();
        let _ = plain.read_to_end(&mut bytes);
        let answer = String::from_utf8_lossy(&bytes);
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("\r\n\r\nthis port serves HTTPS: use https://workq:8080/healthz\n"),
            "{answer}"
        );
    }
    // And TLS goes on as before.
    let answer = https("GET", "/healthz", "").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Makes `command` see no system CA certificates (rustls-native-certs reads these
/// variables first), as in workq's image.
fn without_system_cas<'a>(command: &'a mut Command, pki: &Pki) -> &'a mut Command {
    let empty = pki.path("no-system-cas");
    command
        .env("SSL_CERT_FILE", empty.join("none.pem"))
        .env("SSL_CERT_DIR", empty)
}

/// `queue-cli --server URL [--ca-cert CA] ARGS…` on a system without CA certificates.
fn queue_cli(pki: &Pki, url: &str, ca: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(bin_path("queue-cli"));
    command.args(["--server", url]).args(args);
    if let Some(ca) = ca {
        command.arg("--ca-cert").arg(pki.path(ca));
    }
    without_system_cas(&mut command, pki)
        .env_remove("WORKQ_TOKEN")
        .env_remove("WORKQ_CA_CERT")
        .output()
        .unwrap()
}

#[test]
fn queue_cli_and_a_worker_drain_a_queue_over_tls() {
    let pki = Pki::new();
    let coordinator = pki.coordinator();
    let url = https_url(&coordinator.grpc_url);
    let ca = Some("ca.pem");

    let refused = |ca: Option<&str>, url: &str| {
        let out = queue_cli(&pki, url, ca, &["create", "jobs"]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = refused(None, &url);
    assert!(stderr.contains("no CA certificates"), "{stderr}");
    assert!(stderr.contains("pass --ca-cert"), "{stderr}");
    let stderr = refused(Some("other-ca.pem"), &url);
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(stderr.contains("--ca-cert"), "{stderr}");
    let stderr = refused(None, &coordinator.grpc_url);
    assert!(stderr.contains("use https://"), "{stderr}");

    for args in [
        &["create", "jobs"][..],
        &["enqueue", "jobs", "a", "b", "c", "--seal"],
    ] {
        let out = queue_cli(&pki, &url, ca, args);
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let mut worker = Process::spawn(
        without_system_cas(&mut Command::new(bin_path("workq-worker")), &pki)
            .args(["--server", &url, "--queue", "jobs"])
            .env("WORKQ_CA_CERT", pki.path("ca.pem"))
            .env_remove("WORKQ_TOKEN")
            .args(["exec", "--", "cat"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert_eq!(worker.wait_exit(Duration::from_secs(60)), Some(0));

    let stats = queue_cli(&pki, &url, ca, &["stats", "jobs", "-o", "json"]);
    assert!(stats.status.success(), "{stats:?}");
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["stats"]["done"], 3, "{stats}");
    assert_eq!(stats["stats"]["drained"], true, "{stats}");
}

#[test]
fn unusable_tls_flags_stop_the_start() {
    let pki = Pki::new();
    // A file half written, and a key as `openssl pkcs8 -topk8` encrypts it (only its
    // label matters here).
    let cert = std::fs::read_to_string(pki.path("cert.pem")).unwrap();
    std::fs::write(pki.path("cut-short.pem"), &cert[..cert.len() / 2]).unwrap();
    let key = std::fs::read_to_string(pki.path("key.pem")).unwrap();
    std::fs::write(
        pki.path("encrypted-key.pem"),
        key.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"),
    )
    .unwrap();
    let start = |args: &[String]| {
        let dir = tempfile::tempdir().unwrap();
        let mut coordinator = Process::spawn(
            Command::new(bin_path("workq-coordinator"))
                .args(["--in-memory", "--grpc-addr", "127.0.0.1:0"])
                .args(["--http-addr", "127.0.0.1:0", "--addr-file"])
                .arg(dir.path().join("addr.json"))
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("err")).unwrap()),
        );
        let code = coordinator.wait_exit(Duration::from_secs(20));
        let err = std::fs::read_to_string(dir.path().join("err")).unwrap();
        assert!(!dir.path().join("addr.json").exists(), "it listened: {err}");
        (code, err)
    };
    // (--tls-cert, --tls-key, exit code, what the error says)
    for (cert, key, code, says) in [
        (
            "cert.pem",
            Some("other-key.pem"),
            1,
            "does not fit the certificate",
        ),
        ("key.pem", Some("key.pem"), 1, "no CERTIFICATE"),
        ("missing.pem", Some("key.pem"), 1, "cannot read --tls-cert"),
        ("cert.pem", None, 2, "--tls-key"),
        (
            "cut-short.pem",
            Some("key.pem"),
            1,
            "the CERTIFICATE block has no END line (is the file cut short?)",
        ),
        (
            "cert.pem",
            Some("encrypted-key.pem"),
            1,
            "the key is encrypted: workq needs an unencrypted key",
        ),
        (
            "chain-reversed.pem",
            Some("key.pem"),
            1,
            "the server's own certificate must come first in --tls-cert",
        ),
    ] {
        let mut args = vec!["--tls-cert".to_string(), pki.arg(cert)];
        if let Some(key) = key {
            args.extend(["--tls-key".to_string(), pki.arg(key)]);
        }
        let (exit, err) = start(&args);
        assert_eq!(exit, Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// On the gRPC port, a client that finishes its TLS handshake and then sends no HTTP/2
/// preface (nothing, or half of it) has 10 s for it, as a plain client has for its
/// opening: it is closed then, and it does not hold shutdown up until the grace
/// period ends.
#[tokio::test]
async fn a_grpc_client_that_never_opens_http2_is_closed_and_holds_up_no_shutdown() {
    let pki = Pki::new();
    let mut coordinator = Coordinator::start_with(&[
        "--in-memory",
        "--tls-cert",
        &pki.arg("cert.pem"),
        "--tls-key",
        &pki.arg("key.pem"),
        "--shutdown-grace",
        "60s",
    ]);
    let addr = host_port(&coordinator.grpc_url).to_string();
    let open = async |first: &[u8]| {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let server = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = pki.connector().connect(server, tcp).await.unwrap();
        tls.write_all(first).await.unwrap();
        tls.flush().await.unwrap();
        tls
    };
    // Until the server closes it: what it sent (nothing, for a client that never
    // opened HTTP/2).
    let until_closed = async |mut tls: tokio_rustls::client::TlsStream<_>| {
        let mut seen = Vec::new();
        let _ = tls.read_to_end(&mut seen).await;
        seen
    };
    let silent = open(b"").await;
    let closed = tokio::time::timeout(Duration::from_secs(20), until_closed(silent))
        .await
        .expect("a silent TLS client is closed after the opening timeout");
    assert!(closed.is_empty(), "{closed:?}");

    // Half a preface, then shutdown: the coordinator stops at once, not after 60 s.
    let _half = open(b"PRI * HTTP/2.0\r\n").await;
    let _silent = open(b"").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    workq_tests::signal(coordinator.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(coordinator.wait_exit(Duration::from_secs(10)), Some(0));
    let log = coordinator.log();
    assert!(
        !log.contains("still open after the shutdown grace"),
        "{log}"
    );
}

/// A port that accepts connections and never answers the TLS handshake (a stopped
/// process, or one out of file descriptors with connections in its backlog) fails a
/// client's connection attempt within its connect timeout instead of holding it.
#[tokio::test]
async fn a_handshake_that_never_comes_fails_the_connect_within_its_timeout() {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut options = ConnectOptions::new(url.clone())
        .ca_cert_file(Some(&pki.path("ca.pem")))
        .unwrap();
    options.connect_timeout = Duration::from_millis(500);
    let attempt = tokio::time::timeout(Duration::from_secs(20), Client::connect(options))
        .await
        .expect("the connect attempt gives up by itself");
    let Err(error) = attempt else {
        panic!("nothing answered the handshake, yet the client connected");
    };
    assert!(error.is_transient(), "{error}");
    assert!(error.to_string().contains(&url), "{error}");
    assert!(
        error.to_string().contains(
            "the port accepted the connection but gave no TLS handshake within the 500ms"
        ),
        "{error}"
    );
    held.abort();
}

/// The coordinator reads its own certificate's dates when it loads one, at start and
/// on a renewal: one that clients will refuse as expired is an error in the log, not
/// a mystery found on the clients' side.
#[tokio::test]
async fn an_expired_certificate_is_said_to_be_so_at_start_and_on_reload() {
    let pki = Pki::new();
    let expired = pki.coordinator_with("expired.pem");
    let said = "the TLS certificate expired on 2020-02-01 00:00:00 UTC";
    wait_for("the expiry in the log", Duration::from_secs(15), || {
        expired.log().contains(said)
    });
    assert!(expired.log().contains("ERROR"), "{}", expired.log());

    let fresh = pki.coordinator();
    wait_for("the dates in the log", Duration::from_secs(15), || {
        fresh.log().contains("the TLS certificate is valid until")
    });
    assert!(!fresh.log().contains(said));
    // Renewed with an expired certificate: it is served (nothing else would be
    // better), and the log says what clients will make of it.
    std::fs::copy(pki.path("expired.pem"), pki.path("cert.pem")).unwrap();
    let url = https_url(&fresh.grpc_url);
    wait_for_async("the reload", Duration::from_secs(15), || async {
        let _ = Client::connect(pki.trusting(&url)).await;
        fresh.log().contains(said)
    })
    .await;
}
