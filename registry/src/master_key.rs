//! Device keys at rest: sealed with AES-256-GCM under a master key that
//! lives in its own file next to the database.
//!
//! A copy of the database alone (a backup, a stolen file) therefore holds no
//! usable device key. A sealed key is `nonce || ciphertext || tag`, with a
//! fresh random 96-bit nonce per seal, and the device id and slot as
//! associated data, so that a sealed key copied into another row or slot
//! does not open.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, KeySlot, Result};

/// Length of the master key, in bytes.
pub const MASTER_KEY_LEN: usize = 32;

/// The AEAD key that seals device keys. Its bytes are never printed.
pub(crate) struct MasterKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A random key that exists only in memory.
    pub(crate) fn random(rng: &SystemRandom) -> Result<Self> {
        let mut bytes = [0u8; MASTER_KEY_LEN];
        fill(rng, &mut bytes)?;
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8; MASTER_KEY_LEN]) -> Result<Self> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| Error::Internal("AES-256-GCM refused a 32-byte key".into()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }

    /// Reads the master key at `path`, or, if there is none, makes one and
    /// writes it there (mode 0600, through a temporary file, fsynced and
    /// renamed into place).
    ///
    /// `may_create` is false when the database already holds sealed keys:
    /// a new master key could not open them, so a missing file is an error
    /// rather than a fresh start. The caller holds the database's write lock,
    /// so two processes opening the same registry do not both create a key.
    pub(crate) fn load_or_create(
        path: &Path,
        may_create: bool,
        rng: &SystemRandom,
    ) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes: [u8; MASTER_KEY_LEN] =
                    bytes.as_slice().try_into().map_err(|_| Error::MasterKey {
                        path: path.to_path_buf(),
                        reason: format!(
                            "the file is {} bytes long; a master key is exactly \
                             {MASTER_KEY_LEN} bytes (is it the right file?)",
                            bytes.len()
                        ),
                    })?;
                Self::from_bytes(&bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !may_create {
                    return Err(Error::MasterKey {
                        path: path.to_path_buf(),
                        reason: "the file is missing, but the database holds device keys \
                                 sealed with it; restore the file from a backup"
                            .into(),
                    });
                }
                let mut bytes = [0u8; MASTER_KEY_LEN];
                fill(rng, &mut bytes)?;
                write_new_secret_file(path, &bytes).map_err(io)?;
                Self::from_bytes(&bytes)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Seals a device key for `device_id`'s `slot`.
    pub(crate) fn seal(
        &self,
        rng: &SystemRandom,
        device_id: &str,
        slot: KeySlot,
        plain: &[u8],
    ) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        fill(rng, &mut nonce)?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(device_id, slot)),
                &mut buf,
            )
            .map_err(|_| Error::Internal("AES-256-GCM sealing failed".into()))?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + buf.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&buf);
        Ok(sealed)
    }

    /// Opens what [`MasterKey::seal`] sealed for the same device and slot;
    /// `None` if it was sealed under another master key, device or slot, or
    /// altered.
    pub(crate) fn open(&self, device_id: &str, slot: KeySlot, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(associated_data(device_id, slot)), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// Where the master key of the database at `db_path` lives: the same name
/// with the extension `key` (`registry.db` → `registry.key`).
pub fn key_path(db_path: &Path) -> PathBuf {
    db_path.with_extension("key")
}

/// Binds a sealed key to its row and slot. Ids cannot contain a newline,
/// so the pair has one spelling.
fn associated_data(device_id: &str, slot: KeySlot) -> Vec<u8> {
    let slot = match slot {
        KeySlot::Primary => "primary",
        KeySlot::Secondary => "secondary",
    };
    format!("tributary device key\n{device_id}\n{slot}").into_bytes()
}

fn fill(rng: &SystemRandom, out: &mut [u8]) -> Result<()> {
    rng.fill(out)
        .map_err(|_| Error::Internal("the system random generator failed".into()))
}

/// Writes `bytes` to `path`, readable by the owner only, so that the file
/// either does not exist or is complete, even after a crash.
fn write_new_secret_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A leftover from a crash may have any mode; start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    // The umask can only take bits away, but say exactly what is meant.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    #[cfg(unix)]
    {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_for_their_device_and_slot() {
        let rng = SystemRandom::new();
        let master = MasterKey::random(&rng).unwrap();
        let plain = [7u8; 32];
        let sealed = master.seal(&rng, "d1", KeySlot::Primary, &plain).unwrap();
        assert_eq!(sealed.len(), NONCE_LEN + 32 + 16);
        assert!(!sealed.windows(32).any(|w| w == plain));
        assert_eq!(
            master.open("d1", KeySlot::Primary, &sealed).as_deref(),
            Some(&plain[..])
        );
        assert_eq!(master.open("d2", KeySlot::Primary, &sealed), None);
        assert_eq!(master.open("d1", KeySlot::Secondary, &sealed), None);
        let other = MasterKey::random(&rng).unwrap();
        assert_eq!(other.open("d1", KeySlot::Primary, &sealed), None);
        let mut tampered = sealed.clone();
        tampered[NONCE_LEN] ^= 1;
        assert_eq!(master.open("d1", KeySlot::Primary, &tampered), None);
        assert_eq!(master.open("d1", KeySlot::Primary, &sealed[..5]), None);
        // Fresh nonce each time.
        let again = master.seal(&rng, "d1", KeySlot::Primary, &plain).unwrap();
        assert_ne!(sealed, again);
        assert_eq!(format!("{master:?}"), "MasterKey(..)");
    }

    #[test]
    fn key_file_is_created_once_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir.path().join("registry.db"));
        assert_eq!(path, dir.path().join("registry.key"));
        let rng = SystemRandom::new();

        let err = MasterKey::load_or_create(&path, false, &rng).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(!path.exists());

        let first = MasterKey::load_or_create(&path, true, &rng).unwrap();
        let sealed = first.seal(&rng, "d", KeySlot::Primary, b"k").unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), MASTER_KEY_LEN);
        let again = MasterKey::load_or_create(&path, false, &rng).unwrap();
        assert_eq!(
            again.open("d", KeySlot::Primary, &sealed).as_deref(),
            Some(&b"k"[..])
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "not rewritten");
        assert!(!dir.path().join("registry.key.tmp").exists());

        std::fs::write(&path, b"short").unwrap();
        let err = MasterKey::load_or_create(&path, true, &rng).unwrap_err();
        assert!(matches!(err, Error::MasterKey { .. }), "{err:?}");
        assert!(err.to_string().contains("5 bytes"), "{err}");
        assert!(err.to_string().contains("exactly 32"), "{err}");
    }
}
