//! In-process engine throughput, without the network: what one coordinator core can
//! do per item for enqueue, lease + ack, and batched variants, in memory and with
//! the disk store in strict mode (group commit across concurrent callers).
//!
//! Run: `cargo bench -p workq-coordinator --bench engine` (add `-- --quick` for a
//! shorter run, `-- --items N` for N items per scenario). Prints items/s per scenario.

use std::sync::Arc;
use std::time::Instant;

use workq_coordinator::Engine;
use workq_coordinator::clock::Clock;
use workq_coordinator::engine::{LeaseRequest, NewItem, OptionsPatch, SettleAction, Settlement};
use workq_coordinator::store::{Durability, Store};

const PAYLOAD: [u8; 64] = [b'x'; 64];

fn item() -> NewItem {
    NewItem {
        payload: PAYLOAD.to_vec().into(),
        ..NewItem::default()
    }
}

async fn fresh(store: Store) -> Arc<Engine> {
    let engine = Engine::open(store, Clock::system()).unwrap();
    engine
        .create_queue("bench", &OptionsPatch::default(), false)
        .await
        .unwrap();
    engine
}

/// `tasks` concurrent callers, each doing `per_task` operations of `batch` items.
async fn enqueue(engine: &Arc<Engine>, tasks: usize, per_task: usize, batch: usize) -> f64 {
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let items = (0..batch).map(|_| item()).collect();
                engine.enqueue("bench", items, false).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    (tasks * per_task * batch) as f64 / start.elapsed().as_secs_f64()
}

async fn drain(engine: &Arc<Engine>, tasks: usize, batch: usize) -> f64 {
    let total = engine.stats("bench").unwrap().ready as usize;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            let request = LeaseRequest {
                worker: format!("w{t}"),
                max_items: batch as u32,
                lease_timeout_ms: 0,
                wait_ms: 0,
            };
            loop {
                let outcome = engine.lease("bench", request.clone()).await.unwrap();
                if outcome.granted.is_empty() {
                    break;
                }
                if batch == 1 {
                    let g = &outcome.granted[0];
                    engine
                        .ack("bench", g.id, g.token, Vec::new())
                        .await
                        .unwrap();
                } else {
                    let settlements = outcome
                        .granted
                        .iter()
                        .map(|g| Settlement {
                            id: g.id,
                            token: g.token,
                            action: SettleAction::Ack { result: Vec::new() },
                        })
                        .collect();
                    engine.settle("bench", settlements).await.unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn report(name: &str, rate: f64) {
    println!("{name:<48} {:>12.0} items/s", rate);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--items N`: items per scenario. At the default a batch row in memory lasts
    // under a tenth of a second, short enough for the machine's noise to swamp it.
    let items = args
        .iter()
        .position(|a| a == "--items")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse::<usize>().expect("--items takes a number of items"));
    let n = items.unwrap_or(if quick { 20_000 } else { 200_000 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for (label, durable) in [("memory", false), ("disk strict", true)] {
            let dir = tempfile::tempdir().unwrap();
            let store = || {
                if durable {
                    Store::open_disk(dir.path(), Durability::Strict).unwrap()
                } else {
                    Store::memory()
                }
            };
            let engine = fresh(store()).await;
            report(
                &format!("{label}: enqueue, 32 callers x 1 item"),
                enqueue(&engine, 32, n / 32, 1).await,
            );
            report(
                &format!("{label}: lease+ack, 32 callers x 1 item"),
                drain(&engine, 32, 1).await,
            );
            report(
                &format!("{label}: enqueue, 8 callers x 100 items"),
                enqueue(&engine, 8, n / 800, 100).await,
            );
            report(
                &format!("{label}: lease 100 + settle 100, 8 callers"),
                drain(&engine, 8, 100).await,
            );
            if let Some(f) = engine.store().flush_stats() {
                use std::sync::atomic::Ordering::Relaxed;
                let n = f.flushes.load(Relaxed).max(1);
                println!(
                    "{label}: {} flushes, mean {} us, max {} us",
                    n,
                    f.total_micros.load(Relaxed) / n,
                    f.max_micros.load(Relaxed)
                );
            }
            engine.close().await.unwrap();
        }
    });
}
