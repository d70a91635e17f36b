//! Certificates, enrollment groups, connection state and twins on every
//! backend.

use serde_json::json;
use tokio::sync::broadcast;

use super::*;

const NOW_S: i64 = NOW_MS / 1000;
/// An hour from [`NOW_MS`], in seconds: a typical token expiry.
const IN_AN_HOUR: i64 = NOW_S + 3600;

fn obj(value: serde_json::Value) -> Properties {
    match value {
        serde_json::Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn merge(patch: serde_json::Value) -> PropertiesUpdate {
    PropertiesUpdate {
        patch: obj(patch),
        ..PropertiesUpdate::default()
    }
}

fn group(name: &str, pairs: &[(&str, &str)]) -> NewGroup {
    NewGroup {
        name: name.into(),
        tags: tags(pairs),
        status: None,
    }
}

/// The token device `id` of a group makes, with the key it derives from
/// the group's key (base64, as the group's keys are shown).
fn enrollment_token(group_key: &str, id: &str, expires_at: i64) -> String {
    let group_key = token::decode_key(group_key).expect("a key the registry made");
    token::sign(id, &derive_device_key(&group_key, id), expires_at)
}

/// What every failure before a verified signature says.
fn generic(id: &str) -> String {
    format!("device '{id}': unknown device, or a token not signed by its keys")
}

/// The same for certificates.
fn generic_certificate(id: &str) -> String {
    format!("device '{id}': unknown device, or a certificate not registered to it")
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T>, reason: &str) {
    let err = result.unwrap_err();
    assert!(matches!(&err, Error::Unauthorized(_)), "{err:?}");
    assert_eq!(err.to_string(), reason);
    assert!(err.is_user_error());
}

/// What was announced and not read yet.
fn announced(rx: &mut broadcast::Receiver<Change>) -> Vec<Change> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn disable() -> DevicePatch {
    DevicePatch {
        status: Some(DeviceStatus::Disabled),
        ..DevicePatch::default()
    }
}

// ----- Twins ----------------------------------------------------------------

async fn twin_starts_empty(reg: SharedRegistry) {
    reg.create_device(new("t1", &[]), NOW_MS).await.unwrap();
    assert_eq!(reg.get_twin("t1").await.unwrap(), Twin::default());
    assert!(reg.all_twins().await.unwrap().is_empty());

    let err = reg.get_twin("nobody").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(id) if id == "nobody"),
        "{err:?}"
    );
    let err = reg.get_twin("not valid").await.unwrap_err();
    assert!(matches!(err, Error::InvalidId(_)), "{err:?}");
    let err = reg
        .update_properties("nobody", Side::Desired, merge(json!({"a": 1})), NOW_MS)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(id) if id == "nobody"),
        "{err:?}"
    );
}

async fn properties_merge_and_each_side_has_its_version(reg: SharedRegistry) {
    reg.create_device(new("d", &[]), 0).await.unwrap();
    reg.create_device(new("quiet", &[]), 0).await.unwrap();

    let twin = reg
        .update_properties(
            "d",
            Side::Desired,
            merge(json!({"rate": 10, "led": {"color": "red", "blink": true}})),
            10,
        )
        .await
        .unwrap();
    assert_eq!(
        twin,
        Twin {
            desired: obj(json!({"rate": 10, "led": {"color": "red", "blink": true}})),
            desired_version: 1,
            desired_updated_at: Some(10),
            ..Twin::default()
        }
    );

    // A merge patch: null removes, objects merge key by key, the rest
    // replaces.
    let twin = reg
        .update_properties(
            "d",
            Side::Desired,
            merge(json!({"rate": null, "led": {"blink": null, "level": 3}, "modes": [1, 2]})),
            20,
        )
        .await
        .unwrap();
    assert_eq!(
        twin.desired,
        obj(json!({"led": {"color": "red", "level": 3}, "modes": [1, 2]}))
    );
    assert_eq!(
        (twin.desired_version, twin.desired_updated_at),
        (2, Some(20))
    );
    assert_eq!((twin.reported_version, twin.reported_updated_at), (0, None));

    // The reported side moves on its own.
    let twin = reg
        .update_properties("d", Side::Reported, merge(json!({"fw": "1.0"})), 30)
        .await
        .unwrap();
    assert_eq!(twin.reported, obj(json!({"fw": "1.0"})));
    assert_eq!(
        (twin.reported_version, twin.reported_updated_at),
        (1, Some(30))
    );
    assert_eq!(
        (twin.desired_version, twin.desired_updated_at),
        (2, Some(20))
    );

    // Replacing drops what the new object leaves out (and its nulls).
    let replace = PropertiesUpdate {
        patch: obj(json!({"fw": "1.1", "gone": null})),
        replace: true,
        if_version: None,
    };
    let twin = reg
        .update_properties("d", Side::Reported, replace, 40)
        .await
        .unwrap();
    assert_eq!(twin.reported, obj(json!({"fw": "1.1"})));
    assert_eq!(twin.reported_version, 2);

    // A patch that changes nothing is no change: the version stays.
    let same = reg
        .update_properties("d", Side::Reported, merge(json!({"fw": "1.1"})), 50)
        .await
        .unwrap();
    assert_eq!(same, twin);

    assert_eq!(reg.get_twin("d").await.unwrap(), twin);
    assert_eq!(
        reg.all_twins().await.unwrap(),
        BTreeMap::from([("d".to_string(), twin)]),
        "devices without properties are left out"
    );
    assert_eq!(reg.get_twin("quiet").await.unwrap(), Twin::default());
}

async fn properties_refuse_a_stale_version_and_change_nothing(reg: SharedRegistry) {
    reg.create_device(new("d", &[]), 0).await.unwrap();
    for version in 1..=2 {
        let twin = reg
            .update_properties("d", Side::Desired, merge(json!({"v": version})), version)
            .await
            .unwrap();
        assert_eq!(twin.desired_version, version);
    }
    let before = reg.get_twin("d").await.unwrap();

    let stale = PropertiesUpdate {
        if_version: Some(1),
        ..merge(json!({"v": 99}))
    };
    let err = reg
        .update_properties("d", Side::Desired, stale, 3)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::VersionMismatch(_)), "{err:?}");
    assert!(err.is_user_error());
    let text = err.to_string();
    assert!(
        text.contains("'d'") && text.contains("desired") && text.contains("version 2"),
        "{text}"
    );
    assert_eq!(reg.get_twin("d").await.unwrap(), before);

    // The other side has its own version: 0 so far.
    let reported = PropertiesUpdate {
        if_version: Some(2),
        ..merge(json!({"x": 1}))
    };
    let err = reg
        .update_properties("d", Side::Reported, reported, 3)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::VersionMismatch(_)), "{err:?}");

    let current = PropertiesUpdate {
        if_version: Some(2),
        ..merge(json!({"v": 3}))
    };
    let twin = reg
        .update_properties("d", Side::Desired, current, 4)
        .await
        .unwrap();
    assert_eq!(
        (twin.desired_version, twin.desired),
        (3, obj(json!({"v": 3})))
    );
}

async fn oversized_properties_are_refused_and_change_nothing(reg: SharedRegistry) {
    reg.create_device(new("d", &[]), 0).await.unwrap();
    let mut rx = reg.changes();
    let half = "x".repeat(MAX_PROPERTIES_BYTES / 2 + 16);
    reg.update_properties("d", Side::Desired, merge(json!({"a": half})), 1)
        .await
        .unwrap();
    let before = reg.get_twin("d").await.unwrap();
    assert_eq!(announced(&mut rx), vec![Change::Desired("d".into(), 1)]);

    // Too big by itself, too big once merged in, too deep.
    let too_big = merge(json!({"blob": "x".repeat(MAX_PROPERTIES_BYTES)}));
    let grows_too_big = merge(json!({"b": half}));
    let mut deep = json!(1);
    for _ in 0..MAX_PROPERTIES_DEPTH {
        deep = json!({ "d": deep });
    }
    let too_deep = merge(json!({ "deep": deep }));
    for (update, says) in [
        (too_big, "bytes"),
        (grows_too_big, "bytes"),
        (too_deep, "levels"),
    ] {
        let err = reg
            .update_properties("d", Side::Desired, update, 2)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidProperties(_)), "{err:?}");
        assert!(err.is_user_error());
        let text = err.to_string();
        assert!(text.contains("desired") && text.contains(says), "{text}");
    }
    assert_eq!(reg.get_twin("d").await.unwrap(), before);
    assert!(announced(&mut rx).is_empty(), "failed updates are quiet");

    // The reported side has the same limit.
    let err = reg
        .update_properties(
            "d",
            Side::Reported,
            merge(json!({"blob": "x".repeat(MAX_PROPERTIES_BYTES)})),
            3,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidProperties(_)), "{err:?}");
    assert_eq!(reg.get_twin("d").await.unwrap(), before);
}

async fn desired_changes_are_announced_with_their_version(reg: SharedRegistry) {
    reg.create_device(new("d", &[]), 0).await.unwrap();
    let mut rx = reg.changes();
    reg.update_properties("d", Side::Desired, merge(json!({"a": 1})), 1)
        .await
        .unwrap();
    reg.update_properties("d", Side::Desired, merge(json!({"a": 2})), 2)
        .await
        .unwrap();
    assert_eq!(rx.recv().await.unwrap(), Change::Desired("d".into(), 1));
    assert_eq!(rx.recv().await.unwrap(), Change::Desired("d".into(), 2));

    // Reported properties are news for copies of the registry only.
    reg.update_properties("d", Side::Reported, merge(json!({"a": 2})), 3)
        .await
        .unwrap();
    assert_eq!(rx.recv().await.unwrap(), Change::Updated("d".into()));

    // No change, no announcement; nor for a refused update.
    reg.update_properties("d", Side::Desired, merge(json!({"a": 2})), 4)
        .await
        .unwrap();
    let stale = PropertiesUpdate {
        if_version: Some(0),
        ..merge(json!({"a": 3}))
    };
    reg.update_properties("d", Side::Desired, stale, 5)
        .await
        .unwrap_err();
    assert!(announced(&mut rx).is_empty());
}

// ----- Certificates ----------------------------------------------------------

async fn certificates_are_added_listed_and_registered_once(reg: SharedRegistry) {
    reg.create_device(new("d1", &[]), 0).await.unwrap();
    reg.create_device(new("d2", &[]), 0).await.unwrap();
    let (t1, t2) = (thumbprint(b"one"), thumbprint(b"two"));

    // Registered in the other order of their thumbprints: listed by age.
    let (first, second) = if t1 > t2 { (&t1, &t2) } else { (&t2, &t1) };
    let a = reg
        .add_certificate("d1", first, NOW_MS + 1000, 10)
        .await
        .unwrap();
    assert_eq!(
        a,
        Certificate {
            thumbprint: first.clone(),
            device_id: "d1".into(),
            status: CertificateStatus::Active,
            not_after: NOW_MS + 1000,
            created_at: 10,
            updated_at: 10,
        }
    );
    let b = reg
        .add_certificate("d1", second, NOW_MS + 2000, 20)
        .await
        .unwrap();
    assert_eq!(reg.list_certificates("d1").await.unwrap(), vec![a, b]);
    assert!(reg.list_certificates("d2").await.unwrap().is_empty());

    // A thumbprint belongs to one device.
    for id in ["d1", "d2"] {
        let err = reg
            .add_certificate(id, first, NOW_MS, 30)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");
        assert!(err.is_user_error());
        assert!(err.to_string().contains(first.as_str()), "{err}");
    }
    assert!(reg.list_certificates("d2").await.unwrap().is_empty());

    let err = reg
        .add_certificate("nobody", &thumbprint(b"three"), NOW_MS, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(id) if id == "nobody"),
        "{err:?}"
    );
    let err = reg.list_certificates("nobody").await.unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(id) if id == "nobody"),
        "{err:?}"
    );

    for bad in ["", "abc", &t1.to_uppercase(), &format!("{t1}0")] {
        let err = reg.add_certificate("d1", bad, NOW_MS, 0).await.unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{bad:?}: {err:?}");
        assert!(err.to_string().contains("64 lowercase hex"), "{err}");
    }
    assert_eq!(reg.list_certificates("d1").await.unwrap().len(), 2);
}

async fn certificates_authenticate_their_own_device_only(reg: SharedRegistry) {
    let (d1, _) = reg
        .create_device(new("d1", &[("site", "north")]), 0)
        .await
        .unwrap();
    reg.create_device(new("d2", &[]), 0).await.unwrap();
    let t1 = thumbprint(b"one");
    reg.add_certificate("d1", &t1, NOW_MS + 1000, 0)
        .await
        .unwrap();

    assert_eq!(
        reg.authenticate_certificate("d1", &t1, NOW_MS)
            .await
            .unwrap(),
        d1
    );
    // Another device's certificate, an unknown one, an unknown device and
    // malformed input all look the same.
    assert_refused(
        reg.authenticate_certificate("d2", &t1, NOW_MS).await,
        &generic_certificate("d2"),
    );
    assert_refused(
        reg.authenticate_certificate("d1", &thumbprint(b"two"), NOW_MS)
            .await,
        &generic_certificate("d1"),
    );
    assert_refused(
        reg.authenticate_certificate("nobody", &t1, NOW_MS).await,
        &generic_certificate("nobody"),
    );
    assert_refused(
        reg.authenticate_certificate("d1", "not a thumbprint", NOW_MS)
            .await,
        &generic_certificate("d1"),
    );
    let err = reg
        .authenticate_certificate("bad\nid", &t1, NOW_MS)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized(_)), "{err:?}");
    assert!(!err.to_string().contains('\n'), "{err}");
}

async fn revoked_expired_and_disabled_certificates_are_refused(reg: SharedRegistry) {
    reg.create_device(new("d1", &[]), 0).await.unwrap();
    reg.create_device(new("d2", &[]), 0).await.unwrap();
    let (t1, t2, t3) = (thumbprint(b"one"), thumbprint(b"two"), thumbprint(b"three"));
    reg.add_certificate("d1", &t1, NOW_MS + 1000, 1)
        .await
        .unwrap();
    reg.add_certificate("d1", &t2, NOW_MS, 2).await.unwrap();
    reg.add_certificate("d2", &t3, NOW_MS + 1000, 3)
        .await
        .unwrap();
    let mut rx = reg.changes();

    let revoked = reg.revoke_certificate("d1", &t1, 100).await.unwrap();
    assert_eq!(revoked.status, CertificateStatus::Revoked);
    assert_eq!((revoked.created_at, revoked.updated_at), (1, 100));
    assert_eq!(announced(&mut rx), vec![Change::Access("d1".into())]);
    assert_refused(
        reg.authenticate_certificate("d1", &t1, NOW_MS).await,
        &format!("certificate {}… of device 'd1' is revoked", &t1[..16]),
    );
    // Revoking again changes nothing.
    assert_eq!(
        reg.revoke_certificate("d1", &t1, 200).await.unwrap(),
        revoked
    );
    assert_eq!(reg.list_certificates("d1").await.unwrap()[0], revoked);

    // Not a certificate of d1, no such certificate, no such device.
    for thumb in [&t3, &thumbprint(b"four")] {
        let err = reg.revoke_certificate("d1", thumb, 300).await.unwrap_err();
        assert!(matches!(err, Error::Missing(_)), "{err:?}");
        assert!(err.is_user_error());
        assert!(err.to_string().contains("'d1'"), "{err}");
    }
    let err = reg
        .revoke_certificate("nobody", &t3, 300)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound(id) if id == "nobody"),
        "{err:?}"
    );
    reg.authenticate_certificate("d2", &t3, NOW_MS)
        .await
        .unwrap();

    // A certificate is good until its not_after.
    reg.authenticate_certificate("d1", &t2, NOW_MS - 1)
        .await
        .unwrap();
    assert_refused(
        reg.authenticate_certificate("d1", &t2, NOW_MS).await,
        &format!(
            "certificate {}… of device 'd1' expired at 2026-01-01T00:00:00Z",
            &t2[..16]
        ),
    );

    reg.update_device("d2", disable(), 400).await.unwrap();
    assert_refused(
        reg.authenticate_certificate("d2", &t3, NOW_MS).await,
        "device 'd2' is disabled",
    );
}

// ----- Enrollment groups --------------------------------------------------

async fn groups_are_created_listed_updated_and_removed(reg: SharedRegistry) {
    let (b, b_keys) = reg
        .create_group(group("line-b", &[("site", "north")]), 10)
        .await
        .unwrap();
    assert_eq!(
        b,
        EnrollmentGroup {
            name: "line-b".into(),
            tags: tags(&[("site", "north")]),
            status: DeviceStatus::Enabled,
            created_at: 10,
            updated_at: 10,
        }
    );
    assert_ne!(b_keys.primary, b_keys.secondary);
    for key in [&b_keys.primary, &b_keys.secondary] {
        assert_eq!(token::decode_key(key).unwrap().len(), token::KEY_LEN);
    }
    let off = NewGroup {
        status: Some(DeviceStatus::Disabled),
        ..group("line-a", &[])
    };
    let (a, _) = reg.create_group(off, 20).await.unwrap();
    assert_eq!(a.status, DeviceStatus::Disabled);

    let err = reg
        .create_group(group("line-b", &[]), 30)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    assert_eq!(err.to_string(), "enrollment group 'line-b' already exists");

    assert_eq!(reg.get_group("line-b").await.unwrap(), Some(b.clone()));
    assert_eq!(reg.get_group("line-c").await.unwrap(), None);
    assert_eq!(reg.list_groups().await.unwrap(), vec![a.clone(), b]);

    let patch = GroupPatch {
        tags: Some(tags(&[("site", "south")])),
        status: Some(DeviceStatus::Disabled),
    };
    let b = reg.update_group("line-b", patch, 40).await.unwrap();
    assert_eq!(b.tags, tags(&[("site", "south")]));
    assert_eq!(b.status, DeviceStatus::Disabled);
    assert_eq!((b.created_at, b.updated_at), (10, 40));
    assert_eq!(reg.get_group("line-b").await.unwrap(), Some(b.clone()));
    let kept = reg
        .update_group("line-b", GroupPatch::default(), 50)
        .await
        .unwrap();
    assert_eq!((kept.tags, kept.status), (b.tags, b.status));

    let rotated = reg
        .rotate_group_key("line-b", KeySlot::Secondary, 60)
        .await
        .unwrap();
    assert_ne!(rotated, b_keys.secondary);
    assert_eq!(token::decode_key(&rotated).unwrap().len(), token::KEY_LEN);

    reg.remove_group("line-a").await.unwrap();
    assert_eq!(reg.get_group("line-a").await.unwrap(), None);
    assert_eq!(reg.list_groups().await.unwrap().len(), 1);

    // Groups that do not exist, and names that could not.
    let missing = [
        reg.update_group("line-a", GroupPatch::default(), 70)
            .await
            .map(|_| ()),
        reg.remove_group("line-a").await,
        reg.rotate_group_key("line-a", KeySlot::Primary, 70)
            .await
            .map(|_| ()),
    ];
    for result in missing {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Missing(_)), "{err:?}");
        assert!(err.is_user_error());
        assert_eq!(err.to_string(), "enrollment group 'line-a' does not exist");
    }
    let invalid = [
        reg.create_group(group("a/b", &[]), 0).await.map(|_| ()),
        reg.create_group(group("", &[]), 0).await.map(|_| ()),
        reg.get_group("a b").await.map(|_| ()),
        reg.update_group("-x", GroupPatch::default(), 0)
            .await
            .map(|_| ()),
        reg.remove_group("a/b").await,
    ];
    for result in invalid {
        let err = result.unwrap_err();
        assert!(err.is_user_error(), "{err:?}");
        assert!(err.to_string().contains("group name"), "{err}");
    }
    let err = reg
        .create_group(group("ok", &[("bad key", "v")]), 0)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidTag(_)), "{err:?}");
    assert_eq!(reg.list_groups().await.unwrap().len(), 1);
}

async fn enroll_creates_a_device_with_the_group_tags(reg: SharedRegistry) {
    let (_, keys) = reg
        .create_group(group("line-1", &[("site", "north"), ("kind", "meter")]), 0)
        .await
        .unwrap();
    let mut rx = reg.changes();
    let first = enrollment_token(&keys.primary, "meter-7", IN_AN_HOUR);
    let (device, created) = reg
        .enroll("line-1", "meter-7", &first, NOW_MS)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(device.id, "meter-7");
    assert_eq!(device.tags, tags(&[("site", "north"), ("kind", "meter")]));
    assert_eq!(device.status, DeviceStatus::Enabled);
    assert!(device.metadata.is_empty());
    assert_eq!((device.created_at, device.updated_at), (NOW_MS, NOW_MS));
    assert_eq!(
        reg.get_device("meter-7").await.unwrap(),
        Some(device.clone())
    );
    assert_eq!(announced(&mut rx), vec![Change::Updated("meter-7".into())]);

    // From then on it is a known device: the same token, or one signed by
    // the key derived from the group's secondary key, authenticate it, both
    // through the group and directly.
    let later = NOW_MS + 60_000;
    let by_secondary = enrollment_token(&keys.secondary, "meter-7", IN_AN_HOUR);
    for token in [&first, &by_secondary] {
        assert_eq!(
            reg.enroll("line-1", "meter-7", token, later).await.unwrap(),
            (device.clone(), false)
        );
        assert_eq!(
            reg.authenticate("meter-7", token, later).await.unwrap(),
            device
        );
    }
    assert!(announced(&mut rx).is_empty());

    // Its keys are its own, sealed like any device's: issue_token signs
    // with the one derived from the group's primary key.
    assert_eq!(reg.issue_token("meter-7", IN_AN_HOUR).await.unwrap(), first);

    // As a known device, it is checked as authenticate checks it.
    assert_refused(
        reg.enroll("line-1", "meter-7", &first, IN_AN_HOUR * 1000)
            .await,
        "the token of device 'meter-7' expired at 2026-01-01T01:00:00Z",
    );
    reg.update_device("meter-7", disable(), later)
        .await
        .unwrap();
    assert_refused(
        reg.enroll("line-1", "meter-7", &first, later).await,
        "device 'meter-7' is disabled",
    );
    assert_eq!(reg.all_devices().await.unwrap().len(), 1);
}

async fn enroll_refuses_with_the_generic_reason(reg: SharedRegistry) {
    let (_, a_keys) = reg.create_group(group("a", &[]), 0).await.unwrap();
    let (_, b_keys) = reg.create_group(group("b", &[]), 0).await.unwrap();
    let by_a = enrollment_token(&a_keys.primary, "d1", IN_AN_HOUR);
    reg.enroll("a", "d1", &by_a, NOW_MS).await.unwrap();
    let (_, own_keys) = reg.create_device(new("solo", &[]), 0).await.unwrap();
    let solo_token = reg.issue_token("solo", IN_AN_HOUR).await.unwrap();
    assert_eq!(
        solo_token,
        token::sign(
            "solo",
            &token::decode_key(&own_keys.primary).unwrap(),
            IN_AN_HOUR
        )
    );

    let random_key = token::encode_key(&[7; token::KEY_LEN]);
    let cases: Vec<(&str, &str, String)> = vec![
        // An unknown group, and a name that could not be one.
        (
            "c",
            "d2",
            enrollment_token(&a_keys.primary, "d2", IN_AN_HOUR),
        ),
        (
            "a/b",
            "d2",
            enrollment_token(&a_keys.primary, "d2", IN_AN_HOUR),
        ),
        // A key the group did not derive.
        ("a", "d2", enrollment_token(&random_key, "d2", IN_AN_HOUR)),
        // Another group's key.
        (
            "a",
            "d2",
            enrollment_token(&b_keys.primary, "d2", IN_AN_HOUR),
        ),
        // The group's own key, not derived for this device.
        (
            "a",
            "d2",
            token::sign(
                "d2",
                &token::decode_key(&a_keys.primary).unwrap(),
                IN_AN_HOUR,
            ),
        ),
        // Another device's token.
        ("a", "d2", by_a.clone()),
        // Malformed tokens, a legacy one, none.
        ("a", "d2", "trb1.x.y".into()),
        ("a", "d2", "trb_abcdef".into()),
        ("a", "d2", String::new()),
        ("a", "d2", format!("{by_a}{}", "A".repeat(600))),
        // An id that could not exist, signed correctly all the same.
        (
            "a",
            "bad id",
            enrollment_token(&a_keys.primary, "bad id", IN_AN_HOUR),
        ),
        // A device of group a, through group b: with b's key and with its own.
        (
            "b",
            "d1",
            enrollment_token(&b_keys.primary, "d1", IN_AN_HOUR),
        ),
        ("b", "d1", by_a.clone()),
        // A device no group enrolled, with its own token.
        ("a", "solo", solo_token.clone()),
        // A device of group a, through a, with a key b derives for it.
        (
            "a",
            "d1",
            enrollment_token(&b_keys.primary, "d1", IN_AN_HOUR),
        ),
    ];
    for (group_name, id, token) in &cases {
        assert_refused(
            reg.enroll(group_name, id, token, NOW_MS).await,
            &generic(id),
        );
    }
    // Nothing was created; the devices that were there still work.
    let ids: Vec<String> = reg
        .all_devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["d1", "solo"]);
    reg.enroll("a", "d1", &by_a, NOW_MS).await.unwrap();
    reg.authenticate("solo", &solo_token, NOW_MS).await.unwrap();

    // A hostile id is escaped in the reason.
    let err = reg
        .enroll("a", "x\ny", &by_a, NOW_MS)
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n') && err.contains("x\\ny"), "{err}");
}

async fn enroll_through_a_disabled_group_or_with_an_expired_token(reg: SharedRegistry) {
    let (_, keys) = reg.create_group(group("g", &[]), 0).await.unwrap();
    let member = enrollment_token(&keys.primary, "member", IN_AN_HOUR);
    reg.enroll("g", "member", &member, NOW_MS).await.unwrap();

    // An expired token, signed right: the device learns why, and is not
    // created.
    let expired = enrollment_token(&keys.primary, "late", NOW_S);
    assert_refused(
        reg.enroll("g", "late", &expired, NOW_MS).await,
        "the token of device 'late' expired at 2026-01-01T00:00:00Z",
    );
    assert_eq!(reg.get_device("late").await.unwrap(), None);

    let off = GroupPatch {
        status: Some(DeviceStatus::Disabled),
        ..GroupPatch::default()
    };
    reg.update_group("g", off, 1).await.unwrap();
    let newcomer = enrollment_token(&keys.primary, "newcomer", IN_AN_HOUR);
    assert_refused(
        reg.enroll("g", "newcomer", &newcomer, NOW_MS).await,
        "enrollment group 'g' is disabled",
    );
    assert_eq!(reg.get_device("newcomer").await.unwrap(), None);
    // Only a token the group's key signed learns that.
    let forged = enrollment_token(&token::encode_key(&[1; 32]), "newcomer", IN_AN_HOUR);
    assert_refused(
        reg.enroll("g", "newcomer", &forged, NOW_MS).await,
        &generic("newcomer"),
    );
    // The devices it enrolled keep working.
    let (device, created) = reg.enroll("g", "member", &member, NOW_MS).await.unwrap();
    assert!(!created);
    assert_eq!(
        reg.authenticate("member", &member, NOW_MS).await.unwrap(),
        device
    );

    let on = GroupPatch {
        status: Some(DeviceStatus::Enabled),
        ..GroupPatch::default()
    };
    reg.update_group("g", on, 2).await.unwrap();
    assert!(
        reg.enroll("g", "newcomer", &newcomer, NOW_MS)
            .await
            .unwrap()
            .1
    );
}

async fn concurrent_first_enrollments_of_a_device_both_succeed(reg: SharedRegistry) {
    let (_, keys) = reg
        .create_group(group("g", &[("batch", "7")]), 0)
        .await
        .unwrap();
    let by_primary = enrollment_token(&keys.primary, "twin-start", IN_AN_HOUR);
    let by_secondary = enrollment_token(&keys.secondary, "twin-start", IN_AN_HOUR);
    let (one, other) = tokio::join!(
        reg.enroll("g", "twin-start", &by_primary, NOW_MS),
        reg.enroll("g", "twin-start", &by_secondary, NOW_MS),
    );
    let (one, other) = (one.unwrap(), other.unwrap());
    assert_eq!(one.0, other.0);
    assert_eq!(one.0.tags, tags(&[("batch", "7")]));
    assert!(one.1 ^ other.1, "exactly one created it: {one:?} {other:?}");
    assert_eq!(reg.all_devices().await.unwrap(), vec![one.0]);
}

async fn rotating_a_group_key_changes_later_enrollments_only(reg: SharedRegistry) {
    let (_, keys) = reg.create_group(group("g", &[]), 0).await.unwrap();
    let early = enrollment_token(&keys.primary, "early", IN_AN_HOUR);
    reg.enroll("g", "early", &early, NOW_MS).await.unwrap();

    let new_primary = reg
        .rotate_group_key("g", KeySlot::Primary, 1)
        .await
        .unwrap();
    assert_ne!(new_primary, keys.primary);

    // The device enrolled before keeps its keys...
    assert!(!reg.enroll("g", "early", &early, NOW_MS).await.unwrap().1);
    reg.authenticate("early", &early, NOW_MS).await.unwrap();
    // ...and does not get the new one's.
    assert_refused(
        reg.enroll(
            "g",
            "early",
            &enrollment_token(&new_primary, "early", IN_AN_HOUR),
            NOW_MS,
        )
        .await,
        &generic("early"),
    );

    // Later devices enroll with the new key, not the old one; the
    // secondary key still works.
    assert_refused(
        reg.enroll(
            "g",
            "late",
            &enrollment_token(&keys.primary, "late", IN_AN_HOUR),
            NOW_MS,
        )
        .await,
        &generic("late"),
    );
    let late = enrollment_token(&new_primary, "late", IN_AN_HOUR);
    assert!(reg.enroll("g", "late", &late, NOW_MS).await.unwrap().1);
    assert_eq!(reg.issue_token("late", IN_AN_HOUR).await.unwrap(), late);
    let other = enrollment_token(&keys.secondary, "other", IN_AN_HOUR);
    assert!(reg.enroll("g", "other", &other, NOW_MS).await.unwrap().1);
}

async fn removing_a_group_keeps_its_devices(reg: SharedRegistry) {
    let (_, keys) = reg
        .create_group(group("g", &[("site", "north")]), 0)
        .await
        .unwrap();
    let token = enrollment_token(&keys.primary, "d1", IN_AN_HOUR);
    let (device, _) = reg.enroll("g", "d1", &token, NOW_MS).await.unwrap();

    reg.remove_group("g").await.unwrap();
    assert_eq!(reg.get_group("g").await.unwrap(), None);
    assert_eq!(reg.get_device("d1").await.unwrap(), Some(device.clone()));
    assert_eq!(
        reg.authenticate("d1", &token, NOW_MS).await.unwrap(),
        device
    );
    assert_refused(reg.enroll("g", "d1", &token, NOW_MS).await, &generic("d1"));

    // A new group of the same name is another group: it did not enroll d1.
    reg.create_group(group("g", &[]), 1).await.unwrap();
    assert_refused(reg.enroll("g", "d1", &token, NOW_MS).await, &generic("d1"));
    reg.authenticate("d1", &token, NOW_MS).await.unwrap();
}

// ----- Connection state -----------------------------------------------------

/// Disconnected at `since` for `reason`.
fn offline(since: i64, reason: &str, last_seen: i64, last_event_at: i64) -> ConnectionState {
    ConnectionState {
        connected: false,
        since,
        reason: Some(reason.into()),
        last_seen: Some(last_seen),
        last_event_at: Some(last_event_at),
    }
}

async fn connection_states_are_recorded_and_disconnected_at_start(reg: SharedRegistry) {
    for id in ["a", "b", "c"] {
        reg.create_device(new(id, &[]), 0).await.unwrap();
    }
    let mut rx = reg.changes();
    let online = ConnectionState::connected_at(10);
    let offline = offline(20, "idle timeout", 15, 14);
    reg.record_connection("a", &online).await.unwrap();
    reg.record_connection("b", &offline).await.unwrap();
    // A device removed while connected: nothing to record, and no error.
    reg.record_connection("ghost", &offline).await.unwrap();
    assert_eq!(
        announced(&mut rx),
        vec![Change::Updated("a".into()), Change::Updated("b".into())]
    );

    assert_eq!(
        reg.connection_state("a").await.unwrap(),
        Some(online.clone())
    );
    assert_eq!(reg.connection_state("c").await.unwrap(), None);
    assert_eq!(reg.connection_state("ghost").await.unwrap(), None);
    assert!(matches!(
        reg.connection_state("not valid").await,
        Err(Error::InvalidId(_))
    ));

    // Recording again replaces the state.
    let busy = ConnectionState {
        last_seen: Some(30),
        last_event_at: Some(29),
        ..online
    };
    reg.record_connection("a", &busy).await.unwrap();
    assert_eq!(
        reg.connection_states().await.unwrap(),
        BTreeMap::from([("a".to_string(), busy), ("b".to_string(), offline.clone())])
    );
    announced(&mut rx);

    // At start-up, whoever is still stored as connected was cut off.
    assert_eq!(reg.disconnect_all("server stopped", 40).await.unwrap(), 1);
    let cut = ConnectionState {
        connected: false,
        since: 40,
        reason: Some("server stopped".into()),
        last_seen: Some(30),
        last_event_at: Some(29),
    };
    assert_eq!(reg.connection_state("a").await.unwrap(), Some(cut));
    assert_eq!(reg.connection_state("b").await.unwrap(), Some(offline));
    assert_eq!(announced(&mut rx), vec![Change::Updated("a".into())]);
    assert_eq!(reg.disconnect_all("server stopped", 50).await.unwrap(), 0);
}

async fn connection_states_are_recorded_together_in_order(reg: SharedRegistry) {
    for id in ["a", "b"] {
        reg.create_device(new(id, &[]), 0).await.unwrap();
    }
    let mut rx = reg.changes();
    let online = ConnectionState::connected_at(10);
    let offline = offline(20, "closed by the device", 19, 18);
    let again = ConnectionState {
        since: 30,
        last_seen: Some(30),
        last_event_at: Some(18),
        ..online.clone()
    };
    reg.record_connections(&[]).await.unwrap();
    assert_eq!(announced(&mut rx), vec![]);
    // "a" connects, drops and comes back within one batch: the last stays.
    // A device removed meanwhile ("ghost") is left out, as one at a time.
    let batch = [
        ("a".to_string(), online.clone()),
        ("b".to_string(), offline.clone()),
        ("a".to_string(), offline.clone()),
        ("ghost".to_string(), offline.clone()),
        ("a".to_string(), again.clone()),
    ];
    reg.record_connections(&batch).await.unwrap();
    assert_eq!(
        reg.connection_states().await.unwrap(),
        BTreeMap::from([("a".to_string(), again), ("b".to_string(), offline.clone())])
    );
    assert_eq!(
        announced(&mut rx),
        vec![
            Change::Updated("a".into()),
            Change::Updated("b".into()),
            Change::Updated("a".into()),
            Change::Updated("a".into()),
        ]
    );
    assert!(matches!(
        reg.record_connections(&[("not valid".to_string(), offline)])
            .await,
        Err(Error::InvalidId(_))
    ));
}

// ----- Removing a device ------------------------------------------------------

async fn removing_a_device_clears_its_twin_certificates_and_state(reg: SharedRegistry) {
    reg.create_device(new("d", &[]), 0).await.unwrap();
    reg.create_device(new("other", &[]), 0).await.unwrap();
    let thumb = thumbprint(b"d's certificate");
    reg.add_certificate("d", &thumb, NOW_MS + 1000, 1)
        .await
        .unwrap();
    let state = ConnectionState {
        connected: true,
        since: 2,
        reason: None,
        last_seen: Some(2),
        last_event_at: Some(1),
    };
    reg.record_connection("d", &state).await.unwrap();
    reg.record_connection("other", &state).await.unwrap();
    reg.update_properties("d", Side::Desired, merge(json!({"a": 1})), 3)
        .await
        .unwrap();
    reg.update_properties("d", Side::Reported, merge(json!({"b": 2})), 4)
        .await
        .unwrap();

    reg.remove_device("d").await.unwrap();
    assert!(reg.all_twins().await.unwrap().is_empty());
    assert_eq!(
        reg.connection_states()
            .await
            .unwrap()
            .into_keys()
            .collect::<Vec<_>>(),
        ["other"]
    );
    assert_refused(
        reg.authenticate_certificate("d", &thumb, NOW_MS).await,
        &generic_certificate("d"),
    );

    // A device made again under the same id starts afresh...
    reg.create_device(new("d", &[]), 5).await.unwrap();
    assert_eq!(reg.get_twin("d").await.unwrap(), Twin::default());
    assert!(reg.list_certificates("d").await.unwrap().is_empty());
    assert_eq!(reg.connection_state("d").await.unwrap(), None);
    // ...and the certificate may be registered to another device.
    reg.add_certificate("other", &thumb, NOW_MS + 1000, 6)
        .await
        .unwrap();
}

conformance!(
    twin_starts_empty,
    properties_merge_and_each_side_has_its_version,
    properties_refuse_a_stale_version_and_change_nothing,
    oversized_properties_are_refused_and_change_nothing,
    desired_changes_are_announced_with_their_version,
    certificates_are_added_listed_and_registered_once,
    certificates_authenticate_their_own_device_only,
    revoked_expired_and_disabled_certificates_are_refused,
    groups_are_created_listed_updated_and_removed,
    enroll_creates_a_device_with_the_group_tags,
    enroll_refuses_with_the_generic_reason,
    enroll_through_a_disabled_group_or_with_an_expired_token,
    concurrent_first_enrollments_of_a_device_both_succeed,
    rotating_a_group_key_changes_later_enrollments_only,
    removing_a_group_keeps_its_devices,
    connection_states_are_recorded_and_disconnected_at_start,
    connection_states_are_recorded_together_in_order,
    removing_a_device_clears_its_twin_certificates_and_state,
);
