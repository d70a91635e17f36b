//! The SQLite registry: one database file, all of the crate's SQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SystemRandom;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params, params_from_iter};
use tokio::sync::{Mutex, MutexGuard, broadcast};

use crate::common::{
    Credentials, GroupCredentials, KeyVault, Presented, RawCertificate, RawDevice, RawGroup,
    RawTwin, admit_certificate, apply_update, certificate_taken, check_page_limit,
    check_token_expires_at, check_token_expiry, enroll_known, into_page, missing_group,
    page_query_limit, refused_certificate, refused_token, to_json,
};
use crate::master_key::{self, MasterKey};
use crate::{
    Certificate, Change, ConnectionState, Device, DeviceFilter, DeviceKeys, DevicePage,
    DevicePatch, DeviceStatus, EnrollmentGroup, Error, GroupPatch, KeySlot, NewDevice, NewGroup,
    PropertiesUpdate, Registry, Result, Side, Twin, token, validate_device_id, validate_group_name,
    validate_metadata, validate_tags, validate_thumbprint,
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
    // 3: enrollment groups (keys sealed like a device's, under the
    // associated-data id `group/<name>`, which no device id can spell), the
    // group that enrolled a device, X.509 certificates, connection state and
    // twins. What belongs to a device goes with it (`PRAGMA foreign_keys` is
    // on for every connection); a removed group leaves its devices standing
    // alone.
    "CREATE TABLE enrollment_groups (
        name          TEXT    NOT NULL PRIMARY KEY,
        tags          TEXT    NOT NULL DEFAULT '{}',
        status        TEXT    NOT NULL DEFAULT 'enabled'
                              CHECK (status IN ('enabled', 'disabled')),
        primary_key   BLOB    NOT NULL,
        secondary_key BLOB    NOT NULL,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL
     ) STRICT;
     ALTER TABLE devices ADD COLUMN enrollment_group TEXT
         REFERENCES enrollment_groups (name) ON DELETE SET NULL;
     CREATE INDEX devices_by_enrollment_group ON devices (enrollment_group);
     CREATE TABLE certificates (
        thumbprint TEXT    NOT NULL PRIMARY KEY,
        device_id  TEXT    NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        status     TEXT    NOT NULL DEFAULT 'active'
                           CHECK (status IN ('active', 'revoked')),
        not_after  INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
     ) STRICT;
     CREATE INDEX certificates_by_device ON certificates (device_id, created_at);
     CREATE TABLE connections (
        device_id     TEXT    NOT NULL PRIMARY KEY
                              REFERENCES devices (id) ON DELETE CASCADE,
        connected     INTEGER NOT NULL CHECK (connected IN (0, 1)),
        since         INTEGER NOT NULL,
        reason        TEXT,
        last_seen     INTEGER,
        last_event_at INTEGER
     ) STRICT;
     CREATE TABLE twins (
        device_id           TEXT    NOT NULL PRIMARY KEY
                                    REFERENCES devices (id) ON DELETE CASCADE,
        desired             TEXT    NOT NULL DEFAULT '{}',
        desired_version     INTEGER NOT NULL DEFAULT 0,
        desired_updated_at  INTEGER,
        reported            TEXT    NOT NULL DEFAULT '{}',
        reported_version    INTEGER NOT NULL DEFAULT 0,
        reported_updated_at INTEGER
     ) STRICT;",
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
/// One connection behind an async mutex. Reads are short point lookups and
/// run on the caller's task, cheaper than a thread hop; writes, whose
/// commits wait for an fsync, run on tokio's blocking pool
/// (`SqliteRegistry::write`).
pub struct SqliteRegistry {
    conn: Arc<Mutex<Connection>>,
    keys: KeyVault,
    changes: broadcast::Sender<Change>,
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
                            WHERE primary_key IS NOT NULL OR secondary_key IS NOT NULL)
                 OR EXISTS (SELECT 1 FROM enrollment_groups)",
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
        // A device's certificates, connection state and twin go with it, and
        // a removed group lets go of its devices (see migration 3). SQLite
        // enforces foreign keys only when asked to, per connection, and the
        // pragma is a no-op inside a transaction: so here, before migrating.
        conn.pragma_update(None, "foreign_keys", true)?;
        migrate(&mut conn)?;
        Ok(conn)
    }

    fn new(conn: Connection, master: MasterKey, rng: SystemRandom) -> Result<Self> {
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            keys: KeyVault::new(master, rng)?,
            changes,
        })
    }

    /// The connection, for statements that only read: short point lookups,
    /// run on the caller's task. While a write holds the connection, the
    /// task waits for it without holding up its worker.
    async fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().await
    }

    /// Runs statements that write on tokio's blocking pool: each commit
    /// waits for an fsync (`synchronous=FULL`), 2–13 ms under load here,
    /// and the runtime's workers (QUIC connections, rules) must not wait
    /// with it. The blocking pool rather than `block_in_place`: handing a
    /// worker's role to another thread on every write left the allocator's
    /// per-thread caches behind on idle threads (the server's peak memory
    /// went from 450 MiB to 1.2 GiB with 1,000 devices connecting).
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Connection) -> T + Send + 'static,
        T: Send + 'static,
    {
        self.write_announcing(f, |_| Vec::new()).await
    }

    /// [`Self::write`], then tells [`Registry::changes`] receivers what
    /// `changes` makes of its outcome, on the same thread: a caller that
    /// stops waiting (an HTTP client gone) cannot leave a committed change
    /// unannounced, such as a disabled device whose sessions must end.
    async fn write_announcing<T, F, A>(&self, f: F, changes: A) -> Result<T>
    where
        F: FnOnce(&mut Connection) -> T + Send + 'static,
        A: FnOnce(&T) -> Vec<Change> + Send + 'static,
        T: Send + 'static,
    {
        let mut conn = self.conn.clone().lock_owned().await;
        let sender = self.changes.clone();
        tokio::task::spawn_blocking(move || {
            let outcome = f(&mut conn);
            drop(conn);
            for change in changes(&outcome) {
                // Having no receivers is fine.
                let _ = sender.send(change);
            }
            outcome
        })
        .await
        .map_err(|e| Error::Internal(format!("a registry write did not finish: {e}")))
    }
}

/// For [`SqliteRegistry::write_announcing`]: `change`, if the write succeeded.
fn if_ok<T, E>(change: Change) -> impl FnOnce(&std::result::Result<T, E>) -> Vec<Change> {
    move |outcome| {
        if outcome.is_ok() {
            vec![change]
        } else {
            Vec::new()
        }
    }
}

/// For [`SqliteRegistry::write_announcing`]: each device a write changed
/// the stored state of.
fn updated(ids: &Result<Vec<String>>) -> Vec<Change> {
    match ids {
        Ok(ids) => ids.iter().cloned().map(Change::Updated).collect(),
        Err(_) => Vec::new(),
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
}

fn read_credentials(conn: &Connection, id: &str) -> Result<Option<Credentials>> {
    let row = conn
        .query_row(
            &format!(
                "SELECT {DEVICE_COLUMNS}, token_sha256, primary_key, secondary_key,
                        enrollment_group
                 FROM devices WHERE id = ?1"
            ),
            [id],
            |row| {
                Ok(Credentials {
                    device: RawDevice::from_row(row)?,
                    legacy_digest: row.get(6)?,
                    primary: row.get(7)?,
                    secondary: row.get(8)?,
                    enrollment_group: row.get(9)?,
                })
            },
        )
        .optional()?;
    Ok(row)
}

fn device_exists(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE id = ?1)",
        [id],
        |row| row.get(0),
    )?)
}

const GROUP_COLUMNS: &str = "name, tags, status, created_at, updated_at";

impl RawGroup {
    /// Reads [`GROUP_COLUMNS`], which come first in every query.
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            name: row.get(0)?,
            tags: row.get(1)?,
            status: row.get(2)?,
            created_at: row.get(3)?,
            updated_at: row.get(4)?,
        })
    }
}

fn read_group(conn: &Connection, name: &str) -> Result<Option<EnrollmentGroup>> {
    let raw = conn
        .query_row(
            &format!("SELECT {GROUP_COLUMNS} FROM enrollment_groups WHERE name = ?1"),
            [name],
            RawGroup::from_row,
        )
        .optional()?;
    raw.map(RawGroup::decode).transpose()
}

fn read_group_credentials(conn: &Connection, name: &str) -> Result<Option<GroupCredentials>> {
    let row = conn
        .query_row(
            &format!(
                "SELECT {GROUP_COLUMNS}, primary_key, secondary_key
                 FROM enrollment_groups WHERE name = ?1"
            ),
            [name],
            |row| {
                Ok(GroupCredentials {
                    group: RawGroup::from_row(row)?,
                    primary: row.get(5)?,
                    secondary: row.get(6)?,
                })
            },
        )
        .optional()?;
    Ok(row)
}

const CERTIFICATE_COLUMNS: &str =
    "thumbprint, device_id, status, not_after, created_at, updated_at";

impl RawCertificate {
    /// Reads [`CERTIFICATE_COLUMNS`].
    fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            thumbprint: row.get(0)?,
            device_id: row.get(1)?,
            status: row.get(2)?,
            not_after: row.get(3)?,
            created_at: row.get(4)?,
            updated_at: row.get(5)?,
        })
    }
}

const CONNECTION_COLUMNS: &str = "device_id, connected, since, reason, last_seen, last_event_at";

/// Reads [`CONNECTION_COLUMNS`].
fn connection_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, ConnectionState)> {
    Ok((
        row.get(0)?,
        ConnectionState {
            connected: row.get(1)?,
            since: row.get(2)?,
            reason: row.get(3)?,
            last_seen: row.get(4)?,
            last_event_at: row.get(5)?,
        },
    ))
}

const TWIN_COLUMNS: &str = "desired, desired_version, desired_updated_at, \
                            reported, reported_version, reported_updated_at";

impl RawTwin {
    /// Reads [`TWIN_COLUMNS`], starting at column `at`.
    fn from_row(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Self> {
        Ok(Self {
            desired: row.get(at)?,
            desired_version: row.get(at + 1)?,
            desired_updated_at: row.get(at + 2)?,
            reported: row.get(at + 3)?,
            reported_version: row.get(at + 4)?,
            reported_updated_at: row.get(at + 5)?,
        })
    }
}

/// The device's twin (empty if it has none yet), or `None` for an unknown
/// device.
fn read_twin(conn: &Connection, id: &str) -> Result<Option<Twin>> {
    let raw = conn
        .query_row(
            "SELECT COALESCE(t.desired, '{}'), COALESCE(t.desired_version, 0),
                    t.desired_updated_at,
                    COALESCE(t.reported, '{}'), COALESCE(t.reported_version, 0),
                    t.reported_updated_at
             FROM devices AS d LEFT JOIN twins AS t ON t.device_id = d.id
             WHERE d.id = ?1",
            [id],
            |row| RawTwin::from_row(row, 0),
        )
        .optional()?;
    raw.map(|raw| raw.decode(id)).transpose()
}

fn write_twin(conn: &Connection, id: &str, twin: &Twin) -> Result<()> {
    conn.execute(
        &format!(
            "INSERT INTO twins (device_id, {TWIN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (device_id) DO UPDATE SET
                 desired = excluded.desired,
                 desired_version = excluded.desired_version,
                 desired_updated_at = excluded.desired_updated_at,
                 reported = excluded.reported,
                 reported_version = excluded.reported_version,
                 reported_updated_at = excluded.reported_updated_at"
        ),
        params![
            id,
            to_json("desired properties", &twin.desired)?,
            twin.desired_version,
            twin.desired_updated_at,
            to_json("reported properties", &twin.reported)?,
            twin.reported_version,
            twin.reported_updated_at,
        ],
    )?;
    Ok(())
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

fn is_primary_key_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error(),
        Some(err) if err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

fn is_foreign_key_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error(),
        Some(err) if err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY
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
        let (primary, sealed_primary) = self.keys.new_key(&id, KeySlot::Primary)?;
        let (secondary, sealed_secondary) = self.keys.new_key(&id, KeySlot::Secondary)?;
        let (tags_json, metadata_json) = (to_json("tags", &tags)?, to_json("metadata", &metadata)?);
        let (row_id, announced_id) = (id.clone(), id.clone());
        let inserted = self
            .write_announcing(
                move |conn| {
                    conn.execute(
                        "INSERT INTO devices (id, tags, metadata, status, token_sha256, created_at,
                                      updated_at, primary_key, secondary_key)
                 VALUES (?1, ?2, ?3, ?4, X'', ?5, ?5, ?6, ?7)",
                        params![
                            row_id,
                            tags_json,
                            metadata_json,
                            status.as_str(),
                            now_ms,
                            sealed_primary,
                            sealed_secondary,
                        ],
                    )
                },
                if_ok(Change::Updated(announced_id)),
            )
            .await?;
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
        read_device(&*self.conn().await, id)
    }

    async fn list_devices(&self, filter: &DeviceFilter) -> Result<DevicePage> {
        check_page_limit(filter.limit)?;
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
        args.push(Value::Integer(page_query_limit(filter.limit)?));
        let raws = {
            let conn = self.conn().await;
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params_from_iter(args), RawDevice::from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let devices = raws
            .into_iter()
            .map(RawDevice::decode)
            .collect::<Result<Vec<_>>>()?;
        Ok(into_page(devices, filter.limit))
    }

    async fn all_devices(&self) -> Result<Vec<Device>> {
        let raws = {
            let conn = self.conn().await;
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
        let owned_id = id.to_owned();
        let announced_id = id.to_owned();
        let device = self
            .write_announcing(
                move |conn| -> Result<Device> {
                    let id = owned_id.as_str();
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let mut device =
                        read_device(&tx, id)?.ok_or_else(|| Error::NotFound(id.into()))?;
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
                    Ok(device)
                },
                if_ok(Change::Access(announced_id)),
            )
            .await??;
        Ok(device)
    }

    async fn remove_device(&self, id: &str) -> Result<()> {
        validate_device_id(id)?;
        let owned_id = id.to_owned();
        let announced_id = id.to_owned();
        let removed = self
            .write_announcing(
                move |conn| conn.execute("DELETE FROM devices WHERE id = ?1", [owned_id]),
                move |removed| match removed {
                    Ok(n) if *n > 0 => vec![Change::Access(announced_id)],
                    _ => Vec::new(),
                },
            )
            .await??;
        if removed == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok(())
    }

    /// Also, rotating the primary key of a device made before keys existed
    /// retires its legacy `trb_` token: that token stands in the primary
    /// slot until then. So such a device moves over like any other: rotate
    /// the secondary key, switch the device to it, then rotate the primary.
    async fn rotate_key(&self, id: &str, slot: KeySlot, now_ms: i64) -> Result<String> {
        validate_device_id(id)?;
        let (key, sealed) = self.keys.new_key(id, slot)?;
        let sql = match slot {
            KeySlot::Primary => {
                "UPDATE devices SET primary_key = ?2, token_sha256 = X'', updated_at = ?3
                 WHERE id = ?1"
            }
            KeySlot::Secondary => {
                "UPDATE devices SET secondary_key = ?2, updated_at = ?3 WHERE id = ?1"
            }
        };
        let owned_id = id.to_owned();
        let announced_id = id.to_owned();
        let updated = self
            .write_announcing(
                move |conn| conn.execute(sql, params![owned_id, sealed, now_ms]),
                move |updated| match updated {
                    Ok(n) if *n > 0 => vec![Change::Access(announced_id)],
                    _ => Vec::new(),
                },
            )
            .await??;
        if updated == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok(token::encode_key(&key))
    }

    async fn issue_token(&self, id: &str, expires_at: i64) -> Result<String> {
        validate_device_id(id)?;
        check_token_expires_at(expires_at)?;
        let sealed: Option<Option<Vec<u8>>> = self
            .conn()
            .await
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
        let key = self.keys.open_key(id, KeySlot::Primary, &sealed)?;
        Ok(token::sign(id, &key, expires_at))
    }

    async fn authenticate(&self, id: &str, token: &str, now_ms: i64) -> Result<Device> {
        let presented = Presented::parse(id, token)?;
        let row = read_credentials(&*self.conn().await, id)?;
        self.keys.authenticate(id, &presented, row, now_ms)
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    async fn add_certificate(
        &self,
        id: &str,
        thumbprint: &str,
        not_after_ms: i64,
        now_ms: i64,
    ) -> Result<Certificate> {
        validate_device_id(id)?;
        validate_thumbprint(thumbprint)?;
        let (owned_id, owned_thumbprint) = (id.to_owned(), thumbprint.to_owned());
        self.write(move |conn| {
            let (id, thumbprint) = (owned_id.as_str(), owned_thumbprint.as_str());
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !device_exists(&tx, id)? {
                return Err(Error::NotFound(id.to_string()));
            }
            let owner: Option<String> = tx
                .query_row(
                    "SELECT device_id FROM certificates WHERE thumbprint = ?1",
                    [thumbprint],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(owner) = owner {
                return Err(certificate_taken(thumbprint, &owner));
            }
            tx.execute(
                "INSERT INTO certificates (thumbprint, device_id, status, not_after, created_at,
                                       updated_at)
             VALUES (?1, ?2, 'active', ?3, ?4, ?4)",
                params![thumbprint, id, not_after_ms, now_ms],
            )?;
            tx.commit()?;
            Ok(Certificate::registered(
                thumbprint,
                id,
                not_after_ms,
                now_ms,
            ))
        })
        .await?
    }

    async fn list_certificates(&self, id: &str) -> Result<Vec<Certificate>> {
        validate_device_id(id)?;
        let raws = {
            let conn = self.conn().await;
            if !device_exists(&conn, id)? {
                return Err(Error::NotFound(id.to_string()));
            }
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE device_id = ?1
                 ORDER BY created_at, thumbprint"
            ))?;
            let rows = stmt.query_map([id], RawCertificate::from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        raws.into_iter().map(RawCertificate::decode).collect()
    }

    /// Revoking a revoked certificate again changes nothing (its
    /// `updated_at` stays the time it was revoked).
    async fn revoke_certificate(
        &self,
        id: &str,
        thumbprint: &str,
        now_ms: i64,
    ) -> Result<Certificate> {
        validate_device_id(id)?;
        validate_thumbprint(thumbprint)?;
        let (owned_id, owned_thumbprint) = (id.to_owned(), thumbprint.to_owned());
        let announced_id = id.to_owned();
        let raw = self
            .write_announcing(
                move |conn| -> Result<RawCertificate> {
                    let (id, thumbprint) = (owned_id.as_str(), owned_thumbprint.as_str());
                    let raw = conn
                        .query_row(
                            &format!(
                                "UPDATE certificates
                         SET status = 'revoked',
                             updated_at = CASE status WHEN 'revoked' THEN updated_at ELSE ?3 END
                         WHERE thumbprint = ?1 AND device_id = ?2
                         RETURNING {CERTIFICATE_COLUMNS}"
                            ),
                            params![thumbprint, id, now_ms],
                            RawCertificate::from_row,
                        )
                        .optional()?;
                    match raw {
                        Some(raw) => Ok(raw),
                        None if device_exists(conn, id)? => Err(Error::Missing(format!(
                            "device '{id}' has no certificate {thumbprint}"
                        ))),
                        None => Err(Error::NotFound(id.to_string())),
                    }
                },
                if_ok(Change::Access(announced_id)),
            )
            .await??;
        raw.decode()
    }

    async fn authenticate_certificate(
        &self,
        id: &str,
        thumbprint: &str,
        now_ms: i64,
    ) -> Result<Device> {
        if validate_device_id(id).is_err() || validate_thumbprint(thumbprint).is_err() {
            return Err(refused_certificate(id));
        }
        let row = self
            .conn()
            .await
            .query_row(
                "SELECT d.id, d.tags, d.metadata, d.status, d.created_at, d.updated_at,
                        c.status, c.not_after
                 FROM certificates AS c JOIN devices AS d ON d.id = c.device_id
                 WHERE c.thumbprint = ?1 AND c.device_id = ?2",
                params![thumbprint, id],
                |row| {
                    Ok((
                        RawDevice::from_row(row)?,
                        row.get::<_, String>(6)?,
                        row.get::<_, i64>(7)?,
                    ))
                },
            )
            .optional()?;
        let Some((device, status, not_after)) = row else {
            return Err(refused_certificate(id));
        };
        admit_certificate(id, thumbprint, device, &status, not_after, now_ms)
    }

    async fn create_group(
        &self,
        group: NewGroup,
        now_ms: i64,
    ) -> Result<(EnrollmentGroup, DeviceKeys)> {
        let NewGroup { name, tags, status } = group;
        validate_group_name(&name)?;
        validate_tags(&tags)?;
        let status = status.unwrap_or(DeviceStatus::Enabled);
        let (primary, sealed_primary) = self.keys.new_group_key(&name, KeySlot::Primary)?;
        let (secondary, sealed_secondary) = self.keys.new_group_key(&name, KeySlot::Secondary)?;
        let tags_json = to_json("tags", &tags)?;
        let row_name = name.clone();
        let inserted = self
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO enrollment_groups (name, tags, status, primary_key, secondary_key,
                                                created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                    params![
                        row_name,
                        tags_json,
                        status.as_str(),
                        sealed_primary,
                        sealed_secondary,
                        now_ms,
                    ],
                )
            })
            .await?;
        match inserted {
            Ok(_) => {}
            Err(e) if is_primary_key_violation(&e) => {
                return Err(Error::Conflict(format!(
                    "enrollment group '{name}' already exists"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        let keys = DeviceKeys {
            primary: token::encode_key(&primary),
            secondary: token::encode_key(&secondary),
        };
        let group = EnrollmentGroup {
            name,
            tags,
            status,
            created_at: now_ms,
            updated_at: now_ms,
        };
        Ok((group, keys))
    }

    async fn get_group(&self, name: &str) -> Result<Option<EnrollmentGroup>> {
        validate_group_name(name)?;
        read_group(&*self.conn().await, name)
    }

    async fn list_groups(&self) -> Result<Vec<EnrollmentGroup>> {
        let raws = {
            let conn = self.conn().await;
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {GROUP_COLUMNS} FROM enrollment_groups ORDER BY name"
            ))?;
            let rows = stmt.query_map([], RawGroup::from_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        raws.into_iter().map(RawGroup::decode).collect()
    }

    async fn update_group(
        &self,
        name: &str,
        patch: GroupPatch,
        now_ms: i64,
    ) -> Result<EnrollmentGroup> {
        validate_group_name(name)?;
        if let Some(tags) = &patch.tags {
            validate_tags(tags)?;
        }
        let owned_name = name.to_owned();
        self.write(move |conn| {
            let name = owned_name.as_str();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut group = read_group(&tx, name)?.ok_or_else(|| missing_group(name))?;
            let GroupPatch { tags, status } = patch;
            group.tags = tags.unwrap_or(group.tags);
            group.status = status.unwrap_or(group.status);
            group.updated_at = now_ms;
            tx.execute(
                "UPDATE enrollment_groups SET tags = ?2, status = ?3, updated_at = ?4
                 WHERE name = ?1",
                params![
                    name,
                    to_json("tags", &group.tags)?,
                    group.status.as_str(),
                    now_ms
                ],
            )?;
            tx.commit()?;
            Ok(group)
        })
        .await?
    }

    /// The devices it enrolled stop being its members (so a new group of
    /// the same name does not take them over): they are devices like any
    /// other, which authenticate with their own keys.
    async fn remove_group(&self, name: &str) -> Result<()> {
        validate_group_name(name)?;
        let owned_name = name.to_owned();
        let removed = self
            .write(move |conn| {
                conn.execute(
                    "DELETE FROM enrollment_groups WHERE name = ?1",
                    [owned_name],
                )
            })
            .await??;
        if removed == 0 {
            return Err(missing_group(name));
        }
        Ok(())
    }

    async fn rotate_group_key(&self, name: &str, slot: KeySlot, now_ms: i64) -> Result<String> {
        validate_group_name(name)?;
        let (key, sealed) = self.keys.new_group_key(name, slot)?;
        let sql = match slot {
            KeySlot::Primary => {
                "UPDATE enrollment_groups SET primary_key = ?2, updated_at = ?3 WHERE name = ?1"
            }
            KeySlot::Secondary => {
                "UPDATE enrollment_groups SET secondary_key = ?2, updated_at = ?3 WHERE name = ?1"
            }
        };
        let owned_name = name.to_owned();
        let updated = self
            .write(move |conn| conn.execute(sql, params![owned_name, sealed, now_ms]))
            .await??;
        if updated == 0 {
            return Err(missing_group(name));
        }
        Ok(token::encode_key(&key))
    }

    /// A disabled group refuses devices it has not enrolled yet; the ones it
    /// has keep working, through it too, as [`EnrollmentGroup::status`]
    /// says.
    async fn enroll(
        &self,
        group: &str,
        id: &str,
        token: &str,
        now_ms: i64,
    ) -> Result<(Device, bool)> {
        // As in `authenticate`: up to a verified signature every failure
        // gives the same reason, and ids, names and tokens of the wrong form
        // are refused straight away.
        if validate_device_id(id).is_err() || validate_group_name(group).is_err() {
            return Err(refused_token(id));
        }
        let (expires_at, signature) = token::parse(token).map_err(|_| refused_token(id))?;
        let (group_row, device_row) = {
            let conn = self.conn().await;
            (
                read_group_credentials(&conn, group)?,
                read_credentials(&conn, id)?,
            )
        };
        // Both checks run whatever was found, so that the time taken tells
        // neither whether the group exists nor whether the device does.
        let (derived, by_group) =
            self.keys
                .signed_by_group(group, id, group_row.as_ref(), expires_at, &signature)?;
        let by_device =
            self.keys
                .signed_by_device(id, device_row.as_ref(), expires_at, &signature)?;
        let group_row = match group_row {
            Some(row) => row,
            None => return Err(refused_token(id)),
        };
        if device_row.is_some() {
            return enroll_known(group, id, device_row, by_device, expires_at, now_ms)
                .map(|device| (device, false));
        }
        if !by_group {
            return Err(refused_token(id));
        }
        let enrolling = group_row.group.decode()?;
        if enrolling.status == DeviceStatus::Disabled {
            return Err(Error::Unauthorized(format!(
                "enrollment group '{group}' is disabled"
            )));
        }
        check_token_expiry(id, expires_at, now_ms)?;
        let sealed_primary = self.keys.seal(id, KeySlot::Primary, &derived.primary)?;
        let sealed_secondary = self.keys.seal(id, KeySlot::Secondary, &derived.secondary)?;
        let tags_json = to_json("tags", &enrolling.tags)?;
        let (row_id, row_group, announced_id) = (id.to_owned(), group.to_owned(), id.to_owned());
        let inserted = self
            .write_announcing(
                move |conn| {
                    conn.execute(
                        "INSERT INTO devices (id, tags, metadata, status, token_sha256, created_at,
                                      updated_at, primary_key, secondary_key, enrollment_group)
                 VALUES (?1, ?2, '{}', 'enabled', X'', ?3, ?3, ?4, ?5, ?6)",
                        params![
                            row_id,
                            tags_json,
                            now_ms,
                            sealed_primary,
                            sealed_secondary,
                            row_group,
                        ],
                    )
                },
                if_ok(Change::Updated(announced_id)),
            )
            .await?;
        match inserted {
            Ok(_) => {}
            // Another connection enrolled the device since it was looked
            // up (two first connects at once): it is a known device now,
            // with the same derived keys.
            Err(e) if is_primary_key_violation(&e) => {
                let row = read_credentials(&*self.conn().await, id)?;
                let verified =
                    self.keys
                        .signed_by_device(id, row.as_ref(), expires_at, &signature)?;
                return enroll_known(group, id, row, verified, expires_at, now_ms)
                    .map(|device| (device, false));
            }
            // The group was removed since it was looked up.
            Err(e) if is_foreign_key_violation(&e) => return Err(refused_token(id)),
            Err(e) => return Err(e.into()),
        }
        let device = Device {
            id: id.to_string(),
            tags: enrolling.tags,
            metadata: serde_json::Map::new(),
            status: DeviceStatus::Enabled,
            created_at: now_ms,
            updated_at: now_ms,
        };
        Ok((device, true))
    }

    async fn record_connection(&self, id: &str, state: &ConnectionState) -> Result<()> {
        self.record_connections(&[(id.to_string(), state.clone())])
            .await
    }

    /// One transaction, so one fsync, however many.
    async fn record_connections(&self, states: &[(String, ConnectionState)]) -> Result<()> {
        if states.is_empty() {
            return Ok(());
        }
        for (id, _) in states {
            validate_device_id(id)?;
        }
        let owned = states.to_vec();
        self.write_announcing(
            move |conn| -> Result<Vec<String>> {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut written = Vec::with_capacity(owned.len());
                {
                    // The WHERE leaves out a device that is gone (and also tells
                    // the parser that ON starts the upsert, not a join).
                    let mut upsert = tx.prepare_cached(
                        "INSERT INTO connections (device_id, connected, since, reason, last_seen,
                                              last_event_at)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6
                     WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)
                     ON CONFLICT (device_id) DO UPDATE SET
                         connected = excluded.connected, since = excluded.since,
                         reason = excluded.reason, last_seen = excluded.last_seen,
                         last_event_at = excluded.last_event_at",
                    )?;
                    for (id, s) in owned {
                        let n = upsert.execute(params![
                            id,
                            s.connected,
                            s.since,
                            s.reason,
                            s.last_seen,
                            s.last_event_at
                        ])?;
                        if n > 0 {
                            written.push(id);
                        }
                    }
                }
                tx.commit()?;
                Ok(written)
            },
            updated,
        )
        .await??;
        Ok(())
    }

    async fn connection_state(&self, id: &str) -> Result<Option<ConnectionState>> {
        validate_device_id(id)?;
        let state = self
            .conn()
            .await
            .query_row(
                &format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE device_id = ?1"),
                [id],
                connection_from_row,
            )
            .optional()?;
        Ok(state.map(|(_, state)| state))
    }

    async fn connection_states(&self) -> Result<BTreeMap<String, ConnectionState>> {
        let conn = self.conn().await;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections ORDER BY device_id"
        ))?;
        let rows = stmt.query_map([], connection_from_row)?;
        Ok(rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()?)
    }

    async fn disconnect_all(&self, reason: &str, now_ms: i64) -> Result<usize> {
        let reason = reason.to_owned();
        let ids = self
            .write_announcing(
                move |conn| -> Result<Vec<String>> {
                    let mut stmt = conn.prepare_cached(
                        "UPDATE connections SET connected = 0, since = ?1, reason = ?2
                 WHERE connected = 1
                 RETURNING device_id",
                    )?;
                    let rows =
                        stmt.query_map(params![now_ms, reason], |row| row.get::<_, String>(0))?;
                    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
                },
                updated,
            )
            .await??;
        Ok(ids.len())
    }

    async fn get_twin(&self, id: &str) -> Result<Twin> {
        validate_device_id(id)?;
        read_twin(&*self.conn().await, id)?.ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// An update that leaves the side as it was (a patch setting what is
    /// set already) is no change: the version stays, nothing is announced.
    async fn update_properties(
        &self,
        id: &str,
        side: Side,
        update: PropertiesUpdate,
        now_ms: i64,
    ) -> Result<Twin> {
        validate_device_id(id)?;
        let owned_id = id.to_owned();
        let announced_id = id.to_owned();
        let (twin, _) = self
            .write_announcing(
                move |conn| -> Result<(Twin, bool)> {
                    let id = owned_id.as_str();
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let mut twin =
                        read_twin(&tx, id)?.ok_or_else(|| Error::NotFound(id.to_string()))?;
                    let changed = apply_update(&mut twin, id, side, &update, now_ms)?;
                    if changed {
                        write_twin(&tx, id, &twin)?;
                        tx.commit()?;
                    }
                    Ok((twin, changed))
                },
                move |done| match done {
                    Ok((twin, true)) => vec![match side {
                        Side::Desired => Change::Desired(announced_id, twin.desired_version),
                        Side::Reported => Change::Updated(announced_id),
                    }],
                    _ => Vec::new(),
                },
            )
            .await??;
        Ok(twin)
    }

    async fn all_twins(&self) -> Result<BTreeMap<String, Twin>> {
        let raws = {
            let conn = self.conn().await;
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT device_id, {TWIN_COLUMNS} FROM twins ORDER BY device_id"
            ))?;
            let rows = stmt.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, RawTwin::from_row(row, 1)?))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        raws.into_iter()
            .map(|(id, raw)| {
                let twin = raw.decode(&id)?;
                Ok((id, twin))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
