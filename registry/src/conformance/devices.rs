//! Devices, keys and tokens on every backend: what the registry did before
//! certificates, groups, connection state and twins.

use tokio::sync::broadcast::error::TryRecvError;

use super::*;

async fn create_get_list_remove(reg: SharedRegistry) {
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

async fn create_returns_two_distinct_working_keys(reg: SharedRegistry) {
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

async fn duplicate_create_is_already_exists(reg: SharedRegistry) {
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

async fn authenticate_cases(reg: SharedRegistry) {
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

async fn expired_token_is_refused_with_its_expiry(reg: SharedRegistry) {
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

async fn disabled_device_refused_with_its_reason_only_when_signed(reg: SharedRegistry) {
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

async fn tampered_token_is_refused(reg: SharedRegistry) {
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

async fn list_filters_by_tags_and_status_and_pages(reg: SharedRegistry) {
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
    async fn pages(reg: &SharedRegistry, mut filter: DeviceFilter) -> Vec<Vec<String>> {
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

/// Ids sort byte by byte (digits, then upper case, then lower case), not
/// as a language would, so that pages follow one order everywhere.
async fn ids_are_listed_in_byte_order(reg: SharedRegistry) {
    for id in ["b.2", "a", "Z:1", "B", "0", "a-"] {
        reg.create_device(new(id, &[]), 0).await.unwrap();
    }
    let want = ["0", "B", "Z:1", "a", "a-", "b.2"];
    let ids = |devices: &[Device]| devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&reg.all_devices().await.unwrap()), want);
    let mut filter = DeviceFilter {
        limit: 2,
        ..DeviceFilter::default()
    };
    let mut pages = Vec::new();
    loop {
        let page = reg.list_devices(&filter).await.unwrap();
        pages.push(ids(&page.devices));
        match page.next {
            Some(next) => filter.after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, [["0", "B"], ["Z:1", "a"], ["a-", "b.2"]]);
    // A cursor need not be an id.
    filter.after = Some("Y".into());
    assert_eq!(
        ids(&reg.list_devices(&filter).await.unwrap().devices),
        ["Z:1", "a"]
    );
    filter.after = Some("a\0z".into());
    assert_eq!(
        ids(&reg.list_devices(&filter).await.unwrap().devices),
        ["a-", "b.2"]
    );
}

async fn update_changes_fields_and_validates(reg: SharedRegistry) {
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

async fn rotate_key_replaces_one_slot(reg: SharedRegistry) {
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

async fn issue_token_refuses_what_it_cannot_sign(reg: SharedRegistry) {
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

async fn changes_announce_ids(reg: SharedRegistry) {
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

async fn invalid_input_is_rejected_with_a_reason(reg: SharedRegistry) {
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

async fn usable_as_a_shared_trait_object(reg: SharedRegistry) {
    let r2 = Arc::clone(&reg);
    let (_, keys) = tokio::spawn(async move { r2.create_device(new("x", &[]), 0).await })
        .await
        .unwrap()
        .unwrap();
    let token = signed("x", &keys.primary, IN_AN_HOUR);
    reg.authenticate("x", &token, NOW_MS).await.unwrap();
}

conformance!(
    create_get_list_remove,
    create_returns_two_distinct_working_keys,
    duplicate_create_is_already_exists,
    authenticate_cases,
    expired_token_is_refused_with_its_expiry,
    disabled_device_refused_with_its_reason_only_when_signed,
    tampered_token_is_refused,
    list_filters_by_tags_and_status_and_pages,
    ids_are_listed_in_byte_order,
    update_changes_fields_and_validates,
    rotate_key_replaces_one_slot,
    issue_token_refuses_what_it_cannot_sign,
    changes_announce_ids,
    invalid_input_is_rejected_with_a_reason,
    usable_as_a_shared_trait_object,
);
