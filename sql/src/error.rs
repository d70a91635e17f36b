//! The SQL front end's error type.
//!
//! [`Error::Syntax`] and [`Error::Plan`] are the user's to fix and carry the
//! line and column of the problem when the parser or planner knows it.

use std::fmt;

use datafusion::error::DataFusionError;

/// The SQL front end's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A place in the SQL text, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

fn at(location: &Option<Location>) -> String {
    location.map(|l| format!(" (at {l})")).unwrap_or_default()
}

/// What can go wrong with a SQL statement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not valid SQL.
    #[error("SQL syntax error: {message}{}", at(location))]
    Syntax {
        message: String,
        location: Option<Location>,
    },
    /// Valid SQL that cannot be planned: an unknown column or stream, a type
    /// mismatch, a construct rules do not support.
    #[error("{message}{}", at(location))]
    Plan {
        message: String,
        location: Option<Location>,
    },
    /// The engine refused (unknown stream, duplicate rule) or failed.
    #[error(transparent)]
    Engine(#[from] tributary_engine::Error),
    /// Running a query failed.
    #[error("query failed: {0}")]
    Execution(String),
    /// Reading the stored data failed.
    #[error("reading stored events: {0}")]
    Storage(String),
    /// A broken invariant: a bug in Tributary.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// True when the statement, not the system, is at fault.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Syntax { .. } | Error::Plan { .. } => true,
            Error::Engine(e) => e.is_user_error(),
            _ => false,
        }
    }

    pub(crate) fn plan(message: impl Into<String>) -> Self {
        Error::Plan {
            message: message.into(),
            location: None,
        }
    }

    /// The location of the problem, if known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Error::Syntax { location, .. } | Error::Plan { location, .. } => *location,
            _ => None,
        }
    }
}

/// Finds `at Line: 3, Column: 7` (how sqlparser reports positions) in a message.
pub(crate) fn location_in_message(message: &str) -> Option<Location> {
    let i = message.rfind("Line: ")?;
    let rest = &message[i + 6..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some(Location {
        line: line.trim().parse().ok()?,
        column: column.parse().ok()?,
    })
}

/// Removes the position suffix sqlparser appends, since we report it ourselves.
fn strip_location(message: &str) -> String {
    match message.rfind(" at Line: ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Classifies a DataFusion error: parser and planner errors are the user's.
pub(crate) fn from_datafusion(e: DataFusionError) -> Error {
    let location = e
        .diagnostic()
        .and_then(|d| d.span)
        .map(|s| Location {
            line: s.start.line,
            column: s.start.column,
        })
        .filter(|l| l.line > 0);
    match e.find_root() {
        DataFusionError::SQL(p, _) => {
            let message = p.to_string();
            let message = message
                .strip_prefix("sql parser error: ")
                .unwrap_or(&message);
            Error::Syntax {
                location: location.or_else(|| location_in_message(message)),
                message: strip_location(message),
            }
        }
        DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_) => Error::Plan {
            location,
            message: tidy(&e.find_root().strip_backtrace()),
        },
        _ => Error::Execution(tidy(&e.strip_backtrace())),
    }
}

/// DataFusion prefixes messages with its error kind; users need only the message.
fn tidy(message: &str) -> String {
    let mut m = message.trim();
    for prefix in [
        "Error during planning: ",
        "Schema error: ",
        "This feature is not implemented: ",
        "Arrow error: ",
        "Execution error: ",
    ] {
        if let Some(rest) = m.strip_prefix(prefix) {
            m = rest;
        }
    }
    // Errors are one line wherever they are printed.
    m.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        from_datafusion(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sqlparser_locations() {
        let m = "Expected: an expression, found: FROM at Line: 2, Column: 14";
        assert_eq!(
            location_in_message(m),
            Some(Location {
                line: 2,
                column: 14
            })
        );
        assert_eq!(strip_location(m), "Expected: an expression, found: FROM");
        assert_eq!(location_in_message("no position"), None);
    }
}
