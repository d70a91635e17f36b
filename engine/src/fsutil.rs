//! Small file-system helpers shared by everything that persists state.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// Writes `bytes` to `path` so that a crash leaves either the old file or the
/// new one, never a mix: write a temporary file, fsync it, rename it over the
/// target, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no parent folder", path.display())))?;
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    if let Err(e) = file.write_all(bytes).and_then(|()| file.sync_all()) {
        // Out of space, say: do not leave the partial copy taking room.
        drop(file);
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("write {}", tmp.display()), e));
    }
    fs::rename(&tmp, path).map_err(|e| Error::io(format!("rename {}", path.display()), e))?;
    sync_dir(dir)
}

/// Makes a folder's entries (new, renamed or removed files) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("sync {}", dir.display()), e))
}
