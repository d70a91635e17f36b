//! Where Parquet files live, and consistent snapshots of a stream for queries.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::file::metadata::ParquetMetaDataReader;
use tokio::sync::RwLock;

use super::SINK_CONSUMER;
use super::sink::{FLUSH_KEY, FlushInfo};
use crate::{Error, Result};
use tributary_engine::log::EventStream;

/// The object store holding every stream's Parquet files.
#[derive(Clone)]
pub struct Storage {
    root: PathBuf,
    store: Arc<dyn ObjectStore>,
    /// Held for writing while the sink publishes files and commits offsets,
    /// for reading while a query takes its snapshot.
    pub(crate) visibility: Arc<RwLock<()>>,
    /// Folders whose own entry in their parent this process has made
    /// durable, with what tells them apart from a folder deleted and made
    /// again under the same name ([`FolderId`]).
    durable_folders: Arc<Mutex<HashMap<PathBuf, FolderId>>>,
}

/// A folder's inode number and birth time. The number alone is not
/// enough: a folder made right after another was deleted can get its
/// number back. Where the file system keeps no birth time, folders have no
/// id, and every flush syncs the whole chain of folders above its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FolderId {
    inode: u64,
    born: std::time::SystemTime,
}

impl FolderId {
    fn of(folder: &Path) -> Option<FolderId> {
        let meta = std::fs::metadata(folder).ok()?;
        Some(FolderId {
            inode: meta.ino(),
            born: meta.created().ok()?,
        })
    }
}

/// fsyncs a file or folder.
fn fsync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// What a query of one stream reads: the Parquet files, and the events in
/// the log that no file holds yet.
#[derive(Debug, Clone, Default)]
pub struct StreamSnapshot {
    /// Absolute paths of the stream's Parquet files.
    pub files: Vec<PathBuf>,
    /// Batches from the log past what the files hold.
    pub tail: Vec<RecordBatch>,
}

impl Storage {
    /// Storage in a local folder (created if missing).
    pub fn local(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|source| Error::Io {
            path: root.clone(),
            source,
        })?;
        let root = root.canonicalize().map_err(|source| Error::Io {
            path: root.clone(),
            source,
        })?;
        let store = LocalFileSystem::new_with_prefix(&root)?;
        Ok(Storage {
            root,
            store: Arc::new(store),
            visibility: Arc::new(RwLock::new(())),
            durable_folders: Arc::default(),
        })
    }

    /// The folder files are written under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The same storage through a store that wraps this one's (tests that
    /// hold or fail its calls).
    #[cfg(test)]
    pub(crate) fn wrapped(
        mut self,
        wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>,
    ) -> Self {
        self.store = wrap(self.store);
        self
    }

    /// Makes files just put durable, with the folders that name them, and
    /// returns how many folders it fsynced. The object store writes a file
    /// and renames it into place but fsyncs neither, so until this returns
    /// a power cut can leave a file empty or gone. A flush commits its
    /// offsets only after it: otherwise the log would count events as
    /// stored in files that lost them, and delete them.
    ///
    /// Each file's folder is fsynced (it holds a new entry), and so is each
    /// folder above it until one whose own entry is known to be durable: a
    /// flush into an hour's folder an earlier flush made durable fsyncs
    /// that folder alone, not its day's, the stream's and the root.
    pub(crate) async fn make_durable(&self, paths: &[ObjectPath]) -> Result<usize> {
        let root = self.root.clone();
        let known = self.durable_folders.clone();
        let files: Vec<PathBuf> = paths.iter().map(|p| root.join(p.as_ref())).collect();
        tokio::task::spawn_blocking(move || {
            let is_known = |f: &Path| {
                let known = known.lock().unwrap_or_else(PoisonError::into_inner);
                known.get(f).is_some_and(|id| Some(*id) == FolderId::of(f))
            };
            let mut folders = BTreeSet::new();
            for file in &files {
                fsync(file)?;
                let mut folder = file.parent();
                while let Some(f) = folder.filter(|f| f.starts_with(&root)) {
                    folders.insert(f.to_path_buf());
                    if f == root || is_known(f) {
                        break;
                    }
                    folder = f.parent();
                }
            }
            // Deepest first: a folder's entry goes after what it holds.
            folders.iter().rev().try_for_each(|f| fsync(f))?;
            // Each folder synced here has its own entry durable now: either
            // its parent was synced too, or it was known already.
            let mut known = known.lock().unwrap_or_else(PoisonError::into_inner);
            for f in &folders {
                if let Some(id) = FolderId::of(f) {
                    known.insert(f.clone(), id);
                }
            }
            Ok(folders.len())
        })
        .await
        .map_err(|e| Error::Internal(format!("fsync task failed: {e}")))?
    }

    /// The Parquet files of a stream, sorted by path.
    pub async fn files(&self, stream: &str) -> Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = self
            .object_paths(stream)
            .await?
            .into_iter()
            .map(|p| self.root.join(p.as_ref()))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Object paths of a stream's Parquet files.
    pub(crate) async fn object_paths(&self, stream: &str) -> Result<Vec<ObjectPath>> {
        let prefix = ObjectPath::from(stream);
        let metas: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(metas
            .into_iter()
            .map(|m| m.location)
            .filter(|p| p.extension() == Some("parquet"))
            .collect())
    }

    /// The flush a file belongs to, from its footer; `None` for files that
    /// carry no flush record (written by another tool).
    pub(crate) async fn flush_info(&self, path: &ObjectPath) -> Result<Option<FlushInfo>> {
        // A Parquet file ends with its footer, the footer's length (4 bytes,
        // little-endian) and the magic `PAR1`: read just those.
        let size = self.store.head(path).await?.size;
        if size < 12 {
            return Ok(None);
        }
        let tail = self.store.get_range(path, size - 8..size).await?;
        if &tail[4..8] != b"PAR1" {
            return Ok(None);
        }
        let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
        let Some(start) = (size - 8).checked_sub(footer_len) else {
            return Ok(None);
        };
        let footer = self.store.get_range(path, start..size - 8).await?;
        let metadata = ParquetMetaDataReader::decode_metadata(&footer)?;
        let Some(kv) = metadata.file_metadata().key_value_metadata() else {
            return Ok(None);
        };
        Ok(kv
            .iter()
            .find(|kv| kv.key == FLUSH_KEY)
            .and_then(|kv| kv.value.as_deref())
            .and_then(|v| serde_json::from_str(v).ok()))
    }

    /// A consistent view of a stream: its files, and every event the log holds
    /// past the sink's committed offsets.
    pub async fn snapshot(&self, log: &dyn EventStream, stream: &str) -> Result<StreamSnapshot> {
        let partitions = log.partitions(stream)?;
        let (files, starts) = {
            let _visible = self.visibility.read().await;
            let files = self.files(stream).await?;
            let mut starts = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                starts.push(log.committed(SINK_CONSUMER, stream, p).await?.unwrap_or(0));
            }
            (files, starts)
        };
        // The log only grows, so the tail can be read after the lock is gone.
        let mut tail = Vec::new();
        for (p, start) in starts.into_iter().enumerate() {
            let p = p as u32;
            let end = log.end_offset(stream, p)?;
            let mut next = start;
            while next < end {
                let records = log.read(stream, p, next, 64 * 1024).await?;
                let Some(last) = records.last() else { break };
                next = last.end_offset();
                tail.extend(records.into_iter().map(|r| r.batch));
            }
        }
        Ok(StreamSnapshot { files, tail })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files just put are fsynced with their folder, and with the folders
    /// above it up to one whose entry is already durable; one that is not
    /// there fails the flush, naming it, so its offsets are not committed.
    #[tokio::test]
    async fn files_are_made_durable_with_their_new_folders_or_the_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path().join("parquet")).unwrap();
        let path = ObjectPath::from("s/date=2026-01-05/hour=08/0000000000001-000001.parquet");
        let bytes = bytes::Bytes::from_static(b"PAR1");
        storage
            .store()
            .put(&path, bytes.clone().into())
            .await
            .unwrap();
        // The hour's folder, the day's, the stream's and the root: all new.
        assert_eq!(storage.make_durable(&[path]).await.unwrap(), 4);
        // Without birth times (some file systems keep none), folders cannot
        // be told apart, and every flush syncs all four.
        let tracked = std::fs::metadata(dir.path())
            .and_then(|m| m.created())
            .is_ok();
        let expect = |n: usize| if tracked { n } else { 4 };

        // The same hour again: only its folder has a new entry.
        let again = ObjectPath::from("s/date=2026-01-05/hour=08/0000000000002-000002.parquet");
        storage
            .store()
            .put(&again, bytes.clone().into())
            .await
            .unwrap();
        assert_eq!(storage.make_durable(&[again]).await.unwrap(), expect(1));

        // A new hour of the same day: its folder and the day's, which
        // holds it. Two files of one flush share them.
        let next: Vec<ObjectPath> = ["000003", "000004"]
            .iter()
            .map(|n| {
                ObjectPath::from(format!(
                    "s/date=2026-01-05/hour=09/0000000000003-{n}.parquet"
                ))
            })
            .collect();
        for p in &next {
            storage.store().put(p, bytes.clone().into()).await.unwrap();
        }
        assert_eq!(storage.make_durable(&next).await.unwrap(), expect(2));

        // A folder deleted and made again under the same name is another
        // folder, even when it gets the old one's inode number back: its
        // entry is synced again.
        let hour8 = dir.path().join("parquet/s/date=2026-01-05/hour=08");
        std::fs::remove_dir_all(&hour8).unwrap();
        let remade = ObjectPath::from("s/date=2026-01-05/hour=08/0000000000005-000005.parquet");
        storage.store().put(&remade, bytes.into()).await.unwrap();
        assert_eq!(storage.make_durable(&[remade]).await.unwrap(), expect(2));

        let gone = ObjectPath::from("s/date=2026-01-05/hour=10/0000000000006-000006.parquet");
        let err = storage.make_durable(&[gone]).await.unwrap_err().to_string();
        assert!(
            err.contains("hour=10/0000000000006-000006.parquet"),
            "{err}"
        );
    }
}
