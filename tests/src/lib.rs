//! The harness of Tributary's integration tests: start the real `tributary`
//! binary on a temporary data directory with ephemeral ports, run its client
//! commands, stop and restart it.
//!
//! The binary is the one `cargo test --workspace` builds next to the test
//! executable (`target/<profile>/tributary`); `TRIBUTARY_BIN` overrides it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `tributary` binary under test.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TRIBUTARY_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test> -> target/<profile>/tributary
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("tributary");
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `cargo test --workspace`, which builds it",
        bin.display()
    );
    bin
}

/// A running server on its own data directory.
pub struct Server {
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    child: Option<Child>,
    extra_args: Vec<String>,
}

/// What a finished CLI command printed.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            success: o.status.success(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Panics with everything printed unless the command succeeded.
    pub fn ok(self) -> Run {
        assert!(
            self.success,
            "command failed ({:?}):\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

impl Server {
    /// Starts a server on a fresh temporary data directory.
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// Starts a server with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> Server {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let mut server = Server {
            data_dir: temp.path().join("data"),
            _temp: Some(temp),
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let _ = std::fs::remove_file(self.data_dir.join("server.json"));
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--quic-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ]);
        // Events reach Parquet quickly, unless the test says otherwise.
        let own_interval =
            |a: &String| a == "--flush-interval" || a.starts_with("--flush-interval=");
        if !self.extra_args.iter().any(own_interval) {
            cmd.args(["--flush-interval", "200ms"]);
        }
        cmd.args(&self.extra_args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("start tributary serve");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("tributary serve exited early: {status}");
            }
            if let Some(addr) = self.http_addr()
                && health(&addr)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not become ready within 60s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn info(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.data_dir.join("server.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The HTTP API address.
    pub fn http_addr(&self) -> Option<String> {
        self.info()?.get("http")?.as_str().map(str::to_string)
    }

    /// The QUIC address.
    pub fn quic_addr(&self) -> String {
        self.info()
            .and_then(|i| i.get("quic")?.as_str().map(str::to_string))
            .expect("the server wrote its QUIC address")
    }

    /// The CA certificate clients trust.
    pub fn ca(&self) -> PathBuf {
        self.data_dir.join("tls/ca.pem")
    }

    /// Runs `tributary <args> --data-dir <dir>` and waits for it.
    pub fn cli(&self, args: &[&str]) -> Run {
        self.cli_with_stdin(args, None)
    }

    /// Like [`Server::cli`], feeding `stdin`.
    pub fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        use std::io::Write;
        let mut cmd = Command::new(binary());
        cmd.args(args).arg("--data-dir").arg(&self.data_dir);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run tributary");
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("wait for tributary").into()
    }

    /// Starts `tributary <args> --data-dir <dir>` without waiting.
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        Command::new(binary())
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tributary")
    }

    /// Runs a SQL statement, returning rows as JSON objects.
    pub fn sql_json(&self, statement: &str) -> Vec<serde_json::Value> {
        let run = self.cli(&["sql", statement, "--format", "json"]).ok();
        serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout))
    }

    /// Adds a device; returns its token.
    pub fn add_device(&self, id: &str) -> String {
        self.add_device_with_keys(id).token
    }

    /// Adds a device; returns its keys and the token `device add` made.
    pub fn add_device_with_keys(&self, id: &str) -> DeviceCredentials {
        let run = self.cli(&["device", "add", id, "--json"]).ok();
        let v: serde_json::Value =
            serde_json::from_str(run.stdout.trim()).expect("device add --json prints JSON");
        let field = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("device add --json has no '{k}': {v}"))
                .to_string()
        };
        DeviceCredentials {
            id: field("id"),
            primary_key: field("primary_key"),
            secondary_key: field("secondary_key"),
            token: field("token"),
        }
    }

    /// Calls the HTTP API with the admin token: `method path` with an
    /// optional JSON body. Returns the status and the JSON answer (`Null`
    /// when empty). Plain HTTP/1.1 over std, so that the harness needs no
    /// HTTP client.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let addr = self.http_addr().expect("the server wrote its HTTP address");
        let token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("the server wrote its admin token");
        http_json(&addr, method, path, Some(token.trim()), body)
    }

    /// Like [`Server::api`], expecting `status`; returns the JSON answer.
    pub fn api_expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        status: u16,
    ) -> serde_json::Value {
        let (got, answer) = self.api(method, path, body);
        assert_eq!(got, status, "{method} {path}: {answer}");
        answer
    }

    /// Stops the server with SIGTERM and waits for it to exit cleanly.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        assert!(
                            status.success(),
                            "the server exited with {status} after SIGTERM"
                        );
                        return;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        panic!("the server did not stop within 30s of SIGTERM");
                    }
                }
            }
        }
    }

    /// Kills the server with SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory.
    pub fn restart(&mut self) {
        self.launch();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A device's credentials as `device add --json` shows them once.
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    pub id: String,
    /// Standard base64 with padding, as the CLI prints keys.
    pub primary_key: String,
    pub secondary_key: String,
    /// A token signed with the primary key.
    pub token: String,
}

impl DeviceCredentials {
    /// A token signed with the primary key, valid until `expires_at`.
    pub fn primary_token(&self, expires_at: i64) -> String {
        sign_token(&self.id, &self.primary_key, expires_at)
    }

    /// A token signed with the secondary key, valid until `expires_at`.
    pub fn secondary_token(&self, expires_at: i64) -> String {
        sign_token(&self.id, &self.secondary_key, expires_at)
    }
}

/// Makes a device token the way `docs/security.md` says a device does:
/// `trb1.<expires_at>.<base64url(HMAC-SHA256(key, "trb1\n" + id + "\n" +
/// expires_at))>`. Written from the document, not from the server's code,
/// so that the tests check the two agree.
pub fn sign_token(device_id: &str, key_base64: &str, expires_at: i64) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let key = STANDARD
        .decode(key_base64)
        .expect("a device key is standard base64");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let tag = ring::hmac::sign(&key, format!("trb1\n{device_id}\n{expires_at}").as_bytes());
    format!("trb1.{expires_at}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// A fresh random key, standard base64, as a device key is written.
pub fn random_key() -> String {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .expect("the system random generator");
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Seconds since the Unix epoch now, as tokens count time.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One HTTP/1.1 request with a JSON body and a JSON answer; returns the
/// status and the answer (`Null` when empty).
pub fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let body = body.map(|b| serde_json::to_vec(b).expect("JSON encodes"));
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(b) = &body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    } else {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    let mut stream = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("connecting to the API at {addr}: {e}"));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    if let Some(b) = &body {
        stream.write_all(b).expect("send the body");
    }
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {}", String::from_utf8_lossy(&response)));
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let mut payload = response[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        payload = dechunk(&payload);
    }
    let answer = if payload.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&payload).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&payload)
            )
        })
    };
    (status, answer)
}

/// The body of a chunked HTTP/1.1 message.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = end + 2;
        let stop = (start + size).min(data.len());
        out.extend_from_slice(&data[start..stop]);
        data = data.get(stop + 2..).unwrap_or_default();
    }
}

/// A device key derived from an enrollment group's key the way
/// `docs/protocol.md` (section 4.3) says a device derives it:
/// HMAC-SHA256(group key, device id), standard base64 like every key.
/// Written from the document, not from the server's code.
pub fn derive_device_key(group_key_base64: &str, device_id: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    let group_key = STANDARD
        .decode(group_key_base64)
        .expect("a group key is standard base64");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &group_key);
    STANDARD.encode(ring::hmac::sign(&key, device_id.as_bytes()).as_ref())
}

/// True when `GET /health` answers 200.
pub fn health(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(
            format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every Parquet file under a folder, recursively.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
