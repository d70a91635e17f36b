//! What only the PostgreSQL registry has: a server, a schema of its own,
//! connections that come and go. Behaviour shared with SQLite is in
//! `conformance`.

use std::sync::Arc;

use base64::Engine as _;

use super::*;
use crate::conformance::{
    IN_AN_HOUR, NOW_MS, PostgresDb, assert_refused, contains, generic_reason, meta, new, signed,
    tags,
};
use crate::{NewGroup, Properties};

fn properties(value: serde_json::Value) -> Properties {
    meta(value)
}

#[tokio::test]
async fn data_and_keys_survive_reconnecting() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let (dev, keys, group_keys) = {
        let reg = db.connect().await;
        let (dev, keys) = reg
            .create_device(
                NewDevice {
                    metadata: meta(serde_json::json!({"unit": "°C", "nul": "a\u{0}b"})),
                    ..new("keep", &[("unit", "°C")])
                },
                42,
            )
            .await
            .unwrap();
        let group = NewGroup {
            name: "line-1".into(),
            tags: tags(&[("site", "north")]),
            status: None,
        };
        let (_, group_keys) = reg.create_group(group, 43).await.unwrap();
        let update = PropertiesUpdate {
            patch: properties(serde_json::json!({"rate": 5, "text": "\u{0}"})),
            ..PropertiesUpdate::default()
        };
        reg.update_properties("keep", Side::Desired, update, 44)
            .await
            .unwrap();
        (dev, keys, group_keys)
    };
    let reg = db.connect().await;
    assert_eq!(reg.get_device("keep").await.unwrap(), Some(dev.clone()));
    let token = signed("keep", &keys.secondary, IN_AN_HOUR);
    assert_eq!(reg.authenticate("keep", &token, NOW_MS).await.unwrap(), dev);
    assert_eq!(
        reg.issue_token("keep", IN_AN_HOUR).await.unwrap(),
        signed("keep", &keys.primary, IN_AN_HOUR)
    );
    let twin = reg.get_twin("keep").await.unwrap();
    assert_eq!(twin.desired["text"], "\u{0}");
    assert_eq!(twin.desired_version, 1);
    let group_key = token::decode_key(&group_keys.primary).unwrap();
    let enrolling = token::sign(
        "d1",
        &crate::derive_device_key(&group_key, "d1"),
        IN_AN_HOUR,
    );
    let (enrolled, created) = reg
        .enroll("line-1", "d1", &enrolling, NOW_MS)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(enrolled.tags, tags(&[("site", "north")]));
}

#[tokio::test]
async fn keys_are_encrypted_at_rest() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let reg = db.connect().await;
    let (_, keys) = reg.create_device(new("secret", &[]), 0).await.unwrap();
    let rotated = reg
        .rotate_key("secret", KeySlot::Secondary, 1)
        .await
        .unwrap();
    let group = NewGroup {
        name: "g".into(),
        ..NewGroup::default()
    };
    let (_, group_keys) = reg.create_group(group, 0).await.unwrap();

    // Every form a key could be stored in: raw bytes, hex (bytea's text
    // form), and base64 of both alphabets, with and without padding.
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for key in [
        &keys.primary,
        &keys.secondary,
        &rotated,
        &group_keys.primary,
        &group_keys.secondary,
    ] {
        let raw = token::decode_key(key).unwrap();
        needles.push(raw.clone());
        needles.push(hex(&raw).into_bytes());
        needles.push(key.trim_end_matches('=').as_bytes().to_vec());
        needles.push(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(&raw)
                .into_bytes(),
        );
    }
    let master = std::fs::read(db.key_path()).unwrap();
    assert_eq!(master.len(), 32);
    needles.push(master.clone());
    needles.push(hex(&master).into_bytes());

    let client = db.client().await;
    // The key columns hold sealed blobs of nonce, key and tag.
    let row = client
        .query_one(
            "SELECT primary_key, secondary_key FROM devices WHERE id = 'secret'",
            &[],
        )
        .await
        .unwrap();
    for column in 0..2 {
        let sealed: Vec<u8> = row.get(column);
        assert_eq!(sealed.len(), 12 + 32 + 16);
    }
    // No table holds a key in any form, as bytes or as text.
    let tables: Vec<String> = client
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(tables.contains(&"devices".to_string()), "{tables:?}");
    for table in &tables {
        let rows = client
            .query(&format!("SELECT t::text FROM {table} AS t"), &[])
            .await
            .unwrap();
        for row in rows {
            let text: String = row.get(0);
            for needle in &needles {
                assert!(
                    !contains(text.as_bytes(), needle),
                    "a key in {table}: {text}"
                );
            }
        }
        let rows = client
            .query(&format!("SELECT * FROM {table}"), &[])
            .await
            .unwrap();
        for row in rows {
            for (i, column) in row.columns().iter().enumerate() {
                if *column.type_() == tokio_postgres::types::Type::BYTEA {
                    let bytes: Vec<u8> = row.get(i);
                    for needle in &needles {
                        assert!(
                            !contains(&bytes, needle),
                            "a key in {table}.{}",
                            column.name()
                        );
                    }
                }
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    drop(db.connect().await);
    let client = db.client().await;
    let version: i64 = client
        .query_one("SELECT version FROM schema_version", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, PostgresRegistry::SCHEMA_VERSION);
    client
        .execute("UPDATE schema_version SET version = 99", &[])
        .await
        .unwrap();
    let err = PostgresRegistry::connect(&db.url, &db.key_path())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::SchemaTooNew {
                found: 99,
                supported: PostgresRegistry::SCHEMA_VERSION
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_user_error());
    assert!(err.to_string().contains("upgrade Tributary"), "{err}");
}

/// Two servers starting on one new database: the lock makes one migrate
/// and make the master key, and the other wait and use both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registries_connecting_at_once_migrate_once() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let key_path = db.key_path();
    let (a, b) = tokio::join!(
        PostgresRegistry::connect(&db.url, &key_path),
        PostgresRegistry::connect(&db.url, &key_path),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let client = db.client().await;
    let versions: Vec<i64> = client
        .query("SELECT version FROM schema_version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [PostgresRegistry::SCHEMA_VERSION]);
    let checks: i64 = client
        .query_one("SELECT count(*) FROM master_key_check", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checks, 1);
    // One master key: what one seals, the other opens.
    let (dev, keys) = a.create_device(new("d", &[]), 0).await.unwrap();
    let token = signed("d", &keys.primary, IN_AN_HOUR);
    assert_eq!(b.authenticate("d", &token, NOW_MS).await.unwrap(), dev);
    // And connecting again later changes nothing.
    drop(db.connect().await);
    a.authenticate("d", &token, NOW_MS).await.unwrap();
}

#[tokio::test]
async fn the_master_key_file_must_be_the_databases() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let keys = {
        let reg = db.connect().await;
        reg.create_device(new("d", &[]), 0).await.unwrap().1
    };
    let key_path = db.key_path();
    let saved = key_path.with_extension("saved");
    std::fs::rename(&key_path, &saved).unwrap();

    // Without its key file the database's keys are useless: refuse rather
    // than make a new key.
    let err = PostgresRegistry::connect(&db.url, &key_path)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MasterKey { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(!key_path.exists());

    // Another registry's key (right-sized) is refused up front, not at the
    // first authentication.
    std::fs::write(&key_path, [7u8; 32]).unwrap();
    let err = PostgresRegistry::connect(&db.url, &key_path)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MasterKey { .. }), "{err:?}");
    assert!(err.to_string().contains("another registry"), "{err}");

    std::fs::rename(&saved, &key_path).unwrap();
    let reg = db.connect().await;
    let token = signed("d", &keys.primary, IN_AN_HOUR);
    reg.authenticate("d", &token, NOW_MS).await.unwrap();
}

#[tokio::test]
async fn sealed_key_moved_to_another_device_does_not_open() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let reg = db.connect().await;
    let (_, a_keys) = reg.create_device(new("a", &[]), 0).await.unwrap();
    reg.create_device(new("b", &[]), 0).await.unwrap();
    db.client()
        .await
        .execute(
            "UPDATE devices SET primary_key = (SELECT primary_key FROM devices WHERE id = 'a'),
                                secondary_key = (SELECT primary_key FROM devices WHERE id = 'a')
             WHERE id = 'b'",
            &[],
        )
        .await
        .unwrap();
    let token = signed("b", &a_keys.primary, IN_AN_HOUR);
    let err = reg.authenticate("b", &token, NOW_MS).await.unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    let err = reg.issue_token("b", IN_AN_HOUR).await.unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err:?}");
    assert!(!err.to_string().contains(&a_keys.primary));
    // A device that is not there still gets the generic reason.
    assert_refused(
        reg.authenticate("c", &token, NOW_MS).await,
        &generic_reason("c"),
    );
}

#[tokio::test]
async fn removing_a_device_leaves_no_rows_behind() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let reg = db.connect().await;
    for id in ["gone", "stays"] {
        reg.create_device(new(id, &[]), 0).await.unwrap();
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
        let update = PropertiesUpdate {
            patch: properties(serde_json::json!({"fw": "1.0"})),
            ..PropertiesUpdate::default()
        };
        reg.update_properties(id, Side::Reported, update, 3)
            .await
            .unwrap();
    }
    reg.remove_device("gone").await.unwrap();
    let client = db.client().await;
    for table in ["certificates", "connections", "twins"] {
        let ids: Vec<String> = client
            .query(&format!("SELECT device_id FROM {table}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(ids, vec!["stays".to_string()], "{table}");
    }
}

/// The server dropped every connection (a restart, a failover): the
/// registry connects again instead of failing from then on.
#[tokio::test]
async fn connections_cut_by_the_server_are_made_again() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let reg = db.connect().await;
    // Calls take the pooled connections in turn: now all of them exist.
    for _ in 0..POOL_SIZE {
        reg.all_devices().await.unwrap();
    }
    let client = db.client().await;
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1, "{killed}");
    // The connections' tasks see them closed soon after; a call that
    // raced the cut may fail, the ones after it do not.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for i in 0..2 * POOL_SIZE {
        reg.create_device(new(&format!("d{i}"), &[]), 0)
            .await
            .unwrap();
    }
    assert_eq!(reg.all_devices().await.unwrap().len(), 2 * POOL_SIZE);
}

/// Updates of one twin from several connections at once: each sees the
/// one before, none is lost, every version is used once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_property_updates_are_not_lost() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let reg = Arc::new(db.connect().await);
    reg.create_device(new("busy", &[]), 0).await.unwrap();
    let writers = 2 * POOL_SIZE;
    let rounds = 5;
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..writers {
        let reg = Arc::clone(&reg);
        tasks.spawn(async move {
            let mut versions = Vec::new();
            for round in 0..rounds {
                let update = PropertiesUpdate {
                    patch: properties(serde_json::json!({ format!("w{writer}"): round })),
                    ..PropertiesUpdate::default()
                };
                let twin = reg
                    .update_properties("busy", Side::Desired, update, 1)
                    .await
                    .unwrap();
                versions.push(twin.desired_version);
            }
            versions
        });
    }
    let mut versions: Vec<i64> = tasks.join_all().await.concat();
    versions.sort_unstable();
    let want: Vec<i64> = (1..=(writers * rounds) as i64).collect();
    assert_eq!(versions, want);
    let twin = reg.get_twin("busy").await.unwrap();
    assert_eq!(twin.desired_version, (writers * rounds) as i64);
    for writer in 0..writers {
        assert_eq!(twin.desired[&format!("w{writer}")], rounds - 1, "{twin:?}");
    }
}

#[tokio::test]
async fn bad_urls_and_unreachable_servers_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("registry.key");

    let err = PostgresRegistry::connect("postgres://h:notaport/db", &key_path)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Postgres(_)), "{err:?}");
    assert!(err.to_string().contains("does not parse"), "{err}");
    assert!(err.to_string().contains("port"), "{err}");

    // Nothing listens on a port just freed.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgres://trb:s3cret@127.0.0.1:{port}/registry");
    let err = PostgresRegistry::connect(&url, &key_path)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Postgres(_)), "{err:?}");
    assert!(
        text.contains(&format!(
            "cannot connect to PostgreSQL at 127.0.0.1:{port}, database 'registry'"
        )),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(!err.is_user_error());
    // Nothing was made on the way.
    assert!(!key_path.exists());
}

#[tokio::test]
async fn a_database_not_in_utf8_is_refused() {
    let Some(db) = PostgresDb::create().await else {
        return;
    };
    let client = db.client().await;
    let name = format!("{}_ascii", db.name());
    client
        .batch_execute(&format!(
            "CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' \
             TEMPLATE template0"
        ))
        .await
        .unwrap();
    let url = crate::conformance::with_database(&db.url, &name);
    let result = PostgresRegistry::connect(&url, &db.key_path()).await;
    client
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Postgres(_)), "{err:?}");
    assert!(err.to_string().contains("needs UTF8"), "{err}");
}
