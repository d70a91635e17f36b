//! The server with its registry in PostgreSQL (`serve --registry
//! postgres://…`): a device made through the API connects over QUIC, lives
//! in the database (not in registry.db), and is still there, with its keys,
//! after a restart.
//!
//! Runs against the server `TRIBUTARY_TEST_POSTGRES` names (`.ci/postgres`
//! starts one), in a database of its own; skipped without one, or failed
//! when `TRIBUTARY_REQUIRE_POSTGRES=1`.

use std::time::Duration;

use serde_json::json;
use tributary_ingest::Error as IngestError;
use tributary_ingest::client::{Client, ClientOptions, Outcome};
use tributary_ingest::protocol::ErrorCode;
use tributary_tests::{Server, eventually, sign_token, unix_now};

use crate::e2e::{STREAM, count};

const URL_VAR: &str = "TRIBUTARY_TEST_POSTGRES";
const REQUIRE_VAR: &str = "TRIBUTARY_REQUIRE_POSTGRES";

/// A database of its own on the test server, dropped with this.
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    fn create() -> Option<Database> {
        let admin_url = match std::env::var(URL_VAR) {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") {
                    panic!(
                        "{REQUIRE_VAR}=1 but {URL_VAR} is not set: start a server \
                         (.ci/postgres does) and set {URL_VAR} to its URL"
                    );
                }
                println!("skipped: {URL_VAR} not set");
                return None;
            }
        };
        let name = format!("trb_it_{}_{}", std::process::id(), unix_now());
        block_on(execute(&admin_url, &format!("CREATE DATABASE {name}")));
        let url = with_database(&admin_url, &name);
        Some(Database {
            admin_url,
            name,
            url,
        })
    }

    /// The ids in the registry's `devices` table, read straight from it.
    fn device_ids(&self) -> Vec<String> {
        block_on(async {
            let client = connect(&self.url).await;
            client
                .query("SELECT id FROM devices ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect()
        })
    }

    /// Whether the gateway recorded `id` as connected, in the database.
    fn connected(&self, id: &str) -> Option<bool> {
        block_on(async {
            let client = connect(&self.url).await;
            client
                .query_opt(
                    "SELECT connected FROM connections WHERE device_id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .map(|row| row.get(0))
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        block_on(execute(&self.admin_url, &sql));
    }
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test server ({URL_VAR}): {e:?}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn execute(url: &str, sql: &str) {
    connect(url)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return format!("{url} dbname={name}");
    };
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = base
        .split_once('/')
        .map_or(base, |(authority, _)| authority);
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{scheme}://{authority}/{name}{query}")
}

fn options(server: &Server, device: &str, token: &str) -> ClientOptions {
    ClientOptions::new(
        server.quic_addr().parse().unwrap(),
        server.ca(),
        device,
        token,
    )
}

async fn send_one(server: &Server, device: &str, token: &str) {
    let client = Client::connect(options(server, device, token))
        .await
        .unwrap_or_else(|e| panic!("{device} could not connect: {e}"));
    match client.send("telemetry", &b"{\"temp\": 21.5}"[..]).await {
        Ok(Outcome::Acked(ack)) => assert_eq!(ack.count, 1),
        other => panic!("the event was not stored: {other:?}"),
    }
    client.close().await;
}

#[test]
fn devices_made_through_the_api_connect_over_quic() {
    let Some(db) = Database::create() else {
        return;
    };
    let mut server = Server::start_with(&["--registry", &db.url]);
    server.cli(&["sql", STREAM]).ok();

    let created = server.api_expect(
        "POST",
        "/api/v1/devices",
        Some(&json!({"id": "pg-sensor-1", "tags": {"site": "north"}})),
        201,
    );
    let primary = created["primary_key"].as_str().unwrap().to_string();
    let token = sign_token("pg-sensor-1", &primary, unix_now() + 3600);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(send_one(&server, "pg-sensor-1", &token));
    assert_eq!(count(&server, "telemetry"), 1);

    // The registry is the database: the device and the gateway's record of
    // its connection are there, and no registry.db was made. The master
    // key stays in the data directory.
    assert_eq!(db.device_ids(), ["pg-sensor-1"]);
    eventually(Duration::from_secs(10), || {
        (db.connected("pg-sensor-1") == Some(false)).then_some(())
    });
    assert!(!server.data_dir.join("registry.db").exists());
    assert!(server.data_dir.join("registry.key").exists());
    let rows = server.sql_json("SELECT id, status FROM devices");
    assert_eq!(rows, [json!({"id": "pg-sensor-1", "status": "enabled"})]);

    // After a restart the same key still works...
    server.stop();
    server.restart();
    runtime.block_on(send_one(&server, "pg-sensor-1", &token));
    assert_eq!(count(&server, "telemetry"), 2);

    // ...until the device is disabled.
    server.api_expect("POST", "/api/v1/devices/pg-sensor-1/disable", None, 200);
    let refused = runtime.block_on(Client::connect(options(&server, "pg-sensor-1", &token)));
    match refused {
        Err(IngestError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::Unauthorized, "{message}");
            assert!(message.contains("disabled"), "{message}");
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a disabled device was let in"),
    }
}

/// A server that cannot reach its registry does not start, and says where
/// it tried and why in one line.
#[test]
fn an_unreachable_registry_is_one_clear_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://trb:s3cret@127.0.0.1:{port}/registry");
    let output = std::process::Command::new(tributary_tests::binary())
        .args([
            "serve",
            "--quic-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--registry", &url])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr.trim();
    assert_eq!(line.lines().count(), 1, "{stderr}");
    assert!(
        line.starts_with(&format!(
            "error: registry database error (PostgreSQL): cannot connect to PostgreSQL at \
             127.0.0.1:{port}, database 'registry': "
        )),
        "{line}"
    );
    assert!(line.contains("refused"), "{line}");
    assert!(!line.contains("s3cret"), "{line}");
}
