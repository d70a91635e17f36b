//! Tests every [`Registry`] backend must pass, run against each one.
//!
//! A test here is an `async fn name(reg: SharedRegistry)` that uses only the
//! trait; list it in the `conformance!` call at the bottom, which makes one
//! `#[tokio::test]` per backend. Backend-specific tests (files, migrations,
//! the master key on disk) stay with their backend.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::*;

/// 2026-01-01T00:00:00Z.
pub(crate) const NOW_MS: i64 = 1_767_225_600_000;

pub(crate) fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(crate) fn new(id: &str, pairs: &[(&str, &str)]) -> NewDevice {
    NewDevice {
        id: id.into(),
        tags: tags(pairs),
        ..NewDevice::default()
    }
}

/// A fresh, empty SQLite registry.
pub(crate) async fn sqlite() -> SharedRegistry {
    Arc::new(SqliteRegistry::open_in_memory().expect("an in-memory registry"))
}

/// One `#[tokio::test]` per backend for each listed test.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::conformance::sqlite().await).await
                }
            )*
        }
    };
}

// Devices, keys and tokens: what the registry did before certificates,
// groups, connection state and twins.
mod devices;
// Certificates, enrollment groups, connection state and twins.
mod features;
