//! End to end: the `exec` and `keygen` handlers with real processes, including
//! keys checked by OpenSSH's own `ssh-keygen`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_permanent_codes_go_dead_other_codes_retry_and_timeouts_kill() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "outcomes", options(0, 3)).await;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("hung-pid");
    let ids = enqueue(
        &mut client,
        "outcomes",
        &["ok", "permanent", "flaky", "always-fails", "hangs"],
    )
    .await;
    // Each payload picks a behaviour. `flaky` succeeds on its second attempt; `hangs`
    // leaves a background child behind that the timeout must kill as well.
    let script = sh(&format!(
        r#"read p
        case "$p" in
          ok) echo fine ;;
          permanent) echo "bad input" >&2; exit 3 ;;
          flaky) [ "$WORKQ_ATTEMPT" -ge 2 ] && {{ echo "ok on attempt $WORKQ_ATTEMPT"; exit 0; }}; echo "try again" >&2; exit 1 ;;
          always-fails) echo "still broken" >&2; exit 1 ;;
          hangs) sleep 600 & echo $! > {pid}; wait ;;
        esac"#,
        pid = pid_file.display()
    ));
    let args = cmd(
        &[
            "--queue",
            "outcomes",
            "--concurrency",
            "3",
            "--connect-timeout",
            "1m",
        ],
        [
            vec![
                "exec".to_string(),
                "--permanent-failure-codes".into(),
                "3,4".into(),
                "--item-timeout".into(),
                "1s".into(),
            ],
            script[1..].to_vec(),
        ]
        .concat(),
    );
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "w", &args);
    assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());

    let [ok, permanent, flaky, always, hangs] = [0, 1, 2, 3, 4].map(|i| ids[i]);
    let ok = item(&mut client, "outcomes", ok).await;
    assert_eq!(
        (state(&ok), ok.result.as_slice()),
        (pb::ItemState::Done, &b"fine\n"[..])
    );

    let permanent = item(&mut client, "outcomes", permanent).await;
    assert_eq!(state(&permanent), pb::ItemState::Dead);
    assert_eq!(permanent.attempts, 1, "a permanent failure is not retried");
    assert_eq!(permanent.last_error, "exit code 3: bad input");

    let flaky = item(&mut client, "outcomes", flaky).await;
    assert_eq!(state(&flaky), pb::ItemState::Done);
    assert_eq!(flaky.result, b"ok on attempt 2\n");

    let always = item(&mut client, "outcomes", always).await;
    assert_eq!(state(&always), pb::ItemState::Dead);
    assert_eq!(always.attempts, 3, "retried until max attempts");
    assert_eq!(always.last_error, "exit code 1: still broken");

    let hangs = item(&mut client, "outcomes", hangs).await;
    assert_eq!(state(&hangs), pb::ItemState::Dead);
    assert_eq!(hangs.attempts, 3);
    assert!(
        hangs.last_error.contains("timed out after 1.0s"),
        "{hangs:?}"
    );
    let leftover: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for("the hung command's child to be killed", SOON, || {
        is_dead(leftover)
    });
}

/// `ssh-keygen`, or `None` (with a note in the test output) where it is missing.
fn ssh_keygen() -> Option<&'static str> {
    let found = Command::new("ssh-keygen").arg("-?").output().is_ok();
    if !found {
        println!("NOTE: ssh-keygen is not installed; skipping the OpenSSH cross-check");
    }
    found.then_some("ssh-keygen")
}

/// Checks a written key pair with OpenSSH: the private key loads (`-y` derives the
/// public key from it) and `-l` prints the fingerprint we computed.
fn check_with_ssh_keygen(private: &Path, fingerprint: &str) {
    let mode = std::fs::metadata(private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", private.display());
    let public = std::fs::read_to_string(private.with_extension("pub")).unwrap();
    let Some(ssh_keygen) = ssh_keygen() else {
        return;
    };
    let derived = Command::new(ssh_keygen)
        .arg("-y")
        .arg("-f")
        .arg(private)
        .output()
        .unwrap();
    assert!(
        derived.status.success(),
        "ssh-keygen -y: {}",
        String::from_utf8_lossy(&derived.stderr)
    );
    let derived = String::from_utf8(derived.stdout).unwrap();
    let key_part = |line: &str| {
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(key_part(&derived), key_part(&public));

    let listed = Command::new(ssh_keygen)
        .arg("-l")
        .arg("-f")
        .arg(private.with_extension("pub"))
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed = String::from_utf8(listed.stdout).unwrap();
    // `1024 SHA256:… comment (RSA)`
    assert_eq!(
        listed.split_whitespace().nth(1),
        Some(fingerprint),
        "{listed}"
    );
    assert!(listed.starts_with("1024 "), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_items_yield_keys_ssh_keygen_accepts_with_matching_fingerprints() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "keygen", options(0, 0)).await;
    let ids = enqueue(
        &mut client,
        "keygen",
        &["work-item-0", "work-item-1", "work-item-2"],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let args: Vec<String> = [
        "--queue",
        "keygen",
        "--concurrency",
        "2",
        "keygen",
        "--bits",
        "1024",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([keys.display().to_string()])
    .collect();
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "w", &args);
    assert_eq!(worker.exit_code(SOON), Some(0), "log:\n{}", worker.log());

    let log = worker.log();
    for id in ids {
        let item = item(&mut client, "keygen", id).await;
        assert_eq!(state(&item), pb::ItemState::Done);
        let fingerprint = String::from_utf8(item.result).unwrap();
        assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
        assert!(
            log.contains(&format!("Item done: {fingerprint}")),
            "log:\n{log}"
        );
        // `item-ID` has no extension; `with_extension("pub")` gives `item-ID.pub`.
        check_with_ssh_keygen(&keys.join(format!("item-{id}")), &fingerprint);
    }
}

#[test]
fn standalone_keygen_count_generates_n_keys_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin_path("workq-worker"))
        .args(["keygen", "--count", "2", "--bits", "1024", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{log}");
    // kuard's lines: `(ID 0 1/2) Item done: SHA256:…`
    assert!(log.contains("(ID 0 1/2) Item done: SHA256:"), "{log}");
    assert!(log.contains("(ID 0 2/2) Item done: SHA256:"), "{log}");
    assert!(log.contains("(ID 0) Workload exiting"), "{log}");
    let logged: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("Item done: ").map(|(_, fp)| fp.trim()))
        .collect();
    assert_eq!(logged.len(), 2, "{log}");
    for n in 1..=2 {
        let private = dir.path().join(format!("key-{n}"));
        let public = std::fs::read_to_string(private.with_extension("pub")).unwrap();
        assert!(public.starts_with("ssh-rsa "), "{public}");
        let Some(ssh_keygen) = ssh_keygen() else {
            continue;
        };
        // Which file holds which logged fingerprint depends on finishing order.
        let listed = Command::new(ssh_keygen)
            .arg("-lf")
            .arg(private.with_extension("pub"))
            .output()
            .unwrap();
        let listed = String::from_utf8(listed.stdout).unwrap();
        let fingerprint = listed.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            logged.contains(&fingerprint),
            "{listed} is not among {logged:?}"
        );
        check_with_ssh_keygen(&private, fingerprint);
    }
}

#[test]
fn kuard_flags_run_the_fixed_workload_and_exit_with_the_exit_code() {
    // The book's one-shot Job, with `=` and space forms mixed and a small key size.
    let out = Command::new(bin_path("workq-worker"))
        .args([
            "--keygen-enable",
            "--keygen-exit-on-complete",
            "--keygen-num-to-gen=2",
            "--keygen-exit-code",
            "3",
            "keygen",
            "--bits",
            "1024",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(log.contains("(ID 0) Workload starting"), "{log}");
    assert!(log.contains("(ID 0 1/2) Item done: SHA256:"), "{log}");
    assert!(log.contains("(ID 0 2/2) Item done: SHA256:"), "{log}");
    assert!(!log.contains("3/2"), "stops at the count: {log}");
    assert!(log.contains("(ID 0) Workload exiting"), "{log}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["exec", "--", "true"][..],
        &["--queue", "q"],
        &["--keygen-num-to-gen=3"],
        &["--queue", "q", "exec", "--", "workq-no-such-command"],
        &["--concurrency", "0", "--queue", "q", "keygen"],
        // Zero would read as "the queue's lease timeout" or kill every item at once.
        &["--lease-timeout", "0s", "--queue", "q", "keygen"],
        &["--queue", "q", "exec", "--item-timeout", "0s", "--", "true"],
    ] {
        let out = Command::new(bin_path("workq-worker"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?} explains itself");
    }
}

#[test]
fn kuard_time_to_run_stops_between_keys_and_exits_with_the_exit_code() {
    let out = Command::new(bin_path("workq-worker"))
        .args([
            "--keygen-enable",
            "--keygen-exit-on-complete=true",
            "--keygen-time-to-run=1",
            "--keygen-exit-code=4",
            "keygen",
            "--bits",
            "1024",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{log}");
    // No count limit: `(ID 0 N/Inf <time left>) Item done: SHA256:…`
    assert!(log.contains("(ID 0 1/Inf "), "{log}");
    assert!(log.contains("(ID 0) Workload exiting"), "{log}");
}

/// A command the kernel cannot run (here a script without a `#!` line) fails every
/// item the same way: the worker gives the item back and exits 1 with the reason,
/// instead of leasing and releasing it hundreds of times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_system_cannot_run_stops_the_worker_and_keeps_the_item() {
    let coordinator = Coordinator::start();
    let mut client = coordinator.client().await;
    create_queue(&mut client, "noexec", options(0, 0)).await;
    let id = enqueue(&mut client, "noexec", &["x"]).await[0];
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("no-shebang.sh");
    std::fs::write(&script, "echo hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = cmd(
        &["--queue", "noexec"],
        vec!["exec".into(), "--".into(), script.display().to_string()],
    );
    let mut worker = Worker::start(&coordinator.grpc_url, dir.path(), "w", &args);
    assert_eq!(worker.exit_code(SOON), Some(1), "log:\n{}", worker.log());
    assert!(
        worker.log().contains("a script needs a #! line"),
        "log:\n{}",
        worker.log()
    );
    let item = item(&mut client, "noexec", id).await;
    assert_eq!((state(&item), item.attempts), (pb::ItemState::Ready, 0));
    let stats = stats(&mut client, "noexec").await;
    assert_eq!(stats.total_deliveries, 1, "leased once: {stats:?}");
}
