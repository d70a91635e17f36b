use super::*;
use crate::MAX_METADATA_BYTES;
use crate::SharedRegistry;
use crate::credentials::{digest_token, generate_token};
use base64::Engine as _;
use std::sync::Arc;
use tokio::sync::broadcast::error::TryRecvError;

/// 2026-01-01T00:00:00Z.
const NOW_MS: i64 = 1_767_225_600_000;
const NOW_S: i64 = NOW_MS / 1000;
/// An hour from [`NOW_MS`], in seconds: a typical token expiry.
const IN_AN_HOUR: i64 = NOW_S + 3600;

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn meta(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn new(id: &str, pairs: &[(&str, &str)]) -> NewDevice {
    NewDevice {
        id: id.into(),
        tags: tags(pairs),
        ..NewDevice::default()
    }
}

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("registry.db")
}

/// A token as the device makes it, with the key (base64) it was given.
fn signed(id: &str, key: &str, expires_at: i64) -> String {
    token::sign(id, &token::decode_key(key).unwrap(), expires_at)
}

fn generic_reason(id: &str) -> String {
    format!("device '{id}': unknown device, or a token not signed by its keys")
}

#[track_caller]
fn assert_refused(result: Result<Device>, reason: &str) {
    let err = result.unwrap_err();
    assert!(matches!(&err, Error::Unauthorized(_)), "{err:?}");
    assert_eq!(err.to_string(), reason);
    assert!(err.is_user_error());
}

#[tokio::test]
async fn create_get_list_remove() {
    let dir = tempfile::tempdir().unwrap();
    let reg = SqliteRegistry::open(&db_path(&dir)).unwrap();

    let (b, _) = reg
        .create_device(
            NewDevice {
                metadata: meta(serde_json::json!({"model": "X1", "calibration": [1.5, 2]})),
                ..new("sensor-b", &[("site", "north")])
            },
            2_000,
        )
        .await
        .unwrap();
    let (a, _) = reg
        .create_device(new("sensor-a", &[]), 1_000)
        .await
        .unwrap();
    assert_eq!(a.status, DeviceStatus::Enabled);
    assert_eq!(b.tags, tags(&[("site", "north")]));
    assert_eq!(b.metadata["model"], "X1");
    assert_eq!((b.created_at, b.updated_at), (2_000, 2_000));

    assert_eq!(reg.get_device("sensor-b").await.unwrap(), Some(b.clone()));
    assert_eq!(reg.get_device("sensor-c").await.unwrap(), None);
    assert_eq!(reg.all_devices().await.unwrap(), vec![a.clone(), b.clone()]);
    let page = reg.list_devices(&DeviceFilter::default()).await.unwrap();
    assert_eq!(page.devices, vec![a.clone(), b]);
    assert_eq!(page.next, None);

    reg.remove_device("sensor-b").await.unwrap();
    assert_eq!(reg.get_device("sensor-b").await.unwrap(), None);
    assert_eq!(reg.all_devices().await.unwrap(), vec![a]);
    let err = reg.remove_device("sensor-b").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(id) if id == "sensor-b"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "device 'sensor-b' does not exist");
    assert!(err.is_user_error());
}

#[tokio::test]
async fn create_returns_two_distinct_working_keys() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let (dev, keys) = reg.create_device(new("d", &[]), NOW_MS).await.unwrap();
    assert_ne!(keys.primary, keys.secondary);
    for key in [&keys.primary, &keys.secondary] {
        assert_eq!(key.len(), 44, "32 bytes in padded base64");
        let token = signed("d", key, IN_AN_HOUR);
        assert_eq!(reg.authenticate("d", &token, NOW_MS).await.unwrap(), dev);
    }
    // issue_token signs with the primary key, exactly as the device would.
    assert_eq!(
        reg.issue_token("d", IN_AN_HOUR).await.unwrap(),
        signed("d", &keys.primary, IN_AN_HOUR)
    );
    // Keys do not leak through Debug.
    let debug = format!("{keys:?}");
    assert!(
        !debug.contains(&keys.primary) && !debug.contains(&keys.secondary),
        "{debug}"
    );
}

#[tokio::test]
async fn duplicate_create_is_already_exists() {
    let dir = tempfile::tempdir().unwrap();
    let reg = SqliteRegistry::open(&db_path(&dir)).unwrap();
    let (_, keys) = reg.create_device(new("dev1", &[]), 1).await.unwrap();
    let err = reg
        .create_device(new("dev1", &[("x", "y")]), 2)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists(id) if id == "dev1"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "device 'dev1' already exists");
    // The first device, and its keys, are untouched.
    let token = signed("dev1", &keys.primary, IN_AN_HOUR);
    let dev = reg.authenticate("dev1", &token, NOW_MS).await.unwrap();
    assert_eq!(dev.tags, tags(&[]));
    assert_eq!(dev.created_at, 1);
}

#[tokio::test]
async fn authenticate_cases() {
    let dir = tempfile::tempdir().unwrap();
    let reg = SqliteRegistry::open(&db_path(&dir)).unwrap();
    let (dev, _) = reg
        .create_device(new("gw:1", &[("role", "gateway")]), 5)
        .await
        .unwrap();
    let (_, other_keys) = reg.create_device(new("gw:2", &[]), 6).await.unwrap();
    let token = reg.issue_token("gw:1", IN_AN_HOUR).await.unwrap();
    assert!(token.starts_with("trb1."), "{token}");

    assert_eq!(reg.authenticate("gw:1", &token, NOW_MS).await.unwrap(), dev);

    let refused = generic_reason("gw:1");
    assert_refused(
        reg.authenticate("gw:1", "trb_wrong", NOW_MS).await,
        &refused,
    );
    assert_refused(reg.authenticate("gw:1", "", NOW_MS).await, &refused);
    assert_refused(reg.authenticate("gw:1", "trb1.x.y", NOW_MS).await, &refused);
    // Another device's token, and a token for this device signed with
    // another device's key.
    let other_token = reg.issue_token("gw:2", IN_AN_HOUR).await.unwrap();
    assert_refused(
        reg.authenticate("gw:1", &other_token, NOW_MS).await,
        &refused,
    );
    let wrong_key = signed("gw:1", &other_keys.secondary, IN_AN_HOUR);
    assert_refused(reg.authenticate("gw:1", &wrong_key, NOW_MS).await, &refused);
    // gw:1's own token presented as gw:2's.
    assert_refused(
        reg.authenticate("gw:2", &token, NOW_MS).await,
        &generic_reason("gw:2"),
    );
    assert_refused(
        reg.authenticate("nobody", &token, NOW_MS).await,
        &generic_reason("nobody"),
    );
    assert_refused(
        reg.authenticate("not valid!", &token, NOW_MS).await,
        &generic_reason("not valid!"),
    );
    // A hostile id is escaped and cut short in the reason.
    let err = reg
        .authenticate(&format!("a\nb{}", "x".repeat(500)), &token, NOW_MS)
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n') && err.contains("a\\nb"), "{err}");
    assert!(err.len() < 250, "{err}");

    reg.remove_device("gw:1").await.unwrap();
    assert_refused(reg.authenticate("gw:1", &token, NOW_MS).await, &refused);
}

#[tokio::test]
async fn expired_token_is_refused_with_its_expiry() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let (dev, keys) = reg.create_device(new("d", &[]), NOW_MS).await.unwrap();
    let token = signed("d", &keys.secondary, NOW_S + 60);
    let expired = "the token of device 'd' expired at 2026-01-01T00:01:00Z";
    assert_eq!(
        reg.authenticate("d", &token, NOW_MS + 59_999)
            .await
            .unwrap(),
        dev
    );
    assert_refused(
        reg.authenticate("d", &token, NOW_MS + 60_000).await,
        expired,
    );
    assert_refused(
        reg.authenticate("d", &token, NOW_MS + 3_600_000).await,
        expired,
    );
    // An expired token signed by no key of the device learns nothing.
    let forged = signed("d", &token::encode_key(&[9; 32]), NOW_S - 60);
    assert_refused(
        reg.authenticate("d", &forged, NOW_MS).await,
        &generic_reason("d"),
    );
}

#[tokio::test]
async fn disabled_device_refused_with_its_reason_only_when_signed() {
    let dir = tempfile::tempdir().unwrap();
    let reg = SqliteRegistry::open(&db_path(&dir)).unwrap();
    let (_, keys) = reg.create_device(new("d", &[]), 0).await.unwrap();
    let token = signed("d", &keys.primary, IN_AN_HOUR);
    let dev = reg
        .update_device(
            "d",
            DevicePatch {
                status: Some(DeviceStatus::Disabled),
                ..DevicePatch::default()
            },
            NOW_MS,
        )
        .await
        .unwrap();
    assert_eq!(dev.status, DeviceStatus::Disabled);
    assert_refused(
        reg.authenticate("d", &token, NOW_MS).await,
        "device 'd' is disabled",
    );
    // Disabled wins over expired: both are only for the key holder.
    let old = signed("d", &keys.secondary, NOW_S - 1);
    assert_refused(
        reg.authenticate("d", &old, NOW_MS).await,
        "device 'd' is disabled",
    );
    let forged = signed("d", &token::encode_key(&[1; 32]), IN_AN_HOUR);
    assert_refused(
        reg.authenticate("d", &forged, NOW_MS).await,
        &generic_reason("d"),
    );

    // A device registered disabled, then enabled.
    let (created, keys) = reg
        .create_device(
            NewDevice {
                status: Some(DeviceStatus::Disabled),
                ..new("later", &[])
            },
            0,
        )
        .await
        .unwrap();
    assert_eq!(created.status, DeviceStatus::Disabled);
    let token = signed("later", &keys.primary, IN_AN_HOUR);
    assert_refused(
        reg.authenticate("later", &token, NOW_MS).await,
        "device 'later' is disabled",
    );
    reg.update_device(
        "later",
        DevicePatch {
            status: Some(DeviceStatus::Enabled),
            ..DevicePatch::default()
        },
        NOW_MS,
    )
    .await
    .unwrap();
    reg.authenticate("later", &token, NOW_MS).await.unwrap();
}

#[tokio::test]
async fn tampered_token_is_refused() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let (_, keys) = reg.create_device(new("d", &[]), 0).await.unwrap();
    let token = signed("d", &keys.primary, IN_AN_HOUR);
    reg.authenticate("d", &token, NOW_MS).await.unwrap();
    let refused = generic_reason("d");

    // A later expiry with the old signature.
    let longer = token.replace(&IN_AN_HOUR.to_string(), &(IN_AN_HOUR + 1).to_string());
    assert_ne!(longer, token);
    assert_refused(reg.authenticate("d", &longer, NOW_MS).await, &refused);
    // Each character of the signature changed in turn.
    let sig_start = token.rfind('.').unwrap() + 1;
    for i in sig_start..token.len() {
        let mut bytes = token.clone().into_bytes();
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_refused(reg.authenticate("d", &tampered, NOW_MS).await, &refused);
    }
    // Too long, cut short, a different version.
    let long = format!("{token}{}", "A".repeat(600));
    assert_refused(reg.authenticate("d", &long, NOW_MS).await, &refused);
    assert_refused(
        reg.authenticate("d", &token[..token.len() - 1], NOW_MS)
            .await,
        &refused,
    );
    assert_refused(
        reg.authenticate("d", &token.replacen("trb1", "trb2", 1), NOW_MS)
            .await,
        &refused,
    );
}

#[tokio::test]
async fn list_filters_by_tags_and_status_and_pages() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    // 25 devices: sites alternate, every third is disabled.
    for i in 0..25 {
        let site = if i % 2 == 0 { "north" } else { "south" };
        let status = if i % 3 == 0 {
            DeviceStatus::Disabled
        } else {
            DeviceStatus::Enabled
        };
        let device = NewDevice {
            status: Some(status),
            ..new(
                &format!("dev-{i:02}"),
                &[
                    ("site", site),
                    ("fw.version", "1.2"),
                    ("quote", "it's \"x\""),
                ],
            )
        };
        reg.create_device(device, i).await.unwrap();
    }
    // Every page of one filter, gathered.
    async fn pages(reg: &SqliteRegistry, mut filter: DeviceFilter) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        loop {
            let page = reg.list_devices(&filter).await.unwrap();
            out.push(page.devices.iter().map(|d| d.id.clone()).collect());
            match page.next {
                Some(next) => filter.after = Some(next),
                None => return out,
            }
        }
    }
    let ids = |range: &mut dyn Iterator<Item = i32>| -> Vec<String> {
        range.map(|i| format!("dev-{i:02}")).collect()
    };

    // All 25, 10 per page: three pages, the last short.
    let all = pages(
        &reg,
        DeviceFilter {
            limit: 10,
            ..DeviceFilter::default()
        },
    )
    .await;
    assert_eq!(all.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    assert_eq!(all.concat(), ids(&mut (0..25)));

    // An exact multiple ends without an empty page.
    let fives = pages(
        &reg,
        DeviceFilter {
            limit: 5,
            ..DeviceFilter::default()
        },
    )
    .await;
    assert_eq!(fives.len(), 5);

    // Tag and status filters, combined and paged.
    let north_enabled = pages(
        &reg,
        DeviceFilter {
            tags: tags(&[("site", "north"), ("fw.version", "1.2")]),
            status: Some(DeviceStatus::Enabled),
            limit: 3,
            ..DeviceFilter::default()
        },
    )
    .await;
    let want = ids(&mut (0..25).filter(|i| i % 2 == 0 && i % 3 != 0));
    assert_eq!(want.len(), 8);
    assert_eq!(north_enabled.len(), 3);
    assert_eq!(north_enabled.concat(), want);

    let disabled = pages(
        &reg,
        DeviceFilter {
            status: Some(DeviceStatus::Disabled),
            ..DeviceFilter::default()
        },
    )
    .await;
    assert_eq!(disabled, [ids(&mut (0..25).step_by(3))]);

    // Values are bound, quotes and all; a near miss matches nothing.
    let quoted = DeviceFilter {
        tags: tags(&[("quote", "it's \"x\"")]),
        ..DeviceFilter::default()
    };
    assert_eq!(reg.list_devices(&quoted).await.unwrap().devices.len(), 25);
    for (key, value) in [
        ("site", "North"),
        ("site", "north' OR '1'='1"),
        ("missing", "north"),
        ("fw", "1.2"),
    ] {
        let filter = DeviceFilter {
            tags: tags(&[(key, value)]),
            ..DeviceFilter::default()
        };
        let page = reg.list_devices(&filter).await.unwrap();
        assert!(page.devices.is_empty(), "{key}={value}");
        assert_eq!(page.next, None);
    }

    // After the last id: empty.
    let tail = DeviceFilter {
        after: Some("dev-24".into()),
        ..DeviceFilter::default()
    };
    assert_eq!(
        reg.list_devices(&tail).await.unwrap(),
        DevicePage {
            devices: vec![],
            next: None
        }
    );

    // Page sizes out of range, and bad tag keys, are refused with a reason.
    for limit in [0, MAX_PAGE + 1] {
        let err = reg
            .list_devices(&DeviceFilter {
                limit,
                ..DeviceFilter::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
        assert!(err.is_user_error());
        assert_eq!(
            err.to_string(),
            format!("invalid request: a page holds 1 to 1000 devices; {limit} were asked for")
        );
    }
    reg.list_devices(&DeviceFilter {
        limit: MAX_PAGE,
        ..DeviceFilter::default()
    })
    .await
    .unwrap();
    let err = reg
        .list_devices(&DeviceFilter {
            tags: tags(&[("a\"b", "x")]),
            ..DeviceFilter::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTag(_)), "{err:?}");
}

#[tokio::test]
async fn update_changes_fields_and_validates() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let (created, keys) = reg
        .create_device(
            NewDevice {
                metadata: meta(serde_json::json!({"model": "X1"})),
                ..new("d", &[("site", "north")])
            },
            1_000,
        )
        .await
        .unwrap();

    // Only the given fields change; updated_at moves.
    let tagged = reg
        .update_device(
            "d",
            DevicePatch {
                tags: Some(tags(&[("site", "south"), ("floor", "2")])),
                ..DevicePatch::default()
            },
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(tagged.tags, tags(&[("site", "south"), ("floor", "2")]));
    assert_eq!(tagged.metadata, created.metadata);
    assert_eq!((tagged.created_at, tagged.updated_at), (1_000, 2_000));
    let described = reg
        .update_device(
            "d",
            DevicePatch {
                metadata: Some(meta(serde_json::json!({"model": "X2", "rev": 3}))),
                ..DevicePatch::default()
            },
            3_000,
        )
        .await
        .unwrap();
    assert_eq!(described.tags, tagged.tags);
    assert_eq!(described.metadata["rev"], 3);
    assert_eq!(reg.get_device("d").await.unwrap(), Some(described.clone()));
    // The keys are untouched.
    let token = signed("d", &keys.primary, IN_AN_HOUR);
    assert_eq!(
        reg.authenticate("d", &token, NOW_MS).await.unwrap(),
        described
    );

    // Validated like create; nothing changes on failure.
    let err = reg
        .update_device(
            "d",
            DevicePatch {
                tags: Some(tags(&[("bad key", "v")])),
                ..DevicePatch::default()
            },
            4_000,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTag(_)), "{err:?}");
    let huge = meta(serde_json::json!({"blob": "x".repeat(MAX_METADATA_BYTES)}));
    let err = reg
        .update_device(
            "d",
            DevicePatch {
                metadata: Some(huge),
                ..DevicePatch::default()
            },
            4_000,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidMetadata(_)), "{err:?}");
    assert!(err.to_string().contains("at most 65536"), "{err}");
    assert_eq!(reg.get_device("d").await.unwrap(), Some(described));

    let err = reg
        .update_device("ghost", DevicePatch::default(), 0)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn rotate_key_replaces_one_slot() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let (_, keys) = reg.create_device(new("d", &[]), 0).await.unwrap();
    let old_primary = signed("d", &keys.primary, IN_AN_HOUR);
    let secondary = signed("d", &keys.secondary, IN_AN_HOUR);

    let new_primary = reg.rotate_key("d", KeySlot::Primary, NOW_MS).await.unwrap();
    assert_ne!(new_primary, keys.primary);
    assert_refused(
        reg.authenticate("d", &old_primary, NOW_MS).await,
        &generic_reason("d"),
    );
    let dev = reg.authenticate("d", &secondary, NOW_MS).await.unwrap();
    assert_eq!(dev.updated_at, NOW_MS);
    let fresh = signed("d", &new_primary, IN_AN_HOUR);
    reg.authenticate("d", &fresh, NOW_MS).await.unwrap();
    assert_eq!(reg.issue_token("d", IN_AN_HOUR).await.unwrap(), fresh);

    let new_secondary = reg
        .rotate_key("d", KeySlot::Secondary, NOW_MS)
        .await
        .unwrap();
    assert_refused(
        reg.authenticate("d", &secondary, NOW_MS).await,
        &generic_reason("d"),
    );
    reg.authenticate("d", &fresh, NOW_MS).await.unwrap();
    reg.authenticate("d", &signed("d", &new_secondary, IN_AN_HOUR), NOW_MS)
        .await
        .unwrap();

    let err = reg
        .rotate_key("ghost", KeySlot::Primary, 0)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn issue_token_refuses_what_it_cannot_sign() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    reg.create_device(new("d", &[]), 0).await.unwrap();
    let err = reg.issue_token("ghost", IN_AN_HOUR).await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = reg.issue_token("d", -1).await.unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err:?}");
    assert!(matches!(
        reg.issue_token("bad id", 0).await,
        Err(Error::InvalidId(_))
    ));
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

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
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
async fn changes_announce_ids() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let mut rx = reg.changes();
    reg.create_device(new("a", &[]), 0).await.unwrap();
    reg.create_device(new("b", &[]), 0).await.unwrap();
    // Creating does not touch anyone's access; copies of the registry hear.
    for want in ["a", "b"] {
        assert_eq!(rx.recv().await.unwrap(), Change::Updated(want.into()));
    }
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));

    let disable = DevicePatch {
        status: Some(DeviceStatus::Disabled),
        ..DevicePatch::default()
    };
    reg.update_device("a", disable, 1).await.unwrap();
    reg.rotate_key("b", KeySlot::Secondary, 2).await.unwrap();
    reg.remove_device("a").await.unwrap();
    for want in ["a", "b", "a"] {
        assert_eq!(rx.recv().await.unwrap(), Change::Access(want.into()));
    }
    // Failed calls announce nothing; a late subscriber sees only what follows.
    reg.remove_device("a").await.unwrap_err();
    reg.rotate_key("a", KeySlot::Primary, 3).await.unwrap_err();
    assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    let mut late = reg.changes();
    reg.update_device("b", DevicePatch::default(), 4)
        .await
        .unwrap();
    assert_eq!(late.recv().await.unwrap(), Change::Access("b".into()));
    assert_eq!(rx.recv().await.unwrap(), Change::Access("b".into()));
}

#[tokio::test]
async fn invalid_input_is_rejected_with_a_reason() {
    let reg = SqliteRegistry::open_in_memory().unwrap();
    let err = reg.create_device(new("bad id", &[]), 0).await.unwrap_err();
    assert!(matches!(err, Error::InvalidId(_)), "{err:?}");
    assert!(err.to_string().contains("contains ' '"), "{err}");
    assert!(err.is_user_error());

    let err = reg
        .create_device(new("ok", &[("bad key", "v")]), 0)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTag(_)), "{err:?}");
    assert!(err.to_string().contains("tag key \"bad key\""), "{err}");

    let err = reg
        .create_device(new("ok", &[("k", "line\nbreak")]), 0)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("control character"), "{err}");

    let huge = NewDevice {
        metadata: meta(serde_json::json!({"blob": "x".repeat(MAX_METADATA_BYTES)})),
        ..new("ok", &[])
    };
    let err = reg.create_device(huge, 0).await.unwrap_err();
    assert!(matches!(err, Error::InvalidMetadata(_)), "{err:?}");
    assert!(err.is_user_error());
    assert!(err.to_string().contains("65547 bytes"), "{err}");

    assert!(matches!(reg.get_device("").await, Err(Error::InvalidId(_))));
    assert!(matches!(
        reg.remove_device("/etc").await,
        Err(Error::InvalidId(_))
    ));
    assert!(matches!(
        reg.rotate_key("/etc", KeySlot::Primary, 0).await,
        Err(Error::InvalidId(_))
    ));
    // Nothing was created by the failed calls.
    assert!(reg.all_devices().await.unwrap().is_empty());
}

#[test]
fn open_sets_pragmas_and_creates_parent_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/registry.db");
    let reg = SqliteRegistry::open(&path).unwrap();
    assert!(path.exists());
    assert!(dir.path().join("a/b/registry.key").exists());
    let conn = reg.conn();
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
async fn usable_as_a_shared_trait_object() {
    let reg: SharedRegistry = Arc::new(SqliteRegistry::open_in_memory().unwrap());
    let r2 = Arc::clone(&reg);
    let (_, keys) = tokio::spawn(async move { r2.create_device(new("x", &[]), 0).await })
        .await
        .unwrap()
        .unwrap();
    let token = signed("x", &keys.primary, IN_AN_HOUR);
    reg.authenticate("x", &token, NOW_MS).await.unwrap();
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
    let conn = reg.conn();
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
        let conn = reg.conn();
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
        reg.master
            .open("group/line-1", KeySlot::Primary, &sealed)
            .as_deref(),
        Some(&plain_primary[..])
    );
    assert_eq!(reg.master.open("line-1", KeySlot::Primary, &sealed), None);
    assert_eq!(
        reg.master.open("group/line-1", KeySlot::Secondary, &sealed),
        None
    );

    // A group key that does not open is a broken setup, not a bad token.
    reg.conn()
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
