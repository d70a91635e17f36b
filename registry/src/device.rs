//! The device record and the rules for ids, tags and metadata.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Longest tag key, in characters (all ASCII, so also bytes).
pub const MAX_TAG_KEY_LEN: usize = 64;
/// Longest tag value, in bytes of UTF-8.
pub const MAX_TAG_VALUE_LEN: usize = 256;
/// Largest metadata object, in bytes of compact JSON.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Unique id; see [`validate_device_id`].
    pub id: String,
    /// Short string labels to select devices by; see [`validate_tags`].
    pub tags: BTreeMap<String, String>,
    /// Any JSON object (model, location, calibration, ...); see
    /// [`validate_metadata`].
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Whether the device may connect.
    pub status: DeviceStatus,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Time of the last change to tags, metadata, status or keys,
    /// milliseconds since the Unix epoch.
    pub updated_at: i64,
}

/// Whether a device may authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// The device may authenticate.
    Enabled,
    /// The device exists but authentication is refused.
    Disabled,
}

impl DeviceStatus {
    /// The name used in storage and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Enabled => "enabled",
            DeviceStatus::Disabled => "disabled",
        }
    }

    /// The inverse of [`DeviceStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "enabled" => Some(DeviceStatus::Enabled),
            "disabled" => Some(DeviceStatus::Disabled),
            _ => None,
        }
    }
}

/// Checks a device id: 1 to 128 bytes of ASCII letters, digits, `.`, `_`,
/// `-` and `:`, starting with a letter or digit.
///
/// Ids end up in URLs, log lines, file names and SQL results, so the
/// alphabet is kept small enough to need no escaping anywhere.
pub fn validate_device_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidId("device id must not be empty".into()));
    }
    if id.len() > MAX_DEVICE_ID_LEN {
        return Err(Error::InvalidId(format!(
            "device id {} is {} bytes long; at most {MAX_DEVICE_ID_LEN} are allowed",
            shown(id),
            id.len()
        )));
    }
    for (pos, c) in id.char_indices() {
        if !is_id_char(c) {
            return Err(Error::InvalidId(format!(
                "device id {} contains {c:?} at byte {pos}; allowed are ASCII letters, digits \
                 and '.', '_', '-', ':'",
                shown(id)
            )));
        }
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(Error::InvalidId(format!(
            "device id {} must start with an ASCII letter or digit",
            shown(id)
        )));
    }
    Ok(())
}

/// Checks tags: keys are 1 to 64 ASCII letters, digits, `_`, `-` and `.`;
/// values are up to 256 bytes of UTF-8 without control characters.
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in tags {
        if key.is_empty() {
            return Err(Error::InvalidTag("tag key must not be empty".into()));
        }
        if let Some(c) = key.chars().find(|&c| !is_tag_key_char(c)) {
            return Err(Error::InvalidTag(format!(
                "tag key {} contains {c:?}; allowed are ASCII letters, digits and '_', '-', '.'",
                shown(key)
            )));
        }
        if key.len() > MAX_TAG_KEY_LEN {
            return Err(Error::InvalidTag(format!(
                "tag key {} is {} characters long; at most {MAX_TAG_KEY_LEN} are allowed",
                shown(key),
                key.len()
            )));
        }
        if value.len() > MAX_TAG_VALUE_LEN {
            return Err(Error::InvalidTag(format!(
                "value of tag {} is {} bytes long; at most {MAX_TAG_VALUE_LEN} are allowed",
                shown(key),
                value.len()
            )));
        }
        if let Some(c) = value.chars().find(|c| c.is_control()) {
            return Err(Error::InvalidTag(format!(
                "value of tag {} contains the control character {c:?}; control characters \
                 are not allowed",
                shown(key)
            )));
        }
    }
    Ok(())
}

/// Checks metadata: at most [`MAX_METADATA_BYTES`] (64 KiB) as compact
/// JSON, so that listing devices stays cheap, and a `limits` key, if
/// present, of the shape [`DeviceLimits`] reads.
pub fn validate_metadata(metadata: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let size = json_len(metadata)?;
    if size > MAX_METADATA_BYTES {
        return Err(Error::InvalidMetadata(format!(
            "metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed"
        )));
    }
    DeviceLimits::from_metadata(metadata)?;
    Ok(())
}

/// The metadata key that holds a device's own rate limits.
pub const LIMITS_KEY: &str = "limits";

/// A device's own rate limits, overriding the server's defaults for it:
/// the metadata key `limits`, an object with `events_per_s` and
/// `bytes_per_s`, each a non-negative integer (0: no limit) or absent
/// (the server's default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLimits {
    pub events_per_s: Option<u64>,
    pub bytes_per_s: Option<u64>,
}

impl DeviceLimits {
    /// Reads the limits from a device's metadata; no `limits` key means
    /// none of its own.
    pub fn from_metadata(metadata: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let Some(value) = metadata.get(LIMITS_KEY) else {
            return Ok(DeviceLimits::default());
        };
        let bad = |why: String| {
            Error::InvalidMetadata(format!(
                "metadata key '{LIMITS_KEY}' {why}; it is an object such as \
                 {{\"events_per_s\": 1000, \"bytes_per_s\": 1048576}} (0 means no limit)"
            ))
        };
        let serde_json::Value::Object(fields) = value else {
            return Err(bad(format!("must be an object, got {value}")));
        };
        let mut limits = DeviceLimits::default();
        for (key, v) in fields {
            let slot = match key.as_str() {
                "events_per_s" => &mut limits.events_per_s,
                "bytes_per_s" => &mut limits.bytes_per_s,
                other => return Err(bad(format!("has the unknown key '{other}'"))),
            };
            *slot = match v {
                serde_json::Value::Null => None,
                v => Some(v.as_u64().ok_or_else(|| {
                    bad(format!("'{key}' must be a non-negative integer, got {v}"))
                })?),
            };
        }
        Ok(limits)
    }
}

/// The length of `value` as compact JSON, without building the string.
fn json_len(value: &impl Serialize) -> Result<usize> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)
        .map_err(|e| Error::Internal(format!("cannot encode metadata as JSON: {e}")))?;
    Ok(count.0)
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
}

fn is_tag_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Quotes user input for an error message, escaping control characters and
/// cutting it short so that a hostile id cannot flood a log line.
fn shown(s: &str) -> String {
    const MAX_SHOWN: usize = 40;
    let mut out = String::new();
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(MAX_SHOWN).collect();
    let _ = write!(out, "{head:?}");
    if chars.next().is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_err(id: &str) -> String {
        match validate_device_id(id) {
            Err(e @ Error::InvalidId(_)) => e.to_string(),
            other => panic!("expected InvalidId for {id:?}, got {other:?}"),
        }
    }

    fn tag_err(key: &str, value: &str) -> String {
        let tags = BTreeMap::from([(key.to_string(), value.to_string())]);
        match validate_tags(&tags) {
            Err(e @ Error::InvalidTag(_)) => e.to_string(),
            other => panic!("expected InvalidTag for {key:?}={value:?}, got {other:?}"),
        }
    }

    #[test]
    fn good_ids_pass() {
        for id in ["a", "7", "sensor-1", "plant.3:line_2", &"x".repeat(128)] {
            validate_device_id(id).unwrap();
        }
    }

    #[test]
    fn bad_ids_name_the_problem() {
        assert!(id_err("").contains("must not be empty"));
        let long = id_err(&"x".repeat(129));
        assert!(
            long.contains("129 bytes") && long.contains("at most 128"),
            "{long}"
        );
        let space = id_err("a b");
        assert!(
            space.contains("' '") && space.contains("allowed are"),
            "{space}"
        );
        assert!(id_err("dev/1").contains("'/'"));
        assert!(id_err("émile").contains("'é'"));
        assert!(id_err("-x").contains("must start with an ASCII letter or digit"));
        assert!(id_err(":x").contains("must start"));
        // Control characters are escaped, not printed raw.
        let ctl = id_err("a\nb");
        assert!(!ctl.contains('\n') && ctl.contains("\\n"), "{ctl}");
    }

    #[test]
    fn good_tags_pass() {
        let tags = BTreeMap::from([
            ("site".to_string(), "Zürich – hall 3".to_string()),
            ("fw.version".to_string(), String::new()),
            ("k".repeat(64), "v".repeat(256)),
        ]);
        validate_tags(&tags).unwrap();
    }

    #[test]
    fn bad_tags_name_the_problem() {
        assert!(tag_err("", "v").contains("key must not be empty"));
        assert!(tag_err("a b", "v").contains("' '"));
        assert!(tag_err("a:b", "v").contains("':'"));
        assert!(tag_err(&"k".repeat(65), "v").contains("at most 64"));
        let long = tag_err("site", &"v".repeat(257));
        assert!(
            long.contains("\"site\"") && long.contains("at most 256"),
            "{long}"
        );
        let ctl = tag_err("site", "a\u{7}b");
        assert!(ctl.contains("control character"), "{ctl}");
    }

    #[test]
    fn metadata_size_is_limited() {
        let mut metadata = serde_json::Map::new();
        validate_metadata(&metadata).unwrap();
        // {"k":"vvv..."} is 8 bytes plus the value.
        metadata.insert("k".into(), "v".repeat(MAX_METADATA_BYTES - 8).into());
        assert_eq!(
            serde_json::to_string(&metadata).unwrap().len(),
            MAX_METADATA_BYTES
        );
        validate_metadata(&metadata).unwrap();
        metadata.insert("k".into(), "v".repeat(MAX_METADATA_BYTES - 7).into());
        let err = validate_metadata(&metadata).unwrap_err();
        assert!(matches!(err, Error::InvalidMetadata(_)), "{err:?}");
        assert!(err.is_user_error());
        assert_eq!(
            err.to_string(),
            "invalid metadata: metadata is 65537 bytes as JSON; at most 65536 are allowed"
        );
    }

    #[test]
    fn device_json_uses_the_field_names() {
        let device = Device {
            id: "d".into(),
            tags: BTreeMap::from([("site".into(), "north".into())]),
            metadata: serde_json::json!({"model": "X1", "floors": [1, 2]})
                .as_object()
                .cloned()
                .unwrap(),
            status: DeviceStatus::Enabled,
            created_at: 1,
            updated_at: 2,
        };
        let json = serde_json::to_value(&device).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "d",
                "tags": {"site": "north"},
                "metadata": {"model": "X1", "floors": [1, 2]},
                "status": "enabled",
                "created_at": 1,
                "updated_at": 2,
            })
        );
        assert_eq!(serde_json::from_value::<Device>(json).unwrap(), device);
    }

    #[test]
    fn status_serializes_snake_case() {
        assert_eq!(
            serde_json::to_string(&DeviceStatus::Enabled).unwrap(),
            "\"enabled\""
        );
        for s in [DeviceStatus::Enabled, DeviceStatus::Disabled] {
            assert_eq!(DeviceStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn limits_in_metadata_are_read_and_checked() {
        let meta = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert_eq!(
            DeviceLimits::from_metadata(&meta(serde_json::json!({"model": "X"}))).unwrap(),
            DeviceLimits::default()
        );
        let limits = meta(serde_json::json!({"limits": {"events_per_s": 10, "bytes_per_s": 0}}));
        assert_eq!(
            DeviceLimits::from_metadata(&limits).unwrap(),
            DeviceLimits {
                events_per_s: Some(10),
                bytes_per_s: Some(0)
            }
        );
        validate_metadata(&limits).unwrap();
        for bad in [
            serde_json::json!({"limits": 5}),
            serde_json::json!({"limits": {"events_per_s": -1}}),
            serde_json::json!({"limits": {"events_per_s": 1.5}}),
            serde_json::json!({"limits": {"frames_per_s": 1}}),
        ] {
            let err = validate_metadata(&meta(bad.clone())).unwrap_err();
            assert!(err.to_string().contains("'limits'"), "{bad}: {err}");
        }
    }
}
