//! The device management API over real HTTP, and the `tributary device`
//! commands that drive it: every endpoint, its error codes, pagination,
//! bulk import, and the SQL `devices` table kept current.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};
use tributary_tests::Server;

use crate::e2e::{STREAM, count};

/// A blocking client of one server's API, with its admin token.
struct Http {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: String,
    token: String,
}

/// An answer: status code and JSON body (`Null` when empty).
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    /// The `error.code` of an error answer.
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn expect(self, status: u16) -> Value {
        assert_eq!(self.status, status, "{:?}", self.body);
        self.body
    }

    fn expect_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.code()),
            (status, code),
            "{:?}",
            self.body
        );
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{:?}",
            self.body
        );
    }
}

impl Http {
    fn new(server: &Server) -> Http {
        let token = std::fs::read_to_string(server.data_dir.join("admin.token")).unwrap();
        Http {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::new(),
            base: format!("http://{}", server.http_addr().unwrap()),
            token: token.trim().to_string(),
        }
    }

    /// A request with the admin token (or `token`, or none) and a raw body.
    fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, ct);
        }
        self.runtime.block_on(async {
            let response = request.body(body).send().await.unwrap();
            let status = response.status().as_u16();
            let bytes = response.bytes().await.unwrap();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
                })
            };
            Answer { status, body }
        })
    }

    fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let (ct, bytes) = match body {
            Some(b) => (Some("application/json"), serde_json::to_vec(&b).unwrap()),
            None => (None, Vec::new()),
        };
        self.send(method, path, Some(&self.token), ct, bytes)
    }

    fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None)
    }

    fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body))
    }

    fn patch(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PATCH, path, Some(body))
    }

    fn delete(&self, path: &str) -> Answer {
        self.call(Method::DELETE, path, None)
    }

    /// A JSON body that is not valid JSON.
    fn post_text(&self, path: &str, text: &str) -> Answer {
        self.send(
            Method::POST,
            path,
            Some(&self.token),
            Some("application/json"),
            text.as_bytes().to_vec(),
        )
    }

    fn import(&self, content_type: &str, body: &str) -> Answer {
        self.send(
            Method::POST,
            "/api/v1/devices/import",
            Some(&self.token),
            Some(content_type),
            body.as_bytes().to_vec(),
        )
    }

    /// Every device id, through every page.
    fn all_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        let mut path = "/api/v1/devices?limit=1000".to_string();
        loop {
            let page = self.get(&path).expect(200);
            ids.extend(page["devices"].as_array().unwrap().iter().map(id_of));
            match page["next"].as_str() {
                Some(next) => path = format!("/api/v1/devices?limit=1000&after={next}"),
                None => return ids,
            }
        }
    }
}

fn id_of(device: &Value) -> String {
    device["id"].as_str().unwrap().to_string()
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The SQL `devices` table: id → status.
fn devices_table(server: &Server) -> Vec<(String, String)> {
    server
        .sql_json("SELECT id, status FROM devices ORDER BY id")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn rows(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn every_api_route_needs_the_admin_token() {
    let server = Server::start();
    let http = Http::new(&server);
    let routes = [
        (Method::GET, "/api/v1/devices"),
        (Method::POST, "/api/v1/devices"),
        (Method::GET, "/api/v1/devices/d1"),
        (Method::PATCH, "/api/v1/devices/d1"),
        (Method::DELETE, "/api/v1/devices/d1"),
        (Method::POST, "/api/v1/devices/d1/disable"),
        (Method::POST, "/api/v1/devices/d1/enable"),
        (Method::POST, "/api/v1/devices/d1/keys/primary/rotate"),
        (Method::POST, "/api/v1/devices/d1/token"),
        (Method::POST, "/api/v1/devices/import"),
        (Method::POST, "/api/v1/sql"),
    ];
    for (method, path) in routes {
        for token in [None, Some("not-the-admin-token")] {
            let answer = http.send(method.clone(), path, token, None, Vec::new());
            answer.expect_error(401, "unauthorized");
        }
    }
    // Nothing was created by the refused requests.
    assert!(http.all_ids().is_empty());
    let health = http.send(Method::GET, "/health", None, None, Vec::new());
    assert_eq!(health.expect(200)["status"], "ok");
}

#[test]
fn device_lifecycle_over_http() {
    let server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let http = Http::new(&server);

    // Create: the device, both keys and a long-lived token, shown once.
    let created = http
        .post(
            "/api/v1/devices",
            json!({"id": "pump-1", "tags": {"site": "north"}, "metadata": {"model": "P7", "floors": [1, 2]}}),
        )
        .expect(201);
    assert_eq!(created["id"], "pump-1");
    assert_eq!(created["tags"]["site"], "north");
    assert_eq!(created["metadata"]["floors"], json!([1, 2]));
    assert_eq!(created["status"], "enabled");
    let (primary, secondary) = (
        created["primary_key"].as_str().unwrap().to_string(),
        created["secondary_key"].as_str().unwrap().to_string(),
    );
    assert!(!primary.is_empty() && primary != secondary);
    let token = created["token"].as_str().unwrap().to_string();
    let expires = created["token_expires_at"].as_i64().unwrap();
    assert!((expires - now_s() - 315_576_000).abs() < 120, "{created}");
    assert_eq!(devices_table(&server), rows(&[("pump-1", "enabled")]));

    // The token connects.
    let send = |token: &str| {
        server.cli_with_stdin(
            &["send", "--device", "pump-1", "--token", token],
            Some("{\"temp\": 20}\n"),
        )
    };
    send(&token).ok();

    // Get; the answer never shows keys again.
    let got = http.get("/api/v1/devices/pump-1").expect(200);
    assert_eq!(got["metadata"]["model"], "P7");
    assert_eq!(got["connected"], false);
    assert!(got.get("primary_key").is_none() && got.get("token").is_none());
    http.get("/api/v1/devices/ghost")
        .expect_error(404, "not_found");
    http.get("/api/v1/devices/no%20such%20id")
        .expect_error(404, "not_found");

    // Create refusals: 409 for a taken id, 400 for a malformed body, 422
    // for values that break the rules.
    http.post("/api/v1/devices", json!({"id": "pump-1"}))
        .expect_error(409, "already_exists");
    http.post_text("/api/v1/devices", "{\"id\": ")
        .expect_error(400, "invalid_request");
    http.post("/api/v1/devices", json!({"id": "x", "tag": {}}))
        .expect_error(400, "invalid_request");
    http.post("/api/v1/devices", json!({"tags": {}}))
        .expect_error(400, "invalid_request");
    http.post("/api/v1/devices", json!({"id": "x", "metadata": [1]}))
        .expect_error(400, "invalid_request");
    http.post("/api/v1/devices", json!({"id": "bad id"}))
        .expect_error(422, "invalid_device");
    http.post("/api/v1/devices", json!({"id": "x", "tags": {"a b": "v"}}))
        .expect_error(422, "invalid_device");
    http.post(
        "/api/v1/devices",
        json!({"id": "x", "metadata": {"blob": "v".repeat(70_000)}}),
    )
    .expect_error(422, "invalid_device");
    http.post("/api/v1/devices", json!({"id": "x", "status": "paused"}))
        .expect_error(422, "invalid_device");
    assert_eq!(http.all_ids(), ["pump-1"]);

    // Patch: tags and metadata are replaced whole; absent fields stay.
    let patched = http
        .patch(
            "/api/v1/devices/pump-1",
            json!({"tags": {"site": "south", "line": "2"}}),
        )
        .expect(200);
    assert_eq!(patched["tags"], json!({"site": "south", "line": "2"}));
    assert_eq!(patched["metadata"]["model"], "P7");
    assert!(patched["updated_at"].as_i64() >= got["updated_at"].as_i64());
    let patched = http
        .patch(
            "/api/v1/devices/pump-1",
            json!({"metadata": {"model": "P8"}}),
        )
        .expect(200);
    assert_eq!(patched["metadata"], json!({"model": "P8"}));
    assert_eq!(patched["tags"]["site"], "south");
    let site = server.sql_json(
        "SELECT tags['site'] AS site, metadata, updated_at >= created_at AS later FROM devices",
    );
    assert_eq!(site[0]["site"], "south");
    assert_eq!(site[0]["metadata"], r#"{"model":"P8"}"#);
    assert_eq!(site[0]["later"], true);
    http.patch("/api/v1/devices/ghost", json!({"tags": {}}))
        .expect_error(404, "not_found");
    http.patch("/api/v1/devices/pump-1", json!({"status": "off"}))
        .expect_error(422, "invalid_device");
    http.patch("/api/v1/devices/pump-1", json!({"colour": "red"}))
        .expect_error(400, "invalid_request");

    // Disable and enable, through PATCH and the convenience routes.
    let disabled = http
        .post("/api/v1/devices/pump-1/disable", json!({}))
        .expect(200);
    assert_eq!(disabled["status"], "disabled");
    assert_eq!(devices_table(&server), rows(&[("pump-1", "disabled")]));
    assert!(!send(&token).success);
    let enabled = http
        .post("/api/v1/devices/pump-1/enable", json!({}))
        .expect(200);
    assert_eq!(enabled["status"], "enabled");
    let patched = http
        .patch("/api/v1/devices/pump-1", json!({"status": "disabled"}))
        .expect(200);
    assert_eq!(patched["status"], "disabled");
    http.post("/api/v1/devices/pump-1/enable", json!({}))
        .expect(200);
    http.post("/api/v1/devices/ghost/disable", json!({}))
        .expect_error(404, "not_found");
    send(&token).ok();
    assert_eq!(count(&server, "telemetry"), 2);

    // Tokens: a chosen lifetime, within bounds.
    let issued = http
        .post(
            "/api/v1/devices/pump-1/token",
            json!({"expires_in_s": 3600}),
        )
        .expect(200);
    assert!((issued["expires_at"].as_i64().unwrap() - now_s() - 3600).abs() < 60);
    let short_token = issued["token"].as_str().unwrap().to_string();
    send(&short_token).ok();
    let default = http
        .post("/api/v1/devices/pump-1/token", json!({}))
        .expect(200);
    assert!((default["expires_at"].as_i64().unwrap() - now_s() - 315_576_000).abs() < 60);
    for bad in [0, -5, 101 * 31_557_600_i64] {
        http.post("/api/v1/devices/pump-1/token", json!({"expires_in_s": bad}))
            .expect_error(422, "invalid_parameter");
    }
    http.post(
        "/api/v1/devices/pump-1/token",
        json!({"expires_in_s": "1h"}),
    )
    .expect_error(400, "invalid_request");
    http.post("/api/v1/devices/ghost/token", json!({}))
        .expect_error(404, "not_found");

    // Key rotation: a fresh key; tokens of the old primary key stop working.
    let rotated = http
        .post("/api/v1/devices/pump-1/keys/secondary/rotate", json!({}))
        .expect(200);
    assert_eq!(rotated["slot"], "secondary");
    let new_secondary = rotated["key"].as_str().unwrap();
    assert!(!new_secondary.is_empty() && new_secondary != secondary);
    send(&token).ok();
    let rotated = http
        .post("/api/v1/devices/pump-1/keys/primary/rotate", json!({}))
        .expect(200);
    assert_eq!(rotated["slot"], "primary");
    assert_ne!(rotated["key"].as_str().unwrap(), primary);
    assert!(!send(&token).success);
    let fresh = http
        .post("/api/v1/devices/pump-1/token", json!({}))
        .expect(200);
    send(fresh["token"].as_str().unwrap()).ok();
    http.post("/api/v1/devices/pump-1/keys/tertiary/rotate", json!({}))
        .expect_error(404, "not_found");
    http.post("/api/v1/devices/ghost/keys/primary/rotate", json!({}))
        .expect_error(404, "not_found");

    // Delete: 204, then gone everywhere.
    assert_eq!(http.delete("/api/v1/devices/pump-1").status, 204);
    http.delete("/api/v1/devices/pump-1")
        .expect_error(404, "not_found");
    http.get("/api/v1/devices/pump-1")
        .expect_error(404, "not_found");
    assert!(devices_table(&server).is_empty());
    assert!(!send(fresh["token"].as_str().unwrap()).success);

    // "import" is a device id like any other, though it names a route too.
    http.post("/api/v1/devices", json!({"id": "import"}))
        .expect(201);
    assert_eq!(
        http.get("/api/v1/devices/import").expect(200)["id"],
        "import"
    );
    let patched = http
        .patch("/api/v1/devices/import", json!({"tags": {"k": "v"}}))
        .expect(200);
    assert_eq!(patched["tags"]["k"], "v");
    http.post("/api/v1/devices/import/disable", json!({}))
        .expect(200);
    assert_eq!(http.delete("/api/v1/devices/import").status, 204);

    // SQL still works beside the device routes.
    let sql = http
        .post("/api/v1/sql", json!({"sql": "SELECT 1 AS a"}))
        .expect(200);
    assert_eq!(sql["rows"][0]["a"], 1);
}

#[test]
fn listing_pages_through_filters() {
    let server = Server::start();
    let http = Http::new(&server);
    // 30 devices: sites a and b alternate, every third is disabled.
    let mut expected = Vec::new();
    for i in 0..30 {
        let id = format!("dev-{i:02}");
        let site = if i % 2 == 0 { "a" } else { "b" };
        let status = if i % 3 == 0 { "disabled" } else { "enabled" };
        http.post(
            "/api/v1/devices",
            json!({"id": id, "tags": {"site": site, "kind": "meter"}, "status": status}),
        )
        .expect(201);
        if site == "a" && status == "enabled" {
            expected.push(id);
        }
    }

    // Default page: everything (fewer than 100), no next.
    let page = http.get("/api/v1/devices").expect(200);
    assert_eq!(page["devices"].as_array().unwrap().len(), 30);
    assert_eq!(page["next"], Value::Null);
    assert_eq!(page["devices"][0]["connected"], false);

    // Pages of 4 of site=a, kind=meter, enabled, following `next`.
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut after = String::new();
    loop {
        let mut path =
            "/api/v1/devices?tag=site=a&tag=kind=meter&status=enabled&limit=4".to_string();
        if !after.is_empty() {
            path.push_str(&format!("&after={after}"));
        }
        let page = http.get(&path).expect(200);
        let devices = page["devices"].as_array().unwrap();
        assert!(devices.len() <= 4);
        for d in devices {
            assert_eq!(d["tags"]["site"], "a");
            assert_eq!(d["status"], "enabled");
        }
        seen.extend(devices.iter().map(id_of));
        pages += 1;
        match page["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, expected);
    assert!(pages >= 3, "{pages} pages");

    // Ordered by id, no duplicates across pages.
    let all = http.all_ids();
    let sorted: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(all, sorted.into_iter().collect::<Vec<_>>());
    assert_eq!(all.len(), 30);

    let disabled = http
        .get("/api/v1/devices?status=disabled&limit=1000")
        .expect(200);
    assert_eq!(disabled["devices"].as_array().unwrap().len(), 10);
    let none = http.get("/api/v1/devices?tag=site=c").expect(200);
    assert_eq!(none["devices"], json!([]));

    for bad in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "status=paused",
        "tag=site",
        "tag=a%20b=c",
        "tags=site=a",
        "limit=1&limit=2",
        "after=not%20an%20id",
    ] {
        http.get(&format!("/api/v1/devices?{bad}"))
            .expect_error(422, "invalid_parameter");
    }
}

#[test]
fn json_lines_import_lands_good_rows_and_reports_bad_ones() {
    let server = Server::start();
    let http = Http::new(&server);
    http.post(
        "/api/v1/devices",
        json!({"id": "taken", "tags": {"keep": "me"}}),
    )
    .expect(201);

    let body = [
        r#"{"id": "j-1", "tags": {"site": "north"}}"#, // 1 ok
        r#"{"id": "j-2", "metadata": {"m": 1}, "status": "disabled"}"#, // 2 ok
        r#"{"id": "j-3", "#,                           // 3 not JSON
        "",                                            // 4 blank
        r#"{"id": "bad id"}"#,                         // 5 invalid id
        r#"{"id": "j-1"}"#,                            // 6 repeated
        r#"{"id": "taken", "tags": {"keep": "not"}}"#, // 7 exists
        r#"{"id": "j-4", "status": "paused"}"#,        // 8 bad status
        r#"{"id": "j-5", "colour": "red"}"#,           // 9 unknown field
        r#"{"id": "j-6"}"#,                            // 10 ok
    ]
    .join("\n");
    let report = http.import("application/x-ndjson", &body).expect(200);
    assert_eq!(report["created"], 3, "{report}");
    assert_eq!(report["failed"], 6, "{report}");
    let results = report["results"].as_array().unwrap();
    let by_line = |line: u64| {
        results
            .iter()
            .find(|r| r["line"] == line)
            .unwrap_or_else(|| panic!("no result for line {line}: {report}"))
    };
    for line in [1, 2, 10] {
        let r = by_line(line);
        assert_eq!(r["ok"], true, "{r}");
        assert!(r["primary_key"].is_string() && r["secondary_key"].is_string());
        assert!(r["token"].is_string());
    }
    for (line, code) in [
        (3, "invalid_request"),
        (5, "invalid_device"),
        (6, "duplicate_id"),
        (7, "already_exists"),
        (8, "invalid_device"),
        (9, "invalid_request"),
    ] {
        let r = by_line(line);
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["error"]["code"], code, "line {line}: {r}");
    }
    assert_eq!(by_line(5)["id"], "bad id");
    assert!(
        by_line(6)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1")
    );
    assert!(results.iter().all(|r| r["line"] != 4));

    // Good rows landed, with their fields; nothing else changed.
    assert_eq!(http.all_ids(), ["j-1", "j-2", "j-6", "taken"]);
    let j2 = http.get("/api/v1/devices/j-2").expect(200);
    assert_eq!(
        (j2["status"].clone(), j2["metadata"]["m"].clone()),
        (json!("disabled"), json!(1))
    );
    let taken = http.get("/api/v1/devices/taken").expect(200);
    assert_eq!(taken["tags"], json!({"keep": "me"}));
    assert_eq!(
        devices_table(&server),
        rows(&[
            ("j-1", "enabled"),
            ("j-2", "disabled"),
            ("j-6", "enabled"),
            ("taken", "enabled"),
        ])
    );

    // Refused whole: an unknown format, a JSON array, too many rows, too many bytes.
    http.import("text/plain", "{\"id\": \"z\"}")
        .expect_error(415, "unsupported_media_type");
    http.import("application/json", "[{\"id\": \"z\"}]")
        .expect_error(400, "invalid_request");
    let rows = "{\"id\": \"z\"}\n".repeat(100_001);
    http.import("application/x-ndjson", &rows)
        .expect_error(413, "too_large");
    let big = format!(
        "{{\"id\": \"z\", \"metadata\": {{\"x\": \"{}\"}}}}\n",
        "v".repeat(17 << 20)
    );
    http.import("application/x-ndjson", &big)
        .expect_error(413, "too_large");
    assert_eq!(http.all_ids().len(), 4);

    // application/json is read as JSON lines too.
    let report = http
        .import("application/json", "{\"id\": \"j-7\"}\n{\"id\": \"j-8\"}\n")
        .expect(200);
    assert_eq!(
        (report["created"].clone(), report["failed"].clone()),
        (json!(2), json!(0))
    );
}

#[test]
fn csv_import_lands_good_rows_and_reports_bad_ones() {
    let server = Server::start();
    let http = Http::new(&server);
    http.post("/api/v1/devices", json!({"id": "taken"}))
        .expect(201);
    let csv = "id,tags,metadata,status\r\n\
               c-1,site=north;floor=3,\"{\"\"model\"\": \"\"X1\"\"}\",enabled\r\n\
               c-2,,,disabled\r\n\
               c-3,site,,\r\n\
               c-4,,{not json},\r\n\
               c-5,,,\r\n\
               c-1,,,\r\n\
               taken,,,\r\n\
               c-6,,,maybe\r\n\
               c-7,only three,\r\n\
               \r\n\
               c-8,\"a=1;b=2\",\"{\"\"nested\"\": {\"\"k\"\": [1, 2]}}\",\r\n";
    let report = http.import("text/csv; charset=utf-8", csv).expect(200);
    assert_eq!(report["created"], 4, "{report}");
    assert_eq!(report["failed"], 6, "{report}");
    let results = report["results"].as_array().unwrap();
    let failures: Vec<(u64, String)> = results
        .iter()
        .filter(|r| r["ok"] == false)
        .map(|r| {
            (
                r["line"].as_u64().unwrap(),
                r["error"]["code"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        failures,
        [
            (4, "invalid_device".to_string()),
            (5, "invalid_request".to_string()),
            (7, "duplicate_id".to_string()),
            (8, "already_exists".to_string()),
            (9, "invalid_device".to_string()),
            (10, "invalid_request".to_string()),
        ]
    );
    assert_eq!(http.all_ids(), ["c-1", "c-2", "c-5", "c-8", "taken"]);
    let c1 = http.get("/api/v1/devices/c-1").expect(200);
    assert_eq!(c1["tags"], json!({"site": "north", "floor": "3"}));
    assert_eq!(c1["metadata"], json!({"model": "X1"}));
    let c8 = http.get("/api/v1/devices/c-8").expect(200);
    assert_eq!(c8["metadata"]["nested"]["k"], json!([1, 2]));
    assert_eq!(
        http.get("/api/v1/devices/c-2").expect(200)["status"],
        "disabled"
    );
    assert_eq!(devices_table(&server).len(), 5);

    // Only the id column is required; an unknown column refuses the file.
    let report = http.import("text/csv", "id\nc-9\n").expect(200);
    assert_eq!(report["created"], 1);
    http.import("text/csv", "id,colour\nc-10,red\n")
        .expect_error(400, "invalid_request");
    http.import("text/csv", "tags\nsite=a\n")
        .expect_error(400, "invalid_request");
    assert_eq!(http.all_ids().len(), 6);
}

#[test]
fn device_commands_drive_the_api() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();

    // add: a readable block, or JSON with keys and token.
    let added = server
        .cli(&[
            "device",
            "add",
            "cli-1",
            "--tag",
            "site=lab",
            "--metadata",
            "{\"model\": \"X1\"}",
        ])
        .ok();
    assert!(added.stdout.contains("primary key:"), "{}", added.stdout);
    assert!(added.stdout.contains("token:"), "{}", added.stdout);
    assert!(added.stdout.contains("shown only once"), "{}", added.stdout);
    let added = server
        .cli(&["device", "add", "cli-2", "--disabled", "--json"])
        .ok();
    let v: Value = serde_json::from_str(added.stdout.trim()).unwrap();
    assert_eq!(v["id"], "cli-2");
    assert_eq!(v["status"], "disabled");
    assert!(v["token"].is_string() && v["primary_key"].is_string());
    let refused = server.cli(&["device", "add", "cli-2"]);
    assert!(!refused.success);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("already exists"),
        "{}",
        refused.stderr
    );
    let refused = server.cli(&["device", "add", "x", "--metadata", "[1]"]);
    assert!(!refused.success && refused.stderr.contains("JSON object"));

    // get, update, disable, enable.
    let got = server.cli(&["device", "get", "cli-1"]).ok();
    assert!(got.stdout.contains("site=lab"), "{}", got.stdout);
    assert!(got.stdout.contains("\"model\":\"X1\""), "{}", got.stdout);
    let updated = server
        .cli(&[
            "device",
            "update",
            "cli-1",
            "--tag",
            "site=roof",
            "--metadata",
            "{}",
            "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(updated.stdout.trim()).unwrap();
    assert_eq!(v["tags"], json!({"site": "roof"}));
    assert_eq!(v["metadata"], json!({}));
    assert!(!server.cli(&["device", "update", "cli-1"]).success);
    server.cli(&["device", "enable", "cli-2"]).ok();
    server.cli(&["device", "disable", "cli-1"]).ok();
    let got = server.cli(&["device", "get", "cli-1", "--json"]).ok();
    let v: Value = serde_json::from_str(got.stdout.trim()).unwrap();
    assert_eq!(v["status"], "disabled");
    let missing = server.cli(&["device", "get", "ghost"]);
    assert!(!missing.success);
    assert_eq!(missing.stderr.lines().count(), 1, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("does not exist"),
        "{}",
        missing.stderr
    );

    // rotate-key and token.
    let rotated = server
        .cli(&[
            "device",
            "rotate-key",
            "cli-1",
            "--key",
            "secondary",
            "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(rotated.stdout.trim()).unwrap();
    assert_eq!(v["slot"], "secondary");
    assert!(v["key"].is_string());
    let rotated = server
        .cli(&["device", "rotate-key", "cli-1", "--key", "primary"])
        .ok();
    assert!(
        rotated.stdout.contains("new primary key"),
        "{}",
        rotated.stdout
    );
    let token = server
        .cli(&["device", "token", "cli-2", "--expires-in", "30d", "--json"])
        .ok();
    let v: Value = serde_json::from_str(token.stdout.trim()).unwrap();
    assert!((v["expires_at"].as_i64().unwrap() - now_s() - 30 * 86_400).abs() < 60);
    let token = server.cli(&["device", "token", "cli-2"]).ok();
    assert!(token.stdout.contains("expires:"), "{}", token.stdout);
    assert!(
        !server
            .cli(&["device", "token", "cli-2", "--expires-in", "soon"])
            .success
    );

    // import: a CSV with one bad row exits non-zero and names the line.
    let csv = dir.path().join("devices.csv");
    std::fs::write(
        &csv,
        "id,tags,metadata,status\nimp-1,site=a,,\nimp-2,bad,,\n",
    )
    .unwrap();
    let run = server.cli(&["device", "import", csv.to_str().unwrap()]);
    assert!(!run.success, "{run:?}");
    assert_eq!(run.code, Some(2));
    assert!(run.stdout.contains("created 1, failed 1"), "{}", run.stdout);
    assert!(run.stdout.contains("line 3 (imp-2)"), "{}", run.stdout);
    // JSON lines, with the format from the extension, reported as JSON.
    let lines: String = (0..1_050)
        .map(|i| format!("{{\"id\": \"bulk-{i:04}\", \"tags\": {{\"batch\": \"1\"}}}}\n"))
        .collect();
    let jsonl = dir.path().join("devices.jsonl");
    std::fs::write(&jsonl, lines).unwrap();
    let run = server
        .cli(&["device", "import", jsonl.to_str().unwrap(), "--json"])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        (v["created"].clone(), v["failed"].clone()),
        (json!(1050), json!(0))
    );
    let odd = dir.path().join("devices.txt");
    std::fs::write(&odd, "{\"id\": \"odd\"}\n").unwrap();
    assert!(
        !server
            .cli(&["device", "import", odd.to_str().unwrap()])
            .success
    );
    server
        .cli(&[
            "device",
            "import",
            odd.to_str().unwrap(),
            "--format",
            "jsonl",
        ])
        .ok();

    // A file over the import limit gets the server's one-line reason.
    let huge = dir.path().join("huge.jsonl");
    std::fs::write(
        &huge,
        format!("{{\"id\": \"h\", \"x\": \"{}\"}}\n", "v".repeat(17 << 20)),
    )
    .unwrap();
    let run = server.cli(&["device", "import", huge.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("over 16 MiB"), "{}", run.stderr);

    // list follows `next` through every page; --limit stops early.
    let list = server.cli(&["device", "list", "--json"]).ok();
    let all: Vec<Value> = serde_json::from_str(list.stdout.trim()).unwrap();
    assert_eq!(all.len(), 2 + 1 + 1050 + 1);
    let list = server
        .cli(&[
            "device", "list", "--tag", "batch=1", "--limit", "5", "--json",
        ])
        .ok();
    let some: Vec<Value> = serde_json::from_str(list.stdout.trim()).unwrap();
    assert_eq!(
        some.iter().map(id_of).collect::<Vec<_>>(),
        [
            "bulk-0000",
            "bulk-0001",
            "bulk-0002",
            "bulk-0003",
            "bulk-0004"
        ]
    );
    assert!(list.stderr.contains("--after bulk-0004"), "{}", list.stderr);
    let list = server
        .cli(&["device", "list", "--status", "disabled", "--json"])
        .ok();
    let disabled: Vec<Value> = serde_json::from_str(list.stdout.trim()).unwrap();
    assert_eq!(disabled.iter().map(id_of).collect::<Vec<_>>(), ["cli-1"]);
    let table = server.cli(&["device", "list", "--after", "bulk-1048"]).ok();
    assert!(table.stdout.contains("bulk-1049"), "{}", table.stdout);
    assert!(table.stdout.contains("site=roof"), "{}", table.stdout);
    assert!(!table.stdout.contains("bulk-1047"), "{}", table.stdout);
    assert_eq!(
        server.sql_json("SELECT count(*) AS n FROM devices")[0]["n"],
        1054
    );

    // remove.
    server.cli(&["device", "remove", "cli-1"]).ok();
    let again = server.cli(&["device", "remove", "cli-1"]);
    assert!(!again.success && again.stderr.contains("does not exist"));
}
