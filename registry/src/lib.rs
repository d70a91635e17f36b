//! Tributary's device registry: who the devices are, their metadata, and
//! their credentials.
//!
//! This crate owns the [`Device`] record, the rules for device ids and tags
//! ([`validate_device_id`], [`validate_tags`]), device tokens (made, hashed
//! and checked here, never stored in the clear), and the [`Registry`] trait
//! that the gateway (authentication) and the management API (provisioning)
//! use through a [`SharedRegistry`]. [`SqliteRegistry`] is the one-machine
//! implementation; a PostgreSQL one is planned behind the same trait.
//!
//! Tokens look like `trb_` followed by 43 base64url characters. The registry
//! keeps only their SHA-256 digest, so a token is shown exactly once, by
//! [`Registry::create_device`].
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use tributary_registry::{Error, Registry, SharedRegistry, SqliteRegistry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tributary_registry::Result<()> {
//! let registry: SharedRegistry = Arc::new(SqliteRegistry::open_in_memory()?);
//! let tags = BTreeMap::from([("site".to_string(), "north".to_string())]);
//! let (device, token) = registry.create_device("sensor-1", tags, 1_700_000_000_000).await?;
//! assert!(token.starts_with("trb_"));
//!
//! assert_eq!(registry.authenticate("sensor-1", &token).await?, device);
//! assert!(matches!(
//!     registry.authenticate("sensor-1", "trb_guess").await,
//!     Err(Error::Unauthorized(_))
//! ));
//! # Ok(())
//! # }
//! ```

mod credentials;
mod device;
mod error;
mod sqlite;

use std::collections::BTreeMap;

pub use credentials::TOKEN_PREFIX;
pub use device::{
    Device, DeviceStatus, MAX_DEVICE_ID_LEN, MAX_TAG_KEY_LEN, MAX_TAG_VALUE_LEN,
    validate_device_id, validate_tags,
};
pub use error::{Error, Result};
pub use sqlite::{SCHEMA_VERSION, SqliteRegistry};

/// Devices and their credentials, behind one seam so that SQLite and
/// PostgreSQL can both serve it.
///
/// Times are passed in by the caller (milliseconds since the Unix epoch), so
/// implementations never read a clock.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Creates a device with a fresh random secret token; returns the device
    /// and the token, which is shown this once and cannot be read back.
    ///
    /// Fails with [`Error::InvalidId`] / [`Error::InvalidTag`] for bad input
    /// and [`Error::AlreadyExists`] if the id is taken.
    async fn create_device(
        &self,
        id: &str,
        tags: BTreeMap<String, String>,
        now_ms: i64,
    ) -> Result<(Device, String)>;

    /// The device with this id, or `None`. [`Error::InvalidId`] for an id
    /// that could never exist.
    async fn get_device(&self, id: &str) -> Result<Option<Device>>;

    /// All devices, ordered by id.
    async fn list_devices(&self) -> Result<Vec<Device>>;

    /// Removes a device and its credentials; [`Error::NotFound`] if absent.
    async fn remove_device(&self, id: &str) -> Result<()>;

    /// Checks a device's token in constant time and returns the device.
    ///
    /// An unknown device, a wrong token, a disabled device and an invalid id
    /// all give the same [`Error::Unauthorized`].
    async fn authenticate(&self, id: &str, token: &str) -> Result<Device>;
}

/// The registry as the rest of the program holds it.
pub type SharedRegistry = std::sync::Arc<dyn Registry>;
