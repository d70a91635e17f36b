//! The error a rejected payload carries back to the device.

use crate::protocol::{Reject, RejectCode};

/// Why a payload was rejected: the REJECT frame's code, message, and the
/// first bad event and field when one is to blame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PayloadError {
    pub code: RejectCode,
    pub message: String,
    /// 0-based index of the first bad event.
    pub event: Option<usize>,
    /// The offending key of that event.
    pub field: Option<String>,
}

impl PayloadError {
    pub(crate) fn new(code: RejectCode, message: String) -> Self {
        PayloadError {
            code,
            message,
            event: None,
            field: None,
        }
    }

    pub(crate) fn at(mut self, event: usize, field: Option<&str>) -> Self {
        self.event = Some(event);
        self.field = field.map(str::to_owned);
        self
    }

    /// The REJECT frame answering the EVENTS frame `seq`.
    pub fn into_reject(self, seq: u64) -> Reject {
        Reject {
            seq,
            code: self.code,
            message: self.message,
            event: self.event,
            field: self.field,
            retry_after_ms: None,
        }
    }
}

/// A batch that would not assemble from arrays built with the stream's own
/// column types: a bug, not the device's fault, so `unavailable` keeps its
/// data safe to send again once fixed.
pub(crate) fn internal_batch_error(stream: &str, err: arrow::error::ArrowError) -> PayloadError {
    PayloadError::new(
        RejectCode::Unavailable,
        format!("internal error building the batch for stream '{stream}': {err}"),
    )
}
