//! The item lifecycle of PRODUCT.md, exercised on the pure core with explicit time.

use super::queue::*;
use crate::error::Error;

const T0: u64 = 1_000_000;

struct Fixture {
    q: Queue,
    next_id: u64,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with(Options {
            lease_timeout_ms: 1_000,
            max_attempts: 3,
            backoff_base_ms: 100,
            backoff_cap_ms: 1_000,
            ..Options::default()
        })
    }

    fn with(options: Options) -> Fixture {
        Fixture {
            q: Queue::new("q".into(), options, T0),
            next_id: 1,
        }
    }

    fn enqueue(&mut self, now: u64, payload: &str) -> u64 {
        self.enqueue_item(
            now,
            NewItem {
                payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
                ..NewItem::default()
            },
        )
        .id
    }

    fn enqueue_item(&mut self, now: u64, item: NewItem) -> Enqueued {
        let mut next = self.next_id;
        let out = self
            .q
            .enqueue(now, vec![item], false, || {
                next += 1;
                next
            })
            .unwrap();
        self.next_id = next;
        self.q.check_invariants();
        out.into_iter().next().unwrap()
    }

    /// Enqueues an item with `key`: whether it was new (no item holds the key).
    fn key_is_free(&mut self, now: u64, key: &str) -> bool {
        let item = NewItem {
            key: key.into(),
            ..NewItem::default()
        };
        !self.enqueue_item(now, item).deduplicated
    }

    fn lease(&mut self, now: u64) -> Option<Granted> {
        self.lease_n(now, 1).into_iter().next()
    }

    fn lease_n(&mut self, now: u64, n: usize) -> Vec<Granted> {
        let mut next = self.next_id;
        let out = self.q.lease(now, "w1", n, 0, || {
            next += 1;
            next
        });
        self.next_id = next;
        self.q.check_invariants();
        out
    }

    fn state(&self, id: u64) -> State {
        self.q.item(id).expect("item exists").state
    }

    fn stats(&self, now: u64) -> Stats {
        self.q.stats(now)
    }
}

fn payload(g: &Granted) -> String {
    String::from_utf8(g.payload.clone()).unwrap()
}

#[test]
fn lease_then_ack_completes_once() {
    let mut f = Fixture::new();
    let id = f.enqueue(T0, "a");
    let lease = f.lease(T0).unwrap();
    assert_eq!((lease.id, lease.attempt), (id, 1));
    assert_eq!(lease.deadline_ms, T0 + 1_000);
    f.q.ack(T0 + 10, id, lease.token, b"ok".to_vec()).unwrap();
    assert_eq!(f.state(id), State::Done);
    assert_eq!(f.q.item(id).unwrap().result(), b"ok");
    // A retried ack of the same lease is answered OK and not counted again.
    f.q.ack(T0 + 20, id, lease.token, b"ok".to_vec()).unwrap();
    let s = f.stats(T0 + 20);
    assert_eq!(
        (s.done, s.counters.completed, s.counters.deliveries),
        (1, 1, 1)
    );
    assert!(s.drained);
}

#[test]
fn expired_lease_is_re_leased_and_counts_an_attempt() {
    let mut f = Fixture::new();
    let id = f.enqueue(T0, "a");
    let first = f.lease(T0).unwrap();
    assert_eq!(f.q.next_deadline(), Some(T0 + 1_000));
    assert!(!f.q.tick(T0 + 999), "not expired before its deadline");
    assert_eq!(f.state(id), State::Leased);
    assert!(f.q.tick(T0 + 1_000));
    f.q.check_invariants();
    assert_eq!(f.state(id), State::Ready);
    assert_eq!(f.stats(T0 + 1_000).counters.expired, 1);
    let second = f.lease(T0 + 1_001).unwrap();
    assert_eq!((second.id, second.attempt), (id, 2));
    assert_ne!(second.token, first.token);
}

#[test]
fn attempts_exhausted_by_expiry_go_dead() {
    let mut f = Fixture::new(); // max_attempts 3
    let id = f.enqueue(T0, "a");
    let mut now = T0;
    for attempt in 1..=3 {
        let lease = f.lease(now).unwrap();
        assert_eq!(lease.attempt, attempt);
        now = lease.deadline_ms;
        f.q.tick(now);
    }
    assert_eq!(f.state(id), State::Dead);
    let s = f.stats(now);
    assert_eq!((s.dead, s.counters.dead, s.counters.expired), (1, 1, 3));
    assert!(s.drained, "DEAD does not count against drained");
    assert!(f.lease(now).is_none());
}

#[test]
fn failures_back_off_then_go_dead() {
    let mut f = Fixture::new(); // base 100 ms, cap 1 s, 3 attempts
    let id = f.enqueue(T0, "a");
    let l1 = f.lease(T0).unwrap();
    let out = f.q.fail(T0, id, l1.token, "boom".into(), false, 0).unwrap();
    assert_eq!(out, FailOutcome::Retry { at_ms: T0 + 100 });
    assert_eq!(f.state(id), State::Delayed);
    assert!(f.lease(T0 + 99).is_none(), "still backing off");
    let l2 = f.lease(T0 + 100).unwrap();
    assert_eq!(l2.attempt, 2);
    let out =
        f.q.fail(T0 + 100, id, l2.token, "boom".into(), false, 0)
            .unwrap();
    assert_eq!(out, FailOutcome::Retry { at_ms: T0 + 300 }, "doubles");
    let l3 = f.lease(T0 + 300).unwrap();
    let out =
        f.q.fail(T0 + 300, id, l3.token, "boom 3".into(), false, 0)
            .unwrap();
    assert_eq!(out, FailOutcome::Dead);
    assert_eq!(f.state(id), State::Dead);
    assert_eq!(f.q.item(id).unwrap().last_error(), "boom 3");
    assert_eq!(f.stats(T0 + 300).counters.failed, 3);
}

#[test]
fn backoff_is_capped() {
    let o = Options {
        backoff_base_ms: 1_000,
        backoff_cap_ms: 300_000,
        ..Options::default()
    };
    assert_eq!(backoff(&o, 1), 1_000);
    assert_eq!(backoff(&o, 2), 2_000);
    assert_eq!(backoff(&o, 9), 256_000);
    assert_eq!(backoff(&o, 10), 300_000);
    assert_eq!(backoff(&o, 500), 300_000);
}

#[test]
fn permanent_failure_and_explicit_retry_delay() {
    let mut f = Fixture::new();
    let a = f.enqueue(T0, "a");
    let b = f.enqueue(T0, "b");
    let la = f.lease(T0).unwrap();
    let lb = f.lease(T0).unwrap();
    assert_eq!(
        f.q.fail(T0, a, la.token, "bad input".into(), true, 0)
            .unwrap(),
        FailOutcome::Dead
    );
    assert_eq!(
        f.q.fail(T0, b, lb.token, "later".into(), false, 5_000)
            .unwrap(),
        FailOutcome::Retry { at_ms: T0 + 5_000 }
    );
    assert_eq!(f.state(a), State::Dead);
    assert_eq!(f.state(b), State::Delayed);
}

#[test]
fn release_does_not_count_an_attempt() {
    let mut f = Fixture::new();
    let id = f.enqueue(T0, "a");
    let l1 = f.lease(T0).unwrap();
    f.q.release(T0 + 1, id, l1.token).unwrap();
    assert_eq!(f.state(id), State::Ready);
    assert_eq!(f.q.item(id).unwrap().attempts, 0);
    let l2 = f.lease(T0 + 2).unwrap();
    assert_eq!(l2.attempt, 1, "the released delivery did not count");
    assert_eq!(f.stats(T0 + 2).counters.deliveries, 2);
}

#[test]
fn stale_tokens_are_rejected_and_change_nothing() {
    let mut f = Fixture::new();
    let id = f.enqueue(T0, "a");
    let old = f.lease(T0).unwrap();
    f.q.tick(old.deadline_ms); // expires
    let new = f.lease(old.deadline_ms).unwrap();
    let now = old.deadline_ms + 1;
    let before = f.q.item(id).unwrap().to_item();
    let stats_before = f.stats(now);

    let results = [
        f.q.ack(now, id, old.token, vec![]).unwrap_err(),
        f.q.fail(now, id, old.token, "x".into(), true, 0)
            .unwrap_err(),
        f.q.extend(now, id, old.token, 0).unwrap_err(),
        f.q.release(now, id, old.token).unwrap_err(),
        f.q.ack(now, id, 0, vec![]).unwrap_err(),
        f.q.ack(now, id, new.token + 1000, vec![]).unwrap_err(),
    ];
    for err in results {
        assert!(matches!(err, Error::LeaseLost(_)), "{err:?}");
        assert!(err.to_string().starts_with("lease lost"), "{err}");
    }
    assert_eq!(f.q.item(id).unwrap().to_item(), before, "item unchanged");
    assert_eq!(f.stats(now), stats_before, "stats unchanged");
    assert!(f.q.take_journal().iter().all(|c| *c != Change::Delete(id)));

    // Each refusal says why: an old lease, or a token this item never had.
    let err = f.q.ack(now, id, old.token, vec![]).unwrap_err();
    assert!(err.to_string().contains("was re-leased"), "{err}");
    let err = f.q.ack(now, id, new.token + 1000, vec![]).unwrap_err();
    assert!(err.to_string().contains("was never issued"), "{err}");

    // The current holder still completes it, exactly once.
    f.q.ack(now, id, new.token, vec![]).unwrap();
    let err = f.q.ack(now, id, old.token, vec![]).unwrap_err();
    assert!(
        err.to_string().contains("completed under another lease"),
        "{err}"
    );
    let err = f.q.release(now, id, new.token).unwrap_err();
    assert!(
        err.to_string().contains("completed under this lease"),
        "{err}"
    );
    assert_eq!(f.stats(now).counters.completed, 1);
}

#[test]
fn unknown_items_are_not_found() {
    let mut f = Fixture::new();
    let err = f.q.ack(T0, 999, 1, vec![]).unwrap_err();
    assert!(
        matches!(err, Error::ItemNotFound { id: 999, .. }),
        "{err:?}"
    );
}

#[test]
fn extend_pushes_the_deadline_out() {
    let mut f = Fixture::new();
    let id = f.enqueue(T0, "a");
    let lease = f.lease(T0).unwrap();
    let deadline = f.q.extend(T0 + 900, id, lease.token, 0).unwrap();
    assert_eq!(deadline, T0 + 1_900, "extended by the lease's own timeout");
    assert!(
        !f.q.tick(T0 + 1_500),
        "old deadline passed, lease still held"
    );
    assert_eq!(f.state(id), State::Leased);
    let deadline = f.q.extend(T0 + 1_500, id, lease.token, 5_000).unwrap();
    assert_eq!(deadline, T0 + 6_500);
    f.q.check_invariants();
    f.q.ack(T0 + 6_000, id, lease.token, vec![]).unwrap();
}

#[test]
fn higher_priority_first_then_fifo() {
    let mut f = Fixture::new();
    for (payload, priority) in [
        ("low-1", 0),
        ("high-1", 5),
        ("low-2", 0),
        ("high-2", 5),
        ("neg", -3),
    ] {
        f.enqueue_item(
            T0,
            NewItem {
                payload: payload.into(),
                priority,
                ..NewItem::default()
            },
        );
    }
    let order: Vec<String> = f.lease_n(T0, 10).iter().map(payload).collect();
    assert_eq!(order, ["high-1", "high-2", "low-1", "low-2", "neg"]);
}

#[test]
fn delayed_items_become_ready_when_due() {
    let mut f = Fixture::new();
    let id = f
        .enqueue_item(
            T0,
            NewItem {
                payload: b"later".to_vec().into(),
                delay_ms: 500,
                ..NewItem::default()
            },
        )
        .id;
    assert_eq!(f.state(id), State::Delayed);
    assert!(!f.stats(T0).drained, "DELAYED counts against drained");
    assert_eq!(f.q.next_deadline(), Some(T0 + 500));
    assert!(f.lease(T0 + 499).is_none());
    assert!(f.q.tick(T0 + 500));
    assert_eq!(f.state(id), State::Ready);
    assert_eq!(f.lease(T0 + 500).unwrap().id, id);
}

#[test]
fn dedup_returns_the_existing_item_until_retention_removes_it() {
    let mut f = Fixture::with(Options {
        retention_ms: 10_000,
        ..Options::default()
    });
    let keyed = |p: &str| NewItem {
        payload: bytes::Bytes::copy_from_slice(p.as_bytes()),
        key: "k".into(),
        ..NewItem::default()
    };
    let first = f.enqueue_item(T0, keyed("a"));
    let again = f.enqueue_item(T0 + 1, keyed("b"));
    assert!(!first.deduplicated);
    assert_eq!((again.id, again.deduplicated), (first.id, true));
    // Still deduplicated while leased and after completion (until retention).
    let lease = f.lease(T0 + 2).unwrap();
    f.q.ack(T0 + 3, first.id, lease.token, vec![]).unwrap();
    assert!(f.enqueue_item(T0 + 4, keyed("c")).deduplicated);
    let s = f.stats(T0 + 4);
    assert_eq!((s.counters.enqueued, s.counters.deduplicated), (1, 2));
    // Retention deletes the DONE item and frees the key.
    f.q.tick(T0 + 3 + 10_000);
    assert!(f.q.item(first.id).is_none());
    let fresh = f.enqueue_item(T0 + 20_000, keyed("d"));
    assert!(!fresh.deduplicated);
    assert_ne!(fresh.id, first.id);
}

#[test]
fn dedup_inside_one_batch() {
    let mut f = Fixture::new();
    let item = |key: &str| NewItem::<bytes::Bytes> {
        payload: b"x".to_vec().into(),
        key: key.into(),
        ..NewItem::default()
    };
    let mut ids = 100;
    let out =
        f.q.enqueue(T0, vec![item("a"), item("a"), item("b")], false, || {
            ids += 1;
            ids
        })
        .unwrap();
    assert_eq!(out[1].id, out[0].id);
    assert!(out[1].deduplicated);
    assert_eq!(f.stats(T0).ready, 2);
}

#[test]
fn sealed_queue_refuses_enqueue_and_unseal_reopens() {
    let mut f = Fixture::new();
    let mut ids = 0;
    f.q.enqueue(T0, vec![NewItem::<bytes::Bytes>::default()], true, || {
        ids += 1;
        ids
    })
    .unwrap();
    assert!(f.q.sealed);
    let err =
        f.q.enqueue(T0, vec![NewItem::<bytes::Bytes>::default()], false, || 99)
            .unwrap_err();
    assert!(matches!(err, Error::Sealed(_)), "{err:?}");
    assert_eq!(
        f.stats(T0).counters.enqueued,
        1,
        "refused enqueue changed nothing"
    );
    f.q.sealed = false;
    f.enqueue(T0, "again");
}

#[test]
fn drained_only_when_nothing_ready_delayed_or_leased() {
    let mut f = Fixture::new();
    assert!(f.stats(T0).drained, "an empty queue is drained");
    let a = f.enqueue(T0, "a");
    assert!(!f.stats(T0).drained, "READY");
    let lease = f.lease(T0).unwrap();
    assert!(!f.stats(T0).drained, "LEASED");
    f.q.fail(T0, a, lease.token, "retry".into(), false, 0)
        .unwrap();
    assert!(!f.stats(T0).drained, "DELAYED (retrying)");
    f.q.tick(T0 + 100);
    let lease = f.lease(T0 + 100).unwrap();
    f.q.fail(T0 + 100, a, lease.token, "dead".into(), true, 0)
        .unwrap();
    assert!(f.stats(T0 + 100).drained, "only DEAD left");
    f.enqueue(T0, "b");
    let lease = f.lease(T0 + 100).unwrap();
    f.q.ack(T0 + 100, lease.id, lease.token, vec![]).unwrap();
    assert!(f.stats(T0 + 100).drained, "DONE and DEAD do not count");
}

#[test]
fn requeue_dead_items_resets_attempts() {
    let mut f = Fixture::new();
    let a = f.enqueue(T0, "a");
    let b = f.enqueue(T0, "b");
    for id in [a, b] {
        let lease = f.lease(T0).unwrap();
        assert_eq!(lease.id, id);
        f.q.fail(T0, id, lease.token, "x".into(), true, 0).unwrap();
    }
    // Naming a non-dead item refuses the whole call.
    let c = f.enqueue(T0, "c");
    let err = f.q.requeue(T0, &[a, c]).unwrap_err();
    assert!(err.to_string().contains("not dead"), "{err}");
    assert_eq!(f.state(a), State::Dead);
    assert_eq!(f.q.requeue(T0, &[a]).unwrap(), 1);
    assert_eq!(f.state(a), State::Ready);
    assert_eq!(f.q.item(a).unwrap().attempts, 0);
    assert_eq!(f.q.requeue(T0, &[]).unwrap(), 1, "all dead");
    assert_eq!(f.state(b), State::Ready);
    f.q.check_invariants();
}

#[test]
fn purge_discards_ready_and_delayed_only() {
    let mut f = Fixture::new();
    f.enqueue(T0, "ready");
    f.enqueue_item(
        T0,
        NewItem {
            payload: b"delayed".to_vec().into(),
            delay_ms: 1_000,
            key: "dk".into(),
            ..NewItem::default()
        },
    );
    let leased = f.enqueue(T0, "leased");
    let lease = f.lease_n(T0, 2);
    assert_eq!(lease.len(), 2);
    let kept = lease
        .iter()
        .find(|g| g.id == leased)
        .or(lease.first())
        .unwrap()
        .clone();
    // put one back so one READY remains besides the delayed one
    let other = lease.iter().find(|g| g.id != kept.id).unwrap();
    f.q.release(T0, other.id, other.token).unwrap();
    assert_eq!(f.q.purge(), 2);
    f.q.check_invariants();
    let s = f.stats(T0);
    assert_eq!(
        (s.ready, s.delayed, s.leased, s.counters.purged),
        (0, 0, 1, 2)
    );
    // The purged key is free again.
    assert!(f.key_is_free(T0, "dk"));
}

#[test]
fn purge_ids_takes_only_the_named_ready_and_delayed_items() {
    let mut f = Fixture::new();
    let ready = f.enqueue(T0, "ready");
    let delayed = f
        .enqueue_item(
            T0,
            NewItem {
                delay_ms: 5_000,
                key: "dk".into(),
                ..NewItem::default()
            },
        )
        .id;
    let fresh = f.enqueue(T0, "fresh");
    let kept = f.enqueue(T0, "not named");
    let high = f
        .enqueue_item(
            T0,
            NewItem {
                priority: 7,
                ..NewItem::default()
            },
        )
        .id;
    // Leases the high-priority item, then `ready`, and gives `ready` back: it is then
    // a returned id of its level, `fresh` and `kept` fresh ones.
    let granted = f.lease_n(T0, 2);
    assert_eq!(
        granted.iter().map(|g| g.id).collect::<Vec<_>>(),
        [high, ready]
    );
    f.q.release(T0, ready, granted[1].token).unwrap();
    let purged = f.q.purge_ids(&[ready, delayed, fresh, high, 999_999]);
    assert_eq!(
        purged, 3,
        "ready and delayed go; leased and unknown ids stay"
    );
    f.q.check_invariants();
    for id in [ready, delayed, fresh] {
        assert!(f.q.item(id).is_none(), "{id} purged");
    }
    assert!(f.q.item(high).is_some());
    let s = f.stats(T0);
    assert_eq!(
        (s.ready, s.delayed, s.leased, s.counters.purged),
        (1, 0, 1, 3)
    );
    // Only the unnamed item is left to lease; the purged key is free again.
    let next: Vec<u64> = f.lease_n(T0, 5).iter().map(|g| g.id).collect();
    assert_eq!(next, [kept]);
    assert!(f.key_is_free(T0, "dk"));
}

#[test]
fn limits_refuse_the_whole_batch() {
    let mut f = Fixture::with(Options {
        max_payload_bytes: 4,
        max_depth: 2,
        ..Options::default()
    });
    let item = |p: &str| NewItem {
        payload: bytes::Bytes::copy_from_slice(p.as_bytes()),
        ..NewItem::default()
    };
    let err =
        f.q.enqueue(T0, vec![item("ok"), item("too long")], false, || 1)
            .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("max payload"), "{err}");
    let err =
        f.q.enqueue(T0, vec![item("a"), item("b"), item("c")], false, || 1)
            .unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
    assert_eq!(f.q.item_count(), 0, "nothing was added");
    f.enqueue(T0, "a");
    f.enqueue(T0, "b");
    // Completing one frees room.
    let lease = f.lease(T0).unwrap();
    f.q.ack(T0, lease.id, lease.token, vec![]).unwrap();
    f.enqueue(T0, "c");
}

#[test]
fn retention_deletes_done_items() {
    let mut f = Fixture::with(Options {
        retention_ms: 1_000,
        ..Options::default()
    });
    let id = f.enqueue(T0, "a");
    let lease = f.lease(T0).unwrap();
    f.q.ack(T0 + 10, id, lease.token, b"r".to_vec()).unwrap();
    f.q.take_journal();
    assert_eq!(f.q.next_deadline(), Some(T0 + 1_010));
    f.q.tick(T0 + 1_009);
    assert!(f.q.item(id).is_some());
    f.q.tick(T0 + 1_010);
    assert!(f.q.item(id).is_none());
    assert_eq!(f.q.take_journal(), vec![Change::Delete(id)]);
    assert_eq!(f.stats(T0 + 1_010).counters.completed, 1, "totals stay");
}

#[test]
fn stats_report_rates_oldest_age_and_eta() {
    let mut f = Fixture::new();
    for i in 0..20 {
        f.enqueue(T0, &format!("{i}"));
    }
    for t in 0..10u64 {
        let lease = f.lease(T0 + t * 1_000).unwrap();
        f.q.ack(T0 + t * 1_000, lease.id, lease.token, vec![])
            .unwrap();
    }
    let now = T0 + 9_500;
    let s = f.stats(now);
    assert_eq!(s.rate_10s, 1.0);
    assert_eq!(s.oldest_ready_age_ms, 9_500);
    assert_eq!(s.eta_ms, 10_000, "10 left at 1/s");
    assert_eq!(s.workers, 1);
}

#[test]
fn every_change_is_journaled() {
    let mut f = Fixture::new();
    let id = f.enqueue(T0, "a");
    assert_eq!(f.q.take_journal(), vec![Change::Put(id)]);
    let lease = f.lease(T0).unwrap();
    assert_eq!(f.q.take_journal(), vec![Change::Put(id)]);
    f.q.ack(T0, id, lease.token, vec![]).unwrap();
    assert_eq!(f.q.take_journal(), vec![Change::Put(id)]);
    assert!(f.q.ack(T0, id, 12345, vec![]).is_err());
    assert!(
        f.q.take_journal().is_empty(),
        "a refused call journals nothing"
    );
}

#[test]
fn worker_bookkeeping_follows_leases() {
    let mut f = Fixture::new();
    f.enqueue(T0, "a");
    f.enqueue(T0, "b");
    let leases = f.lease_n(T0, 2);
    let workers = f.q.workers(T0);
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].1.in_flight, 2);
    f.q.ack(T0, leases[0].id, leases[0].token, vec![]).unwrap();
    f.q.tick(leases[1].deadline_ms);
    let w = &f.q.workers(T0)[0].1;
    assert_eq!((w.in_flight, w.completed), (0, 1));
}

/// A queue may hold millions of items: what most items lack stays behind pointers.
/// Ids one queue gets can share a stride (queues taking turns); their hashes must
/// still spread over a table's buckets, whose index is the hash's low bits.
#[test]
fn id_hashes_spread_strided_ids_over_the_low_bits() {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let hasher = BuildHasherDefault::<IdHasher>::default();
    let buckets: std::collections::HashSet<u64> = (0..1024u64)
        .map(|k| hasher.hash_one(k * 1024) & 1023)
        .collect();
    // 1,024 random values in 1,024 buckets fill about 647 of them.
    assert!(
        buckets.len() > 550,
        "only {} of 1024 buckets",
        buckets.len()
    );
}

/// Thousands of random operations (enqueue with priorities, dedup keys and delays,
/// lease, ack, fail, release, extend with current and stale tokens, timers, purge,
/// requeue), checking after each one that every item is in exactly the index its state
/// names, and that what a lease hands out is what was enqueued under that id.
#[test]
fn random_operations_keep_items_and_indexes_in_step() {
    let mut f = Fixture::with(Options {
        lease_timeout_ms: 40,
        max_attempts: 3,
        backoff_base_ms: 5,
        backoff_cap_ms: 20,
        retention_ms: 300,
        ..Options::default()
    });
    let mut random = super::test_random();
    // What each live id was enqueued with: (payload, priority, key).
    let mut enqueued: std::collections::HashMap<u64, (Vec<u8>, i32, String)> =
        std::collections::HashMap::new();
    let mut held: Vec<Granted> = Vec::new();
    let mut now = T0;
    let mut leased_total = 0;
    for step in 0..10_000u64 {
        now += random(4);
        match random(20) {
            0..=5 => {
                let batch: Vec<NewItem> = (0..1 + random(4))
                    .map(|k| NewItem {
                        payload: format!("{step}-{k}").repeat(random(30) as usize).into(),
                        priority: random(5) as i32 - 2,
                        delay_ms: if random(4) == 0 { random(30) } else { 0 },
                        key: if random(3) == 0 {
                            format!("key-{}", random(40))
                        } else {
                            String::new()
                        },
                    })
                    .collect();
                let mut next = f.next_id;
                let results =
                    f.q.enqueue(now, batch.clone(), false, || {
                        next += 1;
                        next
                    })
                    .unwrap();
                f.next_id = next;
                for (new, result) in batch.into_iter().zip(results) {
                    if !result.deduplicated {
                        enqueued.insert(result.id, (new.payload.to_vec(), new.priority, new.key));
                    }
                }
            }
            6..=10 => {
                for g in f.lease_n(now, 1 + random(6) as usize) {
                    let (payload, priority, key) = &enqueued[&g.id];
                    assert_eq!(
                        (&g.payload, g.priority, &g.key),
                        (payload, *priority, key),
                        "item {}",
                        g.id
                    );
                    leased_total += 1;
                    held.push(g);
                }
            }
            11..=16 if !held.is_empty() => {
                // Sometimes a stale lease: its item expired and may be leased again.
                let g = held.swap_remove(random(held.len() as u64) as usize);
                let current = f.q.item(g.id).is_some_and(|item| {
                    item.state == State::Leased && item.lease.is_some_and(|l| l.token == g.token)
                });
                let outcome = match random(6) {
                    0..=2 => f.q.ack(now, g.id, g.token, b"done".to_vec()),
                    3 => {
                        f.q.fail(now, g.id, g.token, "x".into(), random(2) == 0, 0)
                            .map(|_| ())
                    }
                    4 => f.q.release(now, g.id, g.token),
                    _ => {
                        let extended = f.q.extend(now, g.id, g.token, 0).map(|_| ());
                        if extended.is_ok() {
                            held.push(g.clone());
                        }
                        extended
                    }
                };
                assert_eq!(outcome.is_ok(), current, "item {} step {step}", g.id);
            }
            17 => {
                f.q.tick(now);
            }
            18 if random(20) == 0 => {
                f.q.purge();
            }
            19 if random(10) == 0 => {
                f.q.requeue(now, &[]).unwrap();
            }
            _ => {}
        }
        f.q.check_invariants();
        // Items deleted (purged, past retention) leave the model too.
        if step % 500 == 0 {
            enqueued.retain(|id, _| f.q.item(*id).is_some());
            let stats = f.stats(now);
            let by_state = stats.ready + stats.delayed + stats.leased + stats.done + stats.dead;
            assert_eq!(by_state as usize, f.q.item_count());
            assert_eq!(enqueued.len(), f.q.item_count());
        }
    }
    assert!(leased_total > 5_000, "the run leased {leased_total} items");
}

#[test]
fn a_lease_answer_stops_at_its_byte_budget_and_the_rest_keeps_its_place() {
    let mut f = Fixture::with(Options {
        max_payload_bytes: 8 * 1024 * 1024,
        ..Options::default()
    });
    let big = "x".repeat(7 * 1024 * 1024);
    let ids: Vec<u64> = (0..3).map(|_| f.enqueue(T0, &big)).collect();
    let small = f.enqueue(T0, "small");

    // Two 7 MiB payloads fit the 16 MiB budget, the third does not.
    let first = f.lease_n(T0, 10);
    assert_eq!(first.iter().map(|g| g.id).collect::<Vec<_>>(), ids[..2]);
    f.q.check_invariants();
    // The one left out is still first in line, then the small one.
    let second = f.lease_n(T0, 10);
    assert_eq!(
        second.iter().map(|g| g.id).collect::<Vec<_>>(),
        vec![ids[2], small]
    );
    assert_eq!(f.q.stats(T0).ready, 0);
}

#[test]
fn a_payload_over_the_byte_budget_is_still_leased_alone() {
    let mut f = Fixture::with(Options {
        max_payload_bytes: 32 * 1024 * 1024,
        ..Options::default()
    });
    let huge = f.enqueue(T0, &"y".repeat(20 * 1024 * 1024));
    let after = f.enqueue(T0, "after");
    let first = f.lease_n(T0, 10);
    assert_eq!(first.iter().map(|g| g.id).collect::<Vec<_>>(), vec![huge]);
    assert_eq!(f.lease_n(T0, 10)[0].id, after);
}
