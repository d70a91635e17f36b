//! Tributary's device registry: who the devices are, their metadata, and
//! their credentials.
//!
//! This crate owns the [`Device`] record, the rules for device ids, tags and
//! metadata ([`validate_device_id`], [`validate_tags`],
//! [`validate_metadata`]), device keys and the tokens made from them
//! ([`token`]), and the [`Registry`] trait that the gateway (authentication)
//! and the management API (provisioning) use through a [`SharedRegistry`].
//! [`SqliteRegistry`] keeps it in one file on the server's machine;
//! [`PostgresRegistry`] in a PostgreSQL database. Both pass the same
//! conformance tests.
//!
//! Every device has two random keys, a primary and a secondary, shown once
//! when they are made ([`Registry::create_device`], [`Registry::rotate_key`])
//! and stored encrypted. A device signs its own short-lived tokens with
//! either key (`trb1.<expires_at>.<signature>`, see [`token`]); two keys let
//! one be rotated while the device still works with the other. Devices made
//! before keys existed keep their legacy `trb_` token ([`TOKEN_PREFIX`])
//! until their primary key is rotated.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use tributary_registry::{NewDevice, Registry, SharedRegistry, SqliteRegistry, token};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tributary_registry::Result<()> {
//! let registry: SharedRegistry = Arc::new(SqliteRegistry::open_in_memory()?);
//! let now_ms = 1_767_225_600_000; // 2026-01-01T00:00:00Z
//! let new = NewDevice {
//!     id: "sensor-1".into(),
//!     tags: BTreeMap::from([("site".to_string(), "north".to_string())]),
//!     ..NewDevice::default()
//! };
//! let (device, keys) = registry.create_device(new, now_ms).await?;
//!
//! // The device makes a token valid for an hour with one of its keys...
//! let key = token::decode_key(&keys.primary).expect("a key the registry made");
//! let expires_at = now_ms / 1000 + 3600;
//! let device_token = token::sign("sensor-1", &key, expires_at);
//! assert_eq!(registry.authenticate("sensor-1", &device_token, now_ms).await?, device);
//!
//! // ...and a new one when the hour is up.
//! let later = registry.authenticate("sensor-1", &device_token, now_ms + 3_600_000).await;
//! assert_eq!(
//!     later.unwrap_err().to_string(),
//!     "the token of device 'sensor-1' expired at 2026-01-01T01:00:00Z"
//! );
//! # Ok(())
//! # }
//! ```

mod certificate;
mod common;
#[cfg(test)]
mod conformance;
mod credentials;
mod device;
mod enrollment;
mod error;
mod master_key;
mod postgres;
mod presence;
mod sqlite;
pub mod token;
mod twin;

use std::collections::BTreeMap;

pub use certificate::{Certificate, CertificateStatus, thumbprint, validate_thumbprint};
pub use credentials::TOKEN_PREFIX;
pub use device::{
    Device, DeviceLimits, DeviceStatus, LIMITS_KEY, MAX_DEVICE_ID_LEN, MAX_METADATA_BYTES,
    MAX_TAG_KEY_LEN, MAX_TAG_VALUE_LEN, validate_device_id, validate_metadata, validate_tags,
};
pub use enrollment::{
    EnrollmentGroup, GroupPatch, NewGroup, derive_device_key, validate_group_name,
};
pub use error::{Error, Result};
pub use postgres::PostgresRegistry;
pub use presence::ConnectionState;
pub use sqlite::{SCHEMA_VERSION, SqliteRegistry};
pub use twin::{
    MAX_PROPERTIES_BYTES, MAX_PROPERTIES_DEPTH, Properties, PropertiesUpdate, Side, Twin,
    merge_patch, validate_properties,
};

/// Which of a device's two symmetric keys. Each is rotated on its own, so a
/// device moves to a new key without a moment in which neither works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySlot {
    Primary,
    Secondary,
}

/// A device's keys, base64 (standard alphabet), as shown when they are made.
/// Its `Debug` output leaves the keys out, so that they do not end up in logs.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceKeys {
    pub primary: String,
    pub secondary: String,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("primary", &"<redacted>")
            .field("secondary", &"<redacted>")
            .finish()
    }
}

/// A device to create.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewDevice {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    /// A JSON object; see [`validate_metadata`].
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// `Disabled` registers a device that may not connect yet.
    pub status: Option<DeviceStatus>,
}

/// Changes to a device; `None` leaves a field as it is. Tags and metadata
/// are replaced whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DevicePatch {
    pub tags: Option<BTreeMap<String, String>>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub status: Option<DeviceStatus>,
}

/// Which devices to list, a page at a time, ordered by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFilter {
    /// Devices that carry every one of these tags with these values.
    pub tags: BTreeMap<String, String>,
    pub status: Option<DeviceStatus>,
    /// Only ids after this one: the `next` of the previous page.
    pub after: Option<String>,
    /// At most this many (1 to [`MAX_PAGE`]).
    pub limit: usize,
}

impl Default for DeviceFilter {
    fn default() -> Self {
        DeviceFilter {
            tags: BTreeMap::new(),
            status: None,
            after: None,
            limit: DEFAULT_PAGE,
        }
    }
}

/// Devices per page unless asked otherwise, and the most a page holds.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

/// One page of devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePage {
    pub devices: Vec<Device>,
    /// Where the next page starts (`DeviceFilter::after`), if there is one.
    pub next: Option<String>,
}

/// Devices and their credentials, behind one seam so that SQLite and
/// PostgreSQL can both serve it.
///
/// Times are passed in by the caller (milliseconds since the Unix epoch), so
/// implementations never read a clock.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Creates a device with two fresh random keys; returns the device and
    /// the keys, shown this once (they are stored encrypted).
    ///
    /// Fails with [`Error::InvalidId`] / [`Error::InvalidTag`] /
    /// [`Error::InvalidMetadata`] for bad input and [`Error::AlreadyExists`]
    /// if the id is taken.
    async fn create_device(&self, device: NewDevice, now_ms: i64) -> Result<(Device, DeviceKeys)>;

    /// The device with this id, or `None`. [`Error::InvalidId`] for an id
    /// that could never exist.
    async fn get_device(&self, id: &str) -> Result<Option<Device>>;

    /// A page of devices matching `filter`, ordered by id.
    async fn list_devices(&self, filter: &DeviceFilter) -> Result<DevicePage>;

    /// Every device, ordered by id (for the SQL `devices` table).
    async fn all_devices(&self) -> Result<Vec<Device>>;

    /// Changes a device's tags, metadata or status; [`Error::NotFound`] if
    /// absent. Disabling a device is announced on [`Registry::changes`].
    async fn update_device(&self, id: &str, patch: DevicePatch, now_ms: i64) -> Result<Device>;

    /// Removes a device and its credentials; [`Error::NotFound`] if absent.
    /// Announced on [`Registry::changes`].
    async fn remove_device(&self, id: &str) -> Result<()>;

    /// Replaces one of a device's keys with a fresh one and returns it
    /// (base64); tokens signed with the old key stop working. Announced on
    /// [`Registry::changes`].
    async fn rotate_key(&self, id: &str, slot: KeySlot, now_ms: i64) -> Result<String>;

    /// A token for the device, signed with its primary key, valid until
    /// `expires_at` (seconds since the Unix epoch).
    async fn issue_token(&self, id: &str, expires_at: i64) -> Result<String>;

    /// Checks a device's token (see [`token`]) at time `now_ms` and returns
    /// the device.
    ///
    /// An unknown device, a malformed token and a signature by neither of
    /// the device's keys all give the same [`Error::Unauthorized`] reason, so
    /// that a caller cannot probe which ids exist. Only a token the device's
    /// key signed learns that the device is disabled or the token expired.
    async fn authenticate(&self, id: &str, token: &str, now_ms: i64) -> Result<Device>;

    /// Ids of devices whose right to connect may have changed (disabled,
    /// removed, a key or certificate revoked), and of devices whose desired
    /// properties changed, as they change.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change>;

    // ----- X.509 certificates ---------------------------------------------

    /// Registers a certificate (by thumbprint, see [`thumbprint`]) to a
    /// device. [`Error::NotFound`] for an unknown device,
    /// [`Error::Conflict`] if the thumbprint is registered already
    /// (to any device).
    async fn add_certificate(
        &self,
        id: &str,
        thumbprint: &str,
        not_after_ms: i64,
        now_ms: i64,
    ) -> Result<Certificate>;

    /// A device's certificates, oldest first. [`Error::NotFound`] for an
    /// unknown device.
    async fn list_certificates(&self, id: &str) -> Result<Vec<Certificate>>;

    /// Marks a device's certificate revoked; announced on
    /// [`Registry::changes`]. [`Error::NotFound`] for an unknown device,
    /// [`Error::Missing`] if the device has no such certificate.
    async fn revoke_certificate(
        &self,
        id: &str,
        thumbprint: &str,
        now_ms: i64,
    ) -> Result<Certificate>;

    /// The device a certificate (already verified by TLS against a trusted
    /// CA) authenticates as `id`. Refused ([`Error::Unauthorized`]) unless
    /// the thumbprint is registered to `id`, active and not past
    /// `not_after`, and the device is enabled.
    async fn authenticate_certificate(
        &self,
        id: &str,
        thumbprint: &str,
        now_ms: i64,
    ) -> Result<Device>;

    // ----- Enrollment groups ----------------------------------------------

    /// Creates an enrollment group with two fresh keys, shown this once.
    async fn create_group(
        &self,
        group: NewGroup,
        now_ms: i64,
    ) -> Result<(EnrollmentGroup, DeviceKeys)>;

    /// The group with this name, or `None`.
    async fn get_group(&self, name: &str) -> Result<Option<EnrollmentGroup>>;

    /// Every group, ordered by name.
    async fn list_groups(&self) -> Result<Vec<EnrollmentGroup>>;

    /// Changes a group's tags or status; [`Error::Missing`] if absent.
    async fn update_group(
        &self,
        name: &str,
        patch: GroupPatch,
        now_ms: i64,
    ) -> Result<EnrollmentGroup>;

    /// Removes a group; [`Error::Missing`] if absent. Devices it enrolled
    /// stay (with their own keys).
    async fn remove_group(&self, name: &str) -> Result<()>;

    /// Replaces one of a group's keys; devices enrolled later derive from
    /// the new one, devices already enrolled keep theirs. [`Error::Missing`]
    /// if the group does not exist.
    async fn rotate_group_key(&self, name: &str, slot: KeySlot, now_ms: i64) -> Result<String>;

    /// Authenticates device `id` as a member of group `group`
    /// (see [`enrollment`](crate::derive_device_key)): the token must be
    /// signed with a key derived from one of the group's keys. A device the
    /// registry does not know is created with the group's tags and the
    /// derived keys; a known device must have been enrolled by this group
    /// and authenticates with its own keys. Returns the device and whether
    /// it was created now. All failures before a signature verifies give
    /// the same [`Error::Unauthorized`] reason.
    async fn enroll(
        &self,
        group: &str,
        id: &str,
        token: &str,
        now_ms: i64,
    ) -> Result<(Device, bool)>;

    // ----- Connection state ---------------------------------------------

    /// Stores a device's connection state. Ignores an unknown device (it
    /// may have been removed while connected).
    async fn record_connection(&self, id: &str, state: &ConnectionState) -> Result<()>;

    /// Stores several connection states, in order (a device may appear
    /// more than once; its last state stays). A backend writes them
    /// together where it can: the gateway hands over every change that
    /// piled up while the last write ran, e.g. a thousand devices
    /// connecting at once.
    async fn record_connections(&self, states: &[(String, ConnectionState)]) -> Result<()> {
        for (id, state) in states {
            self.record_connection(id, state).await?;
        }
        Ok(())
    }

    /// A device's stored connection state; `None` if it never connected.
    async fn connection_state(&self, id: &str) -> Result<Option<ConnectionState>>;

    /// Every stored connection state, by device id.
    async fn connection_states(&self) -> Result<BTreeMap<String, ConnectionState>>;

    /// At start-up: every device still stored as connected was cut off when
    /// the server last stopped; marks it disconnected with `reason` at
    /// `now_ms`. Returns how many.
    async fn disconnect_all(&self, reason: &str, now_ms: i64) -> Result<usize>;

    // ----- Twins -----------------------------------------------------------

    /// A device's twin; [`Error::NotFound`] for an unknown device (a device
    /// without properties has an empty twin at versions 0).
    async fn get_twin(&self, id: &str) -> Result<Twin>;

    /// Changes one side of a device's twin (see [`PropertiesUpdate`]) and
    /// returns the twin. Desired changes are announced on
    /// [`Registry::changes`]. [`Error::NotFound`], [`Error::VersionMismatch`]
    /// and [`Error::InvalidProperties`] as they apply.
    async fn update_properties(
        &self,
        id: &str,
        side: Side,
        update: PropertiesUpdate,
        now_ms: i64,
    ) -> Result<Twin>;

    /// Every device's twin, by device id (for the SQL `devices` table);
    /// devices without properties are left out.
    async fn all_twins(&self) -> Result<BTreeMap<String, Twin>>;
}

/// What [`Registry::changes`] announces.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// The device's right to connect may have changed: its live sessions
    /// must be checked again.
    Access(String),
    /// The device's desired properties changed (to this version): its live
    /// sessions get the new ones.
    Desired(String, i64),
    /// Something else about the device changed that copies of the registry
    /// (the SQL `devices` table) show: it was created or enrolled, its
    /// tags, metadata or status, its connection state or its reported
    /// properties.
    Updated(String),
}

/// The registry as the rest of the program holds it.
pub type SharedRegistry = std::sync::Arc<dyn Registry>;
