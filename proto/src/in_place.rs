//! The enqueue call's messages read and written in place, for the coordinator's hot
//! path.
//!
//! prost decodes a request into owned values: a `Vec` of items, each payload a
//! reference-counted slice of the frame (an atomic increment when made and a
//! decrement when dropped, per item) and each key a `String`. The coordinator copies
//! every payload into its own record at once, so [`read_enqueue_request`] hands it
//! the payloads and keys as plain slices of the frame instead.
//!
//! It accepts exactly the messages prost accepts, with the same values: the same
//! varint rules, wire-type checks, last-one-wins scalars, skipped unknown fields
//! (groups too, to prost's nesting limit) and UTF-8 checks. The tests hold it to
//! prost's decoder over random, damaged and hand-made messages.
//!
//! The other way, [`write_enqueue_request`] and [`write_enqueue_response`] write the
//! bytes prost writes for a request or an answer, straight from the values, without
//! building the message first.

use std::fmt;

use prost::encoding::{encode_varint, encoded_len_varint};

/// One item of an `EnqueueRequest`, borrowed from the encoded request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewItemRef<'a> {
    pub payload: &'a [u8],
    pub priority: i32,
    pub delay_ms: u64,
    pub key: &'a str,
}

/// Why an encoded request could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed(&'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Malformed {}

/// Reads an encoded `EnqueueRequest`: hands each item to `item`, in order, and
/// returns the queue's name and the seal flag. On an error some items may have been
/// handed over already; the caller drops them with the error.
pub fn read_enqueue_request<'a>(
    encoded: &'a [u8],
    mut item: impl FnMut(NewItemRef<'a>),
) -> Result<(&'a str, bool), Malformed> {
    let mut reader = Reader { buf: encoded };
    let mut queue = "";
    let mut seal = false;
    while let Some((tag, wire)) = reader.key()? {
        match tag {
            1 => queue = reader.string(wire)?,
            2 => {
                expect(wire, LENGTH_DELIMITED)?;
                item(read_item(reader.delimited()?)?);
            }
            3 => seal = reader.varint_field(wire)? != 0,
            _ => reader.skip(wire, tag, RECURSION_LIMIT)?,
        }
    }
    Ok((queue, seal))
}

/// prost's limit on nesting: a request is one level, an item two.
const RECURSION_LIMIT: u32 = 100;

const VARINT: u8 = 0;
const SIXTY_FOUR_BIT: u8 = 1;
const LENGTH_DELIMITED: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const THIRTY_TWO_BIT: u8 = 5;

fn read_item(encoded: &[u8]) -> Result<NewItemRef<'_>, Malformed> {
    let mut reader = Reader { buf: encoded };
    let mut item = NewItemRef::default();
    while let Some((tag, wire)) = reader.key()? {
        match tag {
            1 => {
                expect(wire, LENGTH_DELIMITED)?;
                item.payload = reader.delimited()?;
            }
            2 => item.priority = reader.varint_field(wire)? as i32,
            3 => item.delay_ms = reader.varint_field(wire)?,
            4 => item.key = reader.string(wire)?,
            _ => reader.skip(wire, tag, RECURSION_LIMIT - 1)?,
        }
    }
    Ok(item)
}

fn expect(actual: u8, expected: u8) -> Result<(), Malformed> {
    if actual == expected {
        Ok(())
    } else {
        Err(Malformed("a field has the wrong wire type"))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// The next field's tag and wire type; `None` at the end.
    fn key(&mut self) -> Result<Option<(u32, u8)>, Malformed> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| Malformed("invalid key value"))?;
        let wire = (key & 7) as u8;
        if wire > THIRTY_TWO_BIT {
            return Err(Malformed("invalid wire type value"));
        }
        let tag = key >> 3;
        if tag == 0 {
            return Err(Malformed("invalid tag value: 0"));
        }
        Ok(Some((tag, wire)))
    }

    /// A base-128 varint of at most ten bytes that fits in 64 bits.
    fn varint(&mut self) -> Result<u64, Malformed> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().take(10).enumerate() {
            if i == 9 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(Malformed("invalid varint"))
    }

    fn varint_field(&mut self, wire: u8) -> Result<u64, Malformed> {
        expect(wire, VARINT)?;
        self.varint()
    }

    /// A length-delimited field's bytes.
    fn delimited(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= self.buf.len())
            .ok_or(Malformed("buffer underflow"))?;
        let (bytes, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(bytes)
    }

    fn string(&mut self, wire: u8) -> Result<&'a str, Malformed> {
        expect(wire, LENGTH_DELIMITED)?;
        std::str::from_utf8(self.delimited()?)
            .map_err(|_| Malformed("invalid string value: data is not UTF-8 encoded"))
    }

    /// Skips an unknown field; `depth` is the nesting still allowed.
    fn skip(&mut self, wire: u8, tag: u32, depth: u32) -> Result<(), Malformed> {
        if depth == 0 {
            return Err(Malformed("recursion limit reached"));
        }
        let len = match wire {
            VARINT => {
                self.varint()?;
                0
            }
            SIXTY_FOUR_BIT => 8,
            THIRTY_TWO_BIT => 4,
            LENGTH_DELIMITED => {
                self.delimited()?;
                0
            }
            START_GROUP => loop {
                match self.key()? {
                    None => return Err(Malformed("invalid varint")),
                    Some((inner, END_GROUP)) if inner == tag => break 0,
                    Some((_, END_GROUP)) => return Err(Malformed("unexpected end group tag")),
                    Some((inner, inner_wire)) => self.skip(inner_wire, inner, depth - 1)?,
                }
            },
            _ => return Err(Malformed("unexpected end group tag")),
        };
        if len > self.buf.len() {
            return Err(Malformed("buffer underflow"));
        }
        self.buf = &self.buf[len..];
        Ok(())
    }
}

/// Appends an encoded `EnqueueRequest` to `out`: byte for byte what prost writes for
/// it, without building the message (a `pb::NewItem` per item, each payload a `Bytes`
/// that encoding clones once more). For clients that send many items.
pub fn write_enqueue_request<'a>(
    queue: &str,
    items: impl IntoIterator<Item = NewItemRef<'a>>,
    seal: bool,
    out: &mut Vec<u8>,
) {
    const QUEUE: u8 = 1 << 3 | LENGTH_DELIMITED;
    const ITEMS: u8 = 2 << 3 | LENGTH_DELIMITED;
    const SEAL: u8 = 3 << 3;
    const PAYLOAD: u8 = 1 << 3 | LENGTH_DELIMITED;
    const PRIORITY: u8 = 2 << 3;
    const DELAY_MS: u8 = 3 << 3;
    const KEY: u8 = 4 << 3 | LENGTH_DELIMITED;
    push_bytes_field(QUEUE, queue.as_bytes(), out);
    for item in items {
        // An int32 is encoded as the 64-bit varint of its sign-extended value.
        let priority = i64::from(item.priority) as u64;
        let len = bytes_field_len(item.payload)
            + varint_field_len(priority)
            + varint_field_len(item.delay_ms)
            + bytes_field_len(item.key.as_bytes());
        out.push(ITEMS);
        encode_varint(len as u64, out);
        push_bytes_field(PAYLOAD, item.payload, out);
        push_varint_field(PRIORITY, priority, out);
        push_varint_field(DELAY_MS, item.delay_ms, out);
        push_bytes_field(KEY, item.key.as_bytes(), out);
    }
    if seal {
        out.extend_from_slice(&[SEAL, 1]);
    }
}

/// A length-delimited field's encoded size; 0 when empty (proto3 leaves it out).
fn bytes_field_len(bytes: &[u8]) -> usize {
    match bytes.len() {
        0 => 0,
        n => 1 + encoded_len_varint(n as u64) + n,
    }
}

fn varint_field_len(value: u64) -> usize {
    match value {
        0 => 0,
        v => 1 + encoded_len_varint(v),
    }
}

fn push_bytes_field(key: u8, bytes: &[u8], out: &mut Vec<u8>) {
    if !bytes.is_empty() {
        out.push(key);
        encode_varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
}

fn push_varint_field(key: u8, value: u64, out: &mut Vec<u8>) {
    if value != 0 {
        out.push(key);
        encode_varint(value, out);
    }
}

/// Appends an encoded `EnqueueResponse` holding `results` to `out`: byte for byte what
/// prost writes, in one pass. prost first builds the message (a `Vec` of results),
/// then walks each result three times: for the response's length, for its own length
/// and for its fields.
pub fn write_enqueue_response(
    results: impl IntoIterator<Item = crate::pb::EnqueueResult>,
    out: &mut Vec<u8>,
) {
    /// Field 1 of the response (length-delimited), then fields 1 to 3 of a result
    /// (varints).
    const RESULTS: u8 = 1 << 3 | LENGTH_DELIMITED;
    const ID: u8 = 1 << 3;
    const DEDUPLICATED: u8 = 2 << 3;
    const CREATED_AT_MS: u8 = 3 << 3;
    for result in results {
        // Tag and length, then at most 1 + 10, 2 and 1 + 10 bytes of fields: the
        // length always fits one byte. proto3 leaves out fields at their defaults.
        let mut buf = [0u8; 2 + 24];
        let mut n = 2;
        if result.id != 0 {
            buf[n] = ID;
            n = put_varint(result.id, &mut buf, n + 1);
        }
        if result.deduplicated {
            buf[n..n + 2].copy_from_slice(&[DEDUPLICATED, 1]);
            n += 2;
        }
        if result.created_at_ms != 0 {
            buf[n] = CREATED_AT_MS;
            n = put_varint(result.created_at_ms, &mut buf, n + 1);
        }
        buf[0] = RESULTS;
        buf[1] = (n - 2) as u8;
        out.extend_from_slice(&buf[..n]);
    }
}

/// Writes `value` as a varint at `at`; returns where it ended.
fn put_varint(value: u64, buf: &mut [u8], at: usize) -> usize {
    let len = buf.len();
    let mut rest = &mut buf[at..];
    encode_varint(value, &mut rest);
    len - rest.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use prost::Message;

    /// A request as both readers give it: queue, items (payload, priority, delay, key)
    /// and seal; `None` when refused.
    type Read = Option<(String, Vec<(Vec<u8>, i32, u64, String)>, bool)>;

    /// What prost makes of `encoded`, in the in-place reader's shape.
    fn by_prost(encoded: &[u8]) -> Read {
        let request = pb::EnqueueRequest::decode(encoded).ok()?;
        let items = request
            .items
            .into_iter()
            .map(|i| (i.payload.to_vec(), i.priority, i.delay_ms, i.key))
            .collect();
        Some((request.queue, items, request.seal))
    }

    fn in_place(encoded: &[u8]) -> Read {
        let mut items = Vec::new();
        let (queue, seal) = read_enqueue_request(encoded, |i| {
            items.push((
                i.payload.to_vec(),
                i.priority,
                i.delay_ms,
                i.key.to_string(),
            ))
        })
        .ok()?;
        Some((queue.to_string(), items, seal))
    }

    fn same_as_prost(encoded: &[u8]) {
        assert_eq!(in_place(encoded), by_prost(encoded), "{encoded:02x?}");
    }

    fn random() -> impl FnMut(u64) -> u64 {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        move |below| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % below.max(1)
        }
    }

    fn varint(mut value: u64, out: &mut Vec<u8>) {
        while value >= 0x80 {
            out.push(value as u8 | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn key(tag: u32, wire: u8, out: &mut Vec<u8>) {
        varint(u64::from(tag << 3 | u32::from(wire)), out);
    }

    /// A random request, with unknown fields of every wire type mixed in, and a
    /// random field repeated so that the last one has to win.
    fn random_request(next: &mut impl FnMut(u64) -> u64) -> Vec<u8> {
        let items = (0..next(5))
            .map(|i| pb::NewItem {
                payload: (0..next(70)).map(|b| b as u8).collect::<Vec<_>>().into(),
                priority: [0, 1, -1, i32::MAX, i32::MIN][next(5) as usize],
                delay_ms: [0, 1, 300, u64::MAX][next(4) as usize],
                key: ["", "k", "ключ"][next(3) as usize].repeat(i as usize % 3),
            })
            .collect();
        let request = pb::EnqueueRequest {
            queue: ["", "q", "jobs-é"][next(3) as usize].to_string(),
            items,
            seal: next(2) == 1,
        };
        let mut encoded = request.encode_to_vec();
        for _ in 0..next(3) {
            let tag = 5 + next(40) as u32;
            match next(5) {
                0 => {
                    key(tag, VARINT, &mut encoded);
                    varint(next(u64::MAX), &mut encoded);
                }
                1 => {
                    key(tag, SIXTY_FOUR_BIT, &mut encoded);
                    encoded.extend_from_slice(&[7; 8]);
                }
                2 => {
                    key(tag, THIRTY_TWO_BIT, &mut encoded);
                    encoded.extend_from_slice(&[7; 4]);
                }
                3 => {
                    key(tag, LENGTH_DELIMITED, &mut encoded);
                    encoded.extend_from_slice(&[3, 1, 2, 3]);
                }
                _ => {
                    key(tag, START_GROUP, &mut encoded);
                    key(1, VARINT, &mut encoded);
                    encoded.push(5);
                    key(tag, END_GROUP, &mut encoded);
                }
            }
        }
        if next(3) == 0 {
            // A second queue name and seal flag: the last of each counts.
            key(1, LENGTH_DELIMITED, &mut encoded);
            encoded.extend_from_slice(&[2, b'z', b'z']);
            key(3, VARINT, &mut encoded);
            encoded.push(next(2) as u8);
        }
        encoded
    }

    #[test]
    fn reads_what_prost_reads_from_random_requests() {
        let mut next = random();
        for _ in 0..3000 {
            let encoded = random_request(&mut next);
            assert!(in_place(&encoded).is_some(), "{encoded:02x?}");
            same_as_prost(&encoded);
        }
    }

    /// Cut short, with a byte changed, or with a byte added: refused by both or read
    /// alike by both.
    #[test]
    fn agrees_with_prost_on_damaged_requests() {
        let mut next = random();
        let mut refused = 0;
        for _ in 0..20_000 {
            let mut encoded = random_request(&mut next);
            if encoded.is_empty() {
                continue;
            }
            let at = next(encoded.len() as u64) as usize;
            match next(3) {
                0 => encoded.truncate(at),
                1 => encoded[at] = next(256) as u8,
                _ => encoded.insert(at, next(256) as u8),
            }
            refused += usize::from(by_prost(&encoded).is_none());
            same_as_prost(&encoded);
        }
        assert!(
            refused > 2000,
            "the damage should often be refused: {refused}"
        );
    }

    #[test]
    fn agrees_with_prost_on_edge_cases() {
        let cases: &[&[u8]] = &[
            &[],
            // Varints: ten bytes whose last is 1 (fits) or 2 (overflows), eleven bytes.
            &[
                0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            &[
                0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
            ],
            &[
                0x18, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
            ],
            // Non-minimal varint key and value.
            &[0x98, 0x00, 0x81, 0x00],
            // Tag 0; wire types 6 and 7; a key over 32 bits.
            &[0x00, 0x01],
            &[0x0e],
            &[0x0f],
            &[0x80, 0x80, 0x80, 0x80, 0x10],
            // Wrong wire types for the queue, the items, the seal, a payload, a priority.
            &[0x08, 0x01],
            &[0x10, 0x01],
            &[0x1a, 0x00],
            &[0x12, 0x02, 0x08, 0x01],
            &[0x12, 0x02, 0x12, 0x00],
            // Lengths past the end, inside an item and outside.
            &[0x0a, 0x05, b'a'],
            &[0x12, 0x03, 0x0a, 0x05, 0x00],
            // A queue name that is not UTF-8; a key that is not.
            &[0x0a, 0x01, 0xff],
            &[0x12, 0x03, 0x22, 0x01, 0xc3],
            // Groups: closed, closed by the wrong tag, left open, an end with no start.
            &[0x2b, 0x08, 0x01, 0x2c],
            &[0x2b, 0x08, 0x01, 0x34],
            &[0x2b, 0x08, 0x01],
            &[0x2c],
            // Fixed-width unknown fields cut short.
            &[0x29, 0x01, 0x02],
            &[0x2d, 0x01],
            // An item's priority as a full 64-bit varint: prost keeps the low 32 bits.
            &[
                0x12, 0x0b, 0x10, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ];
        for encoded in cases {
            same_as_prost(encoded);
        }
    }

    #[test]
    fn nesting_is_limited_as_in_prost() {
        for depth in 97..=101 {
            let mut groups = Vec::new();
            for _ in 0..depth {
                key(9, START_GROUP, &mut groups);
            }
            for _ in 0..depth {
                key(9, END_GROUP, &mut groups);
            }
            // At the request's level, and inside an item (one level deeper).
            same_as_prost(&groups);
            let mut encoded = vec![0x12];
            varint(groups.len() as u64, &mut encoded);
            encoded.extend_from_slice(&groups);
            same_as_prost(&encoded);
        }
    }

    #[test]
    fn payloads_and_keys_are_slices_of_the_request() {
        let encoded = pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![pb::NewItem {
                payload: b"payload".to_vec().into(),
                key: "key".into(),
                ..Default::default()
            }],
            seal: true,
        }
        .encode_to_vec();
        let range = encoded.as_ptr_range();
        let mut seen = Vec::new();
        let (queue, seal) = read_enqueue_request(&encoded, |i| seen.push(i)).unwrap();
        assert_eq!((queue, seal, seen.len()), ("q", true, 1));
        assert_eq!((seen[0].payload, seen[0].key), (&b"payload"[..], "key"));
        assert!(range.contains(&seen[0].payload.as_ptr()));
        assert!(range.contains(&seen[0].key.as_ptr()));
    }

    #[test]
    fn writes_the_enqueue_response_prost_writes() {
        let mut next = random();
        let values = [0, 1, 127, 128, 16_383, 16_384, 1 << 35, u64::MAX];
        for round in 0..2_000 {
            let results: Vec<pb::EnqueueResult> = (0..next(6) + u64::from(round == 0) * 100)
                .map(|_| pb::EnqueueResult {
                    id: values[next(8) as usize].saturating_add(next(3)),
                    deduplicated: next(2) == 1,
                    created_at_ms: [0, 1_795_000_000_000, u64::MAX][next(3) as usize],
                })
                .collect();
            let mut written = vec![0xEE];
            write_enqueue_response(results.iter().cloned(), &mut written);
            let by_prost = pb::EnqueueResponse {
                results: results.clone(),
            }
            .encode_to_vec();
            assert_eq!(written[1..], by_prost[..], "{results:?}");
            assert_eq!(written[0], 0xEE, "appends");
            assert_eq!(
                pb::EnqueueResponse::decode(&written[1..]).unwrap().results,
                results
            );
        }
    }

    #[test]
    fn writes_the_enqueue_request_prost_writes() {
        let mut next = random();
        let long_key = "k".repeat(200);
        for round in 0..2_000 {
            let payloads: Vec<Vec<u8>> = (0..next(5) + u64::from(round == 0) * 100)
                .map(|_| vec![next(256) as u8; [0, 1, 64, 127, 128, 300][next(6) as usize]])
                .collect();
            let items: Vec<NewItemRef<'_>> = payloads
                .iter()
                .map(|payload| NewItemRef {
                    payload,
                    priority: [0, 1, -1, 300, i32::MAX, i32::MIN][next(6) as usize],
                    delay_ms: [0, 1, 128, u64::MAX][next(4) as usize],
                    key: ["", "a-key", &long_key][next(3) as usize],
                })
                .collect();
            let queue = ["", "q", "a-longer-queue-name"][next(3) as usize];
            let seal = next(2) == 1;
            let mut written = vec![0xEE];
            write_enqueue_request(queue, items.iter().copied(), seal, &mut written);
            let by_prost = pb::EnqueueRequest {
                queue: queue.to_string(),
                items: items
                    .iter()
                    .map(|i| pb::NewItem {
                        payload: i.payload.to_vec().into(),
                        priority: i.priority,
                        delay_ms: i.delay_ms,
                        key: i.key.to_string(),
                    })
                    .collect(),
                seal,
            }
            .encode_to_vec();
            assert_eq!(written[1..], by_prost[..], "{queue:?} {items:?} {seal}");
            assert_eq!(written[0], 0xEE, "appends");
            let mut read = Vec::new();
            let header = read_enqueue_request(&written[1..], |i| read.push(i)).unwrap();
            assert_eq!((header, read), ((queue, seal), items));
        }
    }
}
