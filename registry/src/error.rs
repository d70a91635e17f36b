//! The registry's error type.

use std::path::PathBuf;

/// `Result` with the registry's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the registry.
///
/// The variants fall into three groups, told apart by [`Error::is_user_error`]:
/// what the caller did wrong (a bad id, tag, metadata or request, an unknown
/// device, a failed authentication), external failures (the database, the file system), and
/// broken invariants (bugs, corrupt rows).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device id does not follow the rules of [`crate::validate_device_id`].
    #[error("invalid device id: {0}")]
    InvalidId(String),
    /// A tag key or value does not follow the rules of [`crate::validate_tags`].
    #[error("invalid tag: {0}")]
    InvalidTag(String),
    /// Device metadata does not follow the rules of [`crate::validate_metadata`].
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    /// A request the registry cannot serve as asked: a page size out of
    /// range, a token for a device without a primary key, ...
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Twin properties do not follow the rules of
    /// [`crate::validate_properties`].
    #[error("invalid properties: {0}")]
    InvalidProperties(String),
    /// A conditional update found another version than it expected.
    #[error("version mismatch: {0}")]
    VersionMismatch(String),
    /// No device has this id.
    #[error("device '{0}' does not exist")]
    NotFound(String),
    /// Something other than a device does not exist (an enrollment group,
    /// a certificate); the message says what.
    #[error("{0}")]
    Missing(String),
    /// Something other than a device exists already; the message says what.
    #[error("{0}")]
    Conflict(String),
    /// A device with this id exists already.
    #[error("device '{0}' already exists")]
    AlreadyExists(String),
    /// Authentication failed; the reason is meant for the device, as is.
    ///
    /// It is the same for an unknown device, a malformed token and a token
    /// signed by neither of the device's keys, so that a caller cannot probe
    /// which device ids exist. Only the holder of a key learns that its device
    /// is disabled or its token expired.
    #[error("{0}")]
    Unauthorized(String),
    /// The database was written by a newer Tributary with a schema this
    /// version does not know.
    #[error(
        "registry database schema version {found} is newer than this program supports \
         (up to {supported}); upgrade Tributary"
    )]
    SchemaTooNew {
        /// The version found in the database (SQLite's `user_version`,
        /// PostgreSQL's `schema_version` table).
        found: i64,
        /// The newest schema version this build knows.
        supported: i64,
    },
    /// The master key file (see [`crate::SqliteRegistry::key_path`]) cannot be
    /// used.
    #[error("registry master key '{}': {reason}", path.display())]
    MasterKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The database failed.
    #[error("registry storage error: {0}")]
    Storage(#[from] rusqlite::Error),
    /// The PostgreSQL server failed, or could not be reached; the message
    /// says which server and what went wrong (never a password).
    #[error("registry database error (PostgreSQL): {0}")]
    Postgres(String),
    /// The file system failed.
    #[error("registry I/O error at '{}': {source}", path.display())]
    Io {
        /// The path being worked on.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A broken invariant: a bug, or a database row this program did not write.
    #[error("internal registry error: {0}")]
    Internal(String),
}

impl Error {
    /// True when the caller caused the error (bad input, unknown device,
    /// failed authentication) rather than the storage or a bug; an HTTP layer
    /// maps these to 4xx and the rest to 5xx.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::InvalidId(_)
                | Error::InvalidTag(_)
                | Error::InvalidMetadata(_)
                | Error::InvalidProperties(_)
                | Error::VersionMismatch(_)
                | Error::InvalidRequest(_)
                | Error::NotFound(_)
                | Error::AlreadyExists(_)
                | Error::Missing(_)
                | Error::Conflict(_)
                | Error::Unauthorized(_)
        )
    }
}
