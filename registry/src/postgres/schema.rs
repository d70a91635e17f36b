//! The PostgreSQL schema, its migrations, and the check that the master key
//! file belongs to the database.

use std::path::Path;

use ring::rand::SystemRandom;
use tokio_postgres::Client;

use crate::master_key::MasterKey;
use crate::{Error, KeySlot, Result};

/// Schema migrations, oldest first; migration `i` takes the database from
/// version `i` to `i + 1` (the one row of `schema_version`). Append only:
/// never edit one that has shipped, add a new one.
///
/// The tables are SQLite's (see `sqlite.rs`) as they stand at its version 3,
/// less the legacy token digest (no PostgreSQL registry ever had legacy
/// tokens), with PostgreSQL's types: text keys in byte order (`COLLATE
/// "C"`, as SQLite compares them, so pages follow the same order), tags as
/// `jsonb` for containment filters, metadata and properties as JSON text as
/// written (a `jsonb` column would refuse the `\u0000` that JSON allows).
/// Sealed keys are as in SQLite: nonce, ciphertext and tag, under the
/// master key in the file next to the data, never in the database.
const MIGRATIONS: &[&str] = &[
    // 1: everything.
    r#"CREATE TABLE enrollment_groups (
        name          TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        tags          JSONB  NOT NULL DEFAULT '{}',
        status        TEXT   NOT NULL DEFAULT 'enabled'
                             CHECK (status IN ('enabled', 'disabled')),
        primary_key   BYTEA  NOT NULL,
        secondary_key BYTEA  NOT NULL,
        created_at    BIGINT NOT NULL,
        updated_at    BIGINT NOT NULL
     );
     CREATE TABLE devices (
        id               TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        tags             JSONB  NOT NULL DEFAULT '{}',
        metadata         TEXT   NOT NULL DEFAULT '{}',
        status           TEXT   NOT NULL DEFAULT 'enabled'
                                CHECK (status IN ('enabled', 'disabled')),
        created_at       BIGINT NOT NULL,
        updated_at       BIGINT NOT NULL,
        primary_key      BYTEA  NOT NULL,
        secondary_key    BYTEA  NOT NULL,
        enrollment_group TEXT COLLATE "C"
                         REFERENCES enrollment_groups (name) ON DELETE SET NULL
     );
     CREATE INDEX devices_by_tags ON devices USING GIN (tags jsonb_path_ops);
     CREATE INDEX devices_by_enrollment_group ON devices (enrollment_group);
     CREATE TABLE certificates (
        thumbprint TEXT COLLATE "C" NOT NULL PRIMARY KEY,
        device_id  TEXT COLLATE "C" NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
        status     TEXT   NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
        not_after  BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
     );
     CREATE INDEX certificates_by_device ON certificates (device_id, created_at);
     CREATE TABLE connections (
        device_id     TEXT COLLATE "C" NOT NULL PRIMARY KEY
                      REFERENCES devices (id) ON DELETE CASCADE,
        connected     BOOLEAN NOT NULL,
        since         BIGINT  NOT NULL,
        reason        TEXT,
        last_seen     BIGINT,
        last_event_at BIGINT
     );
     CREATE TABLE twins (
        device_id           TEXT COLLATE "C" NOT NULL PRIMARY KEY
                            REFERENCES devices (id) ON DELETE CASCADE,
        desired             TEXT   NOT NULL DEFAULT '{}',
        desired_version     BIGINT NOT NULL DEFAULT 0,
        desired_updated_at  BIGINT,
        reported            TEXT   NOT NULL DEFAULT '{}',
        reported_version    BIGINT NOT NULL DEFAULT 0,
        reported_updated_at BIGINT
     );
     -- A value sealed under the master key that made this database's keys:
     -- a key file that does not open it belongs to another registry.
     CREATE TABLE master_key_check (
        only_row BOOLEAN NOT NULL PRIMARY KEY DEFAULT TRUE CHECK (only_row),
        sealed   BYTEA   NOT NULL
     );"#,
];

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The `pg_advisory_xact_lock` key that serializes registries starting on
/// one database ("trbregst" in ASCII), so that two of them do not both
/// migrate it or both make a master key. Advisory locks are per database.
const MIGRATION_LOCK: i64 = 0x7472_6272_6567_7374;

/// What the master key check seals: a name no device id or group can
/// have (ids have no '/'), so the check opens for nothing else.
const CHECK_ID: &str = "registry/master-key-check";
const CHECK_PLAIN: &[u8] = b"tributary registry master key";

/// Brings the schema up to [`SCHEMA_VERSION`] and loads the master key at
/// `key_path`, all in one transaction under the migration lock: the key is
/// made only for a database that has none yet, and must be the one that
/// sealed the database's keys.
pub(super) async fn migrate(
    client: &mut Client,
    key_path: &Path,
    rng: &SystemRandom,
) -> Result<MasterKey> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let encoding: String = tx
        .query_one("SELECT current_setting('server_encoding')", &[])
        .await?
        .try_get(0)?;
    if encoding != "UTF8" {
        return Err(Error::Postgres(format!(
            "the database's encoding is {encoding}; the registry needs UTF8 \
             (CREATE DATABASE ... ENCODING 'UTF8')"
        )));
    }
    // Created only when missing, so that a role without CREATE rights can
    // use a database someone else made.
    let has_version_table: bool = tx
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !has_version_table {
        tx.batch_execute(
            "CREATE TABLE schema_version (
                only_row BOOLEAN NOT NULL PRIMARY KEY DEFAULT TRUE CHECK (only_row),
                version  BIGINT  NOT NULL
             );
             INSERT INTO schema_version (version) VALUES (0);",
        )
        .await?;
    }
    let found: i64 = match tx
        .query_opt("SELECT version FROM schema_version", &[])
        .await?
    {
        Some(row) => row.try_get(0)?,
        None => 0,
    };
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let done = usize::try_from(found)
        .map_err(|_| Error::Internal(format!("negative registry schema version {found}")))?;
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        tx.batch_execute(sql).await?;
        let version = (step + 1) as i64;
        tx.execute(
            "INSERT INTO schema_version (only_row, version) VALUES (TRUE, $1)
             ON CONFLICT (only_row) DO UPDATE SET version = excluded.version",
            &[&version],
        )
        .await?;
    }

    let check: Option<Vec<u8>> = match tx
        .query_opt("SELECT sealed FROM master_key_check", &[])
        .await?
    {
        Some(row) => Some(row.try_get(0)?),
        None => None,
    };
    let master = MasterKey::load_or_create(key_path, check.is_none(), rng)?;
    match check {
        Some(sealed) => {
            if master.open(CHECK_ID, KeySlot::Primary, &sealed).as_deref() != Some(CHECK_PLAIN) {
                return Err(Error::MasterKey {
                    path: key_path.to_path_buf(),
                    reason: "it is not the key this database's device keys are sealed with \
                             (another registry's key file?); use the key file kept with this \
                             database"
                        .into(),
                });
            }
        }
        None => {
            let sealed = master.seal(rng, CHECK_ID, KeySlot::Primary, CHECK_PLAIN)?;
            tx.execute(
                "INSERT INTO master_key_check (sealed) VALUES ($1)",
                &[&sealed],
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(master)
}
