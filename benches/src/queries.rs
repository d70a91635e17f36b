//! The same queries with Tributary and with DuckDB, over the same Parquet
//! files.
//!
//! [`compare`] runs about nine representative queries over the simulator's
//! stream (`sim`: `device_id, ts, received_at, seq, temperature, humidity,
//! status`): a count, per-device averages, a time range, the top devices,
//! percentiles, a status breakdown, per-minute buckets, a join with the
//! device registry, and a selective filter returning rows. Each is written
//! in both dialects where they differ (`approx_percentile_cont` against
//! DuckDB's `approx_quantile`; `date_trunc` against DuckDB's `time_bucket`;
//! `d.tags['site']` of our `devices` table
//! against a `devices` table loaded into DuckDB from `GET /api/v1/devices`).
//!
//! Tributary: `POST /api/v1/sql` timed end to end from this process (connect,
//! request, the whole answer read), answers as an Arrow IPC stream. One
//! warm-up (with a JSON answer, whose rows are kept for the comparison), then
//! `runs` timed runs; the median counts. The server is expected to have
//! flushed everything to Parquet (the orchestrator restarts it), so the
//! stream's log tail, which our queries also read, is empty.
//!
//! DuckDB: `benches/queries.py` in the given Python (with `duckdb`), an
//! in-memory database with a view over
//! `read_parquet('<dir>/**/*.parquet', hive_partitioning = false)`, the same
//! warm-up and timed runs (`to_arrow_table`, so the result is
//! materialized as Arrow like ours), medians, and the rows.
//!
//! Rows match when both sides give the same number of rows, in order (every
//! query has an ORDER BY or returns one row), with equal text, integers and
//! timestamps, floats within a relative 1e-6, and percentiles within 2 %:
//! both are approximate (t-digest), each its own way.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// What to compare, where.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// The HTTP API, `host:port`.
    pub api: String,
    pub admin_token: String,
    /// The stream's folder of Parquet files, `<data>/storage/<stream>`.
    pub parquet_dir: PathBuf,
    /// The stream's name, `sim`.
    pub stream: String,
    /// A Python with `duckdb` (and `pyarrow`) installed.
    pub python: PathBuf,
    /// Timed runs per query and engine, after one warm-up.
    pub runs: usize,
}

/// One query's outcome.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub name: String,
    /// Our dialect; DuckDB's, where it differs, is in `note`.
    pub sql: String,
    /// Median of the timed runs, milliseconds.
    pub ours_ms: f64,
    pub duckdb_ms: f64,
    /// `ours_ms / duckdb_ms`: below 1 is faster than DuckDB.
    pub ratio: f64,
    pub rows_match: bool,
    /// Row counts, the first difference if any, thread counts.
    pub note: String,
}

impl QueryResult {
    /// The result as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "sql": self.sql,
            "ours_ms": self.ours_ms,
            "duckdb_ms": self.duckdb_ms,
            "ratio": self.ratio,
            "rows_match": self.rows_match,
            "note": self.note,
        })
    }
}

/// One query in both dialects.
struct Query {
    name: &'static str,
    ours: String,
    duckdb: String,
    /// Compare numbers within 2 % (approximate aggregates).
    loose: bool,
}

fn queries(stream: &str, range: (&str, &str)) -> Vec<Query> {
    let same = |name, sql: String| Query {
        name,
        duckdb: sql.clone(),
        ours: sql,
        loose: false,
    };
    let (from, to) = range;
    vec![
        same("count", format!("SELECT count(*) AS n FROM {stream}")),
        same(
            "avg_by_device",
            format!(
                "SELECT device_id, avg(temperature) AS avg_t, avg(humidity) AS avg_h \
                 FROM {stream} GROUP BY device_id ORDER BY device_id"
            ),
        ),
        same(
            "time_range",
            format!(
                "SELECT count(*) AS n, avg(temperature) AS avg_t, max(humidity) AS max_h \
                 FROM {stream} WHERE ts >= '{from}' AND ts < '{to}'"
            ),
        ),
        same(
            "top10_devices",
            format!(
                "SELECT device_id, max(temperature) AS max_t FROM {stream} \
                 GROUP BY device_id ORDER BY max_t DESC, device_id LIMIT 10"
            ),
        ),
        Query {
            name: "percentiles",
            ours: format!(
                "SELECT approx_percentile_cont(temperature, 0.5) AS p50, \
                 approx_percentile_cont(temperature, 0.99) AS p99 FROM {stream}"
            ),
            duckdb: format!(
                "SELECT approx_quantile(temperature, 0.5) AS p50, \
                 approx_quantile(temperature, 0.99) AS p99 FROM {stream}"
            ),
            loose: true,
        },
        same(
            "status_breakdown",
            format!("SELECT status, count(*) AS n FROM {stream} GROUP BY status ORDER BY status"),
        ),
        // DuckDB's date_trunc on a TIMESTAMPTZ goes through ICU's calendar
        // (about 4x slower here than time_bucket); time_bucket is its own
        // function for this.
        Query {
            name: "per_minute",
            ours: format!(
                "SELECT date_trunc('minute', ts) AS minute, count(*) AS n, \
                 avg(temperature) AS avg_t FROM {stream} GROUP BY 1 ORDER BY 1"
            ),
            duckdb: format!(
                "SELECT time_bucket(INTERVAL '1 minute', ts) AS minute, count(*) AS n, \
                 avg(temperature) AS avg_t FROM {stream} GROUP BY 1 ORDER BY 1"
            ),
            loose: false,
        },
        Query {
            name: "join_devices",
            ours: format!(
                "SELECT d.tags['site'] AS site, count(*) AS n, avg(s.temperature) AS avg_t \
                 FROM {stream} s JOIN devices d ON s.device_id = d.id GROUP BY 1 ORDER BY 1"
            ),
            duckdb: format!(
                "SELECT d.site AS site, count(*) AS n, avg(s.temperature) AS avg_t \
                 FROM {stream} s JOIN devices d ON s.device_id = d.id GROUP BY 1 ORDER BY 1"
            ),
            loose: false,
        },
        // The stream holds many simulator runs, each counting `seq` from 0
        // again: `ts` breaks those ties, so both engines order rows alike.
        same(
            "filter_rows",
            format!(
                "SELECT device_id, seq, temperature FROM {stream} \
                 WHERE status = 'error' ORDER BY device_id, seq, ts"
            ),
        ),
    ]
}

/// Runs every query on both engines. Blocking: call it from a plain thread
/// (or `spawn_blocking` / `block_in_place` inside tokio).
pub fn compare(o: &QueryOptions) -> Result<Vec<QueryResult>, String> {
    let runs = o.runs.max(1);
    // The time range: the last tenth of the data's span of event time.
    let bounds = sql(
        &o.api,
        &o.admin_token,
        &format!(
            "SELECT min(ts) AS lo, max(ts) AS hi, count(*) AS n FROM {}",
            o.stream
        ),
    )?;
    let row = bounds["rows"]
        .get(0)
        .ok_or("the bounds query gave no row")?;
    let lo = row["lo"]
        .as_str()
        .and_then(parse_ts)
        .ok_or(format!("the stream {} has no events: {bounds}", o.stream))?;
    let hi = row["hi"].as_str().and_then(parse_ts).unwrap_or(lo);
    let from = lo + (hi - lo) * 9 / 10;
    let range = (rfc3339(from), rfc3339(hi + 1));
    let queries = queries(&o.stream, (&range.0, &range.1));

    // Tributary first, then DuckDB: they do not run at the same time.
    let mut ours = Vec::new();
    for q in &queries {
        let answer =
            sql(&o.api, &o.admin_token, &q.ours).map_err(|e| format!("{}: {e}", q.name))?;
        let rows = json_rows(&answer);
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            let (status, body) = http(
                &o.api,
                "POST",
                "/api/v1/sql",
                Some(&o.admin_token),
                Some(&serde_json::to_vec(&json!({ "sql": q.ours })).map_err(|e| e.to_string())?),
                Some("application/vnd.apache.arrow.stream"),
            )?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            if status != 200 {
                return Err(format!(
                    "{}: {status} {}",
                    q.name,
                    String::from_utf8_lossy(&body)
                ));
            }
        }
        ours.push((rows, median(&mut times)));
    }

    let devices = device_sites(&o.api, &o.admin_token)?;
    let input = json!({
        "parquet_dir": o.parquet_dir,
        "stream": o.stream,
        "runs": runs,
        "devices": devices,
        "queries": queries.iter().map(|q| json!({"name": q.name, "sql": q.duckdb})).collect::<Vec<_>>(),
    });
    let duck = run_duckdb(&o.python, &input)?;
    let duck_threads = duck["threads"].to_string();
    let ours_threads = server_threads(&o.parquet_dir);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    let mut results = Vec::new();
    for (i, (q, (our_rows, ours_ms))) in queries.iter().zip(ours).enumerate() {
        let d = &duck["results"][i];
        if let Some(e) = d["error"].as_str() {
            return Err(format!("DuckDB, {}: {e}", q.name));
        }
        let duckdb_ms = d["median_ms"].as_f64().unwrap_or(f64::NAN);
        let duck_rows: Vec<Vec<Value>> = d["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| r.as_array().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        let diff = rows_differ(&our_rows, &duck_rows, q.loose);
        let mut note = format!(
            "rows {} / {}; server threads {ours_threads}, DuckDB threads {duck_threads}, {cores} cores",
            our_rows.len(),
            duck_rows.len()
        );
        if let Some(diff) = &diff {
            note.push_str(&format!("; differs: {diff}"));
        }
        if q.duckdb != q.ours {
            note.push_str(&format!("; DuckDB: {}", q.duckdb));
        }
        results.push(QueryResult {
            name: q.name.to_string(),
            sql: q.ours.clone(),
            ours_ms,
            duckdb_ms,
            ratio: ours_ms / duckdb_ms,
            rows_match: diff.is_none(),
            note,
        });
    }
    Ok(results)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Epoch milliseconds of an RFC 3339 time.
fn parse_ts(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// The rows of a JSON answer as arrays, in the order of its columns.
fn json_rows(answer: &Value) -> Vec<Vec<Value>> {
    let columns: Vec<&str> = answer["columns"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    answer["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| columns.iter().map(|c| r[*c].clone()).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// Where two results first differ, if they do. Timestamps are RFC 3339
/// text on our side and epoch milliseconds on DuckDB's.
fn rows_differ(ours: &[Vec<Value>], duck: &[Vec<Value>], loose: bool) -> Option<String> {
    if ours.len() != duck.len() {
        return Some(format!("{} rows against {}", ours.len(), duck.len()));
    }
    let tolerance = if loose { 0.02 } else { 1e-6 };
    for (i, (a, b)) in ours.iter().zip(duck).enumerate() {
        if a.len() != b.len() {
            return Some(format!("row {i}: {} columns against {}", a.len(), b.len()));
        }
        for (x, y) in a.iter().zip(b) {
            let same = match (x, y) {
                (Value::String(s), Value::Number(n)) => {
                    parse_ts(s).is_some_and(|t| Some(t as f64) == n.as_f64())
                }
                (Value::Number(p), Value::Number(q)) => {
                    let (p, q) = (
                        p.as_f64().unwrap_or(f64::NAN),
                        q.as_f64().unwrap_or(f64::NAN),
                    );
                    p == q || (p - q).abs() <= tolerance * p.abs().max(q.abs())
                }
                _ => x == y,
            };
            if !same {
                return Some(format!("row {i}: {x} against {y}"));
            }
        }
    }
    None
}

/// Every device's id, status and `site` tag, through the paginated list.
fn device_sites(api: &str, token: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/devices?limit=1000&after={a}"),
            None => "/api/v1/devices?limit=1000".to_string(),
        };
        let (status, page) = api_json(api, token, "GET", &path, None)?;
        if status != 200 {
            return Err(format!("GET {path}: {status} {page}"));
        }
        for d in page["devices"].as_array().into_iter().flatten() {
            out.push(json!({
                "id": d["id"],
                "status": d["status"],
                "site": d["tags"]["site"],
            }));
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(out),
        }
    }
}

/// `benches/queries.py`, fed `input` on stdin; its JSON answer.
fn run_duckdb(python: &Path, input: &Value) -> Result<Value, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("queries.py");
    let mut child = Command::new(python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {} {}: {e}", python.display(), script.display()))?;
    let bytes = serde_json::to_vec(input).map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&bytes)
            .map_err(|e| format!("feeding queries.py: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for queries.py: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "queries.py failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "queries.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The server's thread count, from the pid in `<data>/server.json` (the
/// data dir is two folders above the stream's Parquet folder).
fn server_threads(parquet_dir: &Path) -> String {
    let pid = parquet_dir
        .parent()
        .and_then(Path::parent)
        .and_then(|data| std::fs::read(data.join("server.json")).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["pid"].as_u64());
    pid.and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// Runs one SQL statement through the API; its JSON answer, or the error.
pub fn sql(api: &str, token: &str, statement: &str) -> Result<Value, String> {
    let (status, answer) = api_json(
        api,
        token,
        "POST",
        "/api/v1/sql",
        Some(&json!({ "sql": statement })),
    )?;
    if status != 200 {
        return Err(format!("{statement}: {status} {answer}"));
    }
    Ok(answer)
}

/// One API request with a JSON body (or none); the status and JSON answer
/// (`null` when empty).
pub fn api_json(
    api: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let body = body
        .map(serde_json::to_vec)
        .transpose()
        .map_err(|e| e.to_string())?;
    let (status, payload) = http(api, method, path, Some(token), body.as_deref(), None)?;
    let answer = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&payload).map_err(|e| {
            format!(
                "{method} {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&payload)
            )
        })?
    };
    Ok((status, answer))
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`); the
/// status and the body, de-chunked.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
    accept: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(accept) = accept {
        request.push_str(&format!("Accept: {accept}\r\n"));
    }
    match body {
        Some(b) => request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            b.len()
        )),
        None => request.push_str("Content-Length: 0\r\n\r\n"),
    }
    let fail = |e: std::io::Error| format!("{method} {path} at {addr}: {e}");
    let mut stream = std::net::TcpStream::connect(addr).map_err(fail)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(fail)?;
    let _ = stream.set_nodelay(true);
    let mut bytes = request.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    stream.write_all(&bytes).map_err(fail)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(fail)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: no HTTP head in the answer"))?;
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: no status in {head}"))?;
    let mut payload = response.split_off(split + 4);
    if head.contains("transfer-encoding: chunked") {
        payload = dechunk(&payload);
    }
    Ok((status, payload))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        let stop = (start + size).min(data.len());
        out.extend_from_slice(&data[start..stop]);
        data = data.get(stop + 2..).unwrap_or_default();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a running server: `TRIBUTARY_BENCH_DATA=<data dir>
    /// TRIBUTARY_BENCH_PYTHON=<python with duckdb> cargo test -p
    /// tributary-benches --lib -- --ignored --nocapture compare`.
    #[test]
    #[ignore = "needs a running server with a filled `sim` stream"]
    fn compare_against_a_running_server() {
        let data = PathBuf::from(std::env::var("TRIBUTARY_BENCH_DATA").expect("the data dir"));
        let info: Value =
            serde_json::from_slice(&std::fs::read(data.join("server.json")).expect("server.json"))
                .expect("JSON");
        let o = QueryOptions {
            api: info["http"].as_str().expect("http").to_string(),
            admin_token: std::fs::read_to_string(data.join("admin.token"))
                .expect("admin.token")
                .trim()
                .to_string(),
            parquet_dir: data.join("storage/sim"),
            stream: "sim".into(),
            python: std::env::var("TRIBUTARY_BENCH_PYTHON")
                .unwrap_or("/tmp/benchvenv/bin/python".into())
                .into(),
            runs: 5,
        };
        for r in compare(&o).expect("the comparison") {
            println!("{}", r.to_json());
        }
    }
}
