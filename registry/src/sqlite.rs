//! The SQLite registry: one database file, all of the crate's SQL.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ring::rand::SystemRandom;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::credentials::{digest_token, generate_token, verify_token};
use crate::{Device, DeviceStatus, Error, Registry, Result, validate_device_id, validate_tags};

/// Schema migrations, oldest first; migration `i` takes the database from
/// `PRAGMA user_version` `i` to `i + 1`. Append only: never edit one that has
/// shipped, add a new one (e.g. `ALTER TABLE devices ADD COLUMN ...`).
const MIGRATIONS: &[&str] = &[
    // 1: devices with their tags (a JSON object) and token digest.
    "CREATE TABLE devices (
        id           TEXT    NOT NULL PRIMARY KEY,
        tags         TEXT    NOT NULL DEFAULT '{}',
        status       TEXT    NOT NULL DEFAULT 'enabled'
                             CHECK (status IN ('enabled', 'disabled')),
        token_sha256 BLOB    NOT NULL,
        created_at   INTEGER NOT NULL
    ) STRICT;",
];

/// The schema version this build writes, stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a writer waits for another process holding the database lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const DEVICE_COLUMNS: &str = "id, tags, status, created_at";

/// A [`Registry`] in one SQLite file (WAL mode, `synchronous=FULL`).
///
/// Calls run synchronously on the caller's task behind a mutex; registry
/// queries are short point lookups, so this is cheaper than a thread hop.
pub struct SqliteRegistry {
    conn: Mutex<Connection>,
    rng: SystemRandom,
}

impl std::fmt::Debug for SqliteRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteRegistry").finish_non_exhaustive()
    }
}

impl SqliteRegistry {
    /// Opens (or creates) the registry at `path`, creating missing parent
    /// directories and bringing the schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        Self::from_connection(Connection::open(path)?)
    }

    /// A registry that lives only as long as this value; for tests and demos.
    pub fn open_in_memory() -> Result<Self> {
        Self::from_connection(Connection::open_in_memory()?)
    }

    fn from_connection(mut conn: Connection) -> Result<Self> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets readers (e.g. a second CLI process) work during writes; an
        // in-memory database answers "memory", which is fine.
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
        // Device creation hands out a token exactly once; FULL makes sure a
        // token the caller has seen survives a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            rng: SystemRandom::new(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held cannot leave the database half
        // written (an open transaction rolls back when dropped), so the
        // connection is still good.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Brings the schema from whatever `user_version` says up to
/// [`SCHEMA_VERSION`], each step in the same transaction as its version bump.
fn migrate(conn: &mut Connection) -> Result<()> {
    // IMMEDIATE takes the write lock up front, so two processes opening a new
    // file at once do not both run migration 1.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let done = usize::try_from(found)
        .map_err(|_| Error::Internal(format!("negative registry schema version {found}")))?;
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (step + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

/// A `devices` row as read, before its text columns are decoded.
struct RawDevice {
    id: String,
    tags: String,
    status: String,
    created_at: i64,
}

impl RawDevice {
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            tags: row.get(1)?,
            status: row.get(2)?,
            created_at: row.get(3)?,
        })
    }

    fn decode(self) -> Result<Device> {
        let tags: BTreeMap<String, String> = serde_json::from_str(&self.tags).map_err(|e| {
            Error::Internal(format!(
                "device '{}': stored tags are not a JSON object of strings: {e}",
                self.id
            ))
        })?;
        let status = DeviceStatus::parse(&self.status).ok_or_else(|| {
            Error::Internal(format!(
                "device '{}': unknown stored status '{}'",
                self.id, self.status
            ))
        })?;
        Ok(Device {
            id: self.id,
            tags,
            status,
            created_at: self.created_at,
        })
    }
}

fn is_primary_key_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error(),
        Some(err) if err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

#[async_trait::async_trait]
impl Registry for SqliteRegistry {
    async fn create_device(
        &self,
        id: &str,
        tags: BTreeMap<String, String>,
        now_ms: i64,
    ) -> Result<(Device, String)> {
        validate_device_id(id)?;
        validate_tags(&tags)?;
        let token = generate_token(&self.rng)?;
        let digest = digest_token(&token);
        let tags_json = serde_json::to_string(&tags)
            .map_err(|e| Error::Internal(format!("cannot encode tags as JSON: {e}")))?;
        let status = DeviceStatus::Enabled;
        let inserted = self.conn().execute(
            "INSERT INTO devices (id, tags, status, token_sha256, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, tags_json, status.as_str(), &digest[..], now_ms],
        );
        match inserted {
            Ok(_) => {}
            Err(e) if is_primary_key_violation(&e) => {
                return Err(Error::AlreadyExists(id.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
        let device = Device {
            id: id.to_string(),
            tags,
            status,
            created_at: now_ms,
        };
        Ok((device, token))
    }

    async fn get_device(&self, id: &str) -> Result<Option<Device>> {
        validate_device_id(id)?;
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
                [id],
                RawDevice::from_row,
            )
            .optional()?;
        raw.map(RawDevice::decode).transpose()
    }

    async fn list_devices(&self) -> Result<Vec<Device>> {
        let raws = {
            let conn = self.conn();
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"))?;
            let rows = stmt.query_map([], RawDevice::from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        raws.into_iter().map(RawDevice::decode).collect()
    }

    async fn remove_device(&self, id: &str) -> Result<()> {
        validate_device_id(id)?;
        let removed = self
            .conn()
            .execute("DELETE FROM devices WHERE id = ?1", [id])?;
        if removed == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok(())
    }

    async fn authenticate(&self, id: &str, token: &str) -> Result<Device> {
        let unauthorized = || Error::Unauthorized(id.to_string());
        if validate_device_id(id).is_err() {
            // No such device can exist; answer as for any unknown device.
            verify_token(token, None);
            return Err(unauthorized());
        }
        let row = self
            .conn()
            .query_row(
                &format!("SELECT {DEVICE_COLUMNS}, token_sha256 FROM devices WHERE id = ?1"),
                [id],
                |row| Ok((RawDevice::from_row(row)?, row.get::<_, Vec<u8>>(4)?)),
            )
            .optional()?;
        let (raw, digest) = match row {
            Some((raw, digest)) => (Some(raw), Some(digest)),
            None => (None, None),
        };
        if !verify_token(token, digest.as_deref()) {
            return Err(unauthorized());
        }
        let device = raw.ok_or_else(unauthorized)?.decode()?;
        if device.status != DeviceStatus::Enabled {
            return Err(unauthorized());
        }
        Ok(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedRegistry;
    use std::sync::Arc;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn db_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("registry.db")
    }

    #[tokio::test]
    async fn create_get_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::open(&db_path(&dir)).unwrap();

        let (b, _) = reg
            .create_device("sensor-b", tags(&[("site", "north")]), 2_000)
            .await
            .unwrap();
        let (a, _) = reg
            .create_device("sensor-a", tags(&[]), 1_000)
            .await
            .unwrap();
        assert_eq!(a.status, DeviceStatus::Enabled);
        assert_eq!(b.tags, tags(&[("site", "north")]));
        assert_eq!(b.created_at, 2_000);

        assert_eq!(reg.get_device("sensor-b").await.unwrap(), Some(b.clone()));
        assert_eq!(reg.get_device("sensor-c").await.unwrap(), None);
        assert_eq!(reg.list_devices().await.unwrap(), vec![a.clone(), b]);

        reg.remove_device("sensor-b").await.unwrap();
        assert_eq!(reg.get_device("sensor-b").await.unwrap(), None);
        assert_eq!(reg.list_devices().await.unwrap(), vec![a]);
        let err = reg.remove_device("sensor-b").await.unwrap_err();
        assert!(
            matches!(&err, Error::NotFound(id) if id == "sensor-b"),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "device 'sensor-b' does not exist");
        assert!(err.is_user_error());
    }

    #[tokio::test]
    async fn duplicate_create_is_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::open(&db_path(&dir)).unwrap();
        let (_, token) = reg.create_device("dev1", tags(&[]), 1).await.unwrap();
        let err = reg
            .create_device("dev1", tags(&[("x", "y")]), 2)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::AlreadyExists(id) if id == "dev1"),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "device 'dev1' already exists");
        // The first device, and its token, are untouched.
        let dev = reg.authenticate("dev1", &token).await.unwrap();
        assert_eq!(dev.tags, tags(&[]));
        assert_eq!(dev.created_at, 1);
    }

    #[tokio::test]
    async fn authenticate_cases() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::open(&db_path(&dir)).unwrap();
        let (dev, token) = reg
            .create_device("gw:1", tags(&[("role", "gateway")]), 5)
            .await
            .unwrap();
        let (_, other_token) = reg.create_device("gw:2", tags(&[]), 6).await.unwrap();
        assert!(token.starts_with("trb_"));

        assert_eq!(reg.authenticate("gw:1", &token).await.unwrap(), dev);

        let unauthorized = |r: Result<Device>, id: &str| {
            let err = r.unwrap_err();
            assert!(matches!(&err, Error::Unauthorized(i) if i == id), "{err:?}");
            assert_eq!(
                err.to_string(),
                format!("device '{id}': unknown device or wrong token")
            );
            assert!(err.is_user_error());
        };
        unauthorized(reg.authenticate("gw:1", "trb_wrong").await, "gw:1");
        unauthorized(reg.authenticate("gw:1", "").await, "gw:1");
        unauthorized(reg.authenticate("gw:1", &other_token).await, "gw:1");
        unauthorized(reg.authenticate("nobody", &token).await, "nobody");
        unauthorized(reg.authenticate("not valid!", &token).await, "not valid!");

        reg.remove_device("gw:1").await.unwrap();
        unauthorized(reg.authenticate("gw:1", &token).await, "gw:1");
    }

    #[tokio::test]
    async fn disabled_device_cannot_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::open(&db_path(&dir)).unwrap();
        let (_, token) = reg.create_device("d", tags(&[]), 0).await.unwrap();
        reg.conn()
            .execute("UPDATE devices SET status = 'disabled' WHERE id = 'd'", [])
            .unwrap();
        let err = reg.authenticate("d", &token).await.unwrap_err();
        assert!(matches!(err, Error::Unauthorized(_)), "{err:?}");
        let dev = reg.get_device("d").await.unwrap().unwrap();
        assert_eq!(dev.status, DeviceStatus::Disabled);
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let (dev, token) = {
            let reg = SqliteRegistry::open(&path).unwrap();
            reg.create_device("keep", tags(&[("unit", "°C")]), 42)
                .await
                .unwrap()
        };
        let reg = SqliteRegistry::open(&path).unwrap();
        assert_eq!(reg.get_device("keep").await.unwrap(), Some(dev.clone()));
        assert_eq!(reg.authenticate("keep", &token).await.unwrap(), dev);
    }

    #[tokio::test]
    async fn token_is_not_stored_in_plain_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let reg = SqliteRegistry::open(&path).unwrap();
        let (_, token) = reg.create_device("secret", tags(&[]), 0).await.unwrap();
        let body = token.strip_prefix("trb_").unwrap();

        // Nothing in the table holds the token, but the digest is there.
        let cells: Vec<Vec<u8>> = {
            let conn = reg.conn();
            let mut stmt = conn.prepare("SELECT * FROM devices").unwrap();
            let ncols = stmt.column_count();
            let mut rows = stmt.query([]).unwrap();
            let mut cells = Vec::new();
            while let Some(row) = rows.next().unwrap() {
                for i in 0..ncols {
                    cells.push(match row.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => {
                            b.to_vec()
                        }
                        other => format!("{other:?}").into_bytes(),
                    });
                }
            }
            cells
        };
        assert!(cells.iter().any(|c| c[..] == digest_token(&token)[..]));
        for cell in &cells {
            assert!(!contains(cell, body.as_bytes()), "token found in a column");
        }

        // Nor do the files on disk (database and WAL), open or closed.
        let scan = || {
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                let bytes = std::fs::read(entry.unwrap().path()).unwrap();
                assert!(!contains(&bytes, body.as_bytes()), "token found on disk");
            }
        };
        scan();
        drop(reg);
        scan();
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn invalid_input_is_rejected_with_a_reason() {
        let reg = SqliteRegistry::open_in_memory().unwrap();
        let err = reg.create_device("bad id", tags(&[]), 0).await.unwrap_err();
        assert!(matches!(err, Error::InvalidId(_)), "{err:?}");
        assert!(err.to_string().contains("contains ' '"), "{err}");
        assert!(err.is_user_error());

        let err = reg
            .create_device("ok", tags(&[("bad key", "v")]), 0)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidTag(_)), "{err:?}");
        assert!(err.to_string().contains("tag key \"bad key\""), "{err}");

        let err = reg
            .create_device("ok", tags(&[("k", "line\nbreak")]), 0)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("control character"), "{err}");

        assert!(matches!(reg.get_device("").await, Err(Error::InvalidId(_))));
        assert!(matches!(
            reg.remove_device("/etc").await,
            Err(Error::InvalidId(_))
        ));
        // Nothing was created by the failed calls.
        assert!(reg.list_devices().await.unwrap().is_empty());
    }

    #[test]
    fn open_sets_pragmas_and_creates_parent_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/registry.db");
        let reg = SqliteRegistry::open(&path).unwrap();
        assert!(path.exists());
        let conn = reg.conn();
        let int =
            |name: &str| -> i64 { conn.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(int("synchronous"), 2, "2 is FULL");
        assert_eq!(int("user_version"), SCHEMA_VERSION);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = SqliteRegistry::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                Error::SchemaTooNew {
                    found: 99,
                    supported: SCHEMA_VERSION
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_user_error());
    }

    #[tokio::test]
    async fn usable_as_a_shared_trait_object() {
        let reg: SharedRegistry = Arc::new(SqliteRegistry::open_in_memory().unwrap());
        let r2 = Arc::clone(&reg);
        let (_, token) = tokio::spawn(async move { r2.create_device("x", tags(&[]), 0).await })
            .await
            .unwrap()
            .unwrap();
        reg.authenticate("x", &token).await.unwrap();
    }
}
