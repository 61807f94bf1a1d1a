//! The file format shared by log files and snapshots: a sequence of frames, each one
//! atomic batch of key changes.
//!
//! Frame: `[len: u32 LE][crc32 of body: u32 LE][body]`, body = the batch's keys and
//! values (see [`frame`]). Reading stops at a torn or corrupt frame: in a log file that
//! is a crash mid-write, bytes never acknowledged, because acknowledgement waits for
//! the `fdatasync`. How the files are used is in [`super::log_store`].
//!
//! A log file is zero-filled ahead of its frames ([`Segment`]), so reading also stops,
//! cleanly, where only zeros are left.
//!
//! Each sync's bytes in a log file start with a sync marker ([`sync_marker`]): a frame
//! whose one key holds a number drawn at random when the coordinator started. Syncs
//! are made one after another, each written only once the one before it is on disk,
//! so a marker after a damaged frame proves the damage is not a torn last write but a
//! change to synced bytes: reading then says so ([`Ending::Corrupt`]) instead of
//! quietly dropping the rest of the file. Nobody outside the process knows the
//! number, so no payload can pass for a marker.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How far past its last frame a log file is zero-filled, at least (see [`Segment`]).
const ZERO_AHEAD: u64 = 1 << 20;
/// Writes at least this big grow the file themselves instead (see [`Segment`]).
const ZERO_FILL_BELOW: usize = 32 << 10;

/// Appends one framed batch. Body: per op `[key len u32][key][tag u8]` and, for tag 1
/// (put), `[value len u32][value]`; tag 0 is a delete. (The store builds frames op by
/// op with [`begin_frame`], [`push_op`] and [`end_frame`].)
#[cfg(test)]
pub fn frame<'a>(ops: impl Iterator<Item = OpRef<'a>>, buf: &mut Vec<u8>) {
    let start = begin_frame(buf);
    for (key, value) in ops {
        push_op(buf, key, value);
    }
    end_frame(buf, start);
}

/// Opens a frame at the end of `buf`; returns where it starts, for [`end_frame`].
pub fn begin_frame(buf: &mut Vec<u8>) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]); // length and checksum, filled in by `end_frame`
    start
}

/// Bytes a put op takes besides its key and value (the two lengths and the tag).
pub const PUT_OVERHEAD: usize = 9;

/// What a sync marker's key starts with; the marker's number follows.
const SYNC_MARKER_KEY: &[u8] = b"\0sync";
/// A sync marker's size: frame header, one delete op of a 13-byte key.
pub const SYNC_MARKER_LEN: usize = 8 + 4 + SYNC_MARKER_KEY.len() + 8 + 1;

/// Appends the sync marker of `number` (see the module docs).
pub fn sync_marker(number: u64, buf: &mut Vec<u8>) {
    let start = begin_frame(buf);
    let mut key = [0u8; SYNC_MARKER_KEY.len() + 8];
    key[..SYNC_MARKER_KEY.len()].copy_from_slice(SYNC_MARKER_KEY);
    key[SYNC_MARKER_KEY.len()..].copy_from_slice(&number.to_le_bytes());
    push_op(buf, &key, None);
    end_frame(buf, start);
}

/// The number of a batch that is a sync marker.
fn marker_number(ops: &[OpRef<'_>]) -> Option<u64> {
    match ops {
        [(key, None)] if key.len() == SYNC_MARKER_KEY.len() + 8 => {
            let number = key.strip_prefix(SYNC_MARKER_KEY)?;
            Some(u64::from_le_bytes(number.try_into().ok()?))
        }
        _ => None,
    }
}

/// Adds one op to the frame being built at the end of `buf`.
pub fn push_op(buf: &mut Vec<u8>, key: &[u8], value: Option<&[u8]>) {
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

/// Adds a put whose value `encode` appends to `buf` (no intermediate buffer).
pub fn push_put_with(buf: &mut Vec<u8>, key: &[u8], encode: impl FnOnce(&mut Vec<u8>)) {
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(key);
    buf.push(1);
    let len_at = buf.len();
    buf.extend_from_slice(&[0u8; 4]);
    encode(buf);
    let len = (buf.len() - len_at - 4) as u32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Closes the frame that `begin_frame` opened at `start`: fills in length and checksum.
pub fn end_frame(buf: &mut [u8], start: usize) {
    let body_len = (buf.len() - start - 8) as u32;
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One key's new value, borrowed from a file's bytes (`None` = deleted).
pub type OpRef<'a> = (&'a [u8], Option<&'a [u8]>);

fn decode(mut body: &[u8]) -> Option<Vec<OpRef<'_>>> {
    fn take<'a>(body: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (body.get(..n)?, body.get(n..)?);
        *body = rest;
        Some(head)
    }
    fn take_u32(body: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(body, 4)?.try_into().ok()?) as usize)
    }
    let mut ops = Vec::new();
    while !body.is_empty() {
        let key_len = take_u32(&mut body)?;
        let key = take(&mut body, key_len)?;
        let value = match take(&mut body, 1)?[0] {
            0 => None,
            1 => {
                let len = take_u32(&mut body)?;
                Some(take(&mut body, len)?)
            }
            _ => return None,
        };
        ops.push((key, value));
    }
    Some(ops)
}

/// How a file's frames ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every byte belonged to an intact frame.
    Clean,
    /// A torn, corrupt or undecodable frame at `offset`; it and everything after it
    /// were skipped.
    Damaged { offset: usize },
    /// Intact frames up to `offset`, then only zeros: the room a log file keeps ahead
    /// of its writes.
    Zeroed { offset: usize },
    /// A damaged frame at `offset`, and a later sync's marker at `synced`: bytes that
    /// were on disk changed afterwards (see the module docs).
    Corrupt { offset: usize, synced: usize },
}

impl Ending {
    /// How many bytes of the file hold intact frames.
    pub fn frames_len(self, file_len: u64) -> u64 {
        match self {
            Ending::Clean => file_len,
            Ending::Damaged { offset }
            | Ending::Zeroed { offset }
            | Ending::Corrupt { offset, .. } => offset as u64,
        }
    }
}

/// Bytes a replay reads at a time.
const READ_CHUNK: usize = 4 << 20;

/// Hands every intact batch of a file to `visit`, in order, stopping at a torn or
/// corrupt tail. A batch is visited whole or not at all. The file is read a chunk at a
/// time, so a replay holds one chunk (or one frame, if bigger) of it, not all of it.
/// After a damaged frame, the rest of the file is searched for a later sync's marker
/// ([`Ending::Corrupt`]).
pub fn replay(path: &Path, visit: impl FnMut(&[OpRef<'_>])) -> std::io::Result<Ending> {
    replay_in(path, READ_CHUNK, visit)
}

fn replay_in(
    path: &Path,
    chunk: usize,
    mut visit: impl FnMut(&[OpRef<'_>]),
) -> std::io::Result<Ending> {
    let mut window = Window::open(path, chunk)?;
    // The number of this file's sync markers, from the first intact one.
    let mut markers = None;
    while window.fill(1)? {
        let offset = window.offset();
        if !window.fill(8)? {
            return after_damage(window, offset, markers);
        }
        let header = &window.bytes()[..8];
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        // No frame is empty (a log batch always holds the id counter, a snapshot frame
        // at least one record), so a zero header is where the frames end: the zeroed
        // room ahead of them, or a crash that left some zeros on disk in the middle of
        // a sync's bytes. What follows those zeros belongs to a write that never
        // completed.
        if len == 0 && crc == 0 {
            return match window.rest_is_zeros()? {
                true => Ok(Ending::Zeroed { offset }),
                false => after_damage(window, offset, markers),
            };
        }
        if !window.fill(8 + len)? {
            return after_damage(window, offset, markers);
        }
        let body = &window.bytes()[8..8 + len];
        if crc32fast::hash(body) != crc {
            return after_damage(window, offset, markers);
        }
        let Some(ops) = decode(body) else {
            return after_damage(window, offset, markers);
        };
        if markers.is_none() {
            markers = marker_number(&ops);
        }
        visit(&ops);
        window.advance(8 + len);
    }
    Ok(Ending::Clean)
}

/// How a file whose frame at `offset` is damaged ends: [`Ending::Corrupt`] if a sync
/// marker with the file's number (`markers`, when one was read) follows, else
/// [`Ending::Damaged`].
fn after_damage(
    mut window: Window,
    offset: usize,
    markers: Option<u64>,
) -> std::io::Result<Ending> {
    let damaged = Ending::Damaged { offset };
    let Some(number) = markers else {
        return Ok(damaged);
    };
    let mut marker = Vec::with_capacity(SYNC_MARKER_LEN);
    sync_marker(number, &mut marker);
    window.seek(offset + 1)?;
    while window.fill(SYNC_MARKER_LEN)? {
        let bytes = window.bytes();
        if let Some(at) = bytes.windows(SYNC_MARKER_LEN).position(|w| w == marker) {
            return Ok(Ending::Corrupt {
                offset,
                synced: window.offset() + at,
            });
        }
        // Keep the last bytes: a marker may start in them.
        window.advance(bytes.len() + 1 - SYNC_MARKER_LEN);
    }
    Ok(damaged)
}

/// A file read forward through a buffer of about one chunk.
struct Window {
    file: File,
    len: usize,
    buf: Vec<u8>,
    /// Where the unread bytes start in `buf`…
    start: usize,
    /// …and the file offset of `buf[0]`.
    base: usize,
    chunk: usize,
}

impl Window {
    fn open(path: &Path, chunk: usize) -> std::io::Result<Window> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
        Ok(Window {
            file,
            len,
            buf: Vec::new(),
            start: 0,
            base: 0,
            chunk,
        })
    }

    /// Makes `n` unread bytes available; false when the file ends before (then it
    /// reads nothing: a torn frame's length may be anything).
    fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        if self.buf.len() - self.start >= n {
            return Ok(true);
        }
        if self.offset().saturating_add(n) > self.len {
            return Ok(false);
        }
        self.buf.drain(..self.start);
        self.base += self.start;
        self.start = 0;
        let want = n.max(self.chunk).min(self.len - self.base) - self.buf.len();
        (&mut self.file)
            .take(want as u64)
            .read_to_end(&mut self.buf)?;
        // The file may have been shorter than its length said (it is not written while
        // it is replayed, but a short read must not pass for a frame).
        Ok(self.buf.len() >= n)
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Goes to `offset` in the file, dropping what was read.
    fn seek(&mut self, offset: usize) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        self.file.seek(SeekFrom::Start(offset as u64))?;
        self.buf.clear();
        (self.start, self.base) = (0, offset);
        Ok(())
    }

    fn offset(&self) -> usize {
        self.base + self.start
    }

    fn advance(&mut self, n: usize) {
        self.start += n;
    }

    /// Whether every byte from here to the end of the file is zero.
    fn rest_is_zeros(&mut self) -> std::io::Result<bool> {
        loop {
            if self.bytes().iter().any(|&b| b != 0) {
                return Ok(false);
            }
            self.advance(self.bytes().len());
            if !self.fill(1)? {
                return Ok(true);
            }
        }
    }
}

/// Log files in `dir`, oldest first.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    numbered(dir, "wal-", ".log")
}

/// Snapshot files in `dir`, oldest first.
pub fn list_snapshots(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    numbered(dir, "snapshot-", ".snap")
}

fn numbered(dir: &Path, prefix: &str, suffix: &str) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let number = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(suffix))
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

pub fn snapshot_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("snapshot-{number:010}.snap"))
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The log file being appended to.
///
/// The file is zero-filled ahead of its frames, [`ZERO_AHEAD`] at a time, and frames
/// overwrite the zeros. A sync of an overwrite writes only the data: a sync that also
/// grows the file must write the file's size as well, a second write to wait for
/// (`ext4_write_inode`, measured: ~80 µs per append-and-sync against ~50 µs per
/// overwrite-and-sync on this machine's disk). Growing the file is then one write of
/// zeros per megabyte of log, and a crash in the middle of it leaves zeros, which
/// reading takes for the end of the log.
///
/// The zeros are written to disk too, so the room pays only for small syncs: a write
/// of [`ZERO_FILL_BELOW`] or more that reaches past the room grows the file itself.
/// Its sync writes the file's size as well, which costs less than writing as many
/// zeros first (measured, 8 clients enqueueing 100 items per request: zero-filling
/// for every write cost 10–15% of the rate).
///
/// Where the filesystem takes them (Linux, `O_DIRECT`), writes go straight to the
/// disk instead of through the page cache ([`Direct`]): the log is written once and
/// read only at start-up, so caching it buys nothing, and the `fdatasync` after a
/// buffered write spends its CPU on writing the dirty pages back (measured: a 2 KB
/// write and its sync took ~36 µs of CPU and ~84 µs buffered, ~19 µs and ~60 µs
/// direct). Elsewhere, or once a direct write is refused, writes are buffered.
pub struct Segment {
    pub number: u64,
    file: File,
    direct: Option<Direct>,
    /// Where the next frame goes: the end of the frames.
    end: u64,
    /// The file's length: zeros from `end` to here.
    zeroed_to: u64,
}

impl Segment {
    pub fn create(dir: &Path, number: u64) -> std::io::Result<Segment> {
        let mut segment = Segment::create_buffered(dir, number)?;
        segment.direct = Direct::open(&path_of(dir, number));
        Ok(segment)
    }

    /// A segment whose writes go through the page cache, as on a filesystem that
    /// refuses direct writes.
    fn create_buffered(dir: &Path, number: u64) -> std::io::Result<Segment> {
        let path = path_of(dir, number);
        // An empty file of this number is left by an attempt that failed after
        // creating it (its directory sync, say); one that holds data is never reused.
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)?;
        if file.metadata()?.len() != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already holds data", path.display()),
            ));
        }
        // Make the new file's directory entry durable before relying on it.
        sync_dir(dir)?;
        Ok(Segment {
            number,
            file,
            direct: None,
            end: 0,
            zeroed_to: 0,
        })
    }

    /// A segment whose every write fails (its file is open read-only): a disk that
    /// has gone bad, for tests.
    #[cfg(test)]
    pub fn failing(dir: &Path, number: u64) -> std::io::Result<Segment> {
        let path = path_of(dir, number);
        File::create(&path)?;
        Ok(Segment {
            number,
            file: File::open(&path)?,
            direct: None,
            end: 0,
            zeroed_to: 0,
        })
    }

    /// Writes `data` after the last frame and waits until it is on disk. After an
    /// error, the next call writes at the same place again.
    pub fn append_durably(&mut self, data: &[u8]) -> std::io::Result<()> {
        let end = self.end + data.len() as u64;
        let room_to = if end > self.zeroed_to && data.len() < ZERO_FILL_BELOW {
            end + ZERO_AHEAD
        } else {
            end
        };
        let written_to = match &mut self.direct {
            Some(direct) => match direct.write(self.end, data, room_to) {
                Ok(written_to) => written_to,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(error = %e, "the log's filesystem refused a direct write; writing through the page cache");
                    self.direct = None;
                    return self.append_durably(data);
                }
                Err(e) => return Err(e),
            },
            None => {
                if room_to > end {
                    self.zero_fill(room_to)?;
                }
                self.file.write_all_at(data, self.end)?;
                room_to
            }
        };
        self.file.sync_data()?;
        if let Some(direct) = &mut self.direct {
            direct.advance(self.end, data);
        }
        self.end = end;
        self.zeroed_to = self.zeroed_to.max(written_to);
        Ok(())
    }

    /// Cuts the file back to the end of the frames synced so far and syncs that, after
    /// a failed [`Segment::append_durably`]: whatever part of the failed batch reached
    /// the file (a full disk takes whole records before it refuses the rest) is gone,
    /// so a restart cannot replay a change whose callers were told it failed. The zeros
    /// kept ahead go too; the next append writes them again.
    pub fn cut_back(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.end)?;
        self.file.sync_data()?;
        self.zeroed_to = self.end;
        Ok(())
    }

    /// Grows the file with zeros to `to` bytes (the next sync makes them durable, with
    /// the file's new length).
    fn zero_fill(&mut self, to: u64) -> std::io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut at = self.zeroed_to.max(self.end);
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    #[cfg(test)]
    fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

/// Direct writes are whole blocks at block offsets from block-aligned memory; 4096
/// bytes is a multiple of every logical block size in use.
const BLOCK: u64 = 4096;
/// The aligned buffer holds a small write with the zeros of a new room: one write.
const WINDOW: usize = ZERO_AHEAD as usize + ZERO_FILL_BELOW + 2 * BLOCK as usize;

/// A log file's direct-write side: the file opened with `O_DIRECT`, an aligned
/// buffer, and the bytes of the partial block the frames end in, which each write
/// starts with (it rewrites them as they are, so a torn write cannot change them).
struct Direct {
    file: File,
    /// `WINDOW` bytes from `start` are block-aligned in memory. Never resized.
    buf: Vec<u8>,
    start: usize,
    /// The frames' bytes from the start of the block that holds their end.
    tail: Vec<u8>,
}

impl Direct {
    /// `None` where the file cannot be opened for direct writes.
    fn open(path: &Path) -> Option<Direct> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let file = match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(file) => file,
                Err(e) => {
                    tracing::info!(error = %e, "the log's filesystem takes no direct writes; writing through the page cache");
                    return None;
                }
            };
            let buf = vec![0u8; WINDOW + BLOCK as usize];
            let start = (BLOCK as usize - buf.as_ptr().addr() % BLOCK as usize) % BLOCK as usize;
            Some(Direct {
                file,
                buf,
                start,
                tail: Vec::with_capacity(BLOCK as usize),
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = path;
            None
        }
    }

    /// Writes the frames' tail, `data` after it (at `end`) and zeros up to `room_to`,
    /// from the block the tail starts in, in whole blocks; returns where the writes
    /// ended (the file's length, if they grew it). Syncing is the caller's.
    fn write(&mut self, end: u64, data: &[u8], room_to: u64) -> std::io::Result<u64> {
        let base = end - end % BLOCK;
        debug_assert_eq!((end - base) as usize, self.tail.len());
        let stop = (room_to.max(end + data.len() as u64)).next_multiple_of(BLOCK);
        let total = (stop - base) as usize;
        let mut done = 0;
        while done < total {
            let n = (total - done).min(WINDOW);
            let window = &mut self.buf[self.start..self.start + n];
            fill(window, done, &self.tail, data);
            self.file.write_all_at(window, base + done as u64)?;
            done += n;
        }
        Ok(stop)
    }

    /// The tail once `data` is written after `end`.
    fn advance(&mut self, end: u64, data: &[u8]) {
        let tail_len = ((end + data.len() as u64) % BLOCK) as usize;
        if data.len() >= tail_len {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - tail_len..]);
        } else {
            // The new end is in the same block as the old one.
            self.tail.extend_from_slice(data);
        }
        debug_assert_eq!(self.tail.len(), tail_len);
    }
}

/// Fills `window` with the bytes from `from` on of the stream `tail`, `data`, then
/// zeros.
fn fill(window: &mut [u8], from: usize, tail: &[u8], data: &[u8]) {
    let (mut at, mut filled, mut part_start) = (from, 0, 0);
    for part in [tail, data] {
        let part_end = part_start + part.len();
        if at < part_end && filled < window.len() {
            let n = (part_end - at).min(window.len() - filled);
            window[filled..filled + n].copy_from_slice(&part[at - part_start..][..n]);
            (filled, at) = (filled + n, at + n);
        }
        part_start = part_end;
    }
    window[filled..].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    type Owned = Vec<(String, Option<String>)>;

    fn put(ops: &[(&str, Option<&str>)], buf: &mut Vec<u8>) {
        frame(
            ops.iter()
                .map(|(k, v)| (k.as_bytes(), v.map(str::as_bytes))),
            buf,
        );
    }

    /// The file's batches and ending, the same read a few bytes at a time as in one
    /// piece (frames and zeros across reads).
    fn read(path: &Path) -> (Vec<Owned>, Ending) {
        let read_in = |chunk| {
            let mut batches = Vec::new();
            let ending = replay_in(path, chunk, |ops| {
                batches.push(
                    ops.iter()
                        .map(|(k, v)| {
                            (
                                String::from_utf8(k.to_vec()).unwrap(),
                                v.map(|v| String::from_utf8(v.to_vec()).unwrap()),
                            )
                        })
                        .collect(),
                )
            })
            .unwrap();
            (batches, ending)
        };
        let whole = read_in(READ_CHUNK);
        for chunk in [13, 4096, 65536] {
            assert_eq!(read_in(chunk), whole, "read {chunk} bytes at a time");
        }
        whole
    }

    fn owned(ops: &[(&str, Option<&str>)]) -> Owned {
        ops.iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    /// Recovery sizes a put as key + value + [`PUT_OVERHEAD`], the log writer by what
    /// it appended: the two must agree.
    #[test]
    fn a_put_takes_its_key_its_value_and_put_overhead() {
        for (key, value) in [(&b""[..], &b""[..]), (b"i12345678", &[7u8; 300][..])] {
            let mut buf = Vec::new();
            push_op(&mut buf, key, Some(value));
            assert_eq!(buf.len(), key.len() + value.len() + PUT_OVERHEAD);
            buf.clear();
            push_put_with(&mut buf, key, |out| out.extend_from_slice(value));
            assert_eq!(buf.len(), key.len() + value.len() + PUT_OVERHEAD);
        }
    }

    #[test]
    fn replays_intact_batches_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 7).unwrap();
        let mut buf = Vec::new();
        put(&[("a", Some("1")), ("b", Some("x"))], &mut buf);
        put(&[("a", None)], &mut buf);
        segment.append_durably(&buf).unwrap();
        let intact = buf.len();
        // A crash mid-write: half a record.
        let mut torn = Vec::new();
        put(&[("b", Some("2"))], &mut torn);
        segment.append_durably(&torn[..torn.len() / 2]).unwrap();

        let (batches, ending) = read(&path_of(dir.path(), segment.number));
        assert_eq!(
            batches,
            vec![
                owned(&[("a", Some("1")), ("b", Some("x"))]),
                owned(&[("a", None)])
            ]
        );
        assert_eq!(ending, Ending::Damaged { offset: intact });
        assert_eq!(list(dir.path()).unwrap()[0].0, 7);
    }

    /// A damaged frame with a later sync's marker after it is corruption of synced
    /// bytes; after the last marker it is a torn last write. Files without markers
    /// (older versions) and markers of another number (a payload) prove nothing.
    #[test]
    fn damage_before_a_later_syncs_marker_is_corruption() {
        const N: u64 = u64::from_le_bytes(*b"numbered");
        let frames = |ops: &[(&[u8], Option<&[u8]>)], buf: &mut Vec<u8>| {
            for op in ops {
                frame(std::iter::once(*op), buf);
            }
        };
        let mut forged = Vec::new();
        sync_marker(N + 1, &mut forged);
        // Writes `bytes` with byte `damage_at` changed and reads them back: the ending,
        // the same whatever the size of the reads.
        let case = |bytes: &[u8], damage_at: usize| {
            let dir = tempfile::tempdir().unwrap();
            let mut segment = Segment::create(dir.path(), 1).unwrap();
            let mut bytes = bytes.to_vec();
            bytes[damage_at] ^= 0xff;
            segment.append_durably(&bytes).unwrap();
            let path = path_of(dir.path(), 1);
            // 40 bytes at a time: a marker across two reads.
            let endings: Vec<Ending> = [40, 4096, READ_CHUNK]
                .into_iter()
                .map(|chunk| replay_in(&path, chunk, |_| {}).unwrap())
                .collect();
            assert!(endings.windows(2).all(|w| w[0] == w[1]), "{endings:?}");
            endings[0]
        };

        let mut log = Vec::new();
        sync_marker(N, &mut log);
        frames(&[(b"a", Some(b"1"))], &mut log);
        let b_at = log.len();
        frames(&[(b"b", Some(b"2"))], &mut log);
        let second = log.len();
        sync_marker(N, &mut log);
        let c_at = log.len();
        frames(&[(b"c", Some(b"3")), (b"d", Some(&forged))], &mut log);
        assert_eq!(
            case(&log, b_at + 10),
            Ending::Corrupt {
                offset: b_at,
                synced: second
            }
        );
        assert_eq!(case(&log, c_at + 10), Ending::Damaged { offset: c_at });

        // No markers: as before, the rest of the file is dropped.
        let mut old = Vec::new();
        frames(
            &[(b"a", Some(b"1")), (b"b", Some(b"2")), (b"c", Some(b"3"))],
            &mut old,
        );
        let b_at = 19; // after one frame of a 1-byte key and a 1-byte value
        assert_eq!(case(&old, b_at + 10), Ending::Damaged { offset: b_at });

        // After the damage only a marker of another number, inside a payload.
        let mut one_sync = Vec::new();
        sync_marker(N, &mut one_sync);
        let a_at = one_sync.len();
        frames(&[(b"a", Some(b"1")), (b"d", Some(&forged))], &mut one_sync);
        assert_eq!(case(&one_sync, a_at + 10), Ending::Damaged { offset: a_at });
    }

    #[test]
    fn a_corrupt_record_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 1).unwrap();
        let mut buf = Vec::new();
        put(&[("a", Some("1"))], &mut buf);
        let first = buf.len();
        put(&[("b", Some("2"))], &mut buf);
        put(&[("c", Some("3"))], &mut buf);
        buf[first + 9] ^= 0xff;
        segment.append_durably(&buf).unwrap();
        let (batches, ending) = read(&path_of(dir.path(), segment.number));
        assert_eq!(batches, vec![owned(&[("a", Some("1"))])]);
        assert_eq!(ending, Ending::Damaged { offset: first });
    }

    /// Every byte of a log of three syncs, damaged in turn, and the log cut at every
    /// byte: the replay keeps exactly the frames before the damage, whatever the size
    /// of its reads, and calls the damage corruption exactly when a later sync's marker
    /// follows it (once the first marker gave the number). Damage in the zeroed room
    /// after the frames costs no frame.
    #[test]
    fn every_damaged_or_cut_byte_keeps_exactly_the_frames_before_it() {
        type Batch = Vec<(Vec<u8>, Option<Vec<u8>>)>;
        const N: u64 = 0x5eed_0fa1_1b17;
        let (big, mid) = ([7u8; 100], [9u8; 60]);
        let syncs: [&[&[OpRef<'_>]]; 3] = [
            &[&[(b"a", Some(b"1")), (b"b", Some(&big))], &[(b"a", None)]],
            &[&[(b"c", Some(b"3"))]],
            &[&[(b"d", Some(&mid))], &[(b"e", Some(b"5"))]],
        ];
        // The log, and (start, end, is a marker) of each of its frames.
        let (mut log, mut frames) = (Vec::new(), Vec::new());
        let mut add = |log: &mut Vec<u8>, marker: bool, write: &dyn Fn(&mut Vec<u8>)| {
            let start = log.len();
            write(log);
            frames.push((start, log.len(), marker));
        };
        for sync in syncs {
            add(&mut log, true, &|log| sync_marker(N, log));
            for batch in sync {
                add(&mut log, false, &|log| frame(batch.iter().copied(), log));
            }
        }
        let owned = |ops: &[OpRef<'_>]| -> Batch {
            ops.iter()
                .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
                .collect()
        };
        let all: Vec<Batch> = frames
            .iter()
            .map(|&(start, end, _)| owned(&decode(&log[start + 8..end]).unwrap()))
            .collect();
        let in_frame = |at: usize| frames.iter().position(|&(s, e, _)| s <= at && at < e);

        let dir = tempfile::tempdir().unwrap();
        let path = path_of(dir.path(), 1);
        let replay = |bytes: &[u8]| -> (Vec<Batch>, Ending) {
            std::fs::write(&path, bytes).unwrap();
            let read_in = |chunk| {
                let mut batches = Vec::new();
                let ending = replay_in(&path, chunk, |ops| batches.push(owned(ops))).unwrap();
                (batches, ending)
            };
            let whole = read_in(READ_CHUNK);
            for chunk in [40, 4096] {
                assert_eq!(read_in(chunk), whole, "read {chunk} bytes at a time");
            }
            whole
        };

        // Damage, in a file with zeroed room after its frames, as a log file has.
        let mut pristine = log.clone();
        pristine.resize(log.len() + 4096, 0);
        let zeroed = Ending::Zeroed { offset: log.len() };
        assert_eq!(replay(&pristine), (all.clone(), zeroed));
        let after_frames = [0, 3, 7, 8, 1000].map(|n| log.len() + n);
        for at in (0..log.len()).chain(after_frames) {
            for flip in [0x01, 0x80, 0xff] {
                let mut bytes = pristine.clone();
                bytes[at] ^= flip;
                let (kept, ending) = replay(&bytes);
                let (f, expected) = match in_frame(at) {
                    None => (frames.len(), Ending::Damaged { offset: log.len() }),
                    Some(f) => {
                        let offset = frames[f].0;
                        let later_marker = frames[f + 1..].iter().find(|frame| frame.2);
                        match later_marker {
                            Some(&(synced, ..)) if f > 0 => (f, Ending::Corrupt { offset, synced }),
                            _ => (f, Ending::Damaged { offset }),
                        }
                    }
                };
                assert_eq!(ending, expected, "byte {at} ^ {flip:#x}");
                assert_eq!(kept, all[..f], "byte {at} ^ {flip:#x}");
            }
        }

        // Cut anywhere, as a crash leaves a write that grew the file.
        for cut in 0..=log.len() {
            let whole = frames.iter().filter(|&&(_, end, _)| end <= cut).count();
            let expected = match in_frame(cut) {
                Some(f) if frames[f].0 < cut => Ending::Damaged {
                    offset: frames[f].0,
                },
                _ => Ending::Clean,
            };
            let got = replay(&log[..cut]);
            assert_eq!(got, (all[..whole].to_vec(), expected), "cut at {cut}");
        }
    }

    #[test]
    fn a_whole_file_reads_clean() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = Vec::new();
        put(&[("a", Some(""))], &mut buf);
        put(&[("b", None)], &mut buf);
        std::fs::write(path_of(dir.path(), 1), &buf).unwrap();
        let (batches, ending) = read(&path_of(dir.path(), 1));
        assert_eq!(
            batches,
            vec![owned(&[("a", Some(""))]), owned(&[("b", None)])]
        );
        assert_eq!(ending, Ending::Clean);
    }

    /// A segment written directly where this filesystem takes direct writes (checked
    /// on a file beside it), and one written through the page cache.
    fn both_kinds(dir: &Path) -> [Segment; 2] {
        let probe = dir.join("probe");
        File::create(&probe).unwrap();
        let direct = Segment::create(dir, 1).unwrap();
        assert_eq!(
            direct.is_direct(),
            Direct::open(&probe).is_some(),
            "direct writes wherever the filesystem takes them"
        );
        [direct, Segment::create_buffered(dir, 2).unwrap()]
    }

    /// The file keeps zeroed room ahead of small writes, a big write past the room
    /// grows the file itself, and reading ends cleanly where the zeros start.
    #[test]
    fn a_log_file_is_zero_filled_ahead_of_small_writes() {
        let dir = tempfile::tempdir().unwrap();
        for mut segment in both_kinds(dir.path()) {
            let path = path_of(dir.path(), segment.number);
            let (mut expected, mut frames_len) = (Vec::new(), 0);
            let big = "y".repeat(ZERO_AHEAD as usize);
            let small = "s".repeat(ZERO_FILL_BELOW / 2);
            // Two small writes in one room, a big one past it, small ones after it.
            for value in ["x", small.as_str(), big.as_str(), "z", "w"] {
                let mut buf = Vec::new();
                put(&[("k", Some(value))], &mut buf);
                segment.append_durably(&buf).unwrap();
                frames_len += buf.len() as u64;
                expected.push(owned(&[("k", Some(value))]));
                let file_len = std::fs::metadata(&path).unwrap().len();
                let (batches, ending) = read(&path);
                assert_eq!(batches, expected);
                assert_eq!(ending.frames_len(file_len), frames_len);
                if value == big {
                    // To the end of its last block, when written directly.
                    assert!(
                        (frames_len..frames_len.next_multiple_of(BLOCK) + 1).contains(&file_len),
                        "the big write grew the file to {file_len}, its frames end at {frames_len}"
                    );
                } else {
                    assert!(file_len > frames_len, "no room ahead of the frames");
                    assert_eq!(
                        ending,
                        Ending::Zeroed {
                            offset: frames_len as usize
                        }
                    );
                }
            }
        }
    }

    /// A batch whose write or sync failed after the disk took some of it: cutting the
    /// file back leaves exactly the frames synced before it, and the next append goes
    /// on from there (written directly or not).
    #[test]
    fn a_cut_back_drops_what_a_failed_append_left() {
        let dir = tempfile::tempdir().unwrap();
        for mut segment in both_kinds(dir.path()) {
            let path = path_of(dir.path(), segment.number);
            let mut synced = Vec::new();
            put(&[("a", Some("1"))], &mut synced);
            segment.append_durably(&synced).unwrap();
            // The failed batch: whole records on disk, and its zeros ahead.
            let mut failed = Vec::new();
            put(&[("b", Some("lost"))], &mut failed);
            put(&[("c", Some("lost too"))], &mut failed);
            let other = OpenOptions::new().write(true).open(&path).unwrap();
            other.write_all_at(&failed, segment.end).unwrap();
            assert_eq!(read(&path).0.len(), 3, "the failed batch is readable");

            segment.cut_back().unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), synced.len() as u64);
            assert_eq!(read(&path).0, vec![owned(&[("a", Some("1"))])]);

            let mut next = Vec::new();
            put(&[("d", Some("2"))], &mut next);
            segment.append_durably(&next).unwrap();
            let (batches, ending) = read(&path);
            assert_eq!(
                batches,
                vec![owned(&[("a", Some("1"))]), owned(&[("d", Some("2"))])]
            );
            assert_eq!(
                ending,
                Ending::Zeroed {
                    offset: synced.len() + next.len()
                }
            );
        }
    }

    /// Writes of every size, ending inside a block or on its end, small ones and ones
    /// bigger than the direct-write buffer: the file holds exactly what was written,
    /// then zeros, after each of them, written directly or not.
    #[test]
    fn the_file_holds_every_write_and_zeros_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut random = crate::engine::test_random();
        for mut segment in both_kinds(dir.path()) {
            let path = path_of(dir.path(), segment.number);
            let mut expected: Vec<u8> = Vec::new();
            for step in 0..120u64 {
                let len = match random(10) {
                    0..4 => 1 + random(300),
                    4..7 => random(6000),
                    7 | 8 => BLOCK - expected.len() as u64 % BLOCK,
                    _ => ZERO_FILL_BELOW as u64 + random(WINDOW as u64 + 3 * BLOCK),
                };
                let data: Vec<u8> = (0..len).map(|i| (step + i) as u8 | 1).collect();
                segment.append_durably(&data).unwrap();
                expected.extend_from_slice(&data);
                if step % 10 == 9 || len > ZERO_FILL_BELOW as u64 {
                    let bytes = std::fs::read(&path).unwrap();
                    assert_eq!(&bytes[..expected.len()], &expected[..], "step {step}");
                    assert!(
                        bytes[expected.len()..].iter().all(|&b| b == 0),
                        "step {step}: only zeros after the writes"
                    );
                }
            }
        }
    }

    /// A filesystem that opens a file for direct writes and then refuses one (here the
    /// kernel refuses a buffer off its alignment, `EINVAL`): that write goes through the
    /// page cache instead, whole, and so do the ones after it.
    #[test]
    fn a_refused_direct_write_goes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_of(dir.path(), 1);
        let mut segment = Segment::create(dir.path(), 1).unwrap();
        if let Some(direct) = &mut segment.direct {
            direct.start += 1;
        }
        let mut expected = Vec::new();
        for data in [&b"first"[..], b"second", &[7; 5000]] {
            segment.append_durably(data).unwrap();
            expected.extend_from_slice(data);
            assert!(!segment.is_direct(), "back to buffered writes");
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..expected.len()], &expected[..]);
            assert!(bytes[expected.len()..].iter().all(|&b| b == 0));
        }
    }

    /// A new log file may reuse an empty file of its number (left by a failed attempt),
    /// never one that holds data.
    #[test]
    fn a_log_file_is_created_empty_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path_of(dir.path(), 1), b"").unwrap();
        let mut segment = Segment::create(dir.path(), 1).unwrap();
        segment.append_durably(b"frames").unwrap();
        let err = Segment::create(dir.path(), 1).err().unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(
            std::fs::read(path_of(dir.path(), 1))
                .unwrap()
                .starts_with(b"frames")
        );
    }

    /// Zeros where a frame should start end the frames, as a clean end only when
    /// nothing but zeros follows; a frame torn in the zeroed room is damage.
    #[test]
    fn zeros_end_the_frames_and_anything_after_them_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_of(dir.path(), 1);
        let mut buf = Vec::new();
        put(&[("a", Some("1"))], &mut buf);
        let first = buf.len();
        buf.extend_from_slice(&[0; 4096]);
        // A later frame that reached the disk while the bytes before it did not.
        put(&[("b", Some("2"))], &mut buf);
        std::fs::write(&path, &buf).unwrap();
        let (batches, ending) = read(&path);
        assert_eq!(batches, vec![owned(&[("a", Some("1"))])]);
        assert_eq!(ending, Ending::Damaged { offset: first });

        let mut torn = Vec::new();
        put(&[("c", Some("3"))], &mut torn);
        let mut segment = Segment::create(dir.path(), 2).unwrap();
        segment.append_durably(&buf[..first]).unwrap();
        segment.append_durably(&torn[..torn.len() - 1]).unwrap();
        let (batches, ending) = read(&path_of(dir.path(), 2));
        assert_eq!(batches, vec![owned(&[("a", Some("1"))])]);
        assert_eq!(ending, Ending::Damaged { offset: first });
    }
}
