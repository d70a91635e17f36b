use super::*;
use crate::conformance::{
    IN_AN_HOUR, NOW_MS, assert_refused, contains, generic_reason, meta, new, signed, tags,
};
use crate::credentials::{digest_token, generate_token};
use crate::derive_device_key;
use base64::Engine as _;
use std::sync::Arc;

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("registry.db")
}

#[tokio::test]
async fn data_and_keys_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (dev, keys) = {
        let reg = SqliteRegistry::open(&path).unwrap();
        reg.create_device(
            NewDevice {
                metadata: meta(serde_json::json!({"unit": "°C"})),
                ..new("keep", &[("unit", "°C")])
            },
            42,
        )
        .await
        .unwrap()
    };
    let reg = SqliteRegistry::open(&path).unwrap();
    assert_eq!(reg.get_device("keep").await.unwrap(), Some(dev.clone()));
    let token = signed("keep", &keys.secondary, IN_AN_HOUR);
    assert_eq!(reg.authenticate("keep", &token, NOW_MS).await.unwrap(), dev);
    assert_eq!(
        reg.issue_token("keep", IN_AN_HOUR).await.unwrap(),
        signed("keep", &keys.primary, IN_AN_HOUR)
    );
}

#[tokio::test]
async fn master_key_file_is_private_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let key_path = SqliteRegistry::key_path(&path);
    assert_eq!(key_path, dir.path().join("registry.key"));

    let keys = {
        let reg = SqliteRegistry::open(&path).unwrap();
        reg.create_device(new("d", &[]), 0).await.unwrap().1
    };
    let master = std::fs::read(&key_path).unwrap();
    assert_eq!(master.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    drop(SqliteRegistry::open(&path).unwrap());
    assert_eq!(std::fs::read(&key_path).unwrap(), master, "reused as is");

    // Without its key file the database's keys are useless: refuse to start
    // rather than make a new key.
    std::fs::rename(&key_path, dir.path().join("saved")).unwrap();
    let err = SqliteRegistry::open(&path).unwrap_err();
    assert!(matches!(err, Error::MasterKey { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(!key_path.exists());
    std::fs::write(&key_path, [0u8; 31]).unwrap();
    let err = SqliteRegistry::open(&path).unwrap_err();
    assert!(err.to_string().contains("31 bytes"), "{err}");
    assert!(!err.is_user_error());

    // Another (right-sized) key opens the database but not the keys: loud.
    std::fs::write(&key_path, [7u8; 32]).unwrap();
    let reg = SqliteRegistry::open(&path).unwrap();
    let token = signed("d", &keys.primary, IN_AN_HOUR);
    let err = reg.authenticate("d", &token, NOW_MS).await.unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    assert!(err.to_string().contains("master key"), "{err}");
    drop(reg);

    std::fs::rename(dir.path().join("saved"), &key_path).unwrap();
    let reg = SqliteRegistry::open(&path).unwrap();
    reg.authenticate("d", &token, NOW_MS).await.unwrap();

    // A database named like its own key file has nowhere to put the key.
    let err = SqliteRegistry::open(&dir.path().join("odd.key")).unwrap_err();
    assert!(matches!(err, Error::MasterKey { .. }), "{err:?}");
}

#[tokio::test]
async fn sealed_key_moved_to_another_device_does_not_open() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let (_, a_keys) = reg.create_device(new("a", &[]), 0).await.unwrap();
    reg.create_device(new("b", &[]), 0).await.unwrap();
    reg.conn()
        .await
        .execute(
            "UPDATE devices SET primary_key = (SELECT primary_key FROM devices WHERE id = 'a'),
                                secondary_key = (SELECT primary_key FROM devices WHERE id = 'a')
             WHERE id = 'b'",
            [],
        )
        .unwrap();
    let token = signed("b", &a_keys.primary, IN_AN_HOUR);
    let err = reg.authenticate("b", &token, NOW_MS).await.unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    let err = reg.issue_token("b", IN_AN_HOUR).await.unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    assert!(!err.to_string().contains(&a_keys.primary));
}

#[tokio::test]
async fn keys_are_encrypted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let reg = SqliteRegistry::open(&path).unwrap();
    let (_, keys) = reg.create_device(new("secret", &[]), 0).await.unwrap();
    let rotated = reg
        .rotate_key("secret", KeySlot::Secondary, 1)
        .await
        .unwrap();

    // Every form a key could be stored in: raw bytes, and base64 of both
    // alphabets, with and without padding.
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for key in [&keys.primary, &keys.secondary, &rotated] {
        let raw = token::decode_key(key).unwrap();
        needles.push(raw.clone());
        needles.push(key.trim_end_matches('=').as_bytes().to_vec());
        needles.push(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(&raw)
                .into_bytes(),
        );
    }

    // The key columns hold sealed blobs of nonce, key and tag.
    let (digest, primary): (Vec<u8>, Vec<u8>) = reg
        .conn()
        .await
        .query_row(
            "SELECT token_sha256, primary_key FROM devices WHERE id = 'secret'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(digest.is_empty(), "new devices have no legacy digest");
    assert_eq!(primary.len(), 12 + 32 + 16);

    // Neither the files on disk (database and WAL), open or closed...
    let scan = || {
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            for needle in &needles {
                assert!(!contains(&bytes, needle), "a key in {}", path.display());
            }
        }
    };
    scan();
    drop(reg);
    scan();
    assert!(std::fs::metadata(&path).unwrap().len() > 0);
}

/// Builds a registry as schema version 1 left it (device tokens, no keys),
/// by hand, so that the test does not depend on this build's migrations.
fn build_version_1(path: &Path, devices: &[(&str, &str, &str)]) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "CREATE TABLE devices (
            id           TEXT    NOT NULL PRIMARY KEY,
            tags         TEXT    NOT NULL DEFAULT '{}',
            status       TEXT    NOT NULL DEFAULT 'enabled'
                                 CHECK (status IN ('enabled', 'disabled')),
            token_sha256 BLOB    NOT NULL,
            created_at   INTEGER NOT NULL
        ) STRICT;
        PRAGMA user_version = 1;",
    )
    .unwrap();
    for (id, status, token) in devices {
        conn.execute(
            "INSERT INTO devices (id, tags, status, token_sha256, created_at)
             VALUES (?1, '{\"gen\":\"1\"}', ?2, ?3, 77)",
            params![id, status, &digest_token(token)[..]],
        )
        .unwrap();
    }
}

#[tokio::test]
async fn legacy_tokens_authenticate_after_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let rng = SystemRandom::new();
    let old = generate_token(&rng).unwrap();
    let off = generate_token(&rng).unwrap();
    build_version_1(
        &path,
        &[("old", "enabled", &old), ("off", "disabled", &off)],
    );

    let reg = SqliteRegistry::open(&path).unwrap();
    let version: i64 = reg
        .conn()
        .await
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert!(SqliteRegistry::key_path(&path).exists());

    // The old row reads as a device with empty metadata, updated when made.
    let dev = reg.authenticate("old", &old, NOW_MS).await.unwrap();
    assert_eq!(dev.tags, tags(&[("gen", "1")]));
    assert!(dev.metadata.is_empty());
    assert_eq!((dev.created_at, dev.updated_at), (77, 77));
    assert_refused(
        reg.authenticate("off", &off, NOW_MS).await,
        "device 'off' is disabled",
    );
    // Wrong legacy tokens, another device's, and signed tokens (there are no
    // keys yet) all get the generic reason.
    let refused = generic_reason("old");
    assert_refused(reg.authenticate("old", &off, NOW_MS).await, &refused);
    assert_refused(reg.authenticate("old", "trb_guess", NOW_MS).await, &refused);
    assert_refused(
        reg.authenticate("off", &old, NOW_MS).await,
        &generic_reason("off"),
    );
    let forged = signed("old", &token::encode_key(&[0; 32]), IN_AN_HOUR);
    assert_refused(reg.authenticate("old", &forged, NOW_MS).await, &refused);
    // The legacy digest is only for trb_ tokens: the same text without the
    // prefix is just malformed.
    assert_refused(reg.authenticate("old", &old[4..], NOW_MS).await, &refused);
    // No primary key, so nothing to sign tokens with.
    let err = reg.issue_token("old", IN_AN_HOUR).await.unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
    assert!(err.to_string().contains("rotate its primary key"), "{err}");

    // Moving over: a secondary key first; the legacy token still works...
    let secondary = reg
        .rotate_key("old", KeySlot::Secondary, NOW_MS)
        .await
        .unwrap();
    let by_secondary = signed("old", &secondary, IN_AN_HOUR);
    reg.authenticate("old", &by_secondary, NOW_MS)
        .await
        .unwrap();
    reg.authenticate("old", &old, NOW_MS).await.unwrap();
    // ...until the primary key replaces it.
    let primary = reg
        .rotate_key("old", KeySlot::Primary, NOW_MS)
        .await
        .unwrap();
    assert_refused(reg.authenticate("old", &old, NOW_MS).await, &refused);
    reg.authenticate("old", &by_secondary, NOW_MS)
        .await
        .unwrap();
    assert_eq!(
        reg.issue_token("old", IN_AN_HOUR).await.unwrap(),
        signed("old", &primary, IN_AN_HOUR)
    );

    // New devices in the migrated database take no legacy token.
    reg.create_device(new("new", &[]), NOW_MS).await.unwrap();
    assert_refused(
        reg.authenticate("new", &old, NOW_MS).await,
        &generic_reason("new"),
    );

    // Reopening runs no migration again, and reuses the master key.
    drop(reg);
    let reg = SqliteRegistry::open(&path).unwrap();
    reg.authenticate("old", &by_secondary, NOW_MS)
        .await
        .unwrap();
    reg.authenticate("off", &off, NOW_MS).await.unwrap_err();

    // What migration 3 added works for the old devices too.
    assert_eq!(reg.get_twin("old").await.unwrap(), crate::Twin::default());
    assert!(reg.list_certificates("old").await.unwrap().is_empty());
    assert_eq!(reg.connection_state("old").await.unwrap(), None);
}

#[tokio::test]
async fn open_sets_pragmas_and_creates_parent_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/registry.db");
    let reg = SqliteRegistry::open(&path).unwrap();
    assert!(path.exists());
    assert!(dir.path().join("a/b/registry.key").exists());
    let conn = reg.conn().await;
    let int = |name: &str| -> i64 { conn.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(int("synchronous"), 2, "2 is FULL");
    assert_eq!(int("foreign_keys"), 1);
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
async fn removing_a_device_leaves_no_rows_behind() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    reg.create_device(new("gone", &[]), 0).await.unwrap();
    reg.create_device(new("stays", &[]), 0).await.unwrap();
    for id in ["gone", "stays"] {
        let thumbprint = crate::thumbprint(id.as_bytes());
        reg.add_certificate(id, &thumbprint, NOW_MS + 1, 0)
            .await
            .unwrap();
        let state = ConnectionState {
            connected: true,
            since: 1,
            reason: None,
            last_seen: Some(2),
            last_event_at: None,
        };
        reg.record_connection(id, &state).await.unwrap();
        let update = crate::PropertiesUpdate {
            patch: meta(serde_json::json!({"fw": "1.0"})),
            ..crate::PropertiesUpdate::default()
        };
        reg.update_properties(id, Side::Reported, update, 3)
            .await
            .unwrap();
    }
    reg.remove_device("gone").await.unwrap();
    let conn = reg.conn().await;
    for table in ["certificates", "connections", "twins"] {
        let ids: Vec<String> = conn
            .prepare(&format!("SELECT device_id FROM {table}"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(ids, vec!["stays".to_string()], "{table}");
    }
}

#[tokio::test]
async fn group_keys_are_sealed_for_their_group() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let (_, keys) = reg
        .create_group(
            NewGroup {
                name: "line-1".into(),
                ..NewGroup::default()
            },
            0,
        )
        .await
        .unwrap();
    let (sealed, plain_primary) = {
        let conn = reg.conn().await;
        let sealed: Vec<u8> = conn
            .query_row(
                "SELECT primary_key FROM enrollment_groups WHERE name = 'line-1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (sealed, token::decode_key(&keys.primary).unwrap())
    };
    assert_eq!(sealed.len(), 12 + 32 + 16);
    assert!(!contains(&sealed, &plain_primary));
    // Sealed for `group/line-1`: it opens for neither a device nor another
    // group of the same name's slot.
    assert_eq!(
        reg.keys
            .master()
            .open("group/line-1", KeySlot::Primary, &sealed)
            .as_deref(),
        Some(&plain_primary[..])
    );
    assert_eq!(
        reg.keys.master().open("line-1", KeySlot::Primary, &sealed),
        None
    );
    assert_eq!(
        reg.keys
            .master()
            .open("group/line-1", KeySlot::Secondary, &sealed),
        None
    );

    // A group key that does not open is a broken setup, not a bad token.
    reg.conn()
        .await
        .execute(
            "UPDATE enrollment_groups SET primary_key = secondary_key WHERE name = 'line-1'",
            [],
        )
        .unwrap();
    let device_key = derive_device_key(&plain_primary, "d1");
    let token = token::sign("d1", &device_key, IN_AN_HOUR);
    let err = reg
        .enroll("line-1", "d1", &token, NOW_MS)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    assert!(
        err.to_string().contains("enrollment group 'line-1'"),
        "{err}"
    );
    assert!(!err.to_string().contains(&keys.primary), "{err}");
}

#[tokio::test]
async fn master_key_is_not_recreated_for_a_database_with_groups() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let reg = SqliteRegistry::open(&path).unwrap();
        let group = NewGroup {
            name: "g".into(),
            ..NewGroup::default()
        };
        reg.create_group(group, 0).await.unwrap();
    }
    let key_path = SqliteRegistry::key_path(&path);
    std::fs::remove_file(&key_path).unwrap();
    let err = SqliteRegistry::open(&path).unwrap_err();
    assert!(matches!(err, Error::MasterKey { .. }), "{err:?}");
    assert!(!key_path.exists());
}

#[tokio::test]
async fn enrollment_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let group = NewGroup {
        name: "g".into(),
        tags: tags(&[("site", "north")]),
        status: None,
    };
    let (_, keys) = {
        let reg = SqliteRegistry::open(&path).unwrap();
        reg.create_group(group, 0).await.unwrap()
    };
    let reg = SqliteRegistry::open(&path).unwrap();
    let group_key = token::decode_key(&keys.secondary).unwrap();
    let token = token::sign("d1", &derive_device_key(&group_key, "d1"), IN_AN_HOUR);
    let (device, created) = reg.enroll("g", "d1", &token, NOW_MS).await.unwrap();
    assert!(created);
    assert_eq!(device.tags, tags(&[("site", "north")]));
    drop(reg);
    let reg = SqliteRegistry::open(&path).unwrap();
    assert_eq!(
        reg.enroll("g", "d1", &token, NOW_MS).await.unwrap(),
        (device, false)
    );
}

/// Two processes (here: two connections to one file) enrolling the same new
/// devices at once: whichever inserts second falls back to the known-device
/// path instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enrollment_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let first = Arc::new(SqliteRegistry::open(&path).unwrap());
    let group = NewGroup {
        name: "g".into(),
        ..NewGroup::default()
    };
    let (_, keys) = first.create_group(group, 0).await.unwrap();
    let second = Arc::new(SqliteRegistry::open(&path).unwrap());
    let group_key = token::decode_key(&keys.primary).unwrap();
    let ids: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
    let mut tasks = Vec::new();
    for reg in [first.clone(), second.clone()] {
        let ids = ids.clone();
        let group_key = group_key.clone();
        tasks.push(tokio::spawn(async move {
            let mut created = Vec::new();
            for id in &ids {
                let token = token::sign(id, &derive_device_key(&group_key, id), IN_AN_HOUR);
                let (_, new) = reg.enroll("g", id, &token, NOW_MS).await.unwrap();
                created.push(new);
            }
            created
        }));
    }
    let a = tasks.remove(0).await.unwrap();
    let b = tasks.remove(0).await.unwrap();
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(a ^ b, "device d{i}: created by exactly one ({a}, {b})");
    }
    assert_eq!(second.all_devices().await.unwrap().len(), ids.len());
}

/// A caller that stops waiting once its write is under way (an HTTP client
/// gone) still leaves the write committed and announced: disabling a device
/// must reach the gateway, which ends its sessions.
#[tokio::test]
async fn a_write_whose_caller_gave_up_is_still_announced() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let reg = SqliteRegistry::open(&path).unwrap();
    reg.create_device(new("d", &[]), 1).await.unwrap();
    let mut rx = reg.changes();
    // Another connection holds the write lock, so the write is certainly
    // still waiting on its blocking thread when its caller gives up.
    let mut other = rusqlite::Connection::open(&path).unwrap();
    let blocker = other
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let patch = DevicePatch {
        status: Some(DeviceStatus::Disabled),
        ..DevicePatch::default()
    };
    // Polled once (the write is handed to the blocking pool), then dropped.
    let mut write = reg.update_device("d", patch, 2);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
    assert!(
        first.is_pending(),
        "the write finished while another connection held the lock"
    );
    drop(write);
    blocker.rollback().unwrap();
    let change = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("announced")
        .unwrap();
    assert_eq!(change, Change::Access("d".into()));
    let device = reg.get_device("d").await.unwrap().unwrap();
    assert_eq!(device.status, DeviceStatus::Disabled);
}
