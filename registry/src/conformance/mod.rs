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

pub(crate) const NOW_S: i64 = NOW_MS / 1000;
/// An hour from [`NOW_MS`], in seconds: a typical token expiry.
pub(crate) const IN_AN_HOUR: i64 = NOW_S + 3600;

pub(crate) fn meta(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// A token as the device makes it, with the key (base64) it was given.
pub(crate) fn signed(id: &str, key: &str, expires_at: i64) -> String {
    token::sign(id, &token::decode_key(key).unwrap(), expires_at)
}

/// What every failure of token authentication before a verified signature
/// says.
pub(crate) fn generic_reason(id: &str) -> String {
    format!("device '{id}': unknown device, or a token not signed by its keys")
}

#[track_caller]
pub(crate) fn assert_refused(result: Result<Device>, reason: &str) {
    let err = result.unwrap_err();
    assert!(matches!(&err, Error::Unauthorized(_)), "{err:?}");
    assert_eq!(err.to_string(), reason);
    assert!(err.is_user_error());
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A fresh, empty SQLite registry.
pub(crate) async fn sqlite() -> SharedRegistry {
    Arc::new(SqliteRegistry::open_in_memory().expect("an in-memory registry"))
}

/// The URL of the PostgreSQL server to test against (any database on it;
/// each test makes its own), e.g. `postgres://postgres@127.0.0.1:5432/postgres`.
pub(crate) const POSTGRES_URL_VAR: &str = "TRIBUTARY_TEST_POSTGRES";
/// Set to 1 to fail, rather than skip, the PostgreSQL tests without one.
pub(crate) const REQUIRE_POSTGRES_VAR: &str = "TRIBUTARY_REQUIRE_POSTGRES";

/// A database of its own on the test server, made for one test and dropped
/// (with whatever is still connected to it) when this is.
pub(crate) struct PostgresDb {
    admin_url: String,
    name: String,
    /// The database's URL.
    pub(crate) url: String,
    /// The master key file's directory, as the server's data directory.
    dir: tempfile::TempDir,
}

impl PostgresDb {
    /// A new, empty database; `None` when [`POSTGRES_URL_VAR`] is unset
    /// (after saying so), or a panic if [`REQUIRE_POSTGRES_VAR`] is 1.
    pub(crate) async fn create() -> Option<Self> {
        let admin_url = match std::env::var(POSTGRES_URL_VAR) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                if std::env::var(REQUIRE_POSTGRES_VAR).as_deref() == Ok("1") {
                    panic!(
                        "{REQUIRE_POSTGRES_VAR}=1 but {POSTGRES_URL_VAR} is not set: start a \
                         server (.ci/postgres does) and set {POSTGRES_URL_VAR} to its URL, \
                         e.g. postgres://postgres@127.0.0.1:5432/postgres"
                    );
                }
                println!("skipped: {POSTGRES_URL_VAR} not set");
                return None;
            }
        };
        let mut suffix = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix).unwrap();
        let name = format!(
            "trb_test_{}",
            suffix
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let admin = admin_client(&admin_url).await;
        // Sorted as most servers sort text (en-US), not byte by byte as the
        // registry must: where the server has ICU (PostgreSQL 15 on), or
        // else its default.
        let icu = admin
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C' \
                 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            ))
            .await;
        if icu.is_err() {
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e:?}"));
        }
        let url = with_database(&admin_url, &name);
        Some(Self {
            admin_url,
            name,
            url,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// The database's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Where registries of this database keep the master key.
    pub(crate) fn key_path(&self) -> std::path::PathBuf {
        self.dir.path().join("registry.key")
    }

    /// A registry on this database (the first one migrates it).
    pub(crate) async fn connect(&self) -> PostgresRegistry {
        PostgresRegistry::connect(&self.url, &self.key_path())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name))
    }

    /// [`Self::connect`], shared.
    pub(crate) async fn registry(&self) -> SharedRegistry {
        Arc::new(self.connect().await)
    }

    /// A plain client of this database, to look at or tamper with it.
    pub(crate) async fn client(&self) -> tokio_postgres::Client {
        admin_client(&self.url).await
    }
}

impl Drop for PostgresDb {
    fn drop(&mut self) {
        // Drop may run on the test's runtime (or while it unwinds), which
        // cannot be blocked on: a thread of its own, with a runtime of its own.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let admin = admin_client(&admin_url).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("note: could not drop test database {}: {e:?}", self.name);
        }
    }
}

async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test server ({POSTGRES_URL_VAR}): {e:?}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `url` with its database replaced by `name`, in either form PostgreSQL
/// takes: `postgres://host/db?...` or `host=... dbname=...`.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Key-value form: a later key wins.
        return format!("{url} dbname={name}");
    };
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (rest, None),
    };
    let authority = base
        .split_once('/')
        .map_or(base, |(authority, _)| authority);
    match query {
        Some(query) => format!("{scheme}://{authority}/{name}?{query}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

/// One `#[tokio::test]` per backend for each listed test.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        /// On a multi-thread runtime, as the server runs it (writes wait
        /// for their fsync on the blocking pool).
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::conformance::sqlite().await).await
                }
            )*
        }

        /// Each test in a fresh database on the server that
        /// `TRIBUTARY_TEST_POSTGRES` names; skipped without one.
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = $crate::conformance::PostgresDb::create().await else {
                        return;
                    };
                    super::$name(db.registry().await).await
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
