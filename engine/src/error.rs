//! The engine's error type.
//!
//! Errors are split the way a user needs them split: what the caller did wrong
//! ([`Error::User`]), what went wrong outside us ([`Error::Io`], [`Error::Storage`]),
//! and what should never happen ([`Error::Internal`]).

use std::path::PathBuf;

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller asked for something invalid: an unknown stream, a bad name, a duplicate.
    #[error("{0}")]
    User(String),
    /// A stream, rule or command that does not exist.
    #[error("{kind} '{name}' does not exist")]
    NotFound { kind: &'static str, name: String },
    /// A stream or rule that already exists.
    #[error("{kind} '{name}' already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// The disk or the file system failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Stored data failed its checksum or could not be decoded.
    #[error("corrupt data in {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The command store failed.
    #[error("command store: {0}")]
    Storage(#[from] rusqlite::Error),
    /// Arrow failed to build, encode or decode a batch.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The engine cannot take this now; the same request may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// A broken invariant: a bug in Tributary.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with what we were doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the caller, not the system, is at fault.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::User(_) | Error::NotFound { .. } | Error::AlreadyExists { .. }
        )
    }
}
