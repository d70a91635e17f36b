//! The management API over real HTTP, and the `tributary` commands that
//! drive it: every endpoint, its error codes, pagination, bulk import, the
//! SQL `devices` table kept current, twins, certificates, enrollment groups,
//! commands, the admin token and the OpenAPI document.

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

/// An answer: status code, headers and JSON body (`Null` when empty).
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
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
        self.send_with(method, path, token, content_type, &[], body)
    }

    /// Like [`Http::send`], with extra headers.
    fn send_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, ct);
        }
        self.runtime.block_on(async {
            let response = request.body(body).send().await.unwrap();
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let bytes = response.bytes().await.unwrap();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes))
                })
            };
            Answer {
                status,
                headers,
                body,
            }
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

/// A path of the OpenAPI document with its parameters filled in.
fn sample_path(template: &str) -> String {
    template
        .split('/')
        .map(|segment| match segment {
            "{id}" => "d1",
            "{name}" => "g1",
            "{slot}" => "primary",
            "{thumbprint}" => "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            s if s.starts_with('{') => panic!("no sample value for {s} in {template}"),
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Every (method, path, needs the admin token) in the OpenAPI document.
fn documented_routes(doc: &Value) -> Vec<(Method, String, bool)> {
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let security = operation["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path} does not say its security"));
            routes.push((method, path.clone(), !security.is_empty()));
        }
    }
    routes
}

#[test]
fn every_api_route_needs_the_admin_token() {
    let server = Server::start();
    let http = Http::new(&server);
    // The OpenAPI document needs no token, and lists every route: the
    // routes to try come from it, so that new ones are covered as they come.
    let doc = http
        .send(Method::GET, "/api/v1/openapi.json", None, None, Vec::new())
        .expect(200);
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["admin_token"]["scheme"],
        "bearer"
    );
    let routes = documented_routes(&doc);
    for (method, path) in [
        ("GET", "/api/v1/devices/{id}/twin"),
        ("PATCH", "/api/v1/devices/{id}/twin/desired"),
        ("PUT", "/api/v1/devices/{id}/twin/desired"),
        ("POST", "/api/v1/devices/{id}/certificates"),
        ("GET", "/api/v1/devices/{id}/certificates"),
        (
            "POST",
            "/api/v1/devices/{id}/certificates/{thumbprint}/revoke",
        ),
        ("POST", "/api/v1/devices/{id}/commands"),
        ("POST", "/api/v1/enrollment-groups"),
        ("DELETE", "/api/v1/enrollment-groups/{name}"),
        (
            "POST",
            "/api/v1/enrollment-groups/{name}/keys/{slot}/rotate",
        ),
        ("POST", "/api/v1/admin/token/rotate"),
        ("POST", "/api/v1/sql"),
        ("POST", "/api/v1/devices/import"),
    ] {
        assert!(
            routes
                .iter()
                .any(|(m, p, admin)| m.as_str() == method && p == path && *admin),
            "{method} {path} is not in the document as an admin route"
        );
    }
    let mut admin_routes = 0;
    for (method, template, admin) in &routes {
        let path = sample_path(template);
        if !admin {
            let answer = http.send(method.clone(), &path, None, None, Vec::new());
            assert_eq!(answer.status, 200, "{method} {path}: {:?}", answer.body);
            continue;
        }
        admin_routes += 1;
        // A 401 (not 404 or 405) also shows the route exists: the token is
        // checked only on requests that match a route.
        for token in [None, Some("not-the-admin-token")] {
            let answer = http.send(method.clone(), &path, token, None, Vec::new());
            assert_eq!(
                (answer.status, answer.code()),
                (401, "unauthorized"),
                "{method} {path}: {:?}",
                answer.body
            );
        }
    }
    assert!(admin_routes >= 25, "only {admin_routes} admin routes");
    // Nothing was created by the refused requests, and the token still works.
    assert!(http.all_ids().is_empty());
    let health = http.send(Method::GET, "/health", None, None, Vec::new());
    assert_eq!(health.expect(200)["status"], "ok");
    // An unknown route is a JSON 404 with or without a token.
    http.send(Method::GET, "/api/v1/nothing", None, None, Vec::new())
        .expect_error(404, "not_found");
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

/// The SHA-256 of a PEM certificate's DER, in hex: a thumbprint computed
/// here, independently of the server.
fn pem_thumbprint(pem: &str) -> String {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn admin_token_rotation_takes_effect_at_once() {
    let server = Server::start();
    let mut http = Http::new(&server);
    let old = http.token.clone();
    http.post("/api/v1/devices", json!({"id": "d1"}))
        .expect(201);

    let rotated = http
        .post("/api/v1/admin/token/rotate", json!({}))
        .expect(200);
    let new = rotated["token"].as_str().unwrap().to_string();
    assert!(new.starts_with("trb_admin_") && new != old, "{rotated}");
    // The old token stops working at once; the file holds the new one, private.
    http.get("/api/v1/devices")
        .expect_error(401, "unauthorized");
    let file = server.data_dir.join("admin.token");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), new);
    assert_eq!(mode(&file), 0o600);
    http.token = new.clone();
    assert_eq!(http.all_ids(), ["d1"]);

    // The CLI reads the new token from the data directory.
    server.cli(&["device", "get", "d1"]).ok();
    let run = server.cli(&["admin", "rotate-token", "--json"]).ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let newer = v["token"].as_str().unwrap();
    assert_ne!(newer, new);
    http.get("/api/v1/devices")
        .expect_error(401, "unauthorized");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), newer);
    let run = server.cli(&["admin", "rotate-token"]).ok();
    assert!(
        run.stdout.contains("new admin token: trb_admin_"),
        "{}",
        run.stdout
    );
    server.cli(&["device", "list"]).ok();
    // A stale token given on the command line gets one clear line.
    let refused = server.cli(&["device", "list", "--token", newer]);
    assert!(!refused.success);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("not valid"), "{}", refused.stderr);
}

#[test]
fn twins_over_http_and_the_cli() {
    let server = Server::start();
    let http = Http::new(&server);
    http.post("/api/v1/devices", json!({"id": "t1"}))
        .expect(201);

    let answer = http.get("/api/v1/devices/t1/twin");
    assert_eq!(answer.headers["etag"], "\"0\"");
    let twin = answer.expect(200);
    assert_eq!(
        twin,
        json!({"device_id": "t1", "desired": {}, "desired_version": 0,
               "desired_updated_at": null, "reported": {}, "reported_version": 0,
               "reported_updated_at": null})
    );
    http.get("/api/v1/devices/ghost/twin")
        .expect_error(404, "not_found");

    // A merge patch, then a conditional one.
    let twin = http
        .patch(
            "/api/v1/devices/t1/twin/desired",
            json!({"interval_s": 30, "mode": {"eco": true, "level": 2}}),
        )
        .expect(200);
    assert_eq!(twin["desired_version"], 1);
    assert!(twin["desired_updated_at"].as_i64().unwrap() > 0);
    let patch = |if_match: &str, body: Value| {
        http.send_with(
            Method::PATCH,
            "/api/v1/devices/t1/twin/desired",
            Some(&http.token),
            Some("application/merge-patch+json"),
            &[("If-Match", if_match)],
            serde_json::to_vec(&body).unwrap(),
        )
    };
    let answer = patch("\"1\"", json!({"mode": {"level": null}, "x": [1, 2]}));
    assert_eq!(answer.headers["etag"], "\"2\"");
    let twin = answer.expect(200);
    assert_eq!(
        twin["desired"],
        json!({"interval_s": 30, "mode": {"eco": true}, "x": [1, 2]})
    );
    // A stale version is refused and changes nothing.
    patch("\"1\"", json!({"interval_s": 1})).expect_error(412, "version_mismatch");
    patch("W/\"2\"", json!({"interval_s": 5})).expect(200);
    patch("*", json!({"interval_s": 6})).expect(200);
    patch("soon", json!({})).expect_error(400, "invalid_request");
    let twin = http.get("/api/v1/devices/t1/twin").expect(200);
    assert_eq!(
        (
            twin["desired_version"].clone(),
            twin["desired"]["interval_s"].clone()
        ),
        (json!(4), json!(6))
    );

    // PUT replaces the whole side.
    let put = |if_match: Option<&str>, body: Vec<u8>| {
        let headers: Vec<(&str, &str)> = if_match.map(|v| ("If-Match", v)).into_iter().collect();
        http.send_with(
            Method::PUT,
            "/api/v1/devices/t1/twin/desired",
            Some(&http.token),
            Some("application/json"),
            &headers,
            body,
        )
    };
    let twin = put(Some("4"), br#"{"only": "this"}"#.to_vec()).expect(200);
    assert_eq!(twin["desired"], json!({"only": "this"}));
    assert_eq!(twin["desired_version"], 5);
    put(Some("4"), b"{}".to_vec()).expect_error(412, "version_mismatch");
    put(None, b"[1]".to_vec()).expect_error(400, "invalid_request");
    put(None, b"{\"a\": ".to_vec()).expect_error(400, "invalid_request");
    http.patch("/api/v1/devices/ghost/twin/desired", json!({"a": 1}))
        .expect_error(404, "not_found");

    // Sizes: 300 KB fits; over 1 MiB of properties is refused by the
    // registry's rule (422), over 2 MiB of body before it is read (413).
    let big = |n: usize| serde_json::to_vec(&json!({"blob": "x".repeat(n)})).unwrap();
    let twin = put(None, big(300 * 1024)).expect(200);
    assert_eq!(twin["desired"]["blob"].as_str().unwrap().len(), 300 * 1024);
    put(None, big(1536 * 1024)).expect_error(422, "invalid_properties");
    put(None, big(3 << 20)).expect_error(413, "too_large");
    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!({ "d": deep });
    }
    http.patch("/api/v1/devices/t1/twin/desired", deep)
        .expect_error(422, "invalid_properties");
    let version = http.get("/api/v1/devices/t1/twin").expect(200)["desired_version"].clone();
    assert_eq!(version, 6);

    // The CLI: show, patch, replace, conditional, from a file.
    let run = server.cli(&["device", "twin", "t1"]).ok();
    assert!(run.stdout.contains("desired (version 6"), "{}", run.stdout);
    let run = server
        .cli(&["device", "desired", "t1", "{\"interval_s\": 10}", "--json"])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["desired_version"], 7);
    assert_eq!(v["desired"]["interval_s"], 10);
    assert!(v["desired"]["blob"].is_string());
    let refused = server.cli(&["device", "desired", "t1", "{\"a\": 1}", "--if-version", "3"]);
    assert!(!refused.success);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("version 7, not 3"),
        "{}",
        refused.stderr
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("desired.json");
    std::fs::write(&file, big(300 * 1024)).unwrap();
    let arg = format!("@{}", file.display());
    let run = server
        .cli(&[
            "device",
            "desired",
            "t1",
            &arg,
            "--replace",
            "--if-version",
            "7",
            "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["desired_version"], 8);
    assert!(v["desired"].get("interval_s").is_none());
    let run = server
        .cli_with_stdin(
            &["device", "desired", "t1", "-", "--json"],
            Some("{\"k\": 1}"),
        )
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["desired"]["k"], 1);
    let refused = server.cli(&["device", "desired", "t1", "[1]"]);
    assert!(!refused.success && refused.stderr.contains("JSON object"));
}

#[test]
fn certificates_over_http_and_the_cli() {
    let server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let http = Http::new(&server);
    http.post("/api/v1/devices", json!({"id": "c1"}))
        .expect(201);
    http.post("/api/v1/devices", json!({"id": "c2"}))
        .expect(201);

    // Issued by the development CA: certificate and key, shown once.
    let issued = http
        .post(
            "/api/v1/devices/c1/certificates",
            json!({"issue": true, "valid_days": 30}),
        )
        .expect(201);
    let print = issued["thumbprint"].as_str().unwrap().to_string();
    assert_eq!(print, pem_thumbprint(issued["cert_pem"].as_str().unwrap()));
    assert!(issued["key_pem"].as_str().unwrap().contains("PRIVATE KEY"));
    assert_eq!(issued["device_id"], "c1");
    assert_eq!(issued["status"], "active");
    let days = (issued["not_after"].as_i64().unwrap() / 1000 - now_s()) as f64 / 86_400.0;
    assert!((29.0..=31.0).contains(&days), "{days} days");

    // Registered from PEM: the server's own certificate will do (it chains
    // to the same CA); notAfter is read from it (2099-12-31).
    let pem = std::fs::read_to_string(server.data_dir.join("tls/server.pem")).unwrap();
    let registered = http
        .post(
            "/api/v1/devices/c2/certificates",
            json!({"certificate_pem": pem}),
        )
        .expect(201);
    assert_eq!(registered["thumbprint"], pem_thumbprint(&pem));
    assert_eq!(registered["not_after"], 4_102_358_400_000_i64);
    assert!(registered.get("key_pem").is_none() && registered.get("cert_pem").is_none());
    // Once only, to any device.
    for device in ["c1", "c2"] {
        http.post(
            &format!("/api/v1/devices/{device}/certificates"),
            json!({"certificate_pem": pem}),
        )
        .expect_error(409, "conflict");
    }

    // Refusals.
    http.post("/api/v1/devices/ghost/certificates", json!({"issue": true}))
        .expect_error(404, "not_found");
    for body in [
        json!({}),
        json!({"issue": false}),
        json!({"issue": true, "certificate_pem": pem}),
        json!({"certificate_pem": pem, "valid_days": 3}),
        json!({"issue": "yes"}),
        json!({"issue": true, "colour": "red"}),
    ] {
        http.post("/api/v1/devices/c1/certificates", body.clone())
            .expect_error(400, "invalid_request");
    }
    for days in [0, 3651] {
        http.post(
            "/api/v1/devices/c1/certificates",
            json!({"issue": true, "valid_days": days}),
        )
        .expect_error(422, "invalid_parameter");
    }
    for bad in [
        "not a certificate",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ] {
        http.post(
            "/api/v1/devices/c1/certificates",
            json!({"certificate_pem": bad}),
        )
        .expect_error(422, "invalid_certificate");
    }

    // List, revoke (any case, with colons), list again.
    let list = http.get("/api/v1/devices/c1/certificates").expect(200);
    assert_eq!(list["certificates"].as_array().unwrap().len(), 1);
    assert_eq!(list["certificates"][0]["thumbprint"], print.as_str());
    http.get("/api/v1/devices/ghost/certificates")
        .expect_error(404, "not_found");
    let colons: Vec<String> = print
        .to_ascii_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let revoked = http
        .post(
            &format!(
                "/api/v1/devices/c1/certificates/{}/revoke",
                colons.join(":")
            ),
            json!({}),
        )
        .expect(200);
    assert_eq!(revoked["status"], "revoked");
    let list = http.get("/api/v1/devices/c1/certificates").expect(200);
    assert_eq!(list["certificates"][0]["status"], "revoked");
    // c2's certificate is not c1's to revoke.
    http.post(
        &format!(
            "/api/v1/devices/c1/certificates/{}/revoke",
            pem_thumbprint(&pem)
        ),
        json!({}),
    )
    .expect_error(404, "not_found");
    http.post("/api/v1/devices/c1/certificates/xyz/revoke", json!({}))
        .expect_error(404, "not_found");
    http.post(
        &format!("/api/v1/devices/ghost/certificates/{print}/revoke"),
        json!({}),
    )
    .expect_error(404, "not_found");

    // The CLI: a device with a certificate at once, files written privately.
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let run = server
        .cli(&[
            "device",
            "add",
            "c3",
            "--cert",
            "--cert-out",
            out_dir,
            "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert!(v["token"].is_string());
    let thumb = v["certificate"]["thumbprint"].as_str().unwrap().to_string();
    let (crt, key) = (out.path().join("c3.crt"), out.path().join("c3.key"));
    assert_eq!(
        pem_thumbprint(&std::fs::read_to_string(&crt).unwrap()),
        thumb
    );
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert_eq!(mode(&key), 0o600);
    assert_eq!(v["certificate"]["key_path"], key.display().to_string());
    assert!(v["certificate"].get("key_pem").is_none());
    // The files are never overwritten: refused before the device is made.
    std::fs::rename(&crt, out.path().join("c4.crt")).unwrap();
    let refused = server.cli(&["device", "add", "c4", "--cert", "--cert-out", out_dir]);
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("exists already"),
        "{}",
        refused.stderr
    );
    http.get("/api/v1/devices/c4")
        .expect_error(404, "not_found");
    let refused = server.cli(&["device", "cert", "c3", "issue", "--out", out_dir]);
    assert!(
        refused.stderr.contains("c3.key exists already"),
        "{}",
        refused.stderr
    );

    let run = server
        .cli(&[
            "device",
            "cert",
            "c3",
            "issue",
            "--days",
            "7",
            "--out",
            &format!("{out_dir}/more"),
        ])
        .ok();
    assert!(run.stdout.contains("thumbprint:"), "{}", run.stdout);
    assert!(out.path().join("more/c3.key").exists());
    let run = server.cli(&["device", "cert", "c3", "list", "--json"]).ok();
    let list: Vec<Value> = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(list.len(), 2);
    let run = server.cli(&["device", "cert", "c3", "list"]).ok();
    assert!(run.stdout.contains("THUMBPRINT"), "{}", run.stdout);
    assert!(run.stdout.contains(&thumb), "{}", run.stdout);
    let run = server.cli(&["device", "cert", "c3", "revoke", &thumb]).ok();
    assert!(run.stdout.contains("revoked"), "{}", run.stdout);
    let run = server.cli(&["device", "cert", "c3", "list", "--json"]).ok();
    let list: Vec<Value> = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(list[0]["status"], "revoked");
    assert_eq!(list[1]["status"], "active");
    // The device connects with the active certificate and no token; the
    // revoked one is refused. (c3's first certificate was moved to c4.crt.)
    let send_with = |crt: &std::path::Path, key: &std::path::Path| {
        server.cli_with_stdin(
            &[
                "send",
                "--device",
                "c3",
                "--cert",
                crt.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ],
            Some("{\"temp\": 21}\n"),
        )
    };
    let more = out.path().join("more");
    send_with(&more.join("c3.crt"), &more.join("c3.key")).ok();
    let refused = send_with(&out.path().join("c4.crt"), &key);
    assert!(!refused.success, "{refused:?}");
    let ca = server.data_dir.join("tls/ca.pem");
    let run = server
        .cli(&[
            "device",
            "cert",
            "c3",
            "register",
            ca.to_str().unwrap(),
            "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["status"], "active");
    let missing = server.cli(&["device", "cert", "ghost", "list"]);
    assert!(!missing.success);
    assert_eq!(missing.stderr.lines().count(), 1, "{}", missing.stderr);
}

#[test]
fn enrollment_groups_over_http_and_the_cli() {
    let server = Server::start();
    let http = Http::new(&server);

    let created = http
        .post(
            "/api/v1/enrollment-groups",
            json!({"name": "factory-7", "tags": {"site": "north"}}),
        )
        .expect(201);
    assert_eq!(created["name"], "factory-7");
    assert_eq!(created["status"], "enabled");
    assert_eq!(created["tags"], json!({"site": "north"}));
    let primary = created["primary_key"].as_str().unwrap().to_string();
    assert!(created["secondary_key"].is_string() && !primary.is_empty());

    http.post("/api/v1/enrollment-groups", json!({"name": "factory-7"}))
        .expect_error(409, "already_exists");
    for bad in [
        json!({"name": "bad name"}),
        json!({"name": "g2", "tags": {"a b": "c"}}),
        json!({"name": "g2", "status": "paused"}),
    ] {
        http.post("/api/v1/enrollment-groups", bad)
            .expect_error(422, "invalid_group");
    }
    for bad in [
        json!({}),
        json!({"name": "g2", "colour": "red"}),
        json!({"name": 7}),
    ] {
        http.post("/api/v1/enrollment-groups", bad)
            .expect_error(400, "invalid_request");
    }
    http.post(
        "/api/v1/enrollment-groups",
        json!({"name": "b-group", "status": "disabled"}),
    )
    .expect(201);

    // Read: list ordered by name, one by name, never the keys again.
    let list = http.get("/api/v1/enrollment-groups").expect(200);
    let names: Vec<&str> = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b-group", "factory-7"]);
    let got = http.get("/api/v1/enrollment-groups/factory-7").expect(200);
    assert!(got.get("primary_key").is_none());
    assert_eq!(got["tags"]["site"], "north");
    http.get("/api/v1/enrollment-groups/ghost")
        .expect_error(404, "not_found");
    http.get("/api/v1/enrollment-groups/no%20such")
        .expect_error(404, "not_found");

    // Update.
    let patched = http
        .patch(
            "/api/v1/enrollment-groups/factory-7",
            json!({"tags": {"site": "south"}, "status": "disabled"}),
        )
        .expect(200);
    assert_eq!(patched["tags"], json!({"site": "south"}));
    assert_eq!(patched["status"], "disabled");
    http.patch("/api/v1/enrollment-groups/ghost", json!({"tags": {}}))
        .expect_error(404, "not_found");
    http.patch(
        "/api/v1/enrollment-groups/factory-7",
        json!({"status": "x"}),
    )
    .expect_error(422, "invalid_group");
    http.patch("/api/v1/enrollment-groups/factory-7", json!({"name": "x"}))
        .expect_error(400, "invalid_request");

    // Keys.
    let rotated = http
        .post(
            "/api/v1/enrollment-groups/factory-7/keys/primary/rotate",
            json!({}),
        )
        .expect(200);
    assert_eq!(rotated["slot"], "primary");
    assert_ne!(rotated["key"].as_str().unwrap(), primary);
    http.post(
        "/api/v1/enrollment-groups/factory-7/keys/third/rotate",
        json!({}),
    )
    .expect_error(404, "not_found");
    http.post(
        "/api/v1/enrollment-groups/ghost/keys/primary/rotate",
        json!({}),
    )
    .expect_error(404, "not_found");

    // Delete.
    assert_eq!(http.delete("/api/v1/enrollment-groups/b-group").status, 204);
    http.delete("/api/v1/enrollment-groups/b-group")
        .expect_error(404, "not_found");

    // The CLI.
    let run = server
        .cli(&["group", "add", "line-2", "--tag", "line=2", "--json"])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["tags"], json!({"line": "2"}));
    assert!(v["primary_key"].is_string());
    let run = server.cli(&["group", "add", "line-3", "--disabled"]).ok();
    assert!(run.stdout.contains("primary key:"), "{}", run.stdout);
    let refused = server.cli(&["group", "add", "line-3"]);
    assert!(!refused.success);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("already exists"),
        "{}",
        refused.stderr
    );
    let run = server.cli(&["group", "list", "--json"]).ok();
    let groups: Vec<Value> = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(groups.len(), 3);
    let run = server.cli(&["group", "list"]).ok();
    assert!(run.stdout.contains("line=2"), "{}", run.stdout);
    let run = server.cli(&["group", "get", "line-3", "--json"]).ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["status"], "disabled");
    let run = server
        .cli(&[
            "group", "update", "line-3", "--status", "enabled", "--tag", "a=b", "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        (v["status"].clone(), v["tags"].clone()),
        (json!("enabled"), json!({"a": "b"}))
    );
    assert!(!server.cli(&["group", "update", "line-3"]).success);
    let run = server
        .cli(&[
            "group",
            "rotate-key",
            "line-3",
            "--key",
            "secondary",
            "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["slot"], "secondary");
    server.cli(&["group", "remove", "line-3"]).ok();
    let missing = server.cli(&["group", "get", "line-3"]);
    assert!(!missing.success && missing.stderr.contains("does not exist"));
}

#[test]
fn commands_are_queued_and_delivered() {
    let server = Server::start();
    let http = Http::new(&server);
    let token = server.add_device("m1");

    let queued = http
        .post(
            "/api/v1/devices/m1/commands",
            json!({"name": "reboot", "payload": {"delay_s": 5}}),
        )
        .expect(201);
    let id = queued["id"].as_str().unwrap().to_string();
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["device_id"], "m1");
    assert_eq!(queued["payload"], json!({"delay_s": 5}));
    let ttl = queued["expires_at"].as_i64().unwrap() - queued["created_at"].as_i64().unwrap();
    assert_eq!(ttl, 3_600_000);
    let bare = http
        .post("/api/v1/devices/m1/commands", json!({"name": "ping"}))
        .expect(201);
    assert_eq!(bare["payload"], Value::Null);

    http.post("/api/v1/devices/ghost/commands", json!({"name": "x"}))
        .expect_error(404, "not_found");
    http.post("/api/v1/devices/m1/commands", json!({"name": ""}))
        .expect_error(422, "invalid_command");
    http.post(
        "/api/v1/devices/m1/commands",
        json!({"name": "x", "payload": "v".repeat(70_000)}),
    )
    .expect_error(422, "invalid_command");
    http.post("/api/v1/devices/m1/commands", json!({"payload": 1}))
        .expect_error(400, "invalid_request");
    http.post(
        "/api/v1/devices/m1/commands",
        json!({"name": "x", "ttl_s": 5}),
    )
    .expect_error(400, "invalid_request");

    // The CLI queues one too, and the device gets all three in order.
    let run = server
        .cli(&[
            "command",
            "send",
            "m1",
            "set_mode",
            "{\"mode\": \"eco\"}",
            "--json",
        ])
        .ok();
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["name"], "set_mode");
    let run = server.cli(&["command", "send", "m1", "beep"]).ok();
    assert!(run.stdout.contains("queued for m1"), "{}", run.stdout);
    let refused = server.cli(&["command", "send", "m1", "x", "not json"]);
    assert!(!refused.success);
    assert_eq!(refused.stderr.lines().count(), 1, "{}", refused.stderr);
    let refused = server.cli(&["command", "send", "ghost", "x"]);
    assert!(!refused.success && refused.stderr.contains("does not exist"));

    let listener = server.spawn_cli(&[
        "listen", "--device", "m1", "--token", &token, "--count", "4",
    ]);
    let out = crate::e2e::wait_output(listener, std::time::Duration::from_secs(30));
    let got: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = got.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["reboot", "ping", "set_mode", "beep"]);
    assert_eq!(got[0]["id"], id.as_str());
    assert_eq!(got[0]["payload"], json!({"delay_s": 5}));
    assert_eq!(got[2]["payload"], json!({"mode": "eco"}));
}

#[test]
fn devices_show_their_connection() {
    let server = Server::start();
    server.cli(&["sql", STREAM]).ok();
    let http = Http::new(&server);
    let token = server.add_device("s1");
    let device = http.get("/api/v1/devices/s1").expect(200);
    assert_eq!(device["connected"], false);
    assert_eq!(device["connection"], Value::Null);

    // Connected now: live state. (The listener leaves cleanly after one
    // command; a killed one would count as connected until the idle timeout.)
    let listener = server.spawn_cli(&[
        "listen", "--device", "s1", "--token", &token, "--count", "1",
    ]);
    let live = tributary_tests::eventually(std::time::Duration::from_secs(20), || {
        let d = http.get("/api/v1/devices/s1").expect(200);
        (d["connected"] == true).then_some(d)
    });
    assert_eq!(live["connection"]["connected"], true, "{live}");
    assert_eq!(live["connection"]["reason"], Value::Null, "{live}");
    assert!(live["connection"]["since"].as_i64().unwrap() > 0);
    http.post("/api/v1/devices/s1/commands", json!({"name": "bye"}))
        .expect(201);
    crate::e2e::wait_output(listener, std::time::Duration::from_secs(30));

    // Events move last_event_at; once disconnected, the stored state says why.
    server
        .cli_with_stdin(
            &["send", "--device", "s1", "--token", &token],
            Some("{\"temp\": 20, \"ts\": 1764237600000}\n"),
        )
        .ok();
    let stored = tributary_tests::eventually(std::time::Duration::from_secs(20), || {
        let d = http.get("/api/v1/devices/s1").expect(200);
        let c = &d["connection"];
        (c["connected"] == false && c["last_event_at"].is_i64()).then_some(d)
    });
    let c = &stored["connection"];
    assert_eq!(stored["connected"], false);
    assert_eq!(c["last_event_at"], 1_764_237_600_000_i64, "{stored}");
    assert!(c["reason"].is_string(), "{stored}");
    assert!(c["last_seen"].as_i64().unwrap() >= c["since"].as_i64().unwrap() - 60_000);
    // The list shows the same.
    let page = http.get("/api/v1/devices").expect(200);
    assert_eq!(page["devices"][0]["connection"], stored["connection"]);
    let run = server.cli(&["device", "get", "s1"]).ok();
    assert!(run.stdout.contains("last event:"), "{}", run.stdout);
}
