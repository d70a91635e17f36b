//! Device twins: the properties a device reports about itself and the ones
//! an operator wants it to have.
//!
//! Each side is a JSON object with its own version, which goes up by one on
//! every change. Changes are JSON merge patches (RFC 7386): a key set to
//! `null` is removed, an object is merged key by key, anything else
//! replaces. The desired side is set through the API and delivered to the
//! device over its connection; the reported side is sent by the device.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest properties object on either side, in bytes of compact JSON.
/// Generous on purpose: hosted twins stop at 8 to 32 KB.
pub const MAX_PROPERTIES_BYTES: usize = 1024 * 1024;

/// Deepest nesting allowed inside a properties object.
pub const MAX_PROPERTIES_DEPTH: usize = 32;

/// A JSON object of properties.
pub type Properties = serde_json::Map<String, serde_json::Value>;

/// A device's twin: both sides with their versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Twin {
    /// What the operator wants the device to have.
    pub desired: Properties,
    /// Goes up by one on every change of `desired`; 0 before the first.
    pub desired_version: i64,
    /// When `desired` last changed, milliseconds since the Unix epoch.
    pub desired_updated_at: Option<i64>,
    /// What the device says it has.
    pub reported: Properties,
    /// Goes up by one on every change of `reported`; 0 before the first.
    pub reported_version: i64,
    /// When `reported` last changed, milliseconds since the Unix epoch.
    pub reported_updated_at: Option<i64>,
}

/// Which side of a twin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Desired,
    Reported,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Desired => "desired",
            Side::Reported => "reported",
        }
    }
}

/// A change to one side of a twin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PropertiesUpdate {
    /// A merge patch, or with `replace` the whole new object.
    pub patch: Properties,
    /// Replace the side with `patch` instead of merging it in.
    pub replace: bool,
    /// Apply only if the side's version is this one now
    /// ([`Error::VersionMismatch`] otherwise).
    pub if_version: Option<i64>,
}

impl PropertiesUpdate {
    /// The side's new object, from its current one: merged or replaced, and
    /// checked against [`validate_properties`]. `id` and `side` name it in
    /// errors.
    pub fn apply(
        &self,
        id: &str,
        side: Side,
        version: i64,
        current: &Properties,
    ) -> Result<Properties> {
        if let Some(expected) = self.if_version
            && expected != version
        {
            return Err(Error::VersionMismatch(format!(
                "device '{id}': the {} properties are at version {version}, not {expected}",
                side.as_str()
            )));
        }
        let next = if self.replace {
            let mut next = self.patch.clone();
            // `null` means "absent" in a patch; a replacement stores none.
            next.retain(|_, v| !v.is_null());
            next
        } else {
            let mut next = current.clone();
            merge_patch(&mut next, &self.patch);
            next
        };
        validate_properties(side, &next)?;
        Ok(next)
    }
}

/// Applies a JSON merge patch (RFC 7386) to an object.
pub fn merge_patch(target: &mut Properties, patch: &Properties) {
    for (key, value) in patch {
        match value {
            serde_json::Value::Null => {
                target.remove(key);
            }
            serde_json::Value::Object(inner) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| serde_json::Value::Object(Properties::new()));
                if !slot.is_object() {
                    *slot = serde_json::Value::Object(Properties::new());
                }
                if let serde_json::Value::Object(existing) = slot {
                    merge_patch(existing, inner);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}

/// Checks a properties object: at most [`MAX_PROPERTIES_BYTES`] of compact
/// JSON and [`MAX_PROPERTIES_DEPTH`] levels deep.
pub fn validate_properties(side: Side, properties: &Properties) -> Result<()> {
    fn depth(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    let deepest = 1 + properties.values().map(depth).max().unwrap_or(0);
    if deepest > MAX_PROPERTIES_DEPTH {
        return Err(Error::InvalidProperties(format!(
            "{} properties nest {deepest} levels deep; at most {MAX_PROPERTIES_DEPTH} are allowed",
            side.as_str()
        )));
    }
    let bytes = serde_json::to_vec(properties)
        .map_err(|e| Error::Internal(format!("encoding properties: {e}")))?
        .len();
    if bytes > MAX_PROPERTIES_BYTES {
        return Err(Error::InvalidProperties(format!(
            "{} properties are {bytes} bytes of JSON; at most {MAX_PROPERTIES_BYTES} are allowed",
            side.as_str()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> Properties {
        v.as_object().cloned().expect("an object")
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        // The RFC's own example (section 3).
        let mut target = obj(json!({
            "title": "Goodbye!",
            "author": {"givenName": "John", "familyName": "Doe"},
            "tags": ["example", "sample"],
            "content": "This will be unchanged"
        }));
        let patch = obj(json!({
            "title": "Hello!",
            "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": null},
            "tags": ["example"]
        }));
        merge_patch(&mut target, &patch);
        assert_eq!(
            serde_json::Value::Object(target),
            json!({
                "title": "Hello!",
                "author": {"givenName": "John"},
                "tags": ["example"],
                "content": "This will be unchanged",
                "phoneNumber": "+01-123-456-7890"
            })
        );
    }

    #[test]
    fn apply_checks_version_and_size() {
        let current = obj(json!({"a": 1}));
        let update = PropertiesUpdate {
            patch: obj(json!({"b": 2})),
            replace: false,
            if_version: Some(3),
        };
        let err = update.apply("d1", Side::Desired, 2, &current).unwrap_err();
        assert!(matches!(err, Error::VersionMismatch(_)), "{err}");
        assert_eq!(
            update.apply("d1", Side::Desired, 3, &current).unwrap(),
            obj(json!({"a": 1, "b": 2}))
        );
        let replace = PropertiesUpdate {
            patch: obj(json!({"c": null, "d": 4})),
            replace: true,
            if_version: None,
        };
        assert_eq!(
            replace.apply("d1", Side::Reported, 0, &current).unwrap(),
            obj(json!({"d": 4}))
        );
        let big = PropertiesUpdate {
            patch: obj(json!({"blob": "x".repeat(MAX_PROPERTIES_BYTES)})),
            ..PropertiesUpdate::default()
        };
        let err = big.apply("d1", Side::Reported, 0, &current).unwrap_err();
        assert!(matches!(err, Error::InvalidProperties(_)), "{err}");
        // 256 KB, the least the issue asks for, fits.
        let fits = PropertiesUpdate {
            patch: obj(json!({"blob": "x".repeat(256 * 1024)})),
            ..PropertiesUpdate::default()
        };
        fits.apply("d1", Side::Reported, 0, &current).unwrap();
    }
}
