//! Rule checkpoints: a rule's state, the input offsets that state covers, and
//! its output to streams not yet known to be appended, saved together in one
//! file per rule (`<dir>/<rule>.ckpt`).
//!
//! A rule appends its rows to streams as one producer (`producer`) that
//! numbers each record (`seq`): the log keeps the highest number per
//! producer, so appending the rows of a checkpoint again after a crash
//! appends nothing twice ([`EventStream::submit_sequenced`]). Rows are
//! written into the checkpoint before they are appended; after a crash the
//! rule restores its state, appends the checkpoint's rows again (the log
//! drops the copies), and reads on from the checkpoint's offsets. Its output
//! is then that of a run that never stopped.
//!
//! ```text
//! "TRBCKPT1"
//! u64 length, header (JSON: rule, source, producer, next_seq, resume, rows)
//! u64 length, Arrow IPC stream       one per pending record of rows
//! u64 length, state snapshot         empty when the header says none
//! u32 CRC-32 of everything before it
//! ```
//!
//! [`EventStream::submit_sequenced`]: crate::log::EventStream::submit_sequenced

use std::io::Cursor;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use serde::{Deserialize, Serialize};

use crate::snapshot::{Snapshot, put_blob, take_blob};
use crate::{Error, Result, fsutil};

const MAGIC: &[u8; 8] = b"TRBCKPT1";

/// Rows of a rule, numbered for the log, waiting to be appended.
#[derive(Debug, Clone)]
pub struct PendingRows {
    pub stream: String,
    pub seq: u64,
    pub batch: RecordBatch,
}

/// One rule's checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub rule: String,
    /// The stream the rule read (`resume` counts its offsets).
    pub source: String,
    /// The key the rule's rows are appended under.
    pub producer: String,
    /// The number the next record of rows gets.
    pub next_seq: u64,
    /// Where reading resumes, per partition of the source; `None` when the
    /// state was not saved (the rule rebuilds it from its committed offsets).
    pub resume: Option<Vec<u64>>,
    /// Rows produced up to `resume`, perhaps not appended yet.
    pub pending: Vec<PendingRows>,
    /// The program's state at `resume`.
    pub state: Option<Snapshot>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    rule: String,
    source: String,
    producer: String,
    next_seq: u64,
    resume: Option<Vec<u64>>,
    /// (stream, seq) of each pending record, in order.
    rows: Vec<(String, u64)>,
    state: bool,
}

impl Checkpoint {
    /// The checkpoint as the bytes of its file.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let header = Header {
            rule: self.rule.clone(),
            source: self.source.clone(),
            producer: self.producer.clone(),
            next_seq: self.next_seq,
            resume: self.resume.clone(),
            rows: self
                .pending
                .iter()
                .map(|p| (p.stream.clone(), p.seq))
                .collect(),
            state: self.state.is_some(),
        };
        let mut out = MAGIC.to_vec();
        let header = serde_json::to_vec(&header).map_err(|e| Error::Internal(e.to_string()))?;
        put_blob(&mut out, &header);
        for p in &self.pending {
            let mut writer = StreamWriter::try_new(Vec::new(), &p.batch.schema())?;
            writer.write(&p.batch)?;
            writer.finish()?;
            put_blob(&mut out, &writer.into_inner()?);
        }
        let state = match &self.state {
            Some(s) => s.encode().map_err(Error::Internal)?,
            None => Vec::new(),
        };
        put_blob(&mut out, &state);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Reads a checkpoint file's bytes; `what` names the file in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self> {
        let bad = |why: String| Error::Internal(format!("checkpoint {what}: {why}"));
        let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
            return Err(bad("too short".into()));
        };
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return Err(bad("checksum mismatch".into()));
        }
        let mut cursor = body
            .strip_prefix(MAGIC)
            .ok_or_else(|| bad("not a checkpoint".into()))?;
        let header: Header = serde_json::from_slice(take_blob(&mut cursor).map_err(bad)?)
            .map_err(|e| bad(format!("header: {e}")))?;
        let mut pending = Vec::with_capacity(header.rows.len());
        for (stream, seq) in header.rows {
            let blob = take_blob(&mut cursor).map_err(bad)?;
            let mut reader = StreamReader::try_new(Cursor::new(blob), None)?;
            let batch = reader
                .next()
                .ok_or_else(|| bad(format!("rows for '{stream}' are missing")))??;
            pending.push(PendingRows { stream, seq, batch });
        }
        let state = take_blob(&mut cursor).map_err(bad)?;
        let state = if header.state {
            Some(Snapshot::decode(state).map_err(bad)?)
        } else {
            None
        };
        if !cursor.is_empty() {
            return Err(bad("bytes after the state".into()));
        }
        Ok(Checkpoint {
            rule: header.rule,
            source: header.source,
            producer: header.producer,
            next_seq: header.next_seq,
            resume: header.resume,
            pending,
            state,
        })
    }
}

/// The folder of checkpoint files.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    dir: PathBuf,
}

impl Checkpoints {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Checkpoints { dir: dir.into() }
    }

    /// Rule names are identifiers ([`crate::event::validate_name`]), so
    /// they make safe file names.
    fn path(&self, rule: &str) -> PathBuf {
        self.dir.join(format!("{rule}.ckpt"))
    }

    /// Writes a rule's checkpoint; a crash leaves the old one or the new.
    /// Encoding and writing happen off the async threads.
    pub async fn save(&self, checkpoint: Checkpoint) -> Result<()> {
        let path = self.path(&checkpoint.rule);
        blocking(move || fsutil::write_atomic(&path, &checkpoint.encode()?)).await
    }

    /// A rule's last checkpoint, if it has one. A damaged file (it is
    /// written atomically, so only a damaged disk does that) is renamed to
    /// `<rule>.ckpt.damaged` and reported, and the rule goes on without
    /// it; a file that cannot be read now is an error, to be tried again.
    pub async fn load(&self, rule: &str) -> Result<Option<Checkpoint>> {
        let path = self.path(rule);
        blocking(move || read(&path)).await
    }

    /// Deletes a rule's checkpoint (the rule was dropped), durably.
    pub async fn remove(&self, rule: &str) -> Result<()> {
        let path = self.path(rule);
        let dir = self.dir.clone();
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => fsutil::sync_dir(&dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
        })
        .await
    }
}

fn read(path: &Path) -> Result<Option<Checkpoint>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    };
    match Checkpoint::decode(&bytes, &path.display().to_string()) {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            let aside = path.with_extension("ckpt.damaged");
            tracing::error!(error = %e, moved_to = %aside.display(), "damaged rule checkpoint set aside; the rule rebuilds its state");
            std::fs::rename(path, &aside)
                .map_err(|e| Error::io(format!("rename {}", path.display()), e))?;
            Ok(None)
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("checkpoint task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use std::sync::Arc;

    fn rows(values: &[i64]) -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            (
                "device_id",
                Arc::new(StringArray::from(vec!["d"; values.len()])) as _,
            ),
            ("n", Arc::new(Int64Array::from(values.to_vec())) as _),
        ])
        .unwrap()
    }

    #[tokio::test]
    async fn a_checkpoint_comes_back_whole_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Checkpoints::new(dir.path().join("checkpoints"));
        assert!(store.load("r").await.unwrap().is_none());
        let mut state = Snapshot::new();
        state.put_i64s("x", &[1, 2, 3]).unwrap();
        let ckpt = Checkpoint {
            rule: "r".into(),
            source: "s".into(),
            producer: "rule:r:ab12".into(),
            next_seq: 9,
            resume: Some(vec![10, 0, 7]),
            pending: vec![
                PendingRows {
                    stream: "alerts".into(),
                    seq: 7,
                    batch: rows(&[1, 2]),
                },
                PendingRows {
                    stream: "late".into(),
                    seq: 8,
                    batch: rows(&[]),
                },
            ],
            state: Some(state),
        };
        store.save(ckpt).await.unwrap();
        let back = store.load("r").await.unwrap().unwrap();
        assert_eq!(back.producer, "rule:r:ab12");
        assert_eq!(back.next_seq, 9);
        assert_eq!(back.resume, Some(vec![10, 0, 7]));
        assert_eq!(back.pending.len(), 2);
        assert_eq!(back.pending[0].batch, rows(&[1, 2]));
        assert_eq!(back.pending[1].seq, 8);
        assert_eq!(back.state.unwrap().i64s("x").unwrap(), vec![1, 2, 3]);

        let path = dir.path().join("checkpoints/r.ckpt");
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        // Set aside, not read and not overwritten.
        assert!(store.load("r").await.unwrap().is_none());
        assert!(dir.path().join("checkpoints/r.ckpt.damaged").exists());
        assert!(
            Checkpoint::decode(&bytes, "r")
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );

        store.remove("r").await.unwrap();
        store.remove("r").await.unwrap();
        assert!(store.load("r").await.unwrap().is_none());
    }
}
