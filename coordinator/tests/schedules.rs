//! Schedules through the engine: each tick enqueues its batch, the concurrency
//! policies hold the previous tick's items to account, missed ticks follow the
//! CronJob rules (the most recent one runs once, within the starting deadline), a
//! refused enqueue is recorded and changes nothing, and schedules with their last runs
//! survive a restart. In-memory tests run on tokio's paused clock; restarts open the
//! data dir again with the engine's clock set later, so "down for ten minutes" takes
//! no ten minutes.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::open_store;
use workq_coordinator::engine::schedules::{NewSchedule, Outcome, Policy, ScheduleView};
use workq_coordinator::engine::{Item, LeaseRequest, NewItem, OptionsPatch, State};
use workq_coordinator::store::{Durability, Store};
use workq_coordinator::{Engine, Error, clock::Clock};

/// 2026-11-28T16:00:00.500Z.
const T0: u64 = 1_795_881_600_500;
const MINUTE: u64 = 60_000;

fn open_memory() -> Arc<Engine> {
    Engine::open(Store::memory(), Clock::starting_at(T0)).unwrap()
}

async fn create_queue(engine: &Engine, name: &str) {
    engine
        .create_queue(name, &OptionsPatch::default(), false)
        .await
        .unwrap();
}

/// Every minute, two items "item-{i}@{tick}" into "q".
fn every_minute(name: &str) -> NewSchedule {
    NewSchedule {
        payload: b"item-{i}@{tick}".to_vec(),
        count: 2,
        ..NewSchedule::new(name, "q", "* * * * *")
    }
}

async fn schedule(engine: &Engine, name: &str) -> ScheduleView {
    let all = engine.all_schedules().await;
    all.into_iter()
        .find(|s| s.record.name == name)
        .unwrap_or_else(|| panic!("schedule {name} is listed"))
}

fn items(engine: &Engine) -> Vec<Item> {
    engine.list_items("q", None, 0, 1000, true).unwrap().0
}

fn payloads(engine: &Engine, state: State) -> Vec<String> {
    items(engine)
        .into_iter()
        .filter(|i| i.state == state)
        .map(|i| String::from_utf8(i.payload).unwrap())
        .collect()
}

/// Lets the paused clock run `ms` on, the scheduler's timers with it.
async fn pass(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn outcome(view: &ScheduleView, run: usize) -> Option<Outcome> {
    Outcome::from_code(view.record.runs[run].outcome)
}

fn lease(worker: &str, max_items: u32) -> LeaseRequest {
    LeaseRequest {
        worker: worker.into(),
        max_items,
        lease_timeout_ms: 600_000,
        wait_ms: 0,
    }
}

#[tokio::test(start_paused = true)]
async fn each_tick_enqueues_the_batch_with_its_index_and_time() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    let created = engine.create_schedule(every_minute("s")).await.unwrap();
    assert_eq!(created.record.time_zone, "UTC");
    assert_eq!(created.next_run_ms, Some(T0 - 500 + MINUTE));
    assert!(created.record.runs.is_empty());
    assert!(items(&engine).is_empty(), "nothing before the first tick");

    pass(MINUTE).await;
    assert_eq!(
        payloads(&engine, State::Ready),
        ["item-0@2026-11-28T16:01:00Z", "item-1@2026-11-28T16:01:00Z"]
    );
    let keys: Vec<String> = items(&engine).into_iter().map(|i| i.key).collect();
    let tick = T0 - 500 + MINUTE;
    assert_eq!(
        keys,
        [
            format!("schedule/s/{tick}/0"),
            format!("schedule/s/{tick}/1")
        ]
    );
    let view = schedule(&engine, "s").await;
    assert_eq!(view.record.runs.len(), 1);
    assert_eq!(outcome(&view, 0), Some(Outcome::Enqueued));
    assert_eq!(view.record.runs[0].scheduled_ms, tick);
    assert_eq!(view.record.runs[0].items, 2);
    assert_eq!(view.record.enqueued_runs, 1);
    assert_eq!(view.next_run_ms, Some(tick + MINUTE));

    // Allow: the next tick enqueues although the first tick's items are unfinished.
    pass(MINUTE).await;
    assert_eq!(payloads(&engine, State::Ready).len(), 4);
    let view = schedule(&engine, "s").await;
    assert_eq!(view.record.enqueued_runs, 2);
    assert_eq!(
        view.record.runs[0].scheduled_ms,
        tick + MINUTE,
        "most recent first"
    );
    assert_eq!(engine.stats("q").unwrap().counters.enqueued, 4);
}

/// A crash between a tick's items reaching the log and the schedule's record saying
/// the tick ran leaves exactly this: the tick's items, and a schedule due to run it
/// again. The items' dedup keys make the second run the first one's items.
#[tokio::test(start_paused = true)]
async fn a_tick_run_twice_enqueues_its_items_once() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    engine.create_schedule(every_minute("s")).await.unwrap();
    let tick = T0 - 500 + MINUTE;
    let logged: Vec<NewItem> = (0..2)
        .map(|i| NewItem {
            payload: bytes::Bytes::from(format!("first run {i}")),
            key: format!("schedule/s/{tick}/{i}"),
            ..NewItem::default()
        })
        .collect();
    let ids: Vec<u64> = engine
        .enqueue("q", logged, false)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();

    pass(MINUTE).await;
    let view = schedule(&engine, "s").await;
    assert_eq!(outcome(&view, 0), Some(Outcome::Enqueued));
    assert_eq!(
        view.record.last_items, ids,
        "the tick's items are the first run's"
    );
    assert_eq!(
        payloads(&engine, State::Ready),
        ["first run 0", "first run 1"]
    );
    assert_eq!(engine.stats("q").unwrap().counters.deduplicated, 2);
}

#[tokio::test(start_paused = true)]
async fn forbid_skips_while_the_last_runs_items_are_unfinished() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    let new = NewSchedule {
        policy: Policy::Forbid,
        ..every_minute("s")
    };
    engine.create_schedule(new).await.unwrap();
    pass(MINUTE).await;
    assert_eq!(items(&engine).len(), 2);

    // One item done, one still leased: the next tick is skipped.
    let leased = engine.lease("q", lease("w", 2)).await.unwrap().granted;
    engine
        .ack("q", leased[0].id, leased[0].token, Vec::new())
        .await
        .unwrap();
    pass(MINUTE).await;
    assert_eq!(items(&engine).len(), 2, "nothing enqueued");
    let view = schedule(&engine, "s").await;
    assert_eq!(outcome(&view, 0), Some(Outcome::Skipped));
    assert!(
        view.record.runs[0].detail.contains("1 item(s)"),
        "{:?}",
        view.record.runs[0]
    );
    assert_eq!(view.record.skipped_runs, 1);

    // Dead counts as finished as much as done.
    engine
        .fail("q", leased[1].id, leased[1].token, "boom".into(), true, 0)
        .await
        .unwrap();
    pass(MINUTE).await;
    let view = schedule(&engine, "s").await;
    assert_eq!(outcome(&view, 0), Some(Outcome::Enqueued));
    assert_eq!(payloads(&engine, State::Ready).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn replace_purges_the_last_runs_unleased_items_and_lets_leased_ones_finish() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    let new = NewSchedule {
        policy: Policy::Replace,
        count: 3,
        ..every_minute("s")
    };
    engine.create_schedule(new).await.unwrap();
    pass(MINUTE).await;
    let first = engine.lease("q", lease("w", 1)).await.unwrap().granted;
    pass(MINUTE).await;
    let view = schedule(&engine, "s").await;
    assert_eq!(outcome(&view, 0), Some(Outcome::Enqueued));
    assert_eq!(view.record.runs[0].replaced, 2);
    assert_eq!(
        payloads(&engine, State::Leased),
        ["item-0@2026-11-28T16:01:00Z"]
    );
    assert_eq!(
        payloads(&engine, State::Ready),
        [
            "item-0@2026-11-28T16:02:00Z",
            "item-1@2026-11-28T16:02:00Z",
            "item-2@2026-11-28T16:02:00Z"
        ]
    );
    assert_eq!(engine.stats("q").unwrap().counters.purged, 2);
    // The leased item of the first run still completes with its token.
    engine
        .ack("q", first[0].id, first[0].token, Vec::new())
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn replace_counts_the_room_its_purge_makes_and_a_full_queue_purges_nothing() {
    let engine = open_memory();
    let patch = OptionsPatch {
        max_depth: Some(3),
        ..OptionsPatch::default()
    };
    engine.create_queue("q", &patch, false).await.unwrap();
    let new = NewSchedule {
        policy: Policy::Replace,
        ..every_minute("s")
    };
    engine.create_schedule(new).await.unwrap();
    pass(MINUTE).await;
    // 2 unfinished + 2 new would pass the max depth of 3, but the purge makes room.
    pass(MINUTE).await;
    let view = schedule(&engine, "s").await;
    assert_eq!(outcome(&view, 0), Some(Outcome::Enqueued));
    assert_eq!(view.record.runs[0].replaced, 2);

    // One item leased (Replace leaves it) and one from elsewhere: 3 unfinished, 1
    // purgeable, 2 new: 4 > 3. The tick is refused before anything is purged.
    engine.lease("q", lease("w", 1)).await.unwrap();
    let other = NewItem {
        payload: bytes::Bytes::from_static(b"other"),
        ..NewItem::default()
    };
    engine.enqueue("q", vec![other], false).await.unwrap();
    let before = items(&engine);
    pass(MINUTE).await;
    let view = schedule(&engine, "s").await;
    assert_eq!(outcome(&view, 0), Some(Outcome::Failed));
    assert!(
        view.record.runs[0].detail.contains("is full"),
        "{:?}",
        view.record.runs[0]
    );
    assert_eq!(items(&engine), before, "nothing purged, nothing added");
}

#[tokio::test(start_paused = true)]
async fn resuming_runs_only_the_most_recent_missed_tick_within_the_deadline() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    let new = NewSchedule {
        suspend: true,
        ..every_minute("late")
    };
    let created = engine.create_schedule(new).await.unwrap();
    assert_eq!(created.next_run_ms, None, "suspended: no next run");
    let with_deadline = NewSchedule {
        suspend: true,
        starting_deadline_ms: 30_000,
        ..every_minute("strict")
    };
    engine.create_schedule(with_deadline).await.unwrap();

    // Five ticks pass while suspended; resume 45 s after the last one.
    pass(5 * MINUTE + 45_000).await;
    assert!(items(&engine).is_empty());
    engine.set_schedule_suspended("late", false).await.unwrap();
    engine
        .set_schedule_suspended("strict", false)
        .await
        .unwrap();
    pass(1).await;

    // No deadline: the most recent missed tick runs once, late; none before it.
    let late = schedule(&engine, "late").await;
    assert_eq!(late.record.runs.len(), 1, "{:?}", late.record.runs);
    assert_eq!(outcome(&late, 0), Some(Outcome::Enqueued));
    assert_eq!(late.record.runs[0].scheduled_ms, T0 - 500 + 5 * MINUTE);
    assert!(late.record.runs[0].detail.contains("late"));
    assert_eq!(items(&engine).len(), 2);
    // A 30 s deadline: the same tick is missed, and nothing is enqueued for it.
    let strict = schedule(&engine, "strict").await;
    assert_eq!(strict.record.runs.len(), 1);
    assert_eq!(outcome(&strict, 0), Some(Outcome::Missed));
    assert!(
        strict.record.runs[0]
            .detail
            .contains("past the starting deadline of 30s")
    );
    // The four ticks before it were passed over: missed too, and said so.
    assert_eq!(strict.record.missed_runs, 5);
    assert!(
        strict.record.runs[0]
            .detail
            .contains("4 earlier ticks missed")
    );
    assert_eq!(late.record.missed_runs, 4);
    assert!(
        late.record.runs[0]
            .detail
            .contains("4 earlier ticks missed")
    );

    // Both tick on time from then on.
    pass(MINUTE).await;
    assert_eq!(
        outcome(&schedule(&engine, "strict").await, 0),
        Some(Outcome::Enqueued)
    );
    assert_eq!(items(&engine).len(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_refused_enqueue_is_recorded_and_changes_nothing() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    let new = NewSchedule {
        policy: Policy::Replace,
        ..every_minute("s")
    };
    engine.create_schedule(new).await.unwrap();
    pass(MINUTE).await;
    engine.set_sealed("q", true).await.unwrap();
    pass(MINUTE).await;
    let view = schedule(&engine, "s").await;
    assert_eq!(outcome(&view, 0), Some(Outcome::Failed));
    assert!(
        view.record.runs[0].detail.contains("sealed"),
        "{:?}",
        view.record.runs[0]
    );
    assert_eq!(view.record.failed_runs, 1);
    // Replace did not purge the last run's items for a tick that could not enqueue.
    assert_eq!(payloads(&engine, State::Ready).len(), 2);

    engine.delete_queue("q").await.unwrap();
    pass(MINUTE).await;
    let view = schedule(&engine, "s").await;
    assert_eq!(outcome(&view, 0), Some(Outcome::Failed));
    assert!(view.record.runs[0].detail.contains("queue 'q' not found"));
    // The queue comes back: so do the ticks.
    create_queue(&engine, "q").await;
    pass(MINUTE).await;
    assert_eq!(
        outcome(&schedule(&engine, "s").await, 0),
        Some(Outcome::Enqueued)
    );
    assert_eq!(items(&engine).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn time_zones_deletion_and_the_history_limit() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    let new = NewSchedule {
        cron: "0 9 * * *".into(),
        time_zone: "America/New_York".into(),
        ..every_minute("morning")
    };
    let morning = engine.create_schedule(new).await.unwrap();
    // 09:00 in New York on 2026-11-29 is 14:00 UTC (EST, UTC-5).
    assert_eq!(morning.next_run_ms, Some(1_795_960_800_000));
    assert_eq!(morning.record.time_zone, "America/New_York");

    let every_second = NewSchedule {
        cron: "* * * * * *".into(),
        count: 1,
        ..every_minute("fast")
    };
    engine.create_schedule(every_second).await.unwrap();
    pass(12_000).await;
    let fast = schedule(&engine, "fast").await;
    assert_eq!(fast.record.enqueued_runs, 12);
    assert_eq!(fast.record.runs.len(), 10, "the last ten runs are kept");
    engine.delete_schedule("fast").await.unwrap();
    pass(5_000).await;
    assert_eq!(
        items(&engine).len(),
        12,
        "no ticks after deletion; its items stay"
    );
    assert_eq!(engine.all_schedules().await.len(), 1);
    assert_eq!(engine.list_schedules(Some("other")).await.unwrap().len(), 0);
    let err = engine.delete_schedule("fast").await.unwrap_err();
    assert!(matches!(err, Error::ScheduleNotFound(_)), "{err:?}");
    let err = engine
        .set_schedule_suspended("fast", true)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ScheduleNotFound(_)), "{err:?}");
}

/// Stockholm's clocks go back at 01:00 UTC on 2026-10-25 (03:00 CEST becomes 02:00
/// CET). A daily schedule at 02:30 runs once, in the first pass, whether or not another
/// schedule wakes the scheduler inside the second; an hourly one keeps its pace
/// through both passes, as cron runs a job whose hour is `*`.
#[tokio::test(start_paused = true)]
async fn a_repeated_hour_runs_a_fixed_time_once_and_an_hourly_job_in_both_passes() {
    // 2026-10-24T23:50:00Z (01:50 CEST).
    let start = 1_792_885_800_000;
    let engine = Engine::open(Store::memory(), Clock::starting_at(start)).unwrap();
    create_queue(&engine, "q").await;
    let hourly = NewSchedule {
        time_zone: "Europe/Stockholm".into(),
        ..NewSchedule::new("hourly", "q", "0 * * * *")
    };
    engine.create_schedule(hourly).await.unwrap();
    let daily = NewSchedule {
        time_zone: "Europe/Stockholm".into(),
        ..NewSchedule::new("daily", "q", "30 2 * * *")
    };
    engine.create_schedule(daily).await.unwrap();
    // Wakes the scheduler at 00:30, 01:30 and 02:30 UTC.
    let waker = NewSchedule::new("waker", "q", "30 * * * *");
    engine.create_schedule(waker).await.unwrap();
    pass(3 * 60 * MINUTE).await;
    let ticks = |view: ScheduleView| -> Vec<String> {
        view.record
            .runs
            .iter()
            .rev()
            .map(|run| workq_coordinator::engine::cron::rfc3339(run.scheduled_ms))
            .collect()
    };
    // An hourly job keeps its pace through both passes of 02:00.
    assert_eq!(
        ticks(schedule(&engine, "hourly").await),
        [
            "2026-10-25T00:00:00Z", // 02:00 CEST
            "2026-10-25T01:00:00Z", // 02:00 CET
            "2026-10-25T02:00:00Z", // 03:00 CET
        ]
    );
    // 02:30 CEST; not 02:30 CET an hour later.
    assert_eq!(
        ticks(schedule(&engine, "daily").await),
        ["2026-10-25T00:30:00Z"]
    );
    assert_eq!(schedule(&engine, "waker").await.record.enqueued_runs, 3);
}

#[tokio::test(start_paused = true)]
async fn bad_schedules_are_refused_with_the_reason_and_change_nothing() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    engine.create_schedule(every_minute("taken")).await.unwrap();
    let cases: Vec<(NewSchedule, &str)> = vec![
        (every_minute("-bad"), "invalid schedule name"),
        (every_minute(""), "invalid schedule name"),
        (
            NewSchedule {
                cron: "every minute".into(),
                ..every_minute("s")
            },
            "is not valid",
        ),
        (
            NewSchedule {
                time_zone: "Nowhere/Else".into(),
                ..every_minute("s")
            },
            "unknown time zone",
        ),
        (
            NewSchedule {
                queue: "missing".into(),
                ..every_minute("s")
            },
            "queue 'missing' not found",
        ),
        (
            NewSchedule {
                count: 10_001,
                ..every_minute("s")
            },
            "at most 10000 items",
        ),
        (
            NewSchedule {
                payload: vec![b'x'; 1024 * 1024 + 1],
                ..every_minute("s")
            },
            "max payload",
        ),
        (
            NewSchedule {
                payload: [&b"{tick}"[..], &[b'x'; 1024 * 1024 - 10]].concat(),
                ..NewSchedule::new("s", "q", "@daily")
            },
            "payload of up to 1048586 bytes ({i} and {tick} filled in)",
        ),
        (
            NewSchedule {
                payload: vec![b'x'; 10_000],
                count: 10_000,
                ..every_minute("s")
            },
            "a tick would enqueue up to 100000000 bytes (10000 items of up to 10000), over the 64 MiB",
        ),
        (every_minute("taken"), "already exists"),
    ];
    for (new, says) in cases {
        let name = new.name.clone();
        let err = engine.create_schedule(new).await.unwrap_err();
        assert!(err.to_string().contains(says), "{name}: {err}");
    }
    let names: Vec<String> = engine
        .all_schedules()
        .await
        .into_iter()
        .map(|s| s.record.name)
        .collect();
    assert_eq!(names, ["taken"]);
}

// ---- restarts --------------------------------------------------------------------

/// Opens the data dir with the engine's clock at `unix_ms`.
async fn open_at(dir: &Path, unix_ms: u64) -> Arc<Engine> {
    match open_store(dir, Durability::Strict).await {
        Ok(store) => Engine::open(store, Clock::starting_at(unix_ms)).unwrap(),
        Err(e) => panic!("cannot open {}: {e}", dir.display()),
    }
}

/// Waits (really) until `name` has run `runs` times.
async fn wait_runs(engine: &Engine, name: &str, runs: usize) -> ScheduleView {
    for _ in 0..500 {
        let view = schedule(engine, name).await;
        if view.record.runs.len() >= runs {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} did not run {runs} times")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_and_their_runs_survive_restarts_and_missed_ticks_follow_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    // 16:00:59.900: the first tick (16:01:00) comes a tenth of a second after the start.
    let start = T0 + 59_400;
    let engine = open_at(dir.path(), start).await;
    create_queue(&engine, "q").await;
    engine.create_schedule(every_minute("s")).await.unwrap();
    let deadline = NewSchedule {
        starting_deadline_ms: 30_000,
        ..every_minute("d")
    };
    engine.create_schedule(deadline).await.unwrap();
    let suspended = NewSchedule {
        suspend: true,
        ..every_minute("off")
    };
    engine.create_schedule(suspended).await.unwrap();
    let before_s = wait_runs(&engine, "s", 1).await;
    let before_d = wait_runs(&engine, "d", 1).await;
    assert_eq!(items(&engine).len(), 4);
    // A crash: no clean close, no snapshot.
    drop(engine);

    // Back 20 s after 16:05: both run the 16:05 tick once; 16:02–16:04 are not
    // back-filled.
    let engine = open_at(dir.path(), T0 - 500 + 5 * MINUTE + 20_000).await;
    let s = wait_runs(&engine, "s", 2).await;
    let d = wait_runs(&engine, "d", 2).await;
    for (view, before) in [(&s, &before_s), (&d, &before_d)] {
        assert_eq!(view.record.runs.len(), 2, "{:?}", view.record.runs);
        assert_eq!(outcome(view, 0), Some(Outcome::Enqueued));
        assert_eq!(view.record.runs[0].scheduled_ms, T0 - 500 + 5 * MINUTE);
        assert_eq!(
            view.record.runs[1], before.record.runs[0],
            "restored as run"
        );
    }
    let off = schedule(&engine, "off").await;
    assert!(off.record.suspended && off.record.runs.is_empty());
    assert_eq!(items(&engine).len(), 8);
    // A clean stop this time: the schedules go through a snapshot.
    engine.close().await.unwrap();
    drop(engine);

    // Back 50 s after 16:09: past "d"'s 30 s deadline, within "s"'s none.
    let engine = open_at(dir.path(), T0 - 500 + 9 * MINUTE + 50_000).await;
    let s = wait_runs(&engine, "s", 3).await;
    let d = wait_runs(&engine, "d", 3).await;
    assert_eq!(outcome(&s, 0), Some(Outcome::Enqueued));
    assert_eq!(outcome(&d, 0), Some(Outcome::Missed));
    // 16:02–16:04 and 16:06–16:08 were passed over, 16:09 was too late for "d".
    assert_eq!(d.record.missed_runs, 3 + 3 + 1);
    assert_eq!(s.record.missed_runs, 3 + 3);
    assert!(s.record.runs[0].detail.contains("3 earlier ticks missed"));
    assert_eq!(d.record.enqueued_runs, 2);
    assert_eq!(items(&engine).len(), 10);
    // "d" ran the same ticks as "s" before its miss.
    let ticks = |view: &ScheduleView| -> Vec<(u64, u32)> {
        view.record.runs[1..]
            .iter()
            .map(|run| (run.scheduled_ms, run.items))
            .collect()
    };
    assert_eq!(ticks(&d), ticks(&s));
    engine.close().await.unwrap();
}

/// Two hundred schedules ticking every second for ten seconds: each runs each tick
/// once, and every item is there once.
#[tokio::test(start_paused = true)]
async fn many_schedules_each_run_every_tick_once() {
    let engine = open_memory();
    create_queue(&engine, "q").await;
    for n in 0..200 {
        let every_second = NewSchedule {
            payload: format!("{n}:{{tick}}").into_bytes(),
            ..NewSchedule::new(format!("s{n}"), "q", "* * * * * *")
        };
        engine.create_schedule(every_second).await.unwrap();
    }
    pass(10_000).await;
    for view in engine.all_schedules().await {
        let runs: Vec<u64> = view.record.runs.iter().map(|r| r.scheduled_ms).collect();
        let expected: Vec<u64> = (1..=10).rev().map(|s| T0 - 500 + s * 1000).collect();
        assert_eq!(runs, expected, "{}", view.record.name);
    }
    let mut payloads = Vec::new();
    let mut after = 0;
    loop {
        let (page, next) = engine.list_items("q", None, after, 1000, true).unwrap();
        payloads.extend(
            page.into_iter()
                .map(|i| String::from_utf8(i.payload).unwrap()),
        );
        if next == 0 {
            break;
        }
        after = next;
    }
    assert_eq!(payloads.len(), 2_000);
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), 2_000, "no tick enqueued twice");
}

/// Fifty schedules on one second, on disk in strict mode: their ticks share syncs
/// (each tick's items and record in one batch, one sync for them all) instead of
/// taking one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_due_together_share_their_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_disk(dir.path(), Durability::Strict).unwrap();
    let engine = Engine::open(store, Clock::system()).unwrap();
    create_queue(&engine, "q").await;
    for n in 0..50 {
        let every_second = NewSchedule::new(format!("s{n}"), "q", "* * * * * *");
        engine.create_schedule(every_second).await.unwrap();
    }
    // Every schedule has run `n` ticks, the same ones.
    async fn ran(engine: &Engine, n: usize) -> u64 {
        for _ in 0..2000 {
            let views = engine.all_schedules().await;
            if views.iter().all(|v| v.record.runs.len() >= n) {
                let latest: Vec<u64> = views
                    .iter()
                    .map(|v| v.record.runs[0].scheduled_ms)
                    .collect();
                if latest.iter().all(|t| *t == latest[0]) {
                    return latest[0];
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the schedules did not all run {n} ticks");
    }
    let flushes = || {
        engine
            .store()
            .flush_stats()
            .unwrap()
            .flushes
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let first = ran(&engine, 1).await;
    let before = flushes();
    let later = ran(&engine, 2).await;
    let syncs = flushes() - before;
    // One tick later, or more on a slow machine; a tick's record sync may fall after
    // `before` was read.
    let ticks = (later - first) / 1000;
    assert!(ticks >= 1);
    assert!(
        syncs <= 3 * ticks + 1,
        "{ticks} tick(s) of 50 schedules took {syncs} syncs (one at a time: 100 a tick)"
    );
    engine.close().await.unwrap();
}

/// Waits (really) until `name` has handled the tick at `tick`.
async fn wait_tick(engine: &Engine, name: &str, tick: u64) -> ScheduleView {
    for _ in 0..500 {
        let view = schedule(engine, name).await;
        if view.record.last_tick_ms >= tick {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} did not handle the tick at {tick}")
}

/// A crash can end the log anywhere. Cut the log of a tick at every few bytes and
/// start from each cut after the next tick is due: wherever the tick's items are,
/// the schedule's record knows that tick ran, so Forbid holds the next tick back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wherever_a_crash_cuts_a_tick_its_items_come_back_only_with_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open_at(dir.path(), T0 + 59_400).await;
    create_queue(&engine, "q").await;
    let forbid = NewSchedule {
        policy: Policy::Forbid,
        ..every_minute("s")
    };
    engine.create_schedule(forbid).await.unwrap();
    let tick = wait_runs(&engine, "s", 1).await.record.runs[0].scheduled_ms;
    assert_eq!(items(&engine).len(), 2);
    drop(engine);

    let logs: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "log"))
        .collect();
    let [log] = logs.as_slice() else {
        panic!("one log file, no snapshot: {logs:?}");
    };
    let bytes = std::fs::read(log).unwrap();
    // Past the last byte that is not zero (a record may end in zeros), the rest of
    // the file is the zeros a log keeps ahead of itself.
    let end = (bytes.iter().rposition(|&b| b != 0).unwrap() + 16).min(bytes.len());
    let mut cuts: Vec<usize> = (0..end).step_by(8).collect();
    cuts.push(bytes.len());
    let mut with_items = 0;
    for cut in cuts {
        let copy = tempfile::tempdir().unwrap();
        std::fs::create_dir(copy.path().join("wal")).unwrap();
        let copied = copy.path().join("wal").join(log.file_name().unwrap());
        std::fs::write(&copied, &bytes[..cut]).unwrap();

        // Back after the next tick, which Forbid must skip while the tick's items
        // are unfinished.
        let engine = open_at(copy.path(), tick + MINUTE + 20_000).await;
        if !engine
            .all_schedules()
            .await
            .iter()
            .any(|s| s.record.name == "s")
        {
            assert!(
                !matches!(
                    engine.list_items("q", None, 0, 10, false),
                    Ok((items, _)) if !items.is_empty()
                ),
                "cut at {cut}: items without their schedule"
            );
            continue;
        }
        let view = wait_tick(&engine, "s", tick + MINUTE).await;
        let enqueued: Vec<u64> = view
            .record
            .runs
            .iter()
            .filter(|run| Outcome::from_code(run.outcome) == Some(Outcome::Enqueued))
            .map(|run| run.scheduled_ms)
            .collect();
        let found = items(&engine);
        for item in &found {
            let item_tick: u64 = item.key.split('/').nth(2).unwrap().parse().unwrap();
            assert!(
                enqueued.contains(&item_tick),
                "cut at {cut} of {end}: item {} of tick {item_tick} is not in the runs {:?}",
                item.id,
                view.record.runs
            );
        }
        if found
            .iter()
            .any(|item| item.key.contains(&tick.to_string()))
        {
            with_items += 1;
            assert_eq!(
                outcome(&view, 0),
                Some(Outcome::Skipped),
                "cut at {cut}: Forbid sees the tick's unfinished items"
            );
        }
        drop(engine);
    }
    assert!(with_items > 0, "some cut keeps the tick");
}
