//! Where a queue keeps its items: one allocation per item, sized to it.
//!
//! A queue may hold millions of items, nearly all of them READY with nothing but a
//! payload, a few numbers and perhaps a dedup key. So an item's record is a small
//! fixed header followed by its key and its payload, in one `Box<[u8]>`, and the
//! records sit in a hash table whose bucket is the item's id beside the record's
//! pointer and length ([`Items`]): finding an item, telling apart two ids that share a
//! tag and moving buckets when the table grows all read the bucket alone, never a
//! record. A large queue's table is 256 tables that grow one at a time, so growing
//! never stops the queue for long. What only items that were leased have (a live
//! lease, what past deliveries left) is a boxed [`Extras`] in a slab, its slot's
//! number in the record's header (0 for the many items without): reaching it is an
//! array index, not a second hash lookup. Dedup keys are indexed by [`Keys`]. The
//! engine reads items through [`ItemView`], which an owned [`Item`] also gives, so
//! encoding and the APIs have one shape to read.
//!
//! Memory at a million queued 64-byte items, per item: the record (33 + 64 bytes, a
//! 112-byte allocation with glibc's header and rounding), the table's bucket (24 bytes
//! and a control byte, the table being between seven sixteenths and seven eighths
//! full: ~52 bytes at a million), and the ready index (an 8-byte id in a deque that
//! grows by doubling, 8 to 16): ~173 bytes, where a struct with its own payload `Vec`,
//! boxed in a `HashMap` by id, took ~250. A key adds its length to the record and a
//! 16-byte entry in [`Keys`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault};

use super::split::Split;

use super::queue::{IdHasher, Item, LeaseInfo, Outcome, State};

/// The parts of an item only some items have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extras {
    /// Set while LEASED, and only then.
    pub lease: Option<LeaseInfo>,
    /// `None` until the item is first leased.
    pub outcome: Option<Outcome>,
}

impl Extras {
    /// The item's outcome, created at the first delivery.
    pub fn outcome_mut(&mut self) -> &mut Outcome {
        self.outcome.get_or_insert_with(Outcome::default)
    }

    fn is_empty(&self) -> bool {
        self.lease.is_none() && self.outcome.is_none()
    }

    fn boxed(self) -> Option<Box<Extras>> {
        (!self.is_empty()).then(|| Box::new(self))
    }
}

fn extras_slot(record: &[u8]) -> u32 {
    u32::from_le_bytes(record[EXTRAS..EXTRAS + 4].try_into().expect("4"))
}

fn set_extras_slot(record: &mut [u8], slot: u32) {
    record[EXTRAS..EXTRAS + 4].copy_from_slice(&slot.to_le_bytes());
}

/// The extras of the items that have any, by slot number; slot 0 is never used, so 0
/// in a record means "none". Freed slots are reused.
#[derive(Default)]
struct ExtrasSlab {
    slots: Vec<Option<Box<Extras>>>,
    free: Vec<u32>,
}

impl ExtrasSlab {
    fn add(&mut self, extras: Box<Extras>) -> u32 {
        if let Some(slot) = self.free.pop() {
            self.slots[slot as usize] = Some(extras);
            return slot;
        }
        if self.slots.is_empty() {
            self.slots.push(None);
        }
        self.slots.push(Some(extras));
        u32::try_from(self.slots.len() - 1).expect("fewer than 4 billion items with extras")
    }

    fn get(&self, slot: u32) -> Option<&Extras> {
        self.slots.get(slot as usize)?.as_deref()
    }

    fn get_mut(&mut self, slot: u32) -> Option<&mut Extras> {
        self.slots.get_mut(slot as usize)?.as_deref_mut()
    }

    fn take(&mut self, slot: u32) -> Option<Box<Extras>> {
        let extras = self.slots.get_mut(slot as usize)?.take();
        if extras.is_some() {
            self.free.push(slot);
        }
        extras
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

/// An item's fixed-size fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub state: State,
    pub priority: i32,
    /// Deliveries that counted (a release gives one back).
    pub attempts: u32,
    pub enqueued_ms: u64,
    /// When a DELAYED item becomes READY.
    pub ready_at_ms: u64,
}

// The record's layout: the header's fields little-endian at these offsets, then the
// dedup key (`KEY_LEN` bytes, UTF-8; none for most items), then the payload. The id is
// in the table's bucket ([`Slot`]). The key never changes once the item is made.
const STATE: usize = 0;
const PRIORITY: usize = 1;
const ATTEMPTS: usize = 5;
const ENQUEUED: usize = 9;
const READY_AT: usize = 17;
/// u32: the item's slot in the extras slab; 0 = no extras.
const EXTRAS: usize = 25;
/// u32: the key's length (keys are at most 512 bytes when enqueued, but a record read
/// back from storage is taken as it is).
const KEY_LEN: usize = 29;
const HEADER_LEN: usize = 33;

fn key_len(record: &[u8]) -> usize {
    u32::from_le_bytes(record[KEY_LEN..KEY_LEN + 4].try_into().expect("4")) as usize
}

fn record_key(record: &[u8]) -> &str {
    match key_len(record) {
        0 => "",
        len => std::str::from_utf8(&record[HEADER_LEN..HEADER_LEN + len])
            .expect("keys are stored from a str"),
    }
}

fn record_payload(record: &[u8]) -> &[u8] {
    &record[HEADER_LEN + key_len(record)..]
}

impl Header {
    fn read(record: &[u8]) -> Header {
        let u32_at = |at: usize| u32::from_le_bytes(record[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().expect("8"));
        Header {
            state: State::from_code(record[STATE].into())
                .expect("records are only written by Header::write"),
            priority: u32_at(PRIORITY) as i32,
            attempts: u32_at(ATTEMPTS),
            enqueued_ms: u64_at(ENQUEUED),
            ready_at_ms: u64_at(READY_AT),
        }
    }

    /// Writes the header into the front of `record`.
    fn write(&self, record: &mut [u8]) {
        record[STATE] = self.state.code();
        record[PRIORITY..PRIORITY + 4].copy_from_slice(&self.priority.to_le_bytes());
        record[ATTEMPTS..ATTEMPTS + 4].copy_from_slice(&self.attempts.to_le_bytes());
        record[ENQUEUED..ENQUEUED + 8].copy_from_slice(&self.enqueued_ms.to_le_bytes());
        record[READY_AT..READY_AT + 8].copy_from_slice(&self.ready_at_ms.to_le_bytes());
    }
}

/// An item as the engine reads it: borrowed from a queue's storage ([`Items::get`]) or
/// from an owned [`Item`] ([`Item::view`]).
#[derive(Clone, Copy, Debug)]
pub struct ItemView<'a> {
    pub id: u64,
    pub state: State,
    pub priority: i32,
    pub attempts: u32,
    pub enqueued_ms: u64,
    pub ready_at_ms: u64,
    pub payload: &'a [u8],
    pub key: &'a str,
    pub lease: Option<&'a LeaseInfo>,
    pub outcome: Option<&'a Outcome>,
}

impl<'a> ItemView<'a> {
    fn new(id: u64, record: &'a [u8], extras: Option<&'a Extras>) -> ItemView<'a> {
        let header = Header::read(record);
        ItemView {
            id,
            state: header.state,
            priority: header.priority,
            attempts: header.attempts,
            enqueued_ms: header.enqueued_ms,
            ready_at_ms: header.ready_at_ms,
            payload: record_payload(record),
            key: record_key(record),
            lease: extras.and_then(|e| e.lease.as_ref()),
            outcome: extras.and_then(|e| e.outcome.as_ref()),
        }
    }

    /// The worker that last held the item.
    pub fn worker(&self) -> &'a str {
        self.outcome.map_or("", |o| &*o.worker)
    }

    pub fn done_token(&self) -> u64 {
        self.outcome.map_or(0, |o| o.done_token)
    }

    pub fn done_ms(&self) -> u64 {
        self.outcome.map_or(0, |o| o.done_ms)
    }

    pub fn result(&self) -> &'a [u8] {
        self.outcome.map_or(&[], |o| o.result.as_slice())
    }

    pub fn last_error(&self) -> &'a str {
        self.outcome.map_or("", |o| o.last_error.as_str())
    }

    /// An owned copy.
    pub fn to_item(&self) -> Item {
        self.copy(true)
    }

    /// An owned copy whose payload and result are left empty, not copied.
    pub fn to_item_without_payloads(&self) -> Item {
        self.copy(false)
    }

    fn copy(&self, payloads: bool) -> Item {
        let bytes = |b: &[u8]| if payloads { b.to_vec() } else { Vec::new() };
        Item {
            id: self.id,
            state: self.state,
            payload: bytes(self.payload),
            priority: self.priority,
            key: self.key.to_string(),
            attempts: self.attempts,
            enqueued_ms: self.enqueued_ms,
            ready_at_ms: self.ready_at_ms,
            lease: self.lease.map(|l| Box::new(l.clone())),
            outcome: self.outcome.map(|o| {
                Box::new(Outcome {
                    worker: o.worker.clone(),
                    done_token: o.done_token,
                    done_ms: o.done_ms,
                    result: bytes(&o.result),
                    last_error: o.last_error.clone(),
                })
            }),
        }
    }
}

/// Where an item's bucket is: ids come from one counter, so a batch enqueued together
/// has consecutive ids, and leases and acks take them in that order. Each run of 64
/// ids gets one well-mixed start and the ids of the run follow it, so a lease of 100
/// items touches a few runs of neighbouring buckets instead of 100 random cache
/// lines. The table's tag (the top 7 bits) comes from the whole id, so the ids of one
/// run still tell apart by their control bytes, without reading their buckets.
fn hash_id(id: u64) -> u64 {
    const TAG: u64 = 0xFE00_0000_0000_0000;
    let mixed = |value: u64| BuildHasherDefault::<IdHasher>::default().hash_one(value);
    let position = mixed(id >> 6).wrapping_add(id & 63);
    (position & !TAG) | (mixed(id) & TAG)
}

/// An item in its stored form, not yet in a queue: what recovery reads a snapshot
/// into, so a restart builds each item once, in the shape the queue keeps.
#[derive(Debug)]
pub struct Stored {
    id: u64,
    record: Box<[u8]>,
    extras: Option<Box<Extras>>,
}

impl Stored {
    pub fn new(item: Item) -> Stored {
        let header = Header {
            state: item.state,
            priority: item.priority,
            attempts: item.attempts,
            enqueued_ms: item.enqueued_ms,
            ready_at_ms: item.ready_at_ms,
        };
        let extras = Extras {
            lease: item.lease.map(|l| *l),
            outcome: item.outcome.map(|o| *o),
        };
        Stored {
            id: item.id,
            record: encode_record(header, &item.key, &item.payload),
            extras: extras.boxed(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn view(&self) -> ItemView<'_> {
        ItemView::new(self.id, &self.record, self.extras.as_deref())
    }
}

/// A record without extras (slot 0). Allocated at its exact size and written once:
/// no zeroing first, no regrowth.
fn encode_record(header: Header, key: &str, payload: &[u8]) -> Box<[u8]> {
    let mut head = [0u8; HEADER_LEN];
    header.write(&mut head);
    let key_len = u32::try_from(key.len()).expect("a record is under 4 GiB");
    head[KEY_LEN..KEY_LEN + 4].copy_from_slice(&key_len.to_le_bytes());
    let mut record = Vec::with_capacity(HEADER_LEN + key.len() + payload.len());
    record.extend_from_slice(&head);
    record.extend_from_slice(key.as_bytes());
    record.extend_from_slice(payload);
    record.into_boxed_slice()
}

/// A bucket of the item table: the id beside its record, so that probing, comparing
/// and rehashing never read a record (each would be a cache miss at a random address).
struct Slot {
    id: u64,
    record: Box<[u8]>,
}

fn slot_hash(slot: &Slot) -> u64 {
    hash_id(slot.id)
}

/// A queue's items by id, in tables that grow a share at a time (see [`Split`]).
#[derive(Default)]
pub struct Items {
    records: Split<Slot>,
    extras: ExtrasSlab,
}

impl Items {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn reserve(&mut self, additional: usize) {
        self.records.reserve(additional, slot_hash);
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.records.iter().map(|slot| slot.id)
    }

    pub fn get(&self, id: u64) -> Option<ItemView<'_>> {
        self.slot(id).map(|slot| self.view(slot))
    }

    pub fn iter(&self) -> impl Iterator<Item = ItemView<'_>> + '_ {
        self.records.iter().map(|slot| self.view(slot))
    }

    pub fn header(&self, id: u64) -> Option<Header> {
        self.record(id).map(Header::read)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<ItemMut<'_>> {
        let Items { records, extras } = self;
        let slot = records.find_mut(hash_id(id), |s| s.id == id)?;
        Some(ItemMut {
            id,
            record: &mut slot.record,
            slab: extras,
        })
    }

    /// Adds an item with its extras (replacing one with the same id): how tests build
    /// items. The engine adds them with [`Items::insert_new`] (enqueue) and
    /// [`Items::insert_stored`] (recovery).
    #[cfg(test)]
    pub fn insert(&mut self, id: u64, header: Header, key: &str, payload: &[u8], extras: Extras) {
        self.insert_stored(Stored {
            id,
            record: encode_record(header, key, payload),
            extras: extras.boxed(),
        });
    }

    /// Adds an item under a fresh id, one no item of this queue has.
    pub fn insert_new(&mut self, id: u64, header: Header, key: &str, payload: &[u8]) {
        debug_assert!(self.get(id).is_none(), "id {id} is not fresh");
        let record = encode_record(header, key, payload);
        self.records
            .insert_unique(hash_id(id), Slot { id, record }, slot_hash);
    }

    /// Adds an item built earlier (replacing one with the same id).
    pub fn insert_stored(&mut self, stored: Stored) {
        let Stored {
            id,
            mut record,
            extras,
        } = stored;
        if let Some(extras) = extras {
            set_extras_slot(&mut record, self.extras.add(extras));
        }
        let slot = Slot { id, record };
        if let Some(old) = self
            .records
            .insert(hash_id(id), slot, |s| s.id == id, slot_hash)
        {
            self.extras.take(extras_slot(&old.record));
        }
    }

    /// Takes an item out; `None` when there was no such item.
    pub fn remove(&mut self, id: u64) -> Option<Stored> {
        let slot = self.records.remove(hash_id(id), |s| s.id == id)?;
        let extras = self.extras.take(extras_slot(&slot.record));
        Some(Stored {
            id,
            record: slot.record,
            extras,
        })
    }

    /// Every record's extras slot holds its extras, the slab holds nothing else, and
    /// the tables are in order.
    #[cfg(test)]
    pub fn check(&self) {
        let mut with_extras = 0;
        for Slot { id, record } in self.records.iter() {
            let slot = extras_slot(record);
            if slot != 0 {
                assert!(
                    self.extras.get(slot).is_some(),
                    "item {id}: empty slot {slot}"
                );
                with_extras += 1;
            }
        }
        assert_eq!(self.extras.len(), with_extras, "extras without an item");
        self.records.check(slot_hash);
    }

    fn slot(&self, id: u64) -> Option<&Slot> {
        self.records.find(hash_id(id), |s| s.id == id)
    }

    fn record(&self, id: u64) -> Option<&[u8]> {
        self.slot(id).map(|s| &*s.record)
    }

    fn view<'a>(&'a self, slot: &'a Slot) -> ItemView<'a> {
        let extras = self.extras.get(extras_slot(&slot.record));
        ItemView::new(slot.id, &slot.record, extras)
    }
}

/// A queue's dedup keys: each key's hash beside the id of the item that carries it,
/// 16 bytes a key. The key itself is kept once, in the item's record, and is read
/// only to confirm a match of the full 64-bit hash, so adding a new key reads no item
/// and growing the tables moves hashes and ids without hashing a key again. The hash
/// is SipHash with this queue's own random keys: clients choose the keys.
#[derive(Default)]
pub struct Keys<S = std::hash::RandomState> {
    hasher: S,
    entries: Split<(u64, u64)>,
}

fn key_entry_hash(entry: &(u64, u64)) -> u64 {
    entry.0
}

/// Whether an entry is `key`'s: its hash matches in full and its item carries the key.
fn carries<'a>(hash: u64, key: &'a str, items: &'a Items) -> impl Fn(&(u64, u64)) -> bool + 'a {
    move |&(h, id)| h == hash && items.get(id).is_some_and(|item| item.key == key)
}

/// The hash of a key no item carries, from [`Keys::find`], to add it with
/// [`Keys::add`] without hashing it again.
#[derive(Clone, Copy)]
pub struct FreeKey(u64);

impl<S: BuildHasher> Keys<S> {
    /// The item that carries `key`.
    pub fn get(&self, key: &str, items: &Items) -> Option<u64> {
        self.find(key, items).ok()
    }

    /// The item that carries `key`, or the key's hash when none does.
    pub fn find(&self, key: &str, items: &Items) -> Result<u64, FreeKey> {
        let hash = self.hasher.hash_one(key);
        match self.entries.find(hash, carries(hash, key, items)) {
            Some(&(_, id)) => Ok(id),
            None => Err(FreeKey(hash)),
        }
    }

    /// Gives a key [`Keys::find`] found free to item `id` (no other change may come
    /// between the two).
    pub fn add(&mut self, key: FreeKey, id: u64) {
        let FreeKey(hash) = key;
        self.entries.insert_unique(hash, (hash, id), key_entry_hash);
    }

    /// Makes `id` the item that carries `key`, in place of any other (recovery). The
    /// items already keyed must be in `items`; item `id` need not be yet.
    pub fn insert(&mut self, key: &str, id: u64, items: &Items) {
        let hash = self.hasher.hash_one(key);
        self.entries
            .insert(hash, (hash, id), carries(hash, key, items), key_entry_hash);
    }

    /// Forgets `key` if item `id` is the one that carries it. Reads no item, so it
    /// works after the item is gone.
    pub fn remove(&mut self, key: &str, id: u64) {
        let hash = self.hasher.hash_one(key);
        self.entries.remove(hash, |&entry| entry == (hash, id));
    }

    /// Every key maps to an item that carries it.
    #[cfg(test)]
    pub fn check(&self, items: &Items) {
        for &(hash, id) in self.entries.iter() {
            let item = items.get(id).expect("keyed item exists");
            assert_eq!(self.hasher.hash_one(item.key), hash, "item {id}: key");
        }
        self.entries.check(key_entry_hash);
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.entries.len()
    }
}

/// One stored item, open for change.
pub struct ItemMut<'a> {
    id: u64,
    record: &'a mut Box<[u8]>,
    slab: &'a mut ExtrasSlab,
}

impl ItemMut<'_> {
    pub fn header(&self) -> Header {
        Header::read(self.record)
    }

    pub fn set_header(&mut self, header: Header) {
        header.write(self.record);
    }

    /// Reads the header, lets `change` edit it and writes it back; returns the result.
    pub fn update(&mut self, change: impl FnOnce(&mut Header)) -> Header {
        let mut header = self.header();
        change(&mut header);
        self.set_header(header);
        header
    }

    pub fn payload(&self) -> &[u8] {
        record_payload(self.record)
    }

    pub fn key(&self) -> &str {
        record_key(self.record)
    }

    pub fn extras(&self) -> Option<&Extras> {
        self.slab.get(extras_slot(self.record))
    }

    /// The item's extras, created empty when it has none yet.
    pub fn extras_mut(&mut self) -> &mut Extras {
        let mut slot = extras_slot(self.record);
        if self.slab.get(slot).is_none() {
            slot = self.slab.add(Box::default());
            set_extras_slot(self.record, slot);
        }
        self.slab.get_mut(slot).expect("added above")
    }

    /// The view of the item as it is now.
    pub fn view(&self) -> ItemView<'_> {
        ItemView::new(self.id, self.record, self.extras())
    }
}

/// READY items in lease order: highest priority first, then lowest id (FIFO). One
/// `Level` per priority, so an entry is the 8-byte id alone.
#[derive(Default)]
pub struct ReadyIndex {
    levels: BTreeMap<Reverse<i32>, Level>,
    len: usize,
}

impl ReadyIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn insert(&mut self, priority: i32, id: u64) {
        if self.levels.entry(Reverse(priority)).or_default().insert(id) {
            self.len += 1;
        }
    }

    /// The next item to lease, taken out of the index.
    pub fn pop_first(&mut self) -> Option<u64> {
        let mut level = self.levels.first_entry()?;
        let id = level
            .get_mut()
            .pop_first()
            .expect("levels are never left empty");
        if level.get().is_empty() {
            level.remove();
        }
        self.len -= 1;
        Some(id)
    }

    pub fn clear(&mut self) {
        self.levels.clear();
        self.len = 0;
    }

    /// Takes `id` (of `priority`) out of the index; false if it was not in it.
    pub fn remove(&mut self, priority: i32, id: u64) -> bool {
        let std::collections::btree_map::Entry::Occupied(mut level) =
            self.levels.entry(Reverse(priority))
        else {
            return false;
        };
        if !level.get_mut().remove(id) {
            return false;
        }
        if level.get().is_empty() {
            level.remove();
        }
        self.len -= 1;
        true
    }

    /// Ids in lease order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.levels.values().flat_map(Level::iter)
    }

    /// The READY item enqueued first: the smallest id over all priority levels.
    pub fn oldest(&self) -> Option<u64> {
        self.levels.values().filter_map(Level::first).min()
    }

    #[cfg(test)]
    pub fn contains(&self, priority: i32, id: u64) -> bool {
        self.levels
            .get(&Reverse(priority))
            .is_some_and(|level| level.iter().any(|i| i == id))
    }
}

/// One priority level's ids, in ascending order over both parts. A new item's id is
/// larger than any before it, so nearly every insert appends to `fresh`, a sorted
/// deque (no tree walk, 8 bytes an id); an id put back (released, failed, expired) is
/// usually older than the deque's last and goes to `returned`, a B-tree. The next id
/// is the smaller of the two fronts.
#[derive(Default)]
struct Level {
    fresh: VecDeque<u64>,
    returned: BTreeSet<u64>,
}

impl Level {
    /// Capacity a draining deque keeps at least before it gives memory back.
    const KEEP: usize = 1024;

    fn is_empty(&self) -> bool {
        self.fresh.is_empty() && self.returned.is_empty()
    }

    /// False if `id` is already here.
    fn insert(&mut self, id: u64) -> bool {
        match self.fresh.back() {
            Some(&last) if id <= last => {
                self.fresh.binary_search(&id).is_err() && self.returned.insert(id)
            }
            _ => {
                if self.returned.contains(&id) {
                    return false;
                }
                self.fresh.push_back(id);
                true
            }
        }
    }

    /// False if `id` is not here. Linear in the deque: for rare removals by id.
    fn remove(&mut self, id: u64) -> bool {
        match self.fresh.binary_search(&id) {
            Ok(at) => self.fresh.remove(at).is_some(),
            Err(_) => self.returned.remove(&id),
        }
    }

    fn first(&self) -> Option<u64> {
        match (self.fresh.front(), self.returned.first()) {
            (Some(&a), Some(&b)) => Some(a.min(b)),
            (a, b) => a.or(b).copied(),
        }
    }

    fn pop_first(&mut self) -> Option<u64> {
        let from_fresh = match (self.fresh.front(), self.returned.first()) {
            (Some(a), Some(b)) => a < b,
            (a, _) => a.is_some(),
        };
        if !from_fresh {
            return self.returned.pop_first();
        }
        let id = self.fresh.pop_front();
        // A drained deque gives back what a burst grew it to.
        if self.fresh.capacity() > Self::KEEP && self.fresh.len() * 4 < self.fresh.capacity() {
            self.fresh.shrink_to((self.fresh.len() * 2).max(Self::KEEP));
        }
        id
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let mut fresh = self.fresh.iter().copied().peekable();
        let mut returned = self.returned.iter().copied().peekable();
        std::iter::from_fn(move || match (fresh.peek(), returned.peek()) {
            (Some(a), Some(b)) if b < a => returned.next(),
            (Some(_), _) => fresh.next(),
            (None, _) => returned.next(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::split;

    fn header(state: State) -> Header {
        Header {
            state,
            priority: -7,
            attempts: 3,
            enqueued_ms: 1_700_000_000_123,
            ready_at_ms: u64::MAX - 1,
        }
    }

    #[test]
    fn records_round_trip_every_field_and_state() {
        let mut items = Items::default();
        for (id, state) in [
            State::Ready,
            State::Delayed,
            State::Leased,
            State::Done,
            State::Dead,
        ]
        .into_iter()
        .enumerate()
        {
            items.insert(id as u64, header(state), "", b"payload", Extras::default());
            assert_eq!(items.header(id as u64), Some(header(state)));
        }
        let view = items.get(2).unwrap();
        assert_eq!(view.payload, b"payload");
        assert_eq!((view.key, view.lease, view.outcome), ("", None, None));
        assert_eq!(items.len(), 5);
    }

    #[test]
    fn a_record_is_a_small_header_the_key_and_the_payload() {
        let mut items = Items::default();
        items.insert(7, header(State::Ready), "", &[5; 64], Extras::default());
        let record = items.record(7).unwrap();
        assert_eq!(record.len(), HEADER_LEN + 64);
        // glibc serves up to 104 bytes from a 112-byte chunk: a 64-byte payload fits.
        assert_eq!(extras_slot(record), 0, "no extras");
        assert!(record.len() <= 104, "record grew to {} bytes", record.len());
        assert_eq!(items.get(7).unwrap().id, 7);
        assert_eq!(
            std::mem::size_of::<Slot>(),
            24,
            "a bucket is the id and a box"
        );
        // A key goes between the header and the payload, and needs no extras.
        let key = "k".repeat(crate::engine::limits::MAX_KEY_BYTES);
        items.insert(8, header(State::Done), &key, b"pay", Extras::default());
        let view = items.get(8).unwrap();
        assert_eq!(
            (view.key, view.payload, view.state),
            (&*key, &b"pay"[..], State::Done)
        );
        assert_eq!(items.record(8).unwrap().len(), HEADER_LEN + key.len() + 3);
        assert_eq!(items.extras.len(), 0, "a key is not an extra");
        let mut item = items.get_mut(8).unwrap();
        item.update(|h| h.attempts = 2);
        assert_eq!((item.key(), item.payload()), (&*key, &b"pay"[..]));
        assert_eq!(items.remove(8).unwrap().view().key, key);
        // A record read back from storage is taken as it is, even past the limit.
        let long = "x".repeat(70_000);
        items.insert(9, header(State::Ready), &long, b"p", Extras::default());
        assert_eq!(items.get(9).unwrap().key, long);
    }

    #[test]
    fn extras_are_made_only_for_items_that_need_them() {
        let mut items = Items::default();
        items.insert(1, header(State::Ready), "", b"", Extras::default());
        let done = Outcome {
            worker: "v".into(),
            ..Outcome::default()
        };
        items.insert(
            2,
            header(State::Done),
            "k",
            b"x",
            Extras {
                outcome: Some(done),
                ..Extras::default()
            },
        );
        assert_eq!(
            items.extras.len(),
            1,
            "only the item with an outcome has extras"
        );
        assert_eq!(items.get(2).unwrap().worker(), "v");

        let mut item = items.get_mut(1).unwrap();
        assert!(item.extras().is_none());
        item.extras_mut().outcome_mut().worker = "w".into();
        item.update(|h| h.attempts = 9);
        let view = items.get(1).unwrap();
        assert_eq!((view.worker(), view.attempts), ("w", 9));
        assert_eq!(view.payload, b"", "an update leaves the payload alone");

        assert_eq!(items.remove(1).unwrap().view().worker(), "w");
        let removed = items.remove(2).unwrap();
        assert_eq!((removed.view().key, removed.view().worker()), ("k", "v"));
        assert!(items.remove(2).is_none());
        assert_eq!((items.len(), items.extras.len()), (0, 0));
        assert_eq!(items.extras.free.len(), 2, "both slots can be reused");
        let lease = LeaseInfo {
            token: 1,
            deadline_ms: 2,
            timeout_ms: 3,
            worker: "x".into(),
        };
        items.insert(
            3,
            header(State::Leased),
            "again",
            b"",
            Extras {
                lease: Some(lease),
                ..Extras::default()
            },
        );
        assert_eq!(items.get(3).unwrap().key, "again");
        assert_eq!(items.extras.slots.len(), 3, "a freed slot was reused");
    }

    #[test]
    fn ids_of_a_run_are_neighbours_yet_strided_ids_spread() {
        let position = |id: u64| hash_id(id) & 0xFFFF;
        for id in 64..127 {
            assert_eq!(position(id + 1), (position(id) + 1) & 0xFFFF, "id {id}");
        }
        let tags: std::collections::HashSet<u64> = (64..128).map(|id| hash_id(id) >> 57).collect();
        assert!(tags.len() > 30, "one run's tags differ: {}", tags.len());
        // One queue's ids when 1,024 queues take turns: still over the whole table.
        let buckets: std::collections::HashSet<u64> =
            (0..1024u64).map(|k| hash_id(k * 1024) & 1023).collect();
        assert!(
            buckets.len() > 550,
            "only {} of 1024 buckets",
            buckets.len()
        );
    }

    /// Items through the split into many tables (see `split`): records, extras and
    /// keys checked against a map, with ids in runs with gaps as when queues share the
    /// id counter.
    #[test]
    fn items_match_a_map_through_the_split_into_tables() {
        let mut random = crate::engine::test_random();
        let mut items = Items::default();
        // id -> (payload byte, key, has an outcome)
        let mut model: std::collections::HashMap<u64, (u8, String, bool)> = Default::default();
        let mut next_id = 1u64 << 32;
        for step in 0..40_000u64 {
            match random(10) {
                0..6 => {
                    next_id += 1 + random(3) * random(2) * 60;
                    let key = match random(5) {
                        0 => format!("k{next_id}"),
                        _ => String::new(),
                    };
                    items.insert(
                        next_id,
                        header(State::Ready),
                        &key,
                        &[step as u8],
                        Extras::default(),
                    );
                    model.insert(next_id, (step as u8, key, false));
                }
                6 if !model.is_empty() => {
                    let id = next_id - random(next_id.min(5_000));
                    if let Some((_, key, _)) = model.get(&id) {
                        let key = key.clone();
                        let extras = Extras {
                            outcome: Some(Outcome::default()),
                            ..Extras::default()
                        };
                        items.insert(id, header(State::Done), &key, &[7], extras);
                        model.insert(id, (7, key, true));
                    }
                }
                _ => {
                    let id = next_id - random(next_id.min(50_000));
                    assert_eq!(items.remove(id).is_some(), model.remove(&id).is_some());
                }
            }
            if step % 4_999 == 0 {
                items.check();
            }
        }
        assert_eq!(items.records.tables().len(), split::SHARDS, "split");
        items.check();
        assert_eq!(items.len(), model.len());
        for (&id, (byte, key, done)) in &model {
            let view = items.get(id).unwrap();
            let expected = (&[*byte][..], key.as_str(), *done);
            assert_eq!((view.payload, view.key, view.outcome.is_some()), expected);
        }
        let mut ids: Vec<u64> = items.ids().collect();
        ids.sort_unstable();
        let mut expected: Vec<u64> = model.keys().copied().collect();
        expected.sort_unstable();
        assert_eq!(ids, expected);
    }

    /// Keys through the split into many tables: lookups, a key freed when its item
    /// goes (and taken again), a key moved to another item, against a map.
    #[test]
    fn keys_match_a_map_through_the_split_into_tables() {
        let mut random = crate::engine::test_random();
        let (mut items, mut keys) = (Items::default(), Keys::<std::hash::RandomState>::default());
        let mut model: std::collections::HashMap<String, u64> = Default::default();
        for id in 1..=30_000u64 {
            let key = format!("key-{}", random(20_000));
            match model.get(&key) {
                Some(&carrier) => {
                    assert_eq!(keys.get(&key, &items), Some(carrier), "dedup {key}");
                    if random(2) == 0 {
                        // The carrier goes: its key is free for the next item.
                        let removed = items.remove(carrier).unwrap();
                        keys.remove(removed.view().key, carrier);
                        model.remove(&key);
                        assert_eq!(keys.get(&key, &items), None);
                    }
                }
                None => {
                    // As an enqueue adds a key: found free, then given to the new item.
                    let Err(free) = keys.find(&key, &items) else {
                        panic!("new {key} found carried");
                    };
                    keys.add(free, id);
                    items.insert(id, header(State::Ready), &key, b"", Extras::default());
                    model.insert(key, id);
                }
            }
        }
        assert!(keys.count() > split::SPLIT_AT, "split");
        keys.check(&items);
        assert_eq!(keys.count(), model.len());
        for (key, &id) in &model {
            assert_eq!(keys.get(key, &items), Some(id));
        }
        // Removing with an id that does not carry the key changes nothing.
        let (key, &id) = model.iter().next().unwrap();
        keys.remove(key, id + 1);
        assert_eq!(keys.get(key, &items), Some(id));
        // Recovery may put a later item in place of the one carrying a key.
        keys.insert(key, 99_999, &items);
        items.insert(99_999, header(State::Ready), key, b"", Extras::default());
        assert_eq!(keys.get(key, &items), Some(99_999));
        assert_eq!(keys.count(), model.len(), "replaced, not added");
    }

    /// A hash that only counts bytes: keys of one length collide in full.
    #[derive(Default)]
    struct Crude(u64);

    impl std::hash::Hasher for Crude {
        fn finish(&self) -> u64 {
            self.0
        }

        fn write(&mut self, bytes: &[u8]) {
            self.0 += bytes.len() as u64;
        }
    }

    #[test]
    fn keys_whose_hashes_collide_are_told_apart_by_the_key() {
        let mut keys: Keys<BuildHasherDefault<Crude>> = Keys::default();
        let mut items = Items::default();
        for id in 1..=9u64 {
            let key = format!("k-{id}");
            let Err(free) = keys.find(&key, &items) else {
                panic!("{key} found carried");
            };
            keys.add(free, id);
            items.insert(id, header(State::Ready), &key, b"", Extras::default());
        }
        for id in 1..=9u64 {
            assert_eq!(keys.get(&format!("k-{id}"), &items), Some(id));
        }
        assert_eq!(keys.get("k-0", &items), None);
        keys.remove("k-4", 4);
        items.remove(4);
        assert_eq!(
            (keys.get("k-4", &items), keys.get("k-5", &items)),
            (None, Some(5))
        );
        keys.insert("k-5", 50, &items);
        items.insert(50, header(State::Ready), "k-5", b"", Extras::default());
        assert_eq!(
            (keys.get("k-5", &items), keys.get("k-6", &items)),
            (Some(50), Some(6))
        );
        assert_eq!(keys.count(), 8);
        keys.check(&items);
    }

    #[test]
    fn a_run_of_ids_shares_a_table() {
        let mut items = Items::default();
        for id in 0..split::SPLIT_AT as u64 * 2 {
            items.insert(id, header(State::Ready), "", b"", Extras::default());
        }
        let tables = items.records.tables();
        let table_of = |id: u64| {
            tables
                .iter()
                .position(|t| t.find(hash_id(id), |s| s.id == id).is_some())
                .unwrap()
        };
        for run in [0u64, 64, 6400] {
            assert!((run..run + 64).all(|id| table_of(id) == table_of(run)));
        }
        assert_ne!(table_of(0), table_of(64 * 7), "runs spread");
    }

    #[test]
    fn ready_index_orders_by_priority_then_id() {
        let mut ready = ReadyIndex::default();
        for (priority, id) in [(0, 5), (10, 9), (0, 2), (-3, 1), (10, 4)] {
            ready.insert(priority, id);
        }
        ready.insert(0, 5);
        assert_eq!(
            ready.len(),
            5,
            "a second insert of the same entry counts once"
        );
        assert_eq!(ready.oldest(), Some(1));
        assert_eq!(ready.iter().collect::<Vec<_>>(), [4, 9, 2, 5, 1]);
        let mut popped = Vec::new();
        while let Some(id) = ready.pop_first() {
            popped.push(id);
        }
        assert_eq!(popped, [4, 9, 2, 5, 1]);
        assert_eq!((ready.len(), ready.levels.len()), (0, 0));
    }

    /// New ids append to a level's deque and put-back ids go to its B-tree: checked
    /// against a plain ordered set through a long random mix of enqueues, put-backs,
    /// repeated inserts and leases.
    #[test]
    fn ready_index_matches_an_ordered_set_through_puts_back_and_repeats() {
        let mut random = crate::engine::test_random();
        let mut ready = ReadyIndex::default();
        let mut model: BTreeSet<(Reverse<i32>, u64)> = BTreeSet::new();
        let mut next_id = 1;
        let mut leased: Vec<(i32, u64)> = Vec::new();
        for step in 0..20_000 {
            match random(10) {
                0..4 => {
                    let priority = random(3) as i32 - 1;
                    ready.insert(priority, next_id);
                    model.insert((Reverse(priority), next_id));
                    leased.push((priority, next_id));
                    next_id += 1;
                }
                4 if !leased.is_empty() => {
                    // Put back an item (or insert one that is already there).
                    let (priority, id) = leased[random(leased.len() as u64) as usize];
                    ready.insert(priority, id);
                    model.insert((Reverse(priority), id));
                }
                _ => {
                    let popped = ready.pop_first();
                    assert_eq!(popped, model.pop_first().map(|(_, id)| id), "step {step}");
                }
            }
            assert_eq!(ready.len(), model.len(), "step {step}");
            if step % 97 == 0 {
                let order: Vec<u64> = model.iter().map(|&(_, id)| id).collect();
                assert_eq!(ready.iter().collect::<Vec<_>>(), order, "step {step}");
                assert_eq!(ready.oldest(), order.iter().copied().min(), "step {step}");
            }
        }
        while let Some(id) = ready.pop_first() {
            assert_eq!(Some(id), model.pop_first().map(|(_, id)| id));
        }
        assert!(model.is_empty() && ready.levels.is_empty());
    }

    #[test]
    fn a_drained_level_gives_its_deque_back() {
        let mut level = Level::default();
        for id in 0..100_000 {
            level.insert(id);
        }
        let grown = level.fresh.capacity();
        while level.pop_first().is_some() {}
        assert!(grown >= 100_000);
        assert!(
            level.fresh.capacity() <= Level::KEEP,
            "kept {}",
            level.fresh.capacity()
        );
    }
}
