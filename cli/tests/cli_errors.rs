//! Failures a user meets, each with its own one-line message on stderr and a
//! non-zero exit: unknown queue, unreachable server, bad duration, stale token,
//! sealed queue, missing or wrong token, bad usage.

mod cli_support;

use std::time::Duration;

use assert_cmd::Command;
use cli_support::{Env, RUN_TIMEOUT, fails_with};
use predicates::prelude::*;
use workq_tests::bin_path;

#[test]
fn unknown_queue_is_named() {
    let env = Env::start();
    for args in [
        &["stats", "nope"][..],
        &["enqueue", "nope", "x"],
        &["lease", "nope", "--wait", "1s"],
        &["watch", "nope"],
        &["items", "nope"],
        &["seal", "nope"],
        &["delete", "nope"],
    ] {
        let error = env.fails(args, 1);
        assert!(
            error.starts_with("error: queue 'nope' not found"),
            "{args:?}: {error}"
        );
    }
}

#[test]
fn unreachable_server_says_where_it_looked() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut command = Command::new(bin_path("queue-cli"));
    command
        .args(["--server", &url, "list"])
        .timeout(RUN_TIMEOUT);
    let error = fails_with(&mut command, 1, &["list"]);
    assert!(
        error.starts_with(&format!("error: cannot reach coordinator at {url}")),
        "{error}"
    );
    // Nothing listens there: TLS cannot be the reason, so no hint says it may be.
    assert!(!error.contains("https://"), "{error}");

    // The environment variable works the same way.
    Command::new(bin_path("queue-cli"))
        .env("WORKQ_SERVER", &url)
        .args(["stats", "q"])
        .timeout(RUN_TIMEOUT)
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot reach coordinator at"));

    let mut bad = Command::new(bin_path("queue-cli"));
    bad.args(["--server", "127.0.0.1:7070", "list"])
        .timeout(RUN_TIMEOUT);
    let error = fails_with(&mut bad, 1, &["list"]);
    assert!(error.contains("must start with http://"), "{error}");

    // A port past 65535 is refused, not wrapped around to another port.
    let mut wrapped = Command::new(bin_path("queue-cli"));
    wrapped
        .args(["--server", "http://127.0.0.1:99999", "list"])
        .timeout(RUN_TIMEOUT);
    let error = fails_with(&mut wrapped, 1, &["list"]);
    assert!(
        error.contains("port must be a number from 1 to 65535"),
        "{error}"
    );
}

/// A CA file that only WORKQ_CA_CERT names (exported for a coordinator serving TLS)
/// is left out for a plain one; --ca-cert itself with http:// is a mistake.
#[test]
fn a_ca_cert_from_the_environment_does_not_stop_a_plain_coordinator() {
    let env = Env::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not read for http://").expect("write");
    let listed = env
        .cli()
        .env("WORKQ_CA_CERT", &ca)
        .args(["list"])
        .output()
        .expect("run");
    assert!(listed.status.success(), "{listed:?}");

    let error = fails_with(
        env.cli().arg("--ca-cert").arg(&ca).arg("list"),
        1,
        &["--ca-cert", "list"],
    );
    assert!(
        error.contains("--ca-cert is for a coordinator serving TLS: use https://"),
        "{error}"
    );
}

/// The HTTP port answers a gRPC call with an HTTP error page: the mix-up is named.
#[test]
fn the_http_port_is_told_from_the_grpc_port() {
    let env = Env::start();
    let mut command = Command::new(bin_path("queue-cli"));
    command
        .args(["--server", &env.coordinator.http_url, "list"])
        .timeout(RUN_TIMEOUT);
    let error = fails_with(&mut command, 1, &["list"]);
    assert!(
        error.ends_with(
            "(is this the coordinator's HTTP port? queue-cli talks to its gRPC port \
             (default 7070))"
        ),
        "{error}"
    );
}

/// A port that accepts the connection and then says nothing (a stopped
/// coordinator, or one whose accept queue is all it has left) fails the connection
/// within the connect timeout, as a TLS port does, not half a minute later when the
/// client's HTTP/2 pings have gone unanswered. The timeout is `--connect-timeout`,
/// or `WORKQ_CONNECT_TIMEOUT`, and never zero.
#[test]
fn a_port_that_never_answers_fails_within_the_connect_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept() {
            held.push(stream);
        }
    });
    let no_answer = |limit: &str| {
        format!(
            "error: cannot reach coordinator at {url}: the port accepted the connection \
             but did not answer within the {limit} a connection attempt may take"
        )
    };
    let mut command = Command::new(bin_path("queue-cli"));
    command
        .args(["--server", &url, "--connect-timeout", "1500ms", "list"])
        .timeout(RUN_TIMEOUT);
    assert_eq!(fails_with(&mut command, 1, &["list"]), no_answer("1.5s"));

    let mut command = Command::new(bin_path("queue-cli"));
    command
        .args(["--server", &url, "list"])
        .env("WORKQ_CONNECT_TIMEOUT", "1s")
        .timeout(RUN_TIMEOUT);
    assert_eq!(fails_with(&mut command, 1, &["list"]), no_answer("1.0s"));

    let mut command = Command::new(bin_path("queue-cli"));
    command
        .args(["--server", &url, "--connect-timeout", "0s", "list"])
        .timeout(RUN_TIMEOUT);
    let error = fails_with(&mut command, 2, &["list"]);
    assert!(
        error.contains("invalid value '0s' for '--connect-timeout <DURATION>'"),
        "{error}"
    );
}

#[test]
fn an_empty_input_still_names_an_unknown_queue() {
    let env = Env::start();
    for args in [
        &["enqueue", "nope", "--stdin"][..],
        &["enqueue", "nope", "--stdin", "--seal"],
    ] {
        let error = fails_with(env.cli().args(args).write_stdin(""), 1, args);
        assert!(
            error.starts_with("error: queue 'nope' not found"),
            "{args:?}: {error}"
        );
    }
    env.ok(&["create", "q"]);
    let output = env
        .cli()
        .args(["enqueue", "q", "--stdin"])
        .write_stdin("\n\n")
        .output()
        .expect("run");
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("enqueued 0 items"));
}

#[test]
fn an_item_larger_than_a_request_is_refused_before_sending() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "first"]);
    // 65 MiB on the second line: past the 64 MiB message limit.
    let mut input = b"small\n".to_vec();
    input.resize(input.len() + (65 << 20), b'x');
    input.push(b'\n');
    let args = ["enqueue", "q", "--stdin"];
    let error = fails_with(env.cli().args(args).write_stdin(input), 1, &args);
    assert!(
        error.starts_with("error: line 2 is more than") && error.contains("one request"),
        "{error}"
    );
    // Nothing of that input was sent: the held batch goes only once the input ends.
    assert_eq!(env.stats("q")["ready"], 1);
}

#[test]
fn bad_durations_are_usage_errors() {
    for args in [
        &["create", "q", "--lease-timeout", "5x"][..],
        &["enqueue", "q", "a", "--delay", "soon"],
        &["lease", "q", "--wait=-1s"],
        &["watch", "q", "--timeout", "1 hour"],
    ] {
        Command::new(bin_path("queue-cli"))
            .args(args)
            .timeout(RUN_TIMEOUT)
            .assert()
            .code(2)
            .stderr(predicate::str::contains("invalid value"))
            .stderr(predicate::str::contains("duration"));
    }
}

#[test]
fn usage_errors_exit_2_with_help() {
    for args in [
        &["enqueue", "q"][..],
        &["enqueue", "q", "a", "--stdin"],
        &["enqueue", "q", "a", "--count", "5"],
        &["enqueue", "q", "--stdin", "--count", "5"],
        &["enqueue", "q", "--payload", "x", "--count", "0"],
        &["requeue", "q"],
        &["requeue", "q", "1", "--dead"],
        &["ack", "q", "1", "not-a-token"],
        &["items", "q", "--state", "sleeping"],
        &["-o", "yaml", "list"],
        &["lease", "q", "--max", "0"],
        &["lease", "q", "--wait", "2m"],
    ] {
        Command::new(bin_path("queue-cli"))
            .args(args)
            .timeout(RUN_TIMEOUT)
            .assert()
            .code(2)
            .stderr(predicate::str::starts_with("error: "));
    }
}

#[test]
fn every_command_has_help_with_an_example() {
    for command in [
        "create", "delete", "list", "stats", "purge", "seal", "unseal", "enqueue", "watch",
        "items", "item", "requeue", "results", "workers", "lease", "ack", "fail", "extend",
        "release",
    ] {
        Command::new(bin_path("queue-cli"))
            .args([command, "--help"])
            .timeout(RUN_TIMEOUT)
            .assert()
            .success()
            .stdout(predicate::str::contains(format!("queue-cli {command}")))
            .stdout(predicate::str::contains("Example"))
            .stdout(predicate::str::contains("JSON (-o json)"));
    }
}

#[test]
fn stale_token_says_lease_lost() {
    let env = Env::start();
    env.ok(&["create", "q", "--lease-timeout", "1s"]);
    env.ok(&["enqueue", "q", "x"]);
    let first = env.lease_one("q");
    // The lease expires on the server's timer; the next lease gets a new token.
    let second = env.json(&["lease", "q", "--wait", "30s"]);
    let second = &second["leases"][0];
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["attempt"], 2);

    let id = first["id"].to_string();
    let stale = first["token"].as_str().expect("token");
    let error = env.fails(&["ack", "q", &id, stale], 1);
    assert!(error.starts_with("error: lease lost"), "{error}");
    let fresh = second["token"].as_str().expect("token");
    env.ok(&["ack", "q", &id, fresh]);
    assert_eq!(
        env.stats("q")["total_completed"],
        1,
        "completed exactly once"
    );
}

#[test]
fn sealed_queue_refuses_enqueue() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["seal", "q"]);
    let error = env.fails(&["enqueue", "q", "--count", "3", "--payload", "x{i}"], 1);
    assert!(error.contains("sealed"), "{error}");
    assert!(
        !error.contains("not found") && !error.contains("lease lost"),
        "{error}"
    );
    assert_eq!(env.stats("q")["ready"], 0, "nothing was added");
}

#[test]
fn enqueue_failing_midway_says_how_far_it_got() {
    let env = Env::start();
    env.ok(&["create", "q", "--max-depth", "1500"]);
    let error = env.fails(
        &[
            "enqueue",
            "q",
            "--count",
            "3000",
            "--payload",
            "x{i}",
            "--batch-size",
            "1000",
        ],
        1,
    );
    assert!(
        error.starts_with(
            "error: stopped after 1000 items were accepted (1000 enqueued, 0 deduplicated): "
        ),
        "{error}"
    );
    assert_eq!(env.stats("q")["ready"], 1000);
}

#[test]
fn missing_or_wrong_token_is_explained() {
    let env = Env::start_with_token("s3cret-token");

    let error = env.fails(&["list"], 1);
    assert!(
        error.contains("wants a token") && error.contains("--token or set WORKQ_TOKEN"),
        "{error}"
    );
    let error = env.fails(&["--token", "wrong", "list"], 1);
    assert!(error.contains("refused the token"), "{error}");

    env.ok(&["--token", "s3cret-token", "create", "q"]);
    // Global flags work after the command too.
    env.ok(&["seal", "q", "--token", "s3cret-token"]);
    let listed = env
        .cli()
        .env("WORKQ_TOKEN", "s3cret-token")
        .args(["-o", "json", "list"])
        .output()
        .expect("run");
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert_eq!(listed["queues"][0]["name"], "q");
}

#[test]
fn missing_input_file_is_named() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    let error = env.fails(&["enqueue", "q", "--file", "/nonexistent/items.txt"], 1);
    assert!(
        error.starts_with("error: cannot read /nonexistent/items.txt: "),
        "{error}"
    );
    assert_eq!(env.stats("q")["total_enqueued"], 0);
}

/// `queue-cli enqueue q --stdin --batch-size 1` against `url`, its stdin kept.
fn enqueue_from_a_pipe(url: &str) -> (workq_tests::Process, std::process::ChildStdin) {
    use std::process::Stdio;
    let mut enqueue = workq_tests::Process::spawn(
        std::process::Command::new(bin_path("queue-cli"))
            .env("WORKQ_SERVER", url)
            .args(["enqueue", "q", "--stdin", "--batch-size", "1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let stdin = enqueue.child.stdin.take().expect("stdin");
    (enqueue, stdin)
}

/// Writes `lines` to the enqueue's stdin. With batches of one, each line sends the
/// one before it.
fn feed(stdin: &mut std::process::ChildStdin, lines: &str) {
    use std::io::Write;
    stdin.write_all(lines.as_bytes()).expect("write");
    stdin.flush().expect("flush");
}

/// Waits for the enqueue to exit 1 and returns its stderr.
fn failure(mut enqueue: workq_tests::Process) -> String {
    assert_eq!(enqueue.wait_exit(RUN_TIMEOUT), Some(1));
    enqueue.take_output().1
}

/// A TCP proxy for one connection that, once cut, forwards nothing more back to the
/// client and closes both sides at the next bytes the server sends: a request sent
/// after the cut reaches the server, and its answer is lost.
struct CuttingProxy {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CuttingProxy {
    fn start(server: &str) -> CuttingProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::Ordering;

        let server = server.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cutting = cut.clone();
        std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let upstream = TcpStream::connect(&server).expect("connect to coordinator");
            let (mut from_client, mut to_server) = (
                client.try_clone().expect("clone"),
                upstream.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_client, &mut to_server);
            });
            let (mut from_server, mut to_client) = (upstream, client);
            let mut buffer = [0u8; 16384];
            while let Ok(n @ 1..) = from_server.read(&mut buffer) {
                if cutting.load(Ordering::SeqCst) {
                    let _ = to_client.shutdown(Shutdown::Both);
                    let _ = from_server.shutdown(Shutdown::Both);
                    return;
                }
                if to_client.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        });
        CuttingProxy { addr, cut }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn an_enqueue_whose_answer_was_lost_says_which_items_may_be_in() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    let proxy = CuttingProxy::start(env.url());
    let (enqueue, mut stdin) = enqueue_from_a_pipe(&proxy.url());
    feed(&mut stdin, "zero\none\n");
    workq_tests::wait_for("item 0 to be in", Duration::from_secs(20), || {
        env.stats("q")["ready"] == 1
    });
    proxy.cut();
    // Item 1 reaches the coordinator; its answer does not reach the CLI.
    feed(&mut stdin, "two\n");
    drop(stdin);
    let stderr = failure(enqueue);
    assert!(
        stderr.starts_with("error: stopped after 1 item was accepted"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the item with index 1 may or may not be in (without a --key"),
        "{stderr}"
    );
    // The coordinator had answered: it was lost, not unreachable, and not a TLS port.
    assert!(
        stderr.contains(&format!(
            "lost the connection to the coordinator at {}",
            proxy.url()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("https://"), "{stderr}");
    // It was in, as the message warned it might be.
    assert_eq!(env.stats("q")["ready"], 2);
}

#[test]
fn an_enqueue_whose_coordinator_died_says_how_far_it_got() {
    let mut env = Env::start_on_disk();
    env.ok(&["create", "q"]);
    let (enqueue, mut stdin) = enqueue_from_a_pipe(env.url());
    feed(&mut stdin, "zero\none\n");
    workq_tests::wait_for("item 0 to be in", Duration::from_secs(20), || {
        env.stats("q")["ready"] == 1
    });
    env.coordinator.kill9();
    // Item 2 sends item 1. It mostly finds nothing listening and so was never sent,
    // which the message then leaves out; should the connection break only as the
    // request goes out, the CLI cannot know that, and says item 1 may be in.
    feed(&mut stdin, "two\n");
    drop(stdin);
    let stderr = failure(enqueue);
    // Item 0 is in, but the kill may have come before its answer reached the CLI,
    // which then cannot know: it says so, and still that the connection was lost
    // (the coordinator had opened HTTP/2), not that a TLS port was read as plain.
    let answer_lost = "error: the item with index 0 may or may not be in (without a --key, a \
                       rerun can add them twice): ";
    assert!(
        stderr
            .starts_with("error: stopped after 1 item was accepted (1 enqueued, 0 deduplicated): ")
            || stderr.starts_with(answer_lost),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "lost the connection to the coordinator at {} (it stopped or restarted)",
            env.url()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("https://"), "{stderr}");

    // What was acknowledged is there after the restart, and nothing else.
    env.coordinator.restart();
    let items = env.json(&["items", "q"]);
    assert_eq!(items["items"].as_array().map(Vec::len), Some(1), "{items}");
    assert_eq!(items["items"][0]["payload"], "zero", "{items}");
}

/// A reader that went away (`queue-cli … | head`) ends the command quietly, as SIGPIPE
/// ends other Unix tools (exit 141), in every output format: no panic on stderr.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let env = Env::start();
    env.ok(&["create", "q"]);
    env.ok(&["enqueue", "q", "a", "b"]);
    for args in [
        &["list"][..],
        &["-o", "json", "list"],
        &["items", "q"],
        &["-o", "json", "results", "q"],
        &["stats", "q"],
    ] {
        // The read end is gone before the command starts: its first write fails.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = std::process::Command::new(bin_path("queue-cli"))
            .args(args)
            .env("WORKQ_SERVER", env.url())
            .env_remove("WORKQ_TOKEN")
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run queue-cli");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// The API reads a duration of 0 as "the default", so `--retention 0s` would quietly
/// keep DONE items for an hour and `fail --delay 0s` would wait the backoff. Zero is
/// refused at parse time instead (exit 2), and nothing changes.
#[test]
fn a_zero_duration_is_refused_where_zero_would_mean_the_default() {
    let env = Env::start();
    env.ok(&["create", "q", "--retention", "2h"]);
    env.ok(&["enqueue", "q", "x"]);
    let options = env.stats("q")["options"].clone();
    let lease = env.lease_one("q");
    let (id, token) = (lease["id"].to_string(), lease["token"].to_string());
    let token = token.trim_matches('"');
    for (args, flag) in [
        (
            &["create", "fresh", "--lease-timeout", "0s"][..],
            "--lease-timeout",
        ),
        (&["update", "q", "--retention", "0s"], "--retention"),
        (&["update", "q", "--backoff-base", "0"], "--backoff-base"),
        (&["update", "q", "--backoff-cap", "0ms"], "--backoff-cap"),
        (&["lease", "q", "--lease-timeout", "0m"], "--lease-timeout"),
        (&["fail", "q", &id, token, "--delay", "0s"], "--delay"),
        (
            &["extend", "q", &id, token, "--lease-timeout", "0s"],
            "--lease-timeout",
        ),
    ] {
        let error = env.fails(args, 2);
        assert!(
            error.contains(&format!("for '{flag} <DURATION>'")) && error.contains("is no time"),
            "{args:?}: {error}"
        );
    }
    assert!(!env.ok(&["list"]).contains("fresh"), "nothing created");
    let after = env.stats("q");
    assert_eq!(after["options"], options, "nothing updated");
    assert_eq!(after["leased"], 1, "the lease was neither failed nor moved");
    env.ok(&["ack", "q", &id, token]);
}
