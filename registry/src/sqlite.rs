//! The SQLite registry: one database file, all of the crate's SQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ring::rand::SystemRandom;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params, params_from_iter};
use tokio::sync::broadcast;

use crate::credentials::{TOKEN_PREFIX, verify_token};
use crate::master_key::{self, MasterKey};
use crate::{
    Device, DeviceFilter, DeviceKeys, DevicePage, DevicePatch, DeviceStatus, Error, KeySlot,
    MAX_PAGE, NewDevice, Registry, Result, token, validate_device_id, validate_metadata,
    validate_tags,
};

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
    // 2: metadata (a JSON object), the time of the last change, and the two
    // device keys, sealed under the master key (see `master_key`); NULL is
    // "no key in this slot". `token_sha256` stays for devices made under 1
    // (legacy `trb_` tokens). Devices made since store an empty digest
    // there, which no token matches: simpler and safer than rebuilding the
    // table to drop NOT NULL.
    "ALTER TABLE devices ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE devices ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE devices ADD COLUMN primary_key BLOB;
     ALTER TABLE devices ADD COLUMN secondary_key BLOB;
     UPDATE devices SET updated_at = created_at;",
];

/// The schema version this build writes, stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a writer waits for another process holding the database lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many announced changes a slow [`Registry::changes`] receiver may fall
/// behind before it misses some (and is told so by `RecvError::Lagged`).
const CHANGES_CAPACITY: usize = 1024;

const DEVICE_COLUMNS: &str = "id, tags, metadata, status, created_at, updated_at";

/// A [`Registry`] in one SQLite file (WAL mode, `synchronous=FULL`), with
/// the master key that seals device keys in a second file next to it (see
/// [`SqliteRegistry::key_path`]). Back up both: the database without its key
/// file holds no usable device key.
///
/// Calls run synchronously on the caller's task behind a mutex; registry
/// queries are short point lookups, so this is cheaper than a thread hop.
pub struct SqliteRegistry {
    conn: Mutex<Connection>,
    rng: SystemRandom,
    master: MasterKey,
    /// A key sealed for no device (the empty id is invalid), opened in place
    /// of a device's missing key, so that authentication does the same work
    /// whether or not the device and its keys exist.
    dummy_sealed: Vec<u8>,
    changes: broadcast::Sender<String>,
}

impl std::fmt::Debug for SqliteRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteRegistry").finish_non_exhaustive()
    }
}

impl SqliteRegistry {
    /// Opens (or creates) the registry at `path`, creating missing parent
    /// directories, bringing the schema up to date and reading (or, for a
    /// new registry, creating) its master key file, [`Self::key_path`].
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let key_path = Self::key_path(path);
        if key_path == path {
            return Err(Error::MasterKey {
                path: key_path,
                reason: "the database file itself is named like the master key file; \
                         give the database another extension (e.g. registry.db)"
                    .into(),
            });
        }
        let mut conn = Self::prepare(Connection::open(path)?)?;
        let rng = SystemRandom::new();
        // Under the write lock: two processes opening a new registry at once
        // must not each write a key file.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let has_sealed_keys: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM devices
                            WHERE primary_key IS NOT NULL OR secondary_key IS NOT NULL)",
            [],
            |row| row.get(0),
        )?;
        let master = MasterKey::load_or_create(&key_path, !has_sealed_keys, &rng)?;
        tx.commit()?;
        Self::new(conn, master, rng)
    }

    /// A registry that lives only as long as this value, with a random
    /// master key; for tests and demos.
    pub fn open_in_memory() -> Result<Self> {
        let conn = Self::prepare(Connection::open_in_memory()?)?;
        let rng = SystemRandom::new();
        let master = MasterKey::random(&rng)?;
        Self::new(conn, master, rng)
    }

    /// Where the master key of the registry at `db_path` is kept: the same
    /// name with the extension `key` (`registry.db` → `registry.key`). It
    /// holds 32 random bytes, readable by the owner only.
    pub fn key_path(db_path: &Path) -> PathBuf {
        master_key::key_path(db_path)
    }

    fn prepare(mut conn: Connection) -> Result<Connection> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL lets readers (e.g. a second CLI process) work during writes; an
        // in-memory database answers "memory", which is fine.
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
        // Device creation and key rotation hand out a key exactly once; FULL
        // makes sure a key the caller has seen survives a power cut.
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn)?;
        Ok(conn)
    }

    fn new(conn: Connection, master: MasterKey, rng: SystemRandom) -> Result<Self> {
        let dummy_key = token::generate_key(&rng)?;
        let dummy_sealed = master.seal(&rng, "", KeySlot::Primary, &dummy_key)?;
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        Ok(Self {
            conn: Mutex::new(conn),
            rng,
            master,
            dummy_sealed,
            changes,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held cannot leave the database half
        // written (an open transaction rolls back when dropped), so the
        // connection is still good.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells [`Registry::changes`] receivers; having none is fine.
    fn announce(&self, id: &str) {
        let _ = self.changes.send(id.to_string());
    }

    /// Makes a key and seals it for `id`'s `slot`: (plain, sealed).
    fn new_key(&self, id: &str, slot: KeySlot) -> Result<([u8; token::KEY_LEN], Vec<u8>)> {
        let key = token::generate_key(&self.rng)?;
        let sealed = self.master.seal(&self.rng, id, slot, &key)?;
        Ok((key, sealed))
    }

    /// The key in a slot, opened. A sealed key that does not open is a
    /// broken setup (another master key file, a row copied from elsewhere),
    /// not a wrong token, so it is an error of its own.
    fn open_key(&self, id: &str, slot: KeySlot, sealed: &[u8]) -> Result<Vec<u8>> {
        self.master.open(id, slot, sealed).ok_or_else(|| {
            Error::Internal(format!(
                "device '{id}': its stored {} key does not open with this registry's master \
                 key (was the key file replaced, or the row copied from another registry?)",
                slot_name(slot)
            ))
        })
    }

    /// The key to check a signature against, and whether it is real: the
    /// slot's key, or the dummy key (with the same work) when there is none.
    fn key_or_dummy(
        &self,
        id: &str,
        slot: KeySlot,
        sealed: Option<&[u8]>,
    ) -> Result<(Vec<u8>, bool)> {
        match sealed {
            Some(sealed) => Ok((self.open_key(id, slot, sealed)?, true)),
            None => {
                let dummy = self.master.open("", KeySlot::Primary, &self.dummy_sealed);
                Ok((dummy.unwrap_or_default(), false))
            }
        }
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
    metadata: String,
    status: String,
    created_at: i64,
    updated_at: i64,
}

impl RawDevice {
    /// Reads [`DEVICE_COLUMNS`], which come first in every query.
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            tags: row.get(1)?,
            metadata: row.get(2)?,
            status: row.get(3)?,
            created_at: row.get(4)?,
            updated_at: row.get(5)?,
        })
    }

    fn decode(self) -> Result<Device> {
        let tags: BTreeMap<String, String> = serde_json::from_str(&self.tags).map_err(|e| {
            Error::Internal(format!(
                "device '{}': stored tags are not a JSON object of strings: {e}",
                self.id
            ))
        })?;
        let metadata = serde_json::from_str(&self.metadata).map_err(|e| {
            Error::Internal(format!(
                "device '{}': stored metadata is not a JSON object: {e}",
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
            metadata,
            status,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// What authentication reads of a device.
struct Credentials {
    device: RawDevice,
    legacy_digest: Vec<u8>,
    primary: Option<Vec<u8>>,
    secondary: Option<Vec<u8>>,
}

fn read_device(conn: &Connection, id: &str) -> Result<Option<Device>> {
    let raw = conn
        .query_row(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
            [id],
            RawDevice::from_row,
        )
        .optional()?;
    raw.map(RawDevice::decode).transpose()
}

fn to_json(what: &str, value: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::Internal(format!("cannot encode {what} as JSON: {e}")))
}

fn slot_name(slot: KeySlot) -> &'static str {
    match slot {
        KeySlot::Primary => "primary",
        KeySlot::Secondary => "secondary",
    }
}

fn is_primary_key_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error(),
        Some(err) if err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// A device id as it may be shown back to whoever sent it: control
/// characters escaped, cut to the longest valid id.
fn shown_id(id: &str) -> String {
    let mut out: String = id
        .chars()
        .take(crate::MAX_DEVICE_ID_LEN)
        .flat_map(char::escape_debug)
        .collect();
    if id.chars().nth(crate::MAX_DEVICE_ID_LEN).is_some() {
        out.push_str("...");
    }
    out
}

/// Seconds since the Unix epoch as RFC 3339 (UTC), for people.
fn rfc3339(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0).map_or_else(
        || format!("{seconds} seconds after the Unix epoch"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

#[async_trait::async_trait]
impl Registry for SqliteRegistry {
    async fn create_device(&self, device: NewDevice, now_ms: i64) -> Result<(Device, DeviceKeys)> {
        let NewDevice {
            id,
            tags,
            metadata,
            status,
        } = device;
        validate_device_id(&id)?;
        validate_tags(&tags)?;
        validate_metadata(&metadata)?;
        let status = status.unwrap_or(DeviceStatus::Enabled);
        let (primary, sealed_primary) = self.new_key(&id, KeySlot::Primary)?;
        let (secondary, sealed_secondary) = self.new_key(&id, KeySlot::Secondary)?;
        let inserted = self.conn().execute(
            "INSERT INTO devices (id, tags, metadata, status, token_sha256, created_at,
                                  updated_at, primary_key, secondary_key)
             VALUES (?1, ?2, ?3, ?4, X'', ?5, ?5, ?6, ?7)",
            params![
                id,
                to_json("tags", &tags)?,
                to_json("metadata", &metadata)?,
                status.as_str(),
                now_ms,
                sealed_primary,
                sealed_secondary,
            ],
        );
        match inserted {
            Ok(_) => {}
            Err(e) if is_primary_key_violation(&e) => return Err(Error::AlreadyExists(id)),
            Err(e) => return Err(e.into()),
        }
        let keys = DeviceKeys {
            primary: token::encode_key(&primary),
            secondary: token::encode_key(&secondary),
        };
        let device = Device {
            id,
            tags,
            metadata,
            status,
            created_at: now_ms,
            updated_at: now_ms,
        };
        Ok((device, keys))
    }

    async fn get_device(&self, id: &str) -> Result<Option<Device>> {
        validate_device_id(id)?;
        read_device(&self.conn(), id)
    }

    async fn list_devices(&self, filter: &DeviceFilter) -> Result<DevicePage> {
        if !(1..=MAX_PAGE).contains(&filter.limit) {
            return Err(Error::InvalidRequest(format!(
                "a page holds 1 to {MAX_PAGE} devices; {} were asked for",
                filter.limit
            )));
        }
        validate_tags(&filter.tags)?;
        let mut sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE TRUE");
        let mut args: Vec<Value> = Vec::new();
        if let Some(after) = &filter.after {
            sql.push_str(" AND id > ?");
            args.push(Value::Text(after.clone()));
        }
        if let Some(status) = filter.status {
            sql.push_str(" AND status = ?");
            args.push(Value::Text(status.as_str().into()));
        }
        for (key, value) in &filter.tags {
            // validate_tags allows only [A-Za-z0-9_.-] in keys, so the quoted
            // path names exactly this key; it is bound anyway, like the value.
            sql.push_str(" AND json_extract(tags, ?) = ?");
            args.push(Value::Text(format!("$.\"{key}\"")));
            args.push(Value::Text(value.clone()));
        }
        // One more than asked for tells whether there is a next page.
        sql.push_str(" ORDER BY id LIMIT ?");
        args.push(Value::Integer(i64::try_from(filter.limit + 1).map_err(
            |_| Error::Internal("page limit does not fit in i64".into()),
        )?));
        let raws = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params_from_iter(args), RawDevice::from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let mut devices = raws
            .into_iter()
            .map(RawDevice::decode)
            .collect::<Result<Vec<_>>>()?;
        let next = if devices.len() > filter.limit {
            devices.truncate(filter.limit);
            devices.last().map(|d| d.id.clone())
        } else {
            None
        };
        Ok(DevicePage { devices, next })
    }

    async fn all_devices(&self) -> Result<Vec<Device>> {
        let raws = {
            let conn = self.conn();
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"))?;
            let rows = stmt.query_map([], RawDevice::from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        raws.into_iter().map(RawDevice::decode).collect()
    }

    async fn update_device(&self, id: &str, patch: DevicePatch, now_ms: i64) -> Result<Device> {
        validate_device_id(id)?;
        if let Some(tags) = &patch.tags {
            validate_tags(tags)?;
        }
        if let Some(metadata) = &patch.metadata {
            validate_metadata(metadata)?;
        }
        let device = {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut device = read_device(&tx, id)?.ok_or_else(|| Error::NotFound(id.into()))?;
            let DevicePatch {
                tags,
                metadata,
                status,
            } = patch;
            device.tags = tags.unwrap_or(device.tags);
            device.metadata = metadata.unwrap_or(device.metadata);
            device.status = status.unwrap_or(device.status);
            device.updated_at = now_ms;
            tx.execute(
                "UPDATE devices SET tags = ?2, metadata = ?3, status = ?4, updated_at = ?5
                 WHERE id = ?1",
                params![
                    id,
                    to_json("tags", &device.tags)?,
                    to_json("metadata", &device.metadata)?,
                    device.status.as_str(),
                    now_ms,
                ],
            )?;
            tx.commit()?;
            device
        };
        self.announce(id);
        Ok(device)
    }

    async fn remove_device(&self, id: &str) -> Result<()> {
        validate_device_id(id)?;
        let removed = self
            .conn()
            .execute("DELETE FROM devices WHERE id = ?1", [id])?;
        if removed == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        self.announce(id);
        Ok(())
    }

    /// Also, rotating the primary key of a device made before keys existed
    /// retires its legacy `trb_` token: that token stands in the primary
    /// slot until then. So such a device moves over like any other: rotate
    /// the secondary key, switch the device to it, then rotate the primary.
    async fn rotate_key(&self, id: &str, slot: KeySlot, now_ms: i64) -> Result<String> {
        validate_device_id(id)?;
        let (key, sealed) = self.new_key(id, slot)?;
        let sql = match slot {
            KeySlot::Primary => {
                "UPDATE devices SET primary_key = ?2, token_sha256 = X'', updated_at = ?3
                 WHERE id = ?1"
            }
            KeySlot::Secondary => {
                "UPDATE devices SET secondary_key = ?2, updated_at = ?3 WHERE id = ?1"
            }
        };
        let updated = self.conn().execute(sql, params![id, sealed, now_ms])?;
        if updated == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        self.announce(id);
        Ok(token::encode_key(&key))
    }

    async fn issue_token(&self, id: &str, expires_at: i64) -> Result<String> {
        validate_device_id(id)?;
        if expires_at < 0 {
            return Err(Error::InvalidRequest(format!(
                "a token expires at a time in seconds since the Unix epoch, from 0 on; \
                 {expires_at} is before it"
            )));
        }
        let sealed: Option<Option<Vec<u8>>> = self
            .conn()
            .query_row(
                "SELECT primary_key FROM devices WHERE id = ?1",
                [id],
                |row| row.get(0),
            )
            .optional()?;
        let sealed = sealed
            .ok_or_else(|| Error::NotFound(id.to_string()))?
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "device '{id}' has no primary key: it was made before device keys and \
                     still uses its legacy token; rotate its primary key first"
                ))
            })?;
        let key = self.open_key(id, KeySlot::Primary, &sealed)?;
        Ok(token::sign(id, &key, expires_at))
    }

    async fn authenticate(&self, id: &str, token: &str, now_ms: i64) -> Result<Device> {
        let refused = || {
            Error::Unauthorized(format!(
                "device '{}': unknown device, or a token not signed by its keys",
                shown_id(id)
            ))
        };
        // Up to a verified signature, every failure looks the same. Ids and
        // tokens of the wrong form are refused straight away: that they are
        // malformed is no secret, it says nothing about which devices exist.
        if validate_device_id(id).is_err() || token.len() > token::MAX_TOKEN_LEN {
            return Err(refused());
        }
        let parsed = if token.starts_with(TOKEN_PREFIX) {
            None
        } else {
            Some(token::parse(token).map_err(|_| refused())?)
        };
        let row = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {DEVICE_COLUMNS}, token_sha256, primary_key, secondary_key
                     FROM devices WHERE id = ?1"
                ),
                [id],
                |row| {
                    Ok(Credentials {
                        device: RawDevice::from_row(row)?,
                        legacy_digest: row.get(6)?,
                        primary: row.get(7)?,
                        secondary: row.get(8)?,
                    })
                },
            )
            .optional()?;
        // The same work whether or not the device, or a key, exists: every
        // check below runs, against dummies where something is missing.
        let verified = match &parsed {
            None => verify_token(token, row.as_ref().map(|r| &r.legacy_digest[..])),
            Some((expires_at, signature)) => {
                let primary = row.as_ref().and_then(|r| r.primary.as_deref());
                let secondary = row.as_ref().and_then(|r| r.secondary.as_deref());
                let (primary, has_primary) = self.key_or_dummy(id, KeySlot::Primary, primary)?;
                let (secondary, has_secondary) =
                    self.key_or_dummy(id, KeySlot::Secondary, secondary)?;
                let by_primary = token::verify(id, &primary, *expires_at, signature);
                let by_secondary = token::verify(id, &secondary, *expires_at, signature);
                (by_primary & has_primary) | (by_secondary & has_secondary)
            }
        };
        let row = match row {
            Some(row) if verified => row,
            _ => return Err(refused()),
        };
        let device = row.device.decode()?;
        if device.status == DeviceStatus::Disabled {
            return Err(Error::Unauthorized(format!("device '{id}' is disabled")));
        }
        if let Some((expires_at, _)) = parsed
            && now_ms >= expires_at.saturating_mul(1000)
        {
            return Err(Error::Unauthorized(format!(
                "the token of device '{id}' expired at {}",
                rfc3339(expires_at)
            )));
        }
        Ok(device)
    }

    fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests;
