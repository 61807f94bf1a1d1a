//! The write-ahead log behind strict durability.
//!
//! Why: a sled flush costs about ten times a plain `fdatasync` of the same bytes
//! (measured in BENCHMARKS.md), and strict mode pays one per group commit. So strict
//! mode appends every batch to this log as well, group-commits the log with
//! `fdatasync`, and flushes sled itself only at checkpoints in the background.
//!
//! Correctness: every batch holds whole records (a full item or queue record, or a
//! delete), and batches touching one key are ordered by that queue's lock. Replaying
//! the log in order over whatever sled state survived a crash therefore ends with each
//! key at its last logged value, whether or not sled had already seen it: replay is
//! idempotent.
//!
//! Checkpoint: the flusher starts a new log file, then flushes sled; only when that
//! flush is done is the old file deleted. Every batch in the old file was applied to
//! sled before it was appended to the log, so sled's flush covers it. A crash in
//! between leaves both files, and replay handles that too.
//!
//! Record format: `[len: u32 LE][crc32 of body: u32 LE][body]`, body = the batch's
//! keys and values (see [`frame`]). A torn or corrupt tail (a crash mid-write) ends the replay: those bytes
//! were never acknowledged, because acknowledgement waits for the `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// One key's new value (`None` = deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalOp {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalBatch {
    pub ops: Vec<WalOp>,
}

/// Appends one framed batch, written straight from borrowed keys and values (no
/// intermediate copies on the hot path). Body: per op `[key len u32][key][tag u8]` and,
/// for tag 1 (put), `[value len u32][value]`; tag 0 is a delete.
pub fn frame<'a>(ops: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>, buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]); // length and checksum, filled in below
    for (key, value) in ops {
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(key);
        match value {
            Some(value) => {
                buf.push(1);
                buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
                buf.extend_from_slice(value);
            }
            None => buf.push(0),
        }
    }
    let body_len = (buf.len() - start - 8) as u32;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn decode(mut body: &[u8]) -> Option<WalBatch> {
    fn take<'a>(body: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (body.get(..n)?, body.get(n..)?);
        *body = rest;
        Some(head)
    }
    fn take_u32(body: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(body, 4)?.try_into().ok()?) as usize)
    }
    let mut batch = WalBatch::default();
    while !body.is_empty() {
        let key_len = take_u32(&mut body)?;
        let key = take(&mut body, key_len)?.to_vec();
        let value = match take(&mut body, 1)?[0] {
            0 => None,
            1 => {
                let len = take_u32(&mut body)?;
                Some(take(&mut body, len)?.to_vec())
            }
            _ => return None,
        };
        batch.ops.push(WalOp { key, value });
    }
    Some(batch)
}

/// Reads every intact batch of a log file, stopping at a torn or corrupt tail.
pub fn read_batches(path: &Path) -> std::io::Result<Vec<WalBatch>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut batches = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            tracing::warn!(file = %path.display(), offset = at, "log ends in a torn record; ignoring the tail");
            break;
        };
        if crc32fast::hash(body) != crc {
            tracing::warn!(file = %path.display(), offset = at, "log record fails its checksum; ignoring the rest");
            break;
        }
        match decode(body) {
            Some(batch) => batches.push(batch),
            None => {
                tracing::warn!(file = %path.display(), offset = at, "undecodable log record; ignoring the rest");
                break;
            }
        }
        at += 8 + len;
    }
    Ok(batches)
}

/// Log files in `dir`, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("wal-"))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(number) = number {
            files.push((number, path));
        }
    }
    files.sort();
    Ok(files)
}

pub fn path_of(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("wal-{number:010}.log"))
}

/// The log file being appended to.
pub struct Segment {
    pub number: u64,
    pub path: PathBuf,
    file: File,
    pub bytes: u64,
    /// The ticket of the last batch appended (0: none yet).
    pub last_ticket: u64,
}

impl Segment {
    pub fn create(dir: &Path, number: u64) -> std::io::Result<Segment> {
        let path = path_of(dir, number);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        // Make the new file's directory entry durable before relying on it.
        File::open(dir)?.sync_all()?;
        Ok(Segment {
            number,
            path,
            file,
            bytes: 0,
            last_ticket: 0,
        })
    }

    /// Writes `data` and waits until it is on disk.
    pub fn append_durably(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all(data)?;
        self.file.sync_data()?;
        self.bytes += data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(b: &WalBatch, buf: &mut Vec<u8>) {
        frame(
            b.ops
                .iter()
                .map(|op| (op.key.as_slice(), op.value.as_deref())),
            buf,
        );
    }

    fn batch(key: &str, value: Option<&str>) -> WalBatch {
        WalBatch {
            ops: vec![WalOp {
                key: key.as_bytes().to_vec(),
                value: value.map(|v| v.as_bytes().to_vec()),
            }],
        }
    }

    #[test]
    fn replays_intact_batches_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 7).unwrap();
        let mut buf = Vec::new();
        put(&batch("a", Some("1")), &mut buf);
        put(&batch("a", None), &mut buf);
        segment.append_durably(&buf).unwrap();
        // A crash mid-write: half a record.
        let mut torn = Vec::new();
        put(&batch("b", Some("2")), &mut torn);
        segment.append_durably(&torn[..torn.len() / 2]).unwrap();

        let read = read_batches(&segment.path).unwrap();
        assert_eq!(read, vec![batch("a", Some("1")), batch("a", None)]);
        assert_eq!(list(dir.path()).unwrap()[0].0, 7);
    }

    #[test]
    fn a_corrupt_record_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 1).unwrap();
        let mut buf = Vec::new();
        put(&batch("a", Some("1")), &mut buf);
        put(&batch("b", Some("2")), &mut buf);
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        segment.append_durably(&buf).unwrap();
        assert_eq!(
            read_batches(&segment.path).unwrap(),
            vec![batch("a", Some("1"))]
        );
    }
}
