//! The on-disk format of log segments.
//!
//! A partition is a folder of segment files named by the offset of their first
//! event (`00000000000000000000.seg`). A segment is an 8-byte magic followed by
//! records:
//!
//! | bytes | field                                                   |
//! |-------|---------------------------------------------------------|
//! | 4     | `len`: body length, u32 little-endian                   |
//! | 4     | `crc`: CRC-32 of offset, count and body, u32 LE         |
//! | 8     | `offset`: offset of the record's first event, u64 LE    |
//! | 4     | `count`: events in the record, u32 LE                   |
//! | len   | body: one Arrow IPC stream (schema + one batch)         |
//!
//! A crash can leave a torn record at the end of the last segment; recovery
//! keeps every record whose checksum holds and cuts the file after the last one.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Error, Result};

pub(crate) const MAGIC: &[u8; 8] = b"TRBSEG01";
pub(crate) const HEADER_LEN: u64 = 20;
/// A record body larger than this is treated as corruption when scanning.
pub(crate) const MAX_BODY_LEN: u32 = 1 << 30;

/// Where one record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub offset: u64,
    pub count: u32,
    /// Position of the record header in the file.
    pub pos: u64,
    pub len: u32,
}

pub(crate) fn segment_name(base_offset: u64) -> String {
    format!("{base_offset:020}.seg")
}

/// Parses a segment file name back into its base offset.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

fn checksum(offset: u64, count: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&offset.to_le_bytes());
    h.update(&count.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// Appends one encoded record to `out`.
pub(crate) fn encode_record(out: &mut Vec<u8>, offset: u64, count: u32, body: &[u8]) {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(offset, count, body).to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(body);
}

/// What scanning a segment found.
#[derive(Debug)]
pub(crate) struct Scan {
    pub entries: Vec<Entry>,
    /// Length of the valid prefix of the file.
    pub valid_len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub torn: Option<String>,
}

/// Reads a whole segment, checking every record. `expected_offset` is the
/// offset the first record must have; records must be contiguous.
pub(crate) fn scan(path: &Path, expected_offset: u64) -> Result<Scan> {
    let mut file =
        File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    if data.len() < MAGIC.len() {
        // A segment torn while its header was being written holds no records.
        return Ok(Scan {
            entries: Vec::new(),
            valid_len: 0,
            // An empty file too: a crash right after creating it.
            torn: Some("incomplete segment header".to_string()),
        });
    }
    if &data[..MAGIC.len()] != MAGIC {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: "not a Tributary log segment (bad magic)".into(),
        });
    }
    let mut pos = MAGIC.len();
    let mut next = expected_offset;
    let mut entries = Vec::new();
    let torn = loop {
        let rest = &data[pos..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < HEADER_LEN as usize {
            break Some(format!("incomplete record header at byte {pos}"));
        }
        let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let len = word(0);
        let crc = word(4);
        let mut off = [0u8; 8];
        off.copy_from_slice(&rest[8..16]);
        let offset = u64::from_le_bytes(off);
        let count = word(16);
        if len > MAX_BODY_LEN || rest.len() < HEADER_LEN as usize + len as usize {
            break Some(format!("incomplete record at byte {pos}"));
        }
        let body = &rest[HEADER_LEN as usize..HEADER_LEN as usize + len as usize];
        if checksum(offset, count, body) != crc {
            break Some(format!("checksum mismatch at byte {pos}"));
        }
        if offset != next {
            break Some(format!(
                "record at byte {pos} has offset {offset}, expected {next}"
            ));
        }
        entries.push(Entry {
            offset,
            count,
            pos: pos as u64,
            len,
        });
        next = offset + u64::from(count);
        pos += HEADER_LEN as usize + len as usize;
    };
    Ok(Scan {
        entries,
        valid_len: pos as u64,
        torn,
    })
}

/// Reads and checks the body of one record.
pub(crate) fn read_body(file: &File, path: &Path, entry: &Entry) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; HEADER_LEN as usize + entry.len as usize];
    file.read_exact_at(&mut buf, entry.pos)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let body = buf.split_off(HEADER_LEN as usize);
    if checksum(entry.offset, entry.count, &body) != crc {
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("checksum mismatch in record at byte {}", entry.pos),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_segment(path: &Path, records: &[(u64, u32, &[u8])]) -> Vec<u8> {
        let mut data = MAGIC.to_vec();
        for (o, c, b) in records {
            encode_record(&mut data, *o, *c, b);
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
        assert_eq!(read_body(&f, &path, &s.entries[1]).unwrap(), b"cde");
    }

    #[test]
    fn torn_tail_is_detected_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(0));
        let full = write_segment(&path, &[(0, 1, b"first"), (1, 1, b"second")]);
        let first_end = MAGIC.len() + HEADER_LEN as usize + 5;
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

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("x.seg"), None);
    }
}
