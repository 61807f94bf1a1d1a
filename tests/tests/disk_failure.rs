//! A disk that fails under the real binary. One that stops taking writes under a
//! running strict coordinator: the coordinator refuses writes from then on, stops by
//! itself (exit 1) instead of serving a state in memory the disk does not have, and a
//! restart recovers every acknowledged item. One that changes synced records: the
//! coordinator refuses to start, names the file and the byte, and changes nothing.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use workq_tests::{Coordinator, Process, all_items, bin_path, create_queue, enqueue_empty, pb};

/// The coordinator's files may not grow past this: the log hits it after a few
/// megabytes of items (it keeps a megabyte of zeros ahead of its last record).
const FILE_SIZE_LIMIT: u64 = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_stops_the_coordinator_and_a_restart_keeps_every_acknowledged_item() {
    let mut coordinator = Coordinator::start_with_file_size_limit(FILE_SIZE_LIMIT, &[]);
    let mut client = coordinator.client().await;
    create_queue(&mut client, "q", 600_000).await;

    // 100 KiB per request: acknowledged batches until the disk refuses one.
    let mut acknowledged: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut refusal = None;
    for batch in 0..200 {
        let payloads: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("{batch}-{i}-{}", "x".repeat(1_000)).into_bytes())
            .collect();
        let request = pb::EnqueueRequest {
            queue: "q".into(),
            items: payloads
                .iter()
                .map(|p| pb::NewItem {
                    payload: p.clone().into(),
                    ..Default::default()
                })
                .collect(),
            seal: false,
        };
        match client.enqueue(request).await {
            Ok(answer) => {
                for (result, payload) in answer.into_inner().results.iter().zip(payloads) {
                    acknowledged.insert(result.id, payload);
                }
            }
            Err(status) => {
                refusal = Some(status);
                break;
            }
        }
    }
    let refusal = refusal.expect("the disk never refused a write");
    // A coordinator on its way out: retry once it is back.
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    assert!(refusal.message().contains("not on disk"), "{refusal:?}");
    assert!(!acknowledged.is_empty(), "the disk refused the first write");

    // It stops by itself, saying why.
    assert_eq!(coordinator.wait_exit(Duration::from_secs(60)), Some(1));
    let log = coordinator.log();
    assert!(log.contains("write-ahead log failed"), "{log}");

    // Restarted on a disk that works, it has every acknowledged item, whole.
    coordinator.set_file_size_limit(None);
    coordinator.restart();
    let mut client = coordinator.client().await;
    let items = all_items(&mut client, "q").await;
    for (id, payload) in &acknowledged {
        let item = items
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged item {id} lost"));
        assert_eq!(&item.payload[..], &payload[..], "item {id}");
    }
    // And takes writes again.
    client
        .enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![pb::NewItem::default()],
            seal: false,
        })
        .await
        .unwrap();
    assert_eq!(coordinator.stop(), Some(0));
}

/// Concurrent producers share each sync, so the batch the disk refuses holds several
/// requests, and the disk takes some of them before it refuses the rest. Every one of
/// them was told "not on disk": after the restart none of them is there, and a
/// producer that retries it makes no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_a_full_disk_is_not_there_after_the_restart() {
    let mut coordinator = Coordinator::start_with_file_size_limit(FILE_SIZE_LIMIT, &[]);
    let client = coordinator.client().await;
    create_queue(&mut client.clone(), "q", 600_000).await;

    let producers = (0..8).map(|producer| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
            for n in 0..1_000 {
                let payload = format!("{producer}-{n}-{}", "x".repeat(20_000)).into_bytes();
                let request = pb::EnqueueRequest {
                    queue: "q".into(),
                    items: vec![pb::NewItem {
                        payload: payload.clone().into(),
                        ..Default::default()
                    }],
                    seal: false,
                };
                match client.enqueue(request).await {
                    Ok(answer) => acknowledged.push((answer.into_inner().results[0].id, payload)),
                    Err(status) => {
                        refused.push((status, payload));
                        break;
                    }
                }
            }
            (acknowledged, refused)
        })
    });
    let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
    for producer in producers.collect::<Vec<_>>() {
        let (a, r) = producer.await.unwrap();
        acknowledged.extend(a);
        refused.extend(r);
    }
    assert!(!acknowledged.is_empty(), "the disk refused the first write");
    assert!(!refused.is_empty(), "the disk never refused a write");
    // The coordinator's own refusals; a producer that came back after it had gone got a
    // transport error instead.
    let told = |status: &tonic::Status| status.message().contains("not on disk");
    assert!(
        refused.iter().any(|(s, _)| told(s)),
        "{:?}",
        refused.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    // The coordinator refuses with UNAVAILABLE. A call its exit cut off failed in the
    // transport, with whatever code hyper gave it (CANCELLED for a request still
    // waiting to go out, INTERNAL for one the coordinator's GOAWAY turned away), and
    // is one to retry.
    for (status, _) in &refused {
        let cut = workq_proto::client::is_transport_status(status);
        assert!(
            status.code() == tonic::Code::Unavailable || cut,
            "{status:?}"
        );
        assert!(
            workq_proto::client::is_transient_status(status),
            "{status:?}"
        );
    }
    assert_eq!(coordinator.wait_exit(Duration::from_secs(60)), Some(1));

    coordinator.set_file_size_limit(None);
    coordinator.restart();
    let mut client = coordinator.client().await;
    let items = all_items(&mut client, "q").await;
    let payloads: HashMap<&[u8], u64> = items
        .iter()
        .map(|(id, item)| (&item.payload[..], *id))
        .collect();
    for (id, payload) in &acknowledged {
        assert_eq!(
            payloads.get(&payload[..]),
            Some(id),
            "acknowledged item {id}"
        );
    }
    for (status, payload) in refused.iter().filter(|(s, _)| told(s)) {
        assert!(
            !payloads.contains_key(&payload[..]),
            "a write refused with {status:?} is there after the restart: {}",
            String::from_utf8_lossy(&payload[..12])
        );
    }
    assert!(
        items.len() <= acknowledged.len() + refused.iter().filter(|(s, _)| !told(s)).count(),
        "items nobody was told of"
    );
    assert_eq!(coordinator.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_the_disk_changed_before_a_later_sync_stops_the_start() {
    let mut coordinator = Coordinator::start_with(&["--durability", "strict"]);
    let mut client = coordinator.client().await;
    create_queue(&mut client, "q", 600_000).await;
    for _ in 0..5 {
        enqueue_empty(&mut client, "q").await; // a sync each
    }
    // Killed, so no snapshot at shutdown empties the log.
    coordinator.kill9();

    // The first sync's bytes: its marker (26 bytes), then the queue's record. One of
    // that record's bytes changes; later syncs follow it.
    let wal = coordinator.data_dir().join("wal");
    let log = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("a log file");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[26 + 12] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();

    let errors = coordinator.dir().join("restart.err");
    let mut restart = Process::spawn(
        Command::new(bin_path("workq-coordinator"))
            .arg("--data-dir")
            .arg(coordinator.data_dir())
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errors).unwrap()),
    );
    let code = restart.wait_exit(Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&errors).unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is damaged at byte 26"), "{stderr}");
    assert!(stderr.contains(&log.display().to_string()), "{stderr}");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "the log was changed");
}
