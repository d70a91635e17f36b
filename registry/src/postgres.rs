//! The PostgreSQL registry: the tables and behaviour of the SQLite one, in a
//! database server.
//!
//! Everything that is not storage (validation, sealing and checking keys,
//! the reasons authentication gives, twin updates) is shared with the SQLite
//! registry through `common`, so both answer alike; the conformance tests
//! run the same cases against both.

mod pool;
mod schema;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ring::rand::SystemRandom;
use tokio::sync::broadcast;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Config, GenericClient, Row};

use self::pool::Pool;
use crate::common::{
    Credentials, GroupCredentials, KeyVault, Presented, RawCertificate, RawDevice, RawGroup,
    RawTwin, admit_certificate, apply_update, certificate_taken, check_page_limit,
    check_token_expires_at, check_token_expiry, enroll_known, into_page, missing_group,
    page_query_limit, refused_certificate, refused_token, to_json,
};
use crate::{
    Certificate, Change, ConnectionState, Device, DeviceFilter, DeviceKeys, DevicePage,
    DevicePatch, DeviceStatus, EnrollmentGroup, Error, GroupPatch, KeySlot, NewDevice, NewGroup,
    PropertiesUpdate, Registry, Result, Side, Twin, token, validate_device_id, validate_group_name,
    validate_metadata, validate_tags, validate_thumbprint,
};

/// How many connections a registry keeps to the server.
const POOL_SIZE: usize = 4;

/// How long connecting may take, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// As for SQLite: how far a slow [`Registry::changes`] receiver may fall
/// behind.
const CHANGES_CAPACITY: usize = 1024;

const DEVICE_COLUMNS: &str = "id, tags::text, metadata, status, created_at, updated_at";
const GROUP_COLUMNS: &str = "name, tags::text, status, created_at, updated_at";
const CERTIFICATE_COLUMNS: &str =
    "thumbprint, device_id, status, not_after, created_at, updated_at";
const CONNECTION_COLUMNS: &str = "device_id, connected, since, reason, last_seen, last_event_at";
const TWIN_COLUMNS: &str = "desired, desired_version, desired_updated_at, \
                            reported, reported_version, reported_updated_at";

/// A [`Registry`] in a PostgreSQL database, with the master key that seals
/// device keys in a file of its own (as for [`crate::SqliteRegistry`]; in
/// the server's data directory). Back up both: the database without the
/// key file holds no usable device key.
///
/// [`Registry::changes`] reaches the receivers of this process only: one
/// server per database.
pub struct PostgresRegistry {
    pool: Pool,
    keys: KeyVault,
    changes: broadcast::Sender<Change>,
}

impl std::fmt::Debug for PostgresRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresRegistry").finish_non_exhaustive()
    }
}

impl PostgresRegistry {
    /// The schema version this build writes, in the `schema_version` table.
    pub const SCHEMA_VERSION: i64 = schema::SCHEMA_VERSION;

    /// Connects to the database at `url` (`postgres://user:password@host:port/database`,
    /// or libpq's `key=value` form; plain TCP, no TLS), brings its schema up
    /// to date and reads (or, for a new registry, creates) the master key
    /// file at `key_path`.
    ///
    /// Fails with [`Error::Postgres`] for a URL that does not parse or a
    /// server that cannot be reached (naming the host and port, never the
    /// password), [`Error::SchemaTooNew`] for a database a newer Tributary
    /// wrote, and [`Error::MasterKey`] for a missing key file of a database
    /// that has keys, or another database's key file.
    pub async fn connect(url: &str, key_path: &Path) -> Result<Self> {
        let mut config: Config = url.parse().map_err(|e| {
            Error::Postgres(format!("the registry URL does not parse: {}", describe(&e)))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tributary");
        }
        let pool = Pool::new(config, POOL_SIZE);
        let rng = SystemRandom::new();
        let master = {
            let mut conn = pool.get().await?;
            schema::migrate(&mut conn, key_path, &rng).await?
        };
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        Ok(Self {
            pool,
            keys: KeyVault::new(master, rng)?,
            changes,
        })
    }

    /// Tells [`Registry::changes`] receivers; having none is fine.
    fn announce(&self, change: Change) {
        let _ = self.changes.send(change);
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Postgres(describe(&e))
    }
}

/// A PostgreSQL error with its causes, on one line: the server's message
/// and SQLSTATE, or what failed on the way to it.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            text.push_str("; ");
            text.push_str(detail);
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn is_foreign_key_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION)
}

/// PostgreSQL text cannot hold NUL, which no id, tag or name has (their
/// rules leave out control characters), but a free-form string may.
fn without_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}").into()
    } else {
        text.into()
    }
}

impl RawDevice {
    /// Reads [`DEVICE_COLUMNS`] from column `at` on.
    fn from_pg(row: &Row, at: usize) -> Result<Self> {
        Ok(Self {
            id: row.try_get(at)?,
            tags: row.try_get(at + 1)?,
            metadata: row.try_get(at + 2)?,
            status: row.try_get(at + 3)?,
            created_at: row.try_get(at + 4)?,
            updated_at: row.try_get(at + 5)?,
        })
    }
}

impl RawGroup {
    /// Reads [`GROUP_COLUMNS`], which come first.
    fn from_pg(row: &Row) -> Result<Self> {
        Ok(Self {
            name: row.try_get(0)?,
            tags: row.try_get(1)?,
            status: row.try_get(2)?,
            created_at: row.try_get(3)?,
            updated_at: row.try_get(4)?,
        })
    }
}

impl RawCertificate {
    /// Reads [`CERTIFICATE_COLUMNS`].
    fn from_pg(row: &Row) -> Result<Self> {
        Ok(Self {
            thumbprint: row.try_get(0)?,
            device_id: row.try_get(1)?,
            status: row.try_get(2)?,
            not_after: row.try_get(3)?,
            created_at: row.try_get(4)?,
            updated_at: row.try_get(5)?,
        })
    }
}

impl RawTwin {
    /// Reads [`TWIN_COLUMNS`] from column `at` on.
    fn from_pg(row: &Row, at: usize) -> Result<Self> {
        Ok(Self {
            desired: row.try_get(at)?,
            desired_version: row.try_get(at + 1)?,
            desired_updated_at: row.try_get(at + 2)?,
            reported: row.try_get(at + 3)?,
            reported_version: row.try_get(at + 4)?,
            reported_updated_at: row.try_get(at + 5)?,
        })
    }
}

/// Reads [`CONNECTION_COLUMNS`].
fn connection_from_pg(row: &Row) -> Result<(String, ConnectionState)> {
    Ok((
        row.try_get(0)?,
        ConnectionState {
            connected: row.try_get(1)?,
            since: row.try_get(2)?,
            reason: row.try_get(3)?,
            last_seen: row.try_get(4)?,
            last_event_at: row.try_get(5)?,
        },
    ))
}

async fn read_device(client: &impl GenericClient, id: &str) -> Result<Option<Device>> {
    let row = client
        .query_opt(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"),
            &[&id],
        )
        .await?;
    row.map(|row| RawDevice::from_pg(&row, 0)?.decode())
        .transpose()
}

async fn device_exists(client: &impl GenericClient, id: &str) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE id = $1)",
            &[&id],
        )
        .await?
        .try_get(0)?)
}

async fn read_credentials(client: &impl GenericClient, id: &str) -> Result<Option<Credentials>> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {DEVICE_COLUMNS}, primary_key, secondary_key, enrollment_group
                 FROM devices WHERE id = $1"
            ),
            &[&id],
        )
        .await?;
    row.map(|row| {
        Ok(Credentials {
            device: RawDevice::from_pg(&row, 0)?,
            // No PostgreSQL registry ever had legacy tokens.
            legacy_digest: Vec::new(),
            primary: Some(row.try_get(6)?),
            secondary: Some(row.try_get(7)?),
            enrollment_group: row.try_get(8)?,
        })
    })
    .transpose()
}

async fn read_group(client: &impl GenericClient, name: &str) -> Result<Option<EnrollmentGroup>> {
    let row = client
        .query_opt(
            &format!("SELECT {GROUP_COLUMNS} FROM enrollment_groups WHERE name = $1"),
            &[&name],
        )
        .await?;
    row.map(|row| RawGroup::from_pg(&row)?.decode()).transpose()
}

async fn read_group_credentials(
    client: &impl GenericClient,
    name: &str,
) -> Result<Option<GroupCredentials>> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {GROUP_COLUMNS}, primary_key, secondary_key
                 FROM enrollment_groups WHERE name = $1"
            ),
            &[&name],
        )
        .await?;
    row.map(|row| {
        Ok(GroupCredentials {
            group: RawGroup::from_pg(&row)?,
            primary: row.try_get(5)?,
            secondary: row.try_get(6)?,
        })
    })
    .transpose()
}

async fn certificate_owner(
    client: &impl GenericClient,
    thumbprint: &str,
) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT device_id FROM certificates WHERE thumbprint = $1",
            &[&thumbprint],
        )
        .await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}

/// The device's twin (empty if it has none yet), or `None` for an unknown
/// device.
async fn read_twin(client: &impl GenericClient, id: &str) -> Result<Option<Twin>> {
    let row = client
        .query_opt(
            "SELECT COALESCE(t.desired, '{}'), COALESCE(t.desired_version, 0),
                    t.desired_updated_at,
                    COALESCE(t.reported, '{}'), COALESCE(t.reported_version, 0),
                    t.reported_updated_at
             FROM devices AS d LEFT JOIN twins AS t ON t.device_id = d.id
             WHERE d.id = $1",
            &[&id],
        )
        .await?;
    row.map(|row| RawTwin::from_pg(&row, 0)?.decode(id))
        .transpose()
}

async fn write_twin(client: &impl GenericClient, id: &str, twin: &Twin) -> Result<()> {
    client
        .execute(
            &format!(
                "INSERT INTO twins (device_id, {TWIN_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (device_id) DO UPDATE SET
                     desired = excluded.desired,
                     desired_version = excluded.desired_version,
                     desired_updated_at = excluded.desired_updated_at,
                     reported = excluded.reported,
                     reported_version = excluded.reported_version,
                     reported_updated_at = excluded.reported_updated_at"
            ),
            &[
                &id,
                &to_json("desired properties", &twin.desired)?,
                &twin.desired_version,
                &twin.desired_updated_at,
                &to_json("reported properties", &twin.reported)?,
                &twin.reported_version,
                &twin.reported_updated_at,
            ],
        )
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl Registry for PostgresRegistry {
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
        let inserted = self
            .pool
            .get()
            .await?
            .execute(
                "INSERT INTO devices (id, tags, metadata, status, created_at, updated_at,
                                      primary_key, secondary_key)
                 VALUES ($1, $2::text::jsonb, $3, $4, $5, $5, $6, $7)",
                &[
                    &id,
                    &to_json("tags", &tags)?,
                    &to_json("metadata", &metadata)?,
                    &status.as_str(),
                    &now_ms,
                    &sealed_primary,
                    &sealed_secondary,
                ],
            )
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(Error::AlreadyExists(id)),
            Err(e) => return Err(e.into()),
        }
        self.announce(Change::Updated(id.clone()));
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
        read_device(&*self.pool.get().await?, id).await
    }

    async fn list_devices(&self, filter: &DeviceFilter) -> Result<DevicePage> {
        check_page_limit(filter.limit)?;
        validate_tags(&filter.tags)?;
        let mut sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE TRUE");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        if let Some(after) = &filter.after {
            // No id holds a NUL (nor any byte below '-'), so the ids after
            // "a\0b" are the ids after "a", and text cannot hold NUL.
            let after = after.split('\0').next().unwrap_or_default();
            args.push(Box::new(after.to_string()));
            sql.push_str(&format!(" AND id > ${}", args.len()));
        }
        if let Some(status) = filter.status {
            args.push(Box::new(status.as_str()));
            sql.push_str(&format!(" AND status = ${}", args.len()));
        }
        if !filter.tags.is_empty() {
            // Tags are a flat object of strings: containing these pairs is
            // having each of these tags with exactly this value.
            args.push(Box::new(to_json("tags", &filter.tags)?));
            sql.push_str(&format!(" AND tags @> ${}::text::jsonb", args.len()));
        }
        args.push(Box::new(page_query_limit(filter.limit)?));
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", args.len()));
        let params: Vec<&(dyn ToSql + Sync)> = args
            .iter()
            .map(|arg| &**arg as &(dyn ToSql + Sync))
            .collect();
        let rows = self.pool.get().await?.query(&sql, &params).await?;
        let devices = rows
            .iter()
            .map(|row| RawDevice::from_pg(row, 0)?.decode())
            .collect::<Result<Vec<_>>>()?;
        Ok(into_page(devices, filter.limit))
    }

    async fn all_devices(&self) -> Result<Vec<Device>> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"),
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| RawDevice::from_pg(row, 0)?.decode())
            .collect()
    }

    async fn update_device(&self, id: &str, patch: DevicePatch, now_ms: i64) -> Result<Device> {
        validate_device_id(id)?;
        if let Some(tags) = &patch.tags {
            validate_tags(tags)?;
        }
        if let Some(metadata) = &patch.metadata {
            validate_metadata(metadata)?;
        }
        let tags = patch
            .tags
            .as_ref()
            .map(|t| to_json("tags", t))
            .transpose()?;
        let metadata = patch
            .metadata
            .as_ref()
            .map(|m| to_json("metadata", m))
            .transpose()?;
        let status = patch.status.map(DeviceStatus::as_str);
        let row = self
            .pool
            .get()
            .await?
            .query_opt(
                &format!(
                    "UPDATE devices SET tags = COALESCE($2::text::jsonb, tags),
                                        metadata = COALESCE($3::text, metadata),
                                        status = COALESCE($4::text, status),
                                        updated_at = $5
                     WHERE id = $1
                     RETURNING {DEVICE_COLUMNS}"
                ),
                &[&id, &tags, &metadata, &status, &now_ms],
            )
            .await?;
        let row = row.ok_or_else(|| Error::NotFound(id.into()))?;
        let device = RawDevice::from_pg(&row, 0)?.decode()?;
        self.announce(Change::Access(id.to_string()));
        Ok(device)
    }

    async fn remove_device(&self, id: &str) -> Result<()> {
        validate_device_id(id)?;
        let removed = self
            .pool
            .get()
            .await?
            .execute("DELETE FROM devices WHERE id = $1", &[&id])
            .await?;
        if removed == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        self.announce(Change::Access(id.to_string()));
        Ok(())
    }

    async fn rotate_key(&self, id: &str, slot: KeySlot, now_ms: i64) -> Result<String> {
        validate_device_id(id)?;
        let (key, sealed) = self.keys.new_key(id, slot)?;
        let sql = match slot {
            KeySlot::Primary => {
                "UPDATE devices SET primary_key = $2, updated_at = $3 WHERE id = $1"
            }
            KeySlot::Secondary => {
                "UPDATE devices SET secondary_key = $2, updated_at = $3 WHERE id = $1"
            }
        };
        let updated = self
            .pool
            .get()
            .await?
            .execute(sql, &[&id, &sealed, &now_ms])
            .await?;
        if updated == 0 {
            return Err(Error::NotFound(id.to_string()));
        }
        self.announce(Change::Access(id.to_string()));
        Ok(token::encode_key(&key))
    }

    async fn issue_token(&self, id: &str, expires_at: i64) -> Result<String> {
        validate_device_id(id)?;
        check_token_expires_at(expires_at)?;
        let row = self
            .pool
            .get()
            .await?
            .query_opt("SELECT primary_key FROM devices WHERE id = $1", &[&id])
            .await?;
        let sealed: Vec<u8> = row
            .ok_or_else(|| Error::NotFound(id.to_string()))?
            .try_get(0)?;
        let key = self.keys.open_key(id, KeySlot::Primary, &sealed)?;
        Ok(token::sign(id, &key, expires_at))
    }

    async fn authenticate(&self, id: &str, token: &str, now_ms: i64) -> Result<Device> {
        let presented = Presented::parse(id, token)?;
        let row = read_credentials(&*self.pool.get().await?, id).await?;
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
        let conn = self.pool.get().await?;
        if !device_exists(&*conn, id).await? {
            return Err(Error::NotFound(id.to_string()));
        }
        if let Some(owner) = certificate_owner(&*conn, thumbprint).await? {
            return Err(certificate_taken(thumbprint, &owner));
        }
        let inserted = conn
            .execute(
                "INSERT INTO certificates (thumbprint, device_id, status, not_after, created_at,
                                           updated_at)
                 VALUES ($1, $2, 'active', $3, $4, $4)",
                &[&thumbprint, &id, &not_after_ms, &now_ms],
            )
            .await;
        match inserted {
            Ok(_) => {}
            // Registered, or the device removed, since the checks above.
            Err(e) if is_unique_violation(&e) => {
                let owner = certificate_owner(&*conn, thumbprint).await?;
                return Err(certificate_taken(
                    thumbprint,
                    owner.as_deref().unwrap_or("(removed since)"),
                ));
            }
            Err(e) if is_foreign_key_violation(&e) => return Err(Error::NotFound(id.to_string())),
            Err(e) => return Err(e.into()),
        }
        Ok(Certificate::registered(
            thumbprint,
            id,
            not_after_ms,
            now_ms,
        ))
    }

    async fn list_certificates(&self, id: &str) -> Result<Vec<Certificate>> {
        validate_device_id(id)?;
        let conn = self.pool.get().await?;
        if !device_exists(&*conn, id).await? {
            return Err(Error::NotFound(id.to_string()));
        }
        let rows = conn
            .query(
                &format!(
                    "SELECT {CERTIFICATE_COLUMNS} FROM certificates WHERE device_id = $1
                     ORDER BY created_at, thumbprint"
                ),
                &[&id],
            )
            .await?;
        rows.iter()
            .map(|row| RawCertificate::from_pg(row)?.decode())
            .collect()
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
        let raw = {
            let conn = self.pool.get().await?;
            let row = conn
                .query_opt(
                    &format!(
                        "UPDATE certificates
                         SET status = 'revoked',
                             updated_at = CASE status WHEN 'revoked' THEN updated_at ELSE $3 END
                         WHERE thumbprint = $1 AND device_id = $2
                         RETURNING {CERTIFICATE_COLUMNS}"
                    ),
                    &[&thumbprint, &id, &now_ms],
                )
                .await?;
            match row {
                Some(row) => RawCertificate::from_pg(&row)?,
                None if device_exists(&*conn, id).await? => {
                    return Err(Error::Missing(format!(
                        "device '{id}' has no certificate {thumbprint}"
                    )));
                }
                None => return Err(Error::NotFound(id.to_string())),
            }
        };
        self.announce(Change::Access(id.to_string()));
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
            .pool
            .get()
            .await?
            .query_opt(
                "SELECT d.id, d.tags::text, d.metadata, d.status, d.created_at, d.updated_at,
                        c.status, c.not_after
                 FROM certificates AS c JOIN devices AS d ON d.id = c.device_id
                 WHERE c.thumbprint = $1 AND c.device_id = $2",
                &[&thumbprint, &id],
            )
            .await?;
        let Some(row) = row else {
            return Err(refused_certificate(id));
        };
        let device = RawDevice::from_pg(&row, 0)?;
        let status: String = row.try_get(6)?;
        let not_after: i64 = row.try_get(7)?;
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
        let inserted = self
            .pool
            .get()
            .await?
            .execute(
                "INSERT INTO enrollment_groups (name, tags, status, primary_key, secondary_key,
                                                created_at, updated_at)
                 VALUES ($1, $2::text::jsonb, $3, $4, $5, $6, $6)",
                &[
                    &name,
                    &to_json("tags", &tags)?,
                    &status.as_str(),
                    &sealed_primary,
                    &sealed_secondary,
                    &now_ms,
                ],
            )
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
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
        read_group(&*self.pool.get().await?, name).await
    }

    async fn list_groups(&self) -> Result<Vec<EnrollmentGroup>> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                &format!("SELECT {GROUP_COLUMNS} FROM enrollment_groups ORDER BY name"),
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| RawGroup::from_pg(row)?.decode())
            .collect()
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
        let tags = patch
            .tags
            .as_ref()
            .map(|t| to_json("tags", t))
            .transpose()?;
        let status = patch.status.map(DeviceStatus::as_str);
        let row = self
            .pool
            .get()
            .await?
            .query_opt(
                &format!(
                    "UPDATE enrollment_groups SET tags = COALESCE($2::text::jsonb, tags),
                                                  status = COALESCE($3::text, status),
                                                  updated_at = $4
                     WHERE name = $1
                     RETURNING {GROUP_COLUMNS}"
                ),
                &[&name, &tags, &status, &now_ms],
            )
            .await?;
        let row = row.ok_or_else(|| missing_group(name))?;
        RawGroup::from_pg(&row)?.decode()
    }

    /// The devices it enrolled stop being its members (so a new group of
    /// the same name does not take them over): they are devices like any
    /// other, which authenticate with their own keys.
    async fn remove_group(&self, name: &str) -> Result<()> {
        validate_group_name(name)?;
        let removed = self
            .pool
            .get()
            .await?
            .execute("DELETE FROM enrollment_groups WHERE name = $1", &[&name])
            .await?;
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
                "UPDATE enrollment_groups SET primary_key = $2, updated_at = $3 WHERE name = $1"
            }
            KeySlot::Secondary => {
                "UPDATE enrollment_groups SET secondary_key = $2, updated_at = $3 WHERE name = $1"
            }
        };
        let updated = self
            .pool
            .get()
            .await?
            .execute(sql, &[&name, &sealed, &now_ms])
            .await?;
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
        let conn = self.pool.get().await?;
        let group_row = read_group_credentials(&*conn, group).await?;
        let device_row = read_credentials(&*conn, id).await?;
        // Both checks run whatever was found, so that the time taken tells
        // neither whether the group exists nor whether the device does.
        let (derived, by_group) =
            self.keys
                .signed_by_group(group, id, group_row.as_ref(), expires_at, &signature)?;
        let by_device =
            self.keys
                .signed_by_device(id, device_row.as_ref(), expires_at, &signature)?;
        let Some(group_row) = group_row else {
            return Err(refused_token(id));
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
        let inserted = conn
            .execute(
                "INSERT INTO devices (id, tags, metadata, status, created_at, updated_at,
                                      primary_key, secondary_key, enrollment_group)
                 VALUES ($1, $2::text::jsonb, '{}', 'enabled', $3, $3, $4, $5, $6)",
                &[
                    &id,
                    &to_json("tags", &enrolling.tags)?,
                    &now_ms,
                    &sealed_primary,
                    &sealed_secondary,
                    &group,
                ],
            )
            .await;
        match inserted {
            Ok(_) => {}
            // Another connection enrolled the device since it was looked
            // up (two first connects at once): it is a known device now,
            // with the same derived keys.
            Err(e) if is_unique_violation(&e) => {
                let row = read_credentials(&*conn, id).await?;
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
        drop(conn);
        self.announce(Change::Updated(id.to_string()));
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
        validate_device_id(id)?;
        let ConnectionState {
            connected,
            since,
            reason,
            last_seen,
            last_event_at,
        } = state;
        let reason = reason.as_deref().map(without_nul);
        // The WHERE leaves out a device that is gone.
        let written = self
            .pool
            .get()
            .await?
            .execute(
                "INSERT INTO connections (device_id, connected, since, reason, last_seen,
                                          last_event_at)
                 SELECT $1::text, $2::boolean, $3::bigint, $4::text, $5::bigint, $6::bigint
                 WHERE EXISTS (SELECT 1 FROM devices WHERE id = $1::text)
                 ON CONFLICT (device_id) DO UPDATE SET
                     connected = excluded.connected, since = excluded.since,
                     reason = excluded.reason, last_seen = excluded.last_seen,
                     last_event_at = excluded.last_event_at",
                &[&id, connected, since, &reason, last_seen, last_event_at],
            )
            .await;
        match written {
            Ok(0) => {}
            Ok(_) => self.announce(Change::Updated(id.to_string())),
            // Removed while this was written: as good as gone before.
            Err(e) if is_foreign_key_violation(&e) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    async fn connection_state(&self, id: &str) -> Result<Option<ConnectionState>> {
        validate_device_id(id)?;
        let row = self
            .pool
            .get()
            .await?
            .query_opt(
                &format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE device_id = $1"),
                &[&id],
            )
            .await?;
        Ok(row
            .map(|row| connection_from_pg(&row))
            .transpose()?
            .map(|(_, state)| state))
    }

    async fn connection_states(&self) -> Result<BTreeMap<String, ConnectionState>> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                &format!("SELECT {CONNECTION_COLUMNS} FROM connections ORDER BY device_id"),
                &[],
            )
            .await?;
        rows.iter().map(connection_from_pg).collect()
    }

    async fn disconnect_all(&self, reason: &str, now_ms: i64) -> Result<usize> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "UPDATE connections SET connected = FALSE, since = $1, reason = $2
                 WHERE connected
                 RETURNING device_id",
                &[&now_ms, &without_nul(reason)],
            )
            .await?;
        let ids = rows
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<Vec<_>, _>>()?;
        for id in &ids {
            self.announce(Change::Updated(id.clone()));
        }
        Ok(ids.len())
    }

    async fn get_twin(&self, id: &str) -> Result<Twin> {
        validate_device_id(id)?;
        read_twin(&*self.pool.get().await?, id)
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))
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
        let (twin, changed) = {
            let mut conn = self.pool.get().await?;
            let tx = conn.transaction().await?;
            // Updates of one twin take turns on the device's row. The twin
            // is read by a statement of its own once the lock is held: in
            // READ COMMITTED each statement sees what was committed before
            // it began, and one that waited for a lock would not.
            let locked = tx
                .query_opt("SELECT 1 FROM devices WHERE id = $1 FOR UPDATE", &[&id])
                .await?;
            if locked.is_none() {
                return Err(Error::NotFound(id.to_string()));
            }
            let mut twin = read_twin(&tx, id)
                .await?
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            let changed = apply_update(&mut twin, id, side, &update, now_ms)?;
            if changed {
                write_twin(&tx, id, &twin).await?;
                tx.commit().await?;
            }
            (twin, changed)
        };
        if changed {
            self.announce(match side {
                Side::Desired => Change::Desired(id.to_string(), twin.desired_version),
                Side::Reported => Change::Updated(id.to_string()),
            });
        }
        Ok(twin)
    }

    async fn all_twins(&self) -> Result<BTreeMap<String, Twin>> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                &format!("SELECT device_id, {TWIN_COLUMNS} FROM twins ORDER BY device_id"),
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0)?;
                let twin = RawTwin::from_pg(row, 1)?.decode(&id)?;
                Ok((id, twin))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
