//! The on-disk format of log segments.
//!
//! A partition is a folder of segment files named by the offset of their first
//! event (`00000000000000000000.seg`). A segment is an 8-byte magic followed by
//! records. Segments written now start with `TRBSEG02`:
//!
//! | bytes   | field                                                      |
//! |---------|------------------------------------------------------------|
//! | 4       | `len`: body length, u32 little-endian                      |
//! | 4       | `crc`: CRC-32 of everything after it, u32 LE               |
//! | 8       | `offset`: offset of the record's first event, u64 LE       |
//! | 4       | `count`: events in the record, u32 LE                      |
//! | 8       | `seq`: the device's sequence number, 0 for none, u64 LE    |
//! | 2       | `key_len`: length of the key, u16 LE                       |
//! | key_len | `key`: the device id the record was appended for (UTF-8)  |
//! | len     | body: one Arrow IPC stream (schema + one batch)            |
//!
//! The key and sequence number let the log recognise a device's resent
//! frame after a restart (see `EventStream::submit_sequenced`). Segments
//! from before them (`TRBSEG01`: no `seq`, `key_len` or `key`) are still
//! read; new records always go to a new-format segment.
//!
//! A crash can leave a torn record at the end of the last segment; recovery
//! keeps every record whose checksum holds and cuts the file after the last one.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Error, Result};

/// The magic of segments written now.
pub(crate) const MAGIC: &[u8; 8] = b"TRBSEG02";
/// The magic of segments without keys and sequence numbers.
pub(crate) const MAGIC_V1: &[u8; 8] = b"TRBSEG01";
/// The fixed part of a record header (before the key).
pub(crate) const HEADER_LEN: u64 = 30;
const HEADER_LEN_V1: u64 = 20;
/// A record body larger than this is treated as corruption when scanning.
pub(crate) const MAX_BODY_LEN: u32 = 1 << 30;
/// The longest key a record holds.
pub(crate) const MAX_KEY_LEN: usize = u16::MAX as usize;

/// Where one record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub offset: u64,
    pub count: u32,
    /// Position of the record header in the file.
    pub pos: u64,
    /// Bytes from the header to the body: the header and the key.
    pub head: u32,
    pub len: u32,
}

/// A record's device sequence number, found by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sequenced {
    pub key: String,
    pub seq: u64,
}

pub(crate) fn segment_name(base_offset: u64) -> String {
    format!("{base_offset:020}.seg")
}

/// Parses a segment file name back into its base offset.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

fn checksum(fields: &[u8], key: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fields);
    h.update(key);
    h.update(body);
    h.finalize()
}

/// Appends one encoded record to `out`; returns the bytes before its body.
/// `key` must be at most [`MAX_KEY_LEN`] bytes.
pub(crate) fn encode_record(
    out: &mut Vec<u8>,
    offset: u64,
    count: u32,
    seq: u64,
    key: &str,
    body: &[u8],
) -> u32 {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let key = &key.as_bytes()[..key.len().min(MAX_KEY_LEN)];
    let mut fields = [0u8; HEADER_LEN as usize - 8];
    fields[..8].copy_from_slice(&offset.to_le_bytes());
    fields[8..12].copy_from_slice(&count.to_le_bytes());
    fields[12..20].copy_from_slice(&seq.to_le_bytes());
    fields[20..22].copy_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(&fields, key, body).to_le_bytes());
    out.extend_from_slice(&fields);
    out.extend_from_slice(key);
    out.extend_from_slice(body);
    (HEADER_LEN as usize + key.len()) as u32
}

/// The format of a segment, from its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    V1,
    V2,
}

/// What scanning a segment found.
#[derive(Debug)]
pub(crate) struct Scan {
    pub entries: Vec<Entry>,
    /// The records that carry a device sequence number, in order.
    pub sequenced: Vec<Sequenced>,
    /// Length of the valid prefix of the file.
    pub valid_len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub torn: Option<String>,
    /// The segment's format (that of new segments when it has no header).
    pub format: Format,
}

/// A record's header, parsed.
struct Header {
    len: u32,
    crc: u32,
    offset: u64,
    count: u32,
    seq: u64,
    key_len: usize,
}

impl Format {
    fn header_len(self) -> usize {
        match self {
            Format::V1 => HEADER_LEN_V1 as usize,
            Format::V2 => HEADER_LEN as usize,
        }
    }

    /// Parses the fixed part of a header from at least `header_len` bytes.
    fn header(self, b: &[u8]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let (seq, key_len) = match self {
            Format::V1 => (0, 0),
            Format::V2 => (u64_at(20), usize::from(u16::from_le_bytes([b[28], b[29]]))),
        };
        Header {
            len: u32_at(0),
            crc: u32_at(4),
            offset: u64_at(8),
            count: u32_at(16),
            seq,
            key_len,
        }
    }

    /// Whether `record` (header, key, body) matches its checksum.
    fn checks(self, h: &Header, record: &[u8]) -> bool {
        let head = self.header_len() + h.key_len;
        let body = &record[head..head + h.len as usize];
        match self {
            Format::V1 => checksum(&record[8..20], &[], body) == h.crc,
            Format::V2 => checksum(&record[8..30], &record[30..head], body) == h.crc,
        }
    }
}

/// Reads a whole segment, checking every record. `expected_offset` is the
/// offset the first record must have; records must be contiguous.
pub(crate) fn scan(path: &Path, expected_offset: u64) -> Result<Scan> {
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let empty = |reason: &str| Scan {
        entries: Vec::new(),
        sequenced: Vec::new(),
        valid_len: 0,
        torn: Some(reason.to_string()),
        format: Format::V2,
    };
    if data.len() < MAGIC.len() {
        // A segment torn while its header was being written holds no
        // records; an empty file too: a crash right after creating it.
        return Ok(empty("incomplete segment header"));
    }
    let format = match &data[..MAGIC.len()] {
        m if m == MAGIC => Format::V2,
        m if m == MAGIC_V1 => Format::V1,
        _ => {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                reason: "not a Tributary log segment (bad magic)".into(),
            });
        }
    };
    let fixed = format.header_len();
    let mut pos = MAGIC.len();
    let mut next = expected_offset;
    let mut entries = Vec::new();
    let mut sequenced = Vec::new();
    let torn = loop {
        let rest = &data[pos..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < fixed {
            break Some(format!("incomplete record header at byte {pos}"));
        }
        let h = format.header(rest);
        let head = fixed + h.key_len;
        if h.len > MAX_BODY_LEN || rest.len() < head + h.len as usize {
            break Some(format!("incomplete record at byte {pos}"));
        }
        if !format.checks(&h, rest) {
            break Some(format!("checksum mismatch at byte {pos}"));
        }
        if h.offset != next {
            break Some(format!(
                "record at byte {pos} has offset {}, expected {next}",
                h.offset
            ));
        }
        if h.seq > 0 {
            sequenced.push(Sequenced {
                key: String::from_utf8_lossy(&rest[fixed..head]).into_owned(),
                seq: h.seq,
            });
        }
        entries.push(Entry {
            offset: h.offset,
            count: h.count,
            pos: pos as u64,
            head: head as u32,
            len: h.len,
        });
        let Some(after) = h.offset.checked_add(u64::from(h.count)) else {
            break Some(format!("record at byte {pos} counts past the last offset"));
        };
        next = after;
        pos += head + h.len as usize;
    };
    Ok(Scan {
        entries,
        sequenced,
        valid_len: pos as u64,
        torn,
        format,
    })
}

/// Reads and checks the body of one record of a segment in `format`.
pub(crate) fn read_body(
    file: &File,
    path: &Path,
    entry: &Entry,
    format: Format,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; entry.head as usize + entry.len as usize];
    file.read_exact_at(&mut buf, entry.pos)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let h = format.header(&buf);
    if h.len != entry.len
        || format.header_len() + h.key_len != entry.head as usize
        || !format.checks(&h, &buf)
    {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("checksum mismatch in record at byte {}", entry.pos),
        });
    }
    Ok(buf.split_off(entry.head as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_segment(path: &Path, records: &[(u64, u32, &[u8])]) -> Vec<u8> {
        let mut data = MAGIC.to_vec();
        for (o, c, b) in records {
            encode_record(&mut data, *o, *c, *o + 1, "dev", b);
        }
        File::create(path).unwrap().write_all(&data).unwrap();
        data
    }

    #[test]
    fn scans_records_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        write_segment(&path, &[(0, 2, b"ab"), (2, 3, b"cde")]);
        let s = scan(&path, 0).unwrap();
        assert!(s.torn.is_none());
        assert_eq!(s.entries.len(), 2);
        let f = File::open(&path).unwrap();
        assert_eq!(
            read_body(&f, &path, &s.entries[1], s.format).unwrap(),
            b"cde"
        );
        let seqs: Vec<u64> = s.sequenced.iter().map(|q| q.seq).collect();
        assert_eq!(seqs, vec![1, 3]);
        assert!(s.sequenced.iter().all(|q| q.key == "dev"));
    }

    #[test]
    fn torn_tail_is_detected_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let full = write_segment(&path, &[(0, 1, b"first"), (1, 1, b"second")]);
        let first_end = MAGIC.len() + HEADER_LEN as usize + "dev".len() + 5;
        for cut in first_end + 1..full.len() {
            File::create(&path)
                .unwrap()
                .write_all(&full[..cut])
                .unwrap();
            let s = scan(&path, 0).unwrap();
            assert_eq!(s.entries.len(), 1, "cut at {cut}");
            assert_eq!(s.valid_len, first_end as u64);
            assert!(s.torn.is_some());
        }
    }

    #[test]
    fn flipped_bit_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let mut data = write_segment(&path, &[(0, 1, b"payload")]);
        let last = data.len() - 1;
        data[last] ^= 1;
        File::create(&path).unwrap().write_all(&data).unwrap();
        let s = scan(&path, 0).unwrap();
        assert!(s.entries.is_empty());
        assert!(s.torn.unwrap().contains("checksum"));
    }

    /// Segments written before records carried keys are still read.
    #[test]
    fn first_format_segments_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let mut data = MAGIC_V1.to_vec();
        for (offset, count, body) in [(0u64, 2u32, &b"ab"[..]), (2, 1, b"c")] {
            let mut fields = Vec::new();
            fields.extend_from_slice(&offset.to_le_bytes());
            fields.extend_from_slice(&count.to_le_bytes());
            data.extend_from_slice(&(body.len() as u32).to_le_bytes());
            data.extend_from_slice(&checksum(&fields, &[], body).to_le_bytes());
            data.extend_from_slice(&fields);
            data.extend_from_slice(body);
        }
        File::create(&path).unwrap().write_all(&data).unwrap();
        let s = scan(&path, 0).unwrap();
        assert!(s.torn.is_none(), "{:?}", s.torn);
        assert_eq!(s.format, Format::V1);
        assert!(s.sequenced.is_empty());
        let f = File::open(&path).unwrap();
        assert_eq!(
            read_body(&f, &path, &s.entries[0], s.format).unwrap(),
            b"ab"
        );
        assert_eq!(read_body(&f, &path, &s.entries[1], s.format).unwrap(), b"c");
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("x.seg"), None);
    }
}
