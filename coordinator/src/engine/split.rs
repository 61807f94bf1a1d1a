//! Hash tables that grow a share at a time.
//!
//! A hash table grows all at once: it allocates a table twice the size and moves every
//! entry into it. For a queue of millions of items that is tens of milliseconds with
//! the queue's lock held and every caller of the queue waiting. So past
//! [`SPLIT_AT`] entries a [`Split`] spreads its entries over [`SHARDS`] tables by bits
//! 40–47 of their hash, bits no table uses for a position (the low ones) or a tag (the
//! top seven). Each table grows alone, moving its share, and the tables cross their
//! thresholds at different times. A small one keeps one table and costs what a plain
//! table does.

use hashbrown::HashTable;

/// Tables of a large [`Split`].
pub const SHARDS: usize = 256;
/// Entries at which one table becomes [`SHARDS`].
pub const SPLIT_AT: usize = 8192;

pub struct Split<T> {
    /// None, one, or [`SHARDS`].
    tables: Vec<HashTable<T>>,
    len: usize,
}

impl<T> Default for Split<T> {
    fn default() -> Self {
        Split {
            tables: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Split<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room for `additional` more entries: each table gets its share and an eighth
    /// more, as shares are uneven.
    pub fn reserve(&mut self, additional: usize, hasher: impl Fn(&T) -> u64) {
        self.make_room(self.len + additional, &hasher);
        let share = match self.tables.len() {
            1 => additional,
            n => additional.div_ceil(n) * 9 / 8,
        };
        for table in &mut self.tables {
            table.reserve(share, &hasher);
        }
    }

    pub fn find(&self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&T> {
        self.tables.get(self.table_of(hash))?.find(hash, eq)
    }

    pub fn find_mut(&mut self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<&mut T> {
        let table = self.table_of(hash);
        self.tables.get_mut(table)?.find_mut(hash, eq)
    }

    /// Puts `value` in place of the entry `eq` picks, or adds it; returns the entry
    /// it replaced.
    pub fn insert(
        &mut self,
        hash: u64,
        value: T,
        eq: impl FnMut(&T) -> bool,
        hasher: impl Fn(&T) -> u64,
    ) -> Option<T> {
        self.make_room(self.len + 1, &hasher);
        let table = self.table_of(hash);
        match self.tables[table].entry(hash, eq, &hasher) {
            hashbrown::hash_table::Entry::Occupied(mut old) => {
                Some(std::mem::replace(old.get_mut(), value))
            }
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(value);
                self.len += 1;
                None
            }
        }
    }

    /// Adds `value`, which no entry equals (the caller knows: a fresh id). Skips the
    /// search `insert` makes for an entry to replace.
    pub fn insert_unique(&mut self, hash: u64, value: T, hasher: impl Fn(&T) -> u64) {
        self.make_room(self.len + 1, &hasher);
        let table = self.table_of(hash);
        self.tables[table].insert_unique(hash, value, &hasher);
        self.len += 1;
    }

    pub fn remove(&mut self, hash: u64, eq: impl FnMut(&T) -> bool) -> Option<T> {
        let table = self.table_of(hash);
        let (value, _) = self
            .tables
            .get_mut(table)?
            .find_entry(hash, eq)
            .ok()?
            .remove();
        self.len -= 1;
        Some(value)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.tables.iter().flat_map(HashTable::iter)
    }

    /// Every entry is in the table its hash names, and `len` counts them.
    #[cfg(test)]
    pub fn check(&self, hasher: impl Fn(&T) -> u64) {
        for (index, table) in self.tables.iter().enumerate() {
            for value in table.iter() {
                assert_eq!(
                    self.table_of(hasher(value)),
                    index,
                    "entry in a wrong table"
                );
            }
        }
        assert_eq!(self.iter().count(), self.len, "len");
    }

    #[cfg(test)]
    pub fn tables(&self) -> &[HashTable<T>] {
        &self.tables
    }

    fn table_of(&self, hash: u64) -> usize {
        (hash >> 40) as usize & self.tables.len().saturating_sub(1)
    }

    /// Makes the tables ready for `len` entries: the first table, or the split.
    fn make_room(&mut self, len: usize, hasher: &impl Fn(&T) -> u64) {
        if self.tables.is_empty() {
            self.tables.push(HashTable::new());
        }
        if self.tables.len() == 1 && len > SPLIT_AT {
            let one = std::mem::take(&mut self.tables);
            self.tables = (0..SHARDS).map(|_| HashTable::new()).collect();
            for value in one.into_iter().flat_map(HashTable::into_iter) {
                let hash = hasher(&value);
                let table = self.table_of(hash);
                self.tables[table].insert_unique(hash, value, hasher);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// SipHash with fixed keys: spread like a keyed map's hashes, and repeatable.
    fn hash(key: u64) -> u64 {
        std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(key)
    }

    fn hash_of(entry: &(u64, u8)) -> u64 {
        hash(entry.0)
    }

    /// Through the split from one table to many: inserts (of new keys, some without
    /// the search for one to replace), replacements and removals checked against a map.
    #[test]
    fn a_split_matches_a_map_through_the_split() {
        let mut random = crate::engine::test_random();
        let mut split: Split<(u64, u8)> = Split::default();
        let mut model = std::collections::HashMap::new();
        for step in 0..40_000u64 {
            let key = random(16_000);
            match random(10) {
                0..7 if !model.contains_key(&key) && step % 2 == 0 => {
                    split.insert_unique(hash(key), (key, step as u8), hash_of);
                    model.insert(key, step as u8);
                }
                0..7 => {
                    let value = step as u8;
                    let old = split.insert(hash(key), (key, value), |e| e.0 == key, hash_of);
                    assert_eq!(old.map(|e| e.1), model.insert(key, value), "step {step}");
                }
                _ => {
                    let old = split.remove(hash(key), |e| e.0 == key);
                    assert_eq!(old.map(|e| e.1), model.remove(&key), "step {step}");
                }
            }
            if step % 4_999 == 0 {
                split.check(hash_of);
            }
        }
        assert_eq!(split.tables().len(), SHARDS, "split");
        split.check(hash_of);
        assert_eq!(split.len(), model.len());
        for (&key, &value) in &model {
            assert_eq!(split.find(hash(key), |e| e.0 == key), Some(&(key, value)));
        }
        let key = *model.keys().next().unwrap();
        split.find_mut(hash(key), |e| e.0 == key).unwrap().1 = 99;
        assert_eq!(split.find(hash(key), |e| e.0 == key).unwrap().1, 99);
    }

    #[test]
    fn a_large_split_has_even_tables_that_grow_alone() {
        let mut split: Split<(u64, u8)> = Split::default();
        split.reserve(10, hash_of);
        assert_eq!(split.tables().len(), 1, "a small one keeps one table");
        for key in 0..SPLIT_AT as u64 * 8 {
            split.insert(hash(key), (key, 0), |e| e.0 == key, hash_of);
            if key == SPLIT_AT as u64 {
                assert_eq!(split.tables().len(), SHARDS);
                split.check(hash_of);
            }
        }
        let mean = split.len() / SHARDS;
        let sizes: Vec<(usize, usize)> = split
            .tables()
            .iter()
            .map(|t| (t.len(), t.capacity()))
            .collect();
        assert!(
            sizes
                .iter()
                .all(|&(len, _)| len > mean / 3 && len < mean * 3),
            "uneven tables: {sizes:?}"
        );
        let capacities: std::collections::HashSet<usize> = sizes.iter().map(|s| s.1).collect();
        assert!(
            capacities.len() > 1,
            "the tables grew in step: {capacities:?}"
        );
        split.reserve(100_000, hash_of);
        assert!(
            split
                .tables()
                .iter()
                .all(|t| t.capacity() >= t.len() + 100_000 / SHARDS)
        );
        split.check(hash_of);
    }
}
