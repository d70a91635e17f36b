//! The data directory: where the server keeps everything, and where clients
//! on the same machine find the server's addresses, CA and admin token.
//!
//! ```text
//! <data-dir>/
//!   admin.token      the admin bearer token for the HTTP API (mode 0600)
//!   server.json      the addresses the running server listens on
//!   server.lock      held (flock) by the running server: one per directory
//!   tls/             development CA and server certificate
//!   registry.db      the device registry (SQLite)
//!   commands.db      the command queue (SQLite)
//!   catalog.json     declared streams and rules
//!   log/             the event stream
//!   checkpoints/     each rule's last checkpoint: <rule>.ckpt
//!   storage/         Parquet files: <stream>/date=YYYY-MM-DD/hour=HH/*.parquet
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

/// The default data directory, relative to where the command runs.
pub const DEFAULT_DATA_DIR: &str = "tributary-data";

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

/// What a running server writes to `server.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub pid: u32,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    pub fn server_info(&self) -> PathBuf {
        self.root.join("server.json")
    }
    pub fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls().join("ca.pem")
    }
    pub fn registry(&self) -> PathBuf {
        self.root.join("registry.db")
    }
    pub fn commands(&self) -> PathBuf {
        self.root.join("commands.db")
    }
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog.json")
    }
    pub fn log(&self) -> PathBuf {
        self.root.join("log")
    }
    pub fn storage(&self) -> PathBuf {
        self.root.join("storage")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Reads the admin token, creating one on first use.
    pub fn ensure_admin_token(&self) -> Result<String> {
        let path = self.admin_token();
        if let Ok(token) = std::fs::read_to_string(&path) {
            return Ok(token.trim().to_string());
        }
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating the data directory {}", self.root.display()))?;
        let token = new_admin_token()?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "{token}")
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(token)
    }

    /// Replaces the admin token file with `token`, atomically: a reader sees
    /// the old token or the new one, never a part, and after a crash the
    /// file holds one of them. The new file is mode 0600 from its creation.
    pub fn write_admin_token(&self, token: &str) -> Result<()> {
        let path = self.admin_token();
        let mut suffix = [0u8; 8];
        ring::rand::SystemRandom::new()
            .fill(&mut suffix)
            .map_err(|_| anyhow::anyhow!("the operating system gave no random bytes"))?;
        let tmp = self.root.join(format!(".admin.token.{}.tmp", hex(&suffix)));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                writeln!(f, "{token}")?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing {}", path.display()));
        }
        tributary_engine::fsutil::sync_dir(&self.root)?;
        Ok(())
    }

    /// Reads the admin token of an existing data directory.
    pub fn read_admin_token(&self) -> Result<String> {
        let path = self.admin_token();
        let token = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no admin token at {} (start the server with `tributary serve --data-dir {}` or pass --token)",
                path.display(),
                self.root.display()
            )
        })?;
        Ok(token.trim().to_string())
    }

    /// Takes the data directory for one process that writes or reads its
    /// files directly: an exclusive lock on `server.lock`, held while the
    /// returned file is open (the kernel drops it when the process ends,
    /// however it ends). `None`: another process holds it. A second server
    /// on the same directory would write the same log, offsets and Parquet
    /// files; two did, by accident, and their Parquet sinks stored the same
    /// 1.2 M events twice while one's offset commit failed on the other's
    /// rename.
    pub fn lock(&self) -> Result<Option<std::fs::File>> {
        let path = self.root.join("server.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }

    /// ` (pid N, HTTP addr)` of the server that wrote `server.json`, or
    /// nothing, for messages about the server holding the directory.
    pub fn holder(&self) -> String {
        match self.read_server_info() {
            Some(info) => format!(" (pid {}, HTTP {})", info.pid, info.http),
            None => String::new(),
        }
    }

    /// Records where the running server listens.
    pub fn write_server_info(&self, info: &ServerInfo) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(info)?;
        tributary_engine::fsutil::write_atomic(&self.server_info(), &bytes)?;
        Ok(())
    }

    /// Where a server using this data directory listens, if one wrote it down.
    pub fn read_server_info(&self) -> Option<ServerInfo> {
        let bytes = std::fs::read(self.server_info()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Removes `server.json` when the server stops.
    pub fn clear_server_info(&self) {
        let _ = std::fs::remove_file(self.server_info());
    }
}

/// A fresh random admin token: `trb_admin_` and 64 hex digits.
pub fn new_admin_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the operating system gave no random bytes"))?;
    Ok(format!("trb_admin_{}", hex(&bytes)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// True when `path` exists and looks like a data directory.
pub fn looks_like_data_dir(path: &Path) -> bool {
    path.join("catalog.json").exists() || path.join("admin.token").exists()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn admin_token_is_replaced_whole_and_private() {
        let temp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(temp.path());
        let first = dir.ensure_admin_token().unwrap();
        let second = new_admin_token().unwrap();
        assert_ne!(first, second);
        dir.write_admin_token(&second).unwrap();
        assert_eq!(dir.read_admin_token().unwrap(), second);
        let mode = std::fs::metadata(dir.admin_token())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(temp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["admin.token"]);
    }
}
