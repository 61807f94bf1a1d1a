//! On-disk records, encoded with prost so fields can be added without a migration.
//! These types are private to the coordinator; clients never see them.

use crate::engine::items::ItemView;
use crate::engine::queue::{Counters, Item, LeaseInfo, Options, Outcome, State};

#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub lease_timeout_ms: u64,
    #[prost(uint32, tag = "3")]
    pub max_attempts: u32,
    #[prost(uint64, tag = "4")]
    pub backoff_base_ms: u64,
    #[prost(uint64, tag = "5")]
    pub backoff_cap_ms: u64,
    #[prost(uint64, tag = "6")]
    pub max_payload_bytes: u64,
    #[prost(uint64, tag = "7")]
    pub max_depth: u64,
    #[prost(uint64, tag = "8")]
    pub retention_ms: u64,
    #[prost(bool, tag = "9")]
    pub sealed: bool,
    #[prost(uint64, tag = "10")]
    pub created_ms: u64,
    #[prost(uint64, tag = "11")]
    pub enqueued: u64,
    #[prost(uint64, tag = "12")]
    pub deliveries: u64,
    #[prost(uint64, tag = "13")]
    pub completed: u64,
    #[prost(uint64, tag = "14")]
    pub failed: u64,
    #[prost(uint64, tag = "15")]
    pub expired: u64,
    #[prost(uint64, tag = "16")]
    pub dead: u64,
    #[prost(uint64, tag = "17")]
    pub purged: u64,
    #[prost(uint64, tag = "18")]
    pub deduplicated: u64,
}

impl QueueRecord {
    pub fn new(name: &str, options: &Options, sealed: bool, created_ms: u64, c: &Counters) -> Self {
        QueueRecord {
            name: name.to_string(),
            lease_timeout_ms: options.lease_timeout_ms,
            max_attempts: options.max_attempts,
            backoff_base_ms: options.backoff_base_ms,
            backoff_cap_ms: options.backoff_cap_ms,
            max_payload_bytes: options.max_payload_bytes,
            max_depth: options.max_depth,
            retention_ms: options.retention_ms,
            sealed,
            created_ms,
            enqueued: c.enqueued,
            deliveries: c.deliveries,
            completed: c.completed,
            failed: c.failed,
            expired: c.expired,
            dead: c.dead,
            purged: c.purged,
            deduplicated: c.deduplicated,
        }
    }

    pub fn options(&self) -> Options {
        Options {
            lease_timeout_ms: self.lease_timeout_ms,
            max_attempts: self.max_attempts,
            backoff_base_ms: self.backoff_base_ms,
            backoff_cap_ms: self.backoff_cap_ms,
            max_payload_bytes: self.max_payload_bytes,
            max_depth: self.max_depth,
            retention_ms: self.retention_ms,
        }
    }

    pub fn counters(&self) -> Counters {
        Counters {
            enqueued: self.enqueued,
            deliveries: self.deliveries,
            completed: self.completed,
            failed: self.failed,
            expired: self.expired,
            dead: self.dead,
            purged: self.purged,
            deduplicated: self.deduplicated,
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemRecord {
    #[prost(string, tag = "1")]
    pub queue: String,
    #[prost(uint64, tag = "2")]
    pub id: u64,
    /// 1 ready, 2 delayed, 3 leased, 4 done, 5 dead (as in workq.proto).
    #[prost(uint32, tag = "3")]
    pub state: u32,
    #[prost(bytes = "vec", tag = "4")]
    pub payload: Vec<u8>,
    #[prost(int32, tag = "5")]
    pub priority: i32,
    #[prost(string, tag = "6")]
    pub key: String,
    #[prost(uint32, tag = "7")]
    pub attempts: u32,
    #[prost(uint64, tag = "8")]
    pub enqueued_ms: u64,
    #[prost(uint64, tag = "9")]
    pub ready_at_ms: u64,
    #[prost(uint64, tag = "10")]
    pub lease_token: u64,
    #[prost(uint64, tag = "11")]
    pub lease_deadline_ms: u64,
    #[prost(uint64, tag = "12")]
    pub lease_timeout_ms: u64,
    #[prost(string, tag = "13")]
    pub lease_worker: String,
    #[prost(uint64, tag = "14")]
    pub done_token: u64,
    #[prost(uint64, tag = "15")]
    pub done_ms: u64,
    #[prost(bytes = "vec", tag = "16")]
    pub result: Vec<u8>,
    #[prost(string, tag = "17")]
    pub last_error: String,
    #[prost(string, tag = "18")]
    pub worker: String,
}

/// A schedule with the state its ticks need: what it enqueues, the last tick it
/// handled and the items that tick enqueued (for Forbid and Replace).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScheduleRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub queue: String,
    #[prost(string, tag = "3")]
    pub cron: String,
    #[prost(string, tag = "4")]
    pub time_zone: String,
    #[prost(bytes = "vec", tag = "5")]
    pub payload: Vec<u8>,
    #[prost(uint32, tag = "6")]
    pub count: u32,
    /// As `ConcurrencyPolicy` in workq.proto: 1 Allow, 2 Forbid, 3 Replace.
    #[prost(uint32, tag = "7")]
    pub policy: u32,
    /// 0: no deadline.
    #[prost(uint64, tag = "8")]
    pub starting_deadline_ms: u64,
    #[prost(bool, tag = "9")]
    pub suspended: bool,
    #[prost(uint64, tag = "10")]
    pub created_ms: u64,
    /// The scheduled time of the last tick handled (run, skipped, missed or failed),
    /// or the creation time before the first: ticks after it are due.
    #[prost(uint64, tag = "11")]
    pub last_tick_ms: u64,
    /// The items the last tick that enqueued enqueued.
    #[prost(uint64, repeated, tag = "12")]
    pub last_items: Vec<u64>,
    /// The most recent runs first.
    #[prost(message, repeated, tag = "13")]
    pub runs: Vec<RunRecord>,
    #[prost(uint64, tag = "14")]
    pub enqueued_runs: u64,
    #[prost(uint64, tag = "15")]
    pub skipped_runs: u64,
    #[prost(uint64, tag = "16")]
    pub missed_runs: u64,
    #[prost(uint64, tag = "17")]
    pub failed_runs: u64,
}

/// One tick of a schedule, as `ScheduleRun` in workq.proto.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RunRecord {
    #[prost(uint64, tag = "1")]
    pub scheduled_ms: u64,
    #[prost(uint64, tag = "2")]
    pub ran_ms: u64,
    /// As `RunOutcome` in workq.proto.
    #[prost(uint32, tag = "3")]
    pub outcome: u32,
    #[prost(uint32, tag = "4")]
    pub items: u32,
    #[prost(uint32, tag = "5")]
    pub replaced: u32,
    #[prost(string, tag = "6")]
    pub detail: String,
}

/// Appends `item`'s record to `buf`: the same bytes as
/// `ItemRecord::from_item(queue, item).encode_to_vec()`, without copying the payload
/// and strings into an `ItemRecord` first (this runs for every change in strict mode
/// and for every item in a snapshot). Fields in tag order, defaults left out, as prost
/// does.
pub fn encode_item(queue: &str, item: ItemView<'_>, buf: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    fn varint(tag: u32, value: u64, buf: &mut Vec<u8>) {
        if value != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(value, buf);
        }
    }
    fn bytes(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
        if !value.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(value.len() as u64, buf);
            buf.extend_from_slice(value);
        }
    }
    let (lease, outcome) = (item.lease, item.outcome);
    bytes(1, queue.as_bytes(), buf);
    varint(2, item.id, buf);
    varint(3, u64::from(item.state.code()), buf);
    bytes(4, item.payload, buf);
    // int32: negative values are sign-extended to 64 bits.
    varint(5, i64::from(item.priority) as u64, buf);
    bytes(6, item.key.as_bytes(), buf);
    varint(7, u64::from(item.attempts), buf);
    varint(8, item.enqueued_ms, buf);
    varint(9, item.ready_at_ms, buf);
    varint(10, lease.map_or(0, |l| l.token), buf);
    varint(11, lease.map_or(0, |l| l.deadline_ms), buf);
    varint(12, lease.map_or(0, |l| l.timeout_ms), buf);
    bytes(13, lease.map_or(&[][..], |l| l.worker.as_bytes()), buf);
    varint(14, outcome.map_or(0, |o| o.done_token), buf);
    varint(15, outcome.map_or(0, |o| o.done_ms), buf);
    bytes(16, outcome.map_or(&[][..], |o| &o.result), buf);
    bytes(
        17,
        outcome.map_or(&[][..], |o| o.last_error.as_bytes()),
        buf,
    );
    bytes(18, outcome.map_or(&[][..], |o| o.worker.as_bytes()), buf);
}

impl ItemRecord {
    /// The record of `item` (the slow, copying twin of [`encode_item`]).
    #[cfg(test)]
    pub fn from_item(queue: &str, item: &Item) -> Self {
        let lease = item.lease.as_ref();
        ItemRecord {
            queue: queue.to_string(),
            id: item.id,
            state: u32::from(item.state.code()),
            payload: item.payload.clone(),
            priority: item.priority,
            key: item.key.clone(),
            attempts: item.attempts,
            enqueued_ms: item.enqueued_ms,
            ready_at_ms: item.ready_at_ms,
            lease_token: lease.map_or(0, |l| l.token),
            lease_deadline_ms: lease.map_or(0, |l| l.deadline_ms),
            lease_timeout_ms: lease.map_or(0, |l| l.timeout_ms),
            lease_worker: lease.map_or_else(String::new, |l| l.worker.to_string()),
            done_token: item.done_token(),
            done_ms: item.done_ms(),
            result: item.result().to_vec(),
            last_error: item.last_error().to_string(),
            worker: item.worker().to_string(),
        }
    }

    /// Back to an engine item; `None` for a record with an unknown state.
    pub fn into_item(self) -> Option<Item> {
        let state = State::from_code(self.state)?;
        let lease = (state == State::Leased).then(|| {
            Box::new(LeaseInfo {
                token: self.lease_token,
                deadline_ms: self.lease_deadline_ms,
                timeout_ms: self.lease_timeout_ms,
                worker: self.lease_worker.into(),
            })
        });
        let outcome = Outcome {
            worker: self.worker.into(),
            done_token: self.done_token,
            done_ms: self.done_ms,
            result: self.result,
            last_error: self.last_error,
        };
        Some(Item {
            id: self.id,
            state,
            payload: self.payload,
            priority: self.priority,
            key: self.key,
            attempts: self.attempts,
            enqueued_ms: self.enqueued_ms,
            ready_at_ms: self.ready_at_ms,
            lease,
            outcome: (outcome != Outcome::default()).then(|| Box::new(outcome)),
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn items() -> Vec<Item> {
        let plain = Item {
            id: 7,
            state: State::Ready,
            payload: b"payload".to_vec(),
            priority: 0,
            key: String::new(),
            attempts: 0,
            enqueued_ms: 1_700_000_000_000,
            ready_at_ms: 1_700_000_000_000,
            lease: None,
            outcome: None,
        };
        let leased = Item {
            id: u64::MAX,
            state: State::Leased,
            priority: -3,
            key: "dedup-key".into(),
            attempts: 2,
            lease: Some(Box::new(LeaseInfo {
                token: 99,
                deadline_ms: 5,
                timeout_ms: 30_000,
                worker: "worker-ü".into(),
            })),
            outcome: Some(Box::new(Outcome {
                worker: "w".into(),
                last_error: "boom".into(),
                ..Outcome::default()
            })),
            ..plain.clone()
        };
        let done = Item {
            state: State::Done,
            priority: i32::MAX,
            payload: Vec::new(),
            outcome: Some(Box::new(Outcome {
                worker: "w2".into(),
                done_token: 12,
                done_ms: 13,
                result: vec![0, 1, 2],
                last_error: String::new(),
            })),
            ..plain.clone()
        };
        vec![plain, leased, done, dead()]
    }

    fn dead() -> Item {
        Item {
            id: 1,
            state: State::Dead,
            payload: vec![0xff; 300],
            priority: i32::MIN,
            key: String::new(),
            attempts: u32::MAX,
            enqueued_ms: 0,
            ready_at_ms: 0,
            lease: None,
            outcome: None,
        }
    }

    #[test]
    fn direct_encoding_matches_prost_byte_for_byte_and_decodes_back() {
        for item in items() {
            let mut direct = Vec::new();
            encode_item("queue", item.view(), &mut direct);
            let record = ItemRecord::from_item("queue", &item);
            assert_eq!(direct, record.encode_to_vec(), "{item:?}");
            let decoded = ItemRecord::decode(&direct[..]).unwrap();
            assert_eq!(decoded, record);
            assert_eq!(decoded.into_item().unwrap(), item);
        }
    }
}
