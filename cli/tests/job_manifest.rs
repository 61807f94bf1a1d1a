//! `queue-cli job manifest`: the generated Job says on a cluster what the flags say
//! locally, worker Jobs get what a work-queue Job needs, and the examples in
//! `examples/jobs/` are exactly what the generator prints today. (Schema validation of
//! the same output is `.ci/validate-manifests`.)

use std::path::PathBuf;
use std::process::{Command, Output};

use workq_tests::bin_path;

fn manifest(args: &[&str]) -> Output {
    Command::new(bin_path("queue-cli"))
        .args(["job", "manifest"])
        .args(args)
        .env_remove("WORKQ_SERVER")
        .env_remove("WORKQ_TOKEN")
        .output()
        .expect("run queue-cli")
}

fn yaml(args: &[&str]) -> String {
    let out = manifest(args);
    assert!(
        out.status.success(),
        "job manifest {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn worker_jobs_get_never_a_pod_failure_policy_a_longer_grace_and_the_token() {
    let y = yaml(&[
        "consumers",
        "--parallelism",
        "5",
        "--image",
        "workq:1",
        "--",
        "workq-worker",
        "--queue",
        "keygen",
        "--grace",
        "40s",
        "keygen",
    ]);
    assert!(y.contains("kind: Job\n"));
    assert!(y.contains("  parallelism: 5\n"));
    assert!(
        !y.contains("completions:"),
        "work-queue mode leaves completions unset"
    );
    assert!(y.contains("      restartPolicy: Never\n"));
    assert!(y.contains(
        "- action: Ignore\n        onPodConditions:\n          - type: DisruptionTarget\n"
    ));
    assert!(y.contains("- action: FailJob\n        onExitCodes:\n          containerName: worker\n          operator: In\n          values: [1, 2]\n"));
    assert!(
        y.contains("terminationGracePeriodSeconds: 45\n"),
        "above the worker's --grace 40s:\n{y}"
    );
    assert!(y.contains("- name: WORKQ_SERVER\n              value: http://workq:7070\n"));
    assert!(y.contains("name: WORKQ_TOKEN\n              valueFrom:\n                secretKeyRef:\n                  name: workq-token\n                  key: token\n"));
}

#[test]
fn default_worker_grace_gives_kubernetes_default_30s() {
    let y = yaml(&[
        "k",
        "--image",
        "w",
        "--",
        "workq-worker",
        "keygen",
        "--count",
        "3",
    ]);
    assert!(
        y.contains("terminationGracePeriodSeconds: 30\n"),
        "25s + margin"
    );
    assert!(
        !y.contains("WORKQ_SERVER"),
        "a standalone keygen talks to no coordinator"
    );
    assert!(
        y.contains("            - \"3\"\n"),
        "numeric args are quoted strings"
    );
}

#[test]
fn generic_jobs_keep_their_flags_and_get_no_worker_policy() {
    let y = yaml(&[
        "pi",
        "--completions",
        "4",
        "--parallelism",
        "2",
        "--completion-mode",
        "Indexed",
        "--restart-policy",
        "OnFailure",
        "--backoff-limit",
        "2",
        "--active-deadline",
        "90s",
        "--image",
        "busybox:1.36",
        "--",
        "sh",
        "-c",
        "echo $JOB_COMPLETION_INDEX",
    ]);
    for line in [
        "  completions: 4\n",
        "  parallelism: 2\n",
        "  completionMode: Indexed\n",
        "  backoffLimit: 2\n",
        "  activeDeadlineSeconds: 90\n",
        "      restartPolicy: OnFailure\n",
        "      terminationGracePeriodSeconds: 30\n",
        "          image: busybox:1.36\n",
        "            - sh\n",
        "            - \"echo $JOB_COMPLETION_INDEX\"\n",
    ] {
        assert!(y.contains(line), "missing {line:?} in:\n{y}");
    }
    assert!(!y.contains("podFailurePolicy"));
    assert!(!y.contains("WORKQ_"));
}

#[test]
fn a_local_workq_server_does_not_leak_into_the_manifest() {
    let out = Command::new(bin_path("queue-cli"))
        .args(["job", "manifest", "c", "--parallelism", "2", "--image", "w"])
        .args(["--", "workq-worker", "--queue", "q", "keygen"])
        .env("WORKQ_SERVER", "http://127.0.0.1:7070")
        .output()
        .unwrap();
    let y = String::from_utf8(out.stdout).unwrap();
    assert!(y.contains("value: http://workq:7070\n"), "{y}");
    let y = yaml(&[
        "c",
        "--image",
        "w",
        "--server",
        "http://q.ns:7070",
        "--",
        "workq-worker",
        "--queue",
        "q",
        "keygen",
    ]);
    assert!(y.contains("value: http://q.ns:7070\n"), "{y}");
}

#[test]
fn a_ca_secret_is_mounted_and_named_for_an_https_coordinator_only() {
    let worker = ["--", "workq-worker", "--queue", "q", "keygen"];
    let https = ["c", "--image", "w", "--server", "https://q.ns:7070"];
    let y = yaml(&[&https[..], &["--ca-secret", "q-tls"], &worker].concat());
    assert!(
        y.contains(
            "            - name: WORKQ_CA_CERT\n              value: /etc/workq-ca/ca.crt\n"
        ),
        "{y}"
    );
    assert!(y.contains("          volumeMounts:\n            - name: workq-ca\n              mountPath: /etc/workq-ca\n              readOnly: true\n"), "{y}");
    assert!(y.contains("      volumes:\n        - name: workq-ca\n          secret:\n            secretName: q-tls\n            items:\n              - key: ca.crt\n                path: ca.crt\n"), "{y}");
    // Without it, nothing of the kind.
    let y = yaml(&[&https[..], &worker].concat());
    assert!(
        !y.contains("WORKQ_CA_CERT") && !y.contains("volumes:"),
        "{y}"
    );
    // With a plain (or the default) server it is a mistake, said before any output.
    for server in [&["--server", "http://q.ns:7070"][..], &[]] {
        let args = [
            &["c", "--image", "w", "--ca-secret", "q-tls"],
            server,
            &worker,
        ]
        .concat();
        let out = manifest(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--server https://"), "{stderr}");
    }
}

#[test]
fn a_worker_job_with_on_failure_is_refused() {
    let out = manifest(&[
        "c",
        "--restart-policy",
        "OnFailure",
        "--image",
        "w",
        "--",
        "workq-worker",
        "keygen",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--restart-policy Never"));
}

#[test]
fn example_jobs_are_what_the_generator_prints() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let Some(command) = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# Generated by: queue-cli job manifest "))
        else {
            continue;
        };
        assert!(!command.contains('\''), "keep example commands quote-free");
        let args: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(
            yaml(&args),
            text,
            "{} is stale: regenerate it with the command on its first line",
            path.display()
        );
        checked += 1;
    }
    assert_eq!(checked, 3, "oneshot, parallel and consumers are generated");
}
