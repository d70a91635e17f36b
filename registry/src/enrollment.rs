//! Enrollment groups: zero-touch provisioning with symmetric keys.
//!
//! A group has two keys, like a device. A device of the group derives its
//! own key from the group's, and needs nothing else installed at the
//! factory:
//!
//! ```text
//! device_key = HMAC-SHA256(group_key, device_id)      (32 bytes)
//! ```
//!
//! The first time a device the registry does not know connects naming the
//! group, with a token (see [`crate::token`]) signed by a key derived this
//! way, the registry creates it with the group's tags, and its two keys are
//! the ones derived from the group's primary and secondary keys. From then on
//! it is a device like any other.

use std::collections::BTreeMap;

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::DeviceStatus;

/// An enrollment group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentGroup {
    /// Unique name; the same rules as a device id.
    pub name: String,
    /// Tags every device enrolled through this group is created with.
    pub tags: BTreeMap<String, String>,
    /// A disabled group enrolls no new devices (its devices keep working).
    pub status: DeviceStatus,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Milliseconds since the Unix epoch.
    pub updated_at: i64,
}

/// A group to create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewGroup {
    pub name: String,
    pub tags: BTreeMap<String, String>,
    pub status: Option<DeviceStatus>,
}

/// Changes to a group; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupPatch {
    pub tags: Option<BTreeMap<String, String>>,
    pub status: Option<DeviceStatus>,
}

/// Checks a group name: the rules of [`crate::validate_device_id`], told
/// as a group name's.
pub fn validate_group_name(name: &str) -> crate::Result<()> {
    crate::validate_device_id(name).map_err(|e| match e {
        crate::Error::InvalidId(reason) => {
            crate::Error::InvalidRequest(reason.replacen("device id", "group name", 1))
        }
        other => other,
    })
}

/// A device's key derived from its group's key.
pub fn derive_device_key(group_key: &[u8], device_id: &str) -> [u8; crate::token::KEY_LEN] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, group_key);
    let tag = hmac::sign(&key, device_id.as_bytes());
    let mut out = [0u8; crate::token::KEY_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published test vector, for docs/security.md (computed
    /// independently, with Python's `hmac`):
    ///
    /// ```text
    /// group key   000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f (hex)
    /// device id   sensor-1
    /// device key  n5hp4ukLeAS7SxeF5FRQVLr8H+gphAmzs4FeKjULmFc= (base64)
    /// ```
    #[test]
    fn derived_key_test_vector() {
        let group_key: Vec<u8> = (0u8..32).collect();
        let key = derive_device_key(&group_key, "sensor-1");
        assert_eq!(
            crate::token::encode_key(&key),
            "n5hp4ukLeAS7SxeF5FRQVLr8H+gphAmzs4FeKjULmFc="
        );
        assert_ne!(key, derive_device_key(&group_key, "sensor-2"));
    }

    #[test]
    fn group_name_errors_say_group_name() {
        validate_group_name("factory-7").unwrap();
        for bad in ["", "a/b", "-x", &"g".repeat(200)] {
            let err = validate_group_name(bad).unwrap_err();
            assert!(matches!(err, crate::Error::InvalidRequest(_)), "{err:?}");
            let text = err.to_string();
            assert!(text.contains("group name"), "{text}");
            assert!(!text.contains("device id"), "{text}");
        }
    }
}
