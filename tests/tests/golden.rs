//! Golden tests of rules: `tests/golden/*.case`, one case per file (the
//! format is in `tests/golden/README.md`). Each case creates a stream,
//! compiles a rule, feeds it events (and `tick`s of the clock) and compares
//! the rows and the late events with the file.
//!
//! Windowed cases are then replayed with other micro-batchings (one event per
//! record, one record per stretch between ticks, random splits, several
//! records per call) and with shuffled events, where a shuffle is used only
//! when a reference model of the watermarks (written here, independently of
//! the engine) says that every event stays late or on time as it was. Every
//! replay must give the same rows.
//!
//! The expected sections of cases with an `oracle:` header come from DuckDB
//! (`tests/golden/oracle.py`), never from the engine. Those of cases without
//! one (stateless rules) are rewritten from the engine's output with
//! `TRIBUTARY_GOLDEN=rewrite cargo test -p tributary-tests --test integration golden`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use tributary_engine::catalog::Catalog;
use tributary_engine::log::Record;
use tributary_engine::rule::{Output, RuleProgram};
use tributary_sql::rule::compile_rule;
use tributary_sql::statement::{Statement, parse};
use tributary_sql::window::{TimeOptions, parse_duration};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

// ------------------------------------------------------------- case files

#[derive(Debug, Clone)]
struct Event {
    device: String,
    ts: i64,
    received_at: i64,
    /// Raw CSV fields by column name.
    fields: HashMap<String, String>,
}

#[derive(Debug, Clone, Copy)]
enum Item {
    /// Index into `Case::events`.
    Event(usize),
    Tick(i64),
}

#[derive(Debug)]
struct Case {
    path: PathBuf,
    text: String,
    /// Everything before `expected rows:`, kept as written.
    prefix: Vec<String>,
    headers: HashMap<String, String>,
    events: Vec<Event>,
    items: Vec<Item>,
    /// `None` when the file has no `expected rows:` section yet.
    expected: Option<Outcome>,
}

/// What a run produced, formatted: sorted rows and sorted late events.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    header: String,
    rows: Vec<String>,
    late: Vec<String>,
}

fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' && chars.peek() == Some(&'"') {
                cur.push('"');
                chars.next();
            } else if c == '"' {
                quoted = false;
            } else {
                cur.push(c);
            }
        } else if c == '"' {
            quoted = true;
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) || s != s.trim() {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl Case {
    fn read(path: &Path) -> Result<Case, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let mut prefix = Vec::new();
        let mut headers: HashMap<String, String> = HashMap::new();
        let mut events = Vec::new();
        let mut items = Vec::new();
        let mut event_header: Option<Vec<String>> = None;
        let mut in_events = false;
        let mut last_key: Option<String> = None;
        let mut lines = text.split('\n').peekable();
        let mut expected_lines = None;
        while let Some(line) = lines.next() {
            let t = line.trim();
            if t == "expected rows:" {
                expected_lines = Some(lines.by_ref().collect::<Vec<_>>());
                break;
            }
            prefix.push(line.to_string());
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            if !in_events {
                if t == "events:" {
                    in_events = true;
                    continue;
                }
                if line.starts_with([' ', '\t']) {
                    let key = last_key
                        .as_ref()
                        .ok_or("continuation line without a header")?;
                    let v = headers.get_mut(key).ok_or("continuation")?;
                    v.push('\n');
                    v.push_str(t);
                    continue;
                }
                let (k, v) = line
                    .split_once(':')
                    .ok_or_else(|| format!("cannot read header line {line:?}"))?;
                headers.insert(k.trim().to_string(), v.trim().to_string());
                last_key = Some(k.trim().to_string());
                continue;
            }
            let Some(header) = &event_header else {
                event_header = Some(t.split(',').map(|s| s.trim().to_string()).collect());
                continue;
            };
            if let Some(ms) = t.strip_prefix("tick ") {
                let ms = ms.trim().parse().map_err(|_| format!("bad tick {t:?}"))?;
                items.push(Item::Tick(ms));
                continue;
            }
            let values = split_csv(t);
            if values.len() != header.len() {
                return Err(format!("event {t:?} does not match the header {header:?}"));
            }
            let fields: HashMap<String, String> = header.iter().cloned().zip(values).collect();
            let num = |k: &str| -> Result<Option<i64>, String> {
                match fields.get(k).map(String::as_str) {
                    None | Some("") => Ok(None),
                    Some(v) => v.parse().map(Some).map_err(|_| format!("bad {k} in {t:?}")),
                }
            };
            let ts = num("ts")?.ok_or_else(|| format!("no ts in {t:?}"))?;
            let received_at = num("received_at")?.unwrap_or(ts);
            let device = fields
                .get("device_id")
                .cloned()
                .ok_or_else(|| format!("no device_id in {t:?}"))?;
            items.push(Item::Event(events.len()));
            events.push(Event {
                device,
                ts,
                received_at,
                fields,
            });
        }
        while prefix.last().is_some_and(|l| l.trim().is_empty()) {
            prefix.pop();
        }
        let expected = expected_lines.map(|lines| {
            let mut rows = Vec::new();
            let mut late = Vec::new();
            let mut in_late = false;
            for l in lines {
                let l = l.trim_end();
                if l.trim() == "expected late:" {
                    in_late = true;
                } else if !l.trim().is_empty() {
                    let target = if in_late { &mut late } else { &mut rows };
                    target.push(l.to_string());
                }
            }
            let header = if rows.is_empty() {
                String::new()
            } else {
                rows.remove(0)
            };
            if !late.is_empty() {
                late.remove(0);
            }
            Outcome { header, rows, late }
        });
        Ok(Case {
            path: path.to_path_buf(),
            text,
            prefix,
            headers,
            events,
            items,
            expected,
        })
    }

    fn mode(&self) -> Option<&str> {
        self.headers.get("mode").map(String::as_str)
    }

    fn render(&self, outcome: &Outcome) -> String {
        let mut lines = self.prefix.clone();
        lines.push(String::new());
        lines.push("expected rows:".into());
        lines.push(outcome.header.clone());
        lines.extend(outcome.rows.iter().cloned());
        lines.push(String::new());
        lines.push("expected late:".into());
        lines.push("device_id,ts".into());
        lines.extend(outcome.late.iter().cloned());
        lines.join("\n") + "\n"
    }
}

// ------------------------------------------------------------- formatting

/// 9 significant digits, no exponent between 1e-7 and 1e16 (as oracle.py).
fn fmt_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return "0".into();
    }
    let s = format!("{x:.8e}");
    let (mant, exp) = s.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let neg = mant.starts_with('-');
    let digits: String = mant.trim_start_matches('-').replace('.', "");
    let digits = match digits.trim_end_matches('0') {
        "" => "0".to_string(),
        d => d.to_string(),
    };
    let body = if (-7..16).contains(&exp) {
        let (whole, frac) = if exp >= 0 {
            let e = exp as usize + 1;
            let mut whole: String = digits.chars().take(e).collect();
            while whole.len() < e {
                whole.push('0');
            }
            (whole, digits.chars().skip(e).collect::<String>())
        } else {
            ("0".to_string(), "0".repeat((-exp - 1) as usize) + &digits)
        };
        if frac.is_empty() {
            whole
        } else {
            format!("{whole}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        if rest.is_empty() {
            format!("{first}e{exp}")
        } else {
            format!("{first}.{rest}e{exp}")
        }
    };
    if neg { format!("-{body}") } else { body }
}

/// Each value of `column` as text, `NULL` for nulls.
fn cells(column: &dyn Array, text: impl Fn(usize) -> String) -> Vec<String> {
    (0..column.len())
        .map(|i| {
            if column.is_null(i) {
                "NULL".into()
            } else {
                text(i)
            }
        })
        .collect()
}

fn format_column(column: &ArrayRef) -> Result<Vec<String>, String> {
    let err = |e: arrow::error::ArrowError| e.to_string();
    let out = match column.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let c = cast(column, &DataType::Utf8).map_err(err)?;
            let c = c.as_any().downcast_ref::<StringArray>().unwrap();
            cells(c, |i| csv_field(c.value(i)))
        }
        DataType::Boolean => {
            let c = column.as_any().downcast_ref::<BooleanArray>().unwrap();
            cells(c, |i| c.value(i).to_string())
        }
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Timestamp(..) => {
            let c = match column.data_type() {
                DataType::Timestamp(_, tz) => cast(
                    column,
                    &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()),
                )
                .map_err(err)?,
                _ => column.clone(),
            };
            let c = cast(&c, &DataType::Int64).map_err(err)?;
            let c = c.as_any().downcast_ref::<Int64Array>().unwrap();
            cells(c, |i| c.value(i).to_string())
        }
        DataType::Float16
        | DataType::Float32
        | DataType::Float64
        | DataType::Decimal128(..)
        | DataType::Decimal256(..) => {
            let c = cast(column, &DataType::Float64).map_err(err)?;
            let c = c.as_any().downcast_ref::<Float64Array>().unwrap();
            cells(c, |i| fmt_float(c.value(i)))
        }
        other => return Err(format!("the harness cannot format {other} yet")),
    };
    Ok(out)
}

// --------------------------------------------------------------- running

/// One `process` call (records of event indices) or one `advance`.
#[derive(Debug, Clone)]
enum Step {
    Process(Vec<Vec<usize>>),
    Tick(i64),
}

struct Compiled {
    program: Box<dyn RuleProgram>,
    columns: Vec<String>,
    schema: arrow::datatypes::SchemaRef,
    explain: Vec<String>,
    time: TimeOptions,
}

async fn compile(case: &Case) -> Result<Compiled, String> {
    let stream_sql = case.headers.get("stream").ok_or("no `stream:` header")?;
    let rule_sql = case.headers.get("rule").ok_or("no `rule:` header")?;
    let catalog = Catalog::in_memory();
    let Statement::CreateStream { def, .. } = parse(stream_sql).map_err(|e| e.to_string())? else {
        return Err(format!("`stream:` is not CREATE STREAM: {stream_sql}"));
    };
    let time = TimeOptions::from_options(&def.options)?;
    let schema = def.schema();
    catalog.add_stream(def).map_err(|e| e.to_string())?;
    let Statement::CreateRule(rule) = parse(rule_sql).map_err(|e| e.to_string())? else {
        return Err(format!("`rule:` is not a rule: {rule_sql}"));
    };
    let compiled = compile_rule(&rule, &catalog, 0)
        .await
        .map_err(|e| format!("compiling the rule: {e}"))?;
    Ok(Compiled {
        columns: compiled
            .output
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect(),
        program: compiled.program,
        schema,
        explain: compiled.explain,
        time,
    })
}

fn batch_of(
    case: &Case,
    schema: &arrow::datatypes::SchemaRef,
    rows: &[usize],
) -> Result<RecordBatch, String> {
    let mut columns: Vec<ArrayRef> = Vec::new();
    for field in schema.fields() {
        let name = field.name().as_str();
        let raw: Vec<Option<String>> = rows
            .iter()
            .map(|&i| {
                let e = &case.events[i];
                match name {
                    "device_id" => Some(e.device.clone()),
                    "ts" => Some(e.ts.to_string()),
                    "received_at" => Some(e.received_at.to_string()),
                    _ => e
                        .fields
                        .get(name)
                        .filter(|v| !v.is_empty() && v.as_str() != "NULL")
                        .cloned(),
                }
            })
            .collect();
        let bad = |v: &str| format!("column {name}: cannot read {v:?}");
        let array: ArrayRef = match field.data_type() {
            DataType::Utf8 => Arc::new(StringArray::from(raw)),
            DataType::Boolean => Arc::new(BooleanArray::from(
                raw.iter()
                    .map(|v| v.as_ref().map(|v| v.eq_ignore_ascii_case("true")))
                    .collect::<Vec<_>>(),
            )),
            DataType::Float32 | DataType::Float64 => {
                let values = raw
                    .iter()
                    .map(|v| {
                        v.as_ref()
                            .map(|v| v.parse::<f64>().map_err(|_| bad(v)))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                cast(
                    &(Arc::new(Float64Array::from(values)) as ArrayRef),
                    field.data_type(),
                )
                .map_err(|e| e.to_string())?
            }
            _ => {
                let values = raw
                    .iter()
                    .map(|v| {
                        v.as_ref()
                            .map(|v| v.parse::<i64>().map_err(|_| bad(v)))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                cast(
                    &(Arc::new(Int64Array::from(values)) as ArrayRef),
                    field.data_type(),
                )
                .map_err(|e| e.to_string())?
            }
        };
        columns.push(array);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

async fn run(case: &Case, steps: &[Step]) -> Result<Outcome, String> {
    let mut c = compile(case).await?;
    let mut out = Output::default();
    let mut offset = 0u64;
    for step in steps {
        match step {
            Step::Tick(ms) => c.program.advance(*ms, &mut out)?,
            Step::Process(records) => {
                let mut batch = Vec::new();
                for rows in records {
                    batch.push(Record {
                        partition: 0,
                        offset,
                        batch: batch_of(case, &c.schema, rows)?,
                    });
                    offset += rows.len() as u64;
                }
                c.program.process(&batch, &mut out)?;
            }
        }
        if !out.errors.is_empty() {
            return Err(format!("the rule reported errors: {:?}", out.errors));
        }
    }
    let mut rows = Vec::new();
    for emitted in &out.rows {
        let b = &emitted.batch;
        let mut formatted = Vec::new();
        for name in &c.columns {
            let column = b
                .column_by_name(name)
                .ok_or_else(|| format!("emitted rows have no column {name}"))?;
            formatted.push(format_column(column)?);
        }
        for r in 0..b.num_rows() {
            rows.push(
                formatted
                    .iter()
                    .map(|col| col[r].as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
    }
    rows.sort();
    let mut late = Vec::new();
    for b in &out.late {
        let devices = format_column(b.column_by_name("device_id").ok_or("late: no device_id")?)?;
        let ts = format_column(b.column_by_name("ts").ok_or("late: no ts")?)?;
        late.extend(devices.iter().zip(&ts).map(|(d, t)| format!("{d},{t}")));
    }
    late.sort();
    let _ = &c.explain;
    Ok(Outcome {
        header: c
            .columns
            .iter()
            .map(|n| csv_field(n))
            .collect::<Vec<_>>()
            .join(","),
        rows,
        late,
    })
}

// ------------------------------------------------- orders and batchings

/// xorshift64*: fixed seeds, no crates.
struct Rng(u64);

impl Rng {
    fn new(seed: &str) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The items as stretches of events between ticks.
#[derive(Debug, Clone)]
enum Segment {
    Events(Vec<usize>),
    Tick(i64),
}

fn segments(items: &[Item]) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for item in items {
        match item {
            Item::Event(i) => cur.push(*i),
            Item::Tick(ms) => {
                if !cur.is_empty() {
                    out.push(Segment::Events(std::mem::take(&mut cur)));
                }
                out.push(Segment::Tick(*ms));
            }
        }
    }
    if !cur.is_empty() {
        out.push(Segment::Events(cur));
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum Batching {
    OnePerRecord,
    OneRecordPerStretch,
    /// Random records, one per call.
    Random,
    /// Random records, several per call.
    RandomCalls,
}

fn plan(segs: &[Segment], batching: Batching, rng: &mut Rng) -> Vec<Step> {
    let mut steps = Vec::new();
    for s in segs {
        let events = match s {
            Segment::Tick(ms) => {
                steps.push(Step::Tick(*ms));
                continue;
            }
            Segment::Events(e) => e,
        };
        match batching {
            Batching::OnePerRecord => {
                steps.extend(events.iter().map(|e| Step::Process(vec![vec![*e]])));
            }
            Batching::OneRecordPerStretch => steps.push(Step::Process(vec![events.clone()])),
            Batching::Random | Batching::RandomCalls => {
                let mut records = Vec::new();
                let mut i = 0;
                while i < events.len() {
                    let n = 1 + rng.below((events.len() - i).min(5));
                    records.push(events[i..i + n].to_vec());
                    i += n;
                }
                if matches!(batching, Batching::Random) {
                    steps.extend(records.into_iter().map(|r| Step::Process(vec![r])));
                } else {
                    let mut j = 0;
                    while j < records.len() {
                        let n = 1 + rng.below((records.len() - j).min(3));
                        steps.push(Step::Process(records[j..j + n].to_vec()));
                        j += n;
                    }
                }
            }
        }
    }
    steps
}

/// A rule's window, as the reference model needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Tumble(i64),
    Hop {
        slide: i64,
        size: i64,
    },
    Session(i64),
    /// A per-event rule (OVER): each event waits until its watermark passes
    /// it; a silent device's waiting events are released, its watermark
    /// rising just past the newest of them.
    Over,
}

impl Window {
    /// From the rule's description ("window: hop(slide 5s, size 10s) over ts",
    /// or "per event: ..." for OVER).
    fn from_explain(explain: &[String]) -> Option<Window> {
        if explain.iter().any(|l| l.starts_with("per event: ")) {
            return Some(Window::Over);
        }
        let line = explain.iter().find_map(|l| l.strip_prefix("window: "))?;
        let spec = line.strip_suffix(" over ts")?;
        let d = |s: &str| parse_duration(s.trim()).ok();
        if let Some(x) = spec.strip_prefix("tumble(") {
            return Some(Window::Tumble(d(x.strip_suffix(')')?)?));
        }
        if let Some(x) = spec.strip_prefix("hop(slide ") {
            let (slide, size) = x.strip_suffix(')')?.split_once(", size ")?;
            return Some(Window::Hop {
                slide: d(slide)?,
                size: d(size)?,
            });
        }
        let x = spec.strip_prefix("session(gap ")?;
        Some(Window::Session(d(x.strip_suffix(')')?)?))
    }

    /// The end of the newest window holding an event at `ts`.
    fn newest_end(self, ts: i64) -> i64 {
        match self {
            Window::Tumble(size) => ts - ts.rem_euclid(size) + size,
            Window::Hop { slide, size } => ts - ts.rem_euclid(slide) + size,
            Window::Session(gap) => ts + gap,
            Window::Over => ts + 1,
        }
    }
}

/// What the reference model says of one order of the events, by event index.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    late: Vec<bool>,
    /// On time and passed by its final watermark (the device's own, or the
    /// global one): the events a per-event (OVER) rule has emitted rows for.
    released: Vec<bool>,
}

/// The reference watermark model (the same as oracle.py's, written apart
/// from the engine): which events of this order are late, by event index.
fn reference_late(
    case: &Case,
    segs: &[Segment],
    time: TimeOptions,
    window: Window,
    per_device: bool,
) -> Reference {
    #[derive(Clone)]
    struct Dev {
        max_ts: i64,
        last_seen: i64,
        floor: i64,
        active: bool,
        on_time: Vec<i64>,
    }
    let delay = time.watermark_delay;
    let wm = |d: &Dev| d.max_ts.saturating_sub(delay).max(d.floor);
    let mut devices: Vec<(String, Dev)> = Vec::new();
    let mut global = i64::MIN;
    let mut now = i64::MIN;
    let mut late = vec![false; case.events.len()];
    let settle = |devices: &mut Vec<(String, Dev)>, now: i64, global: &mut i64| {
        let before = now.saturating_sub(time.idle_timeout);
        for (_, d) in devices.iter_mut() {
            if d.active && d.last_seen < before {
                d.active = false;
                if per_device {
                    let current = wm(d);
                    if let Some(end) = d
                        .on_time
                        .iter()
                        .map(|t| window.newest_end(*t))
                        .filter(|e| *e > current)
                        .max()
                    {
                        d.floor = d.floor.max(end);
                    }
                }
            }
        }
        if !per_device {
            let active = devices
                .iter()
                .filter(|(_, d)| d.active)
                .map(|(_, d)| wm(d))
                .min();
            let candidate = active
                .or_else(|| devices.iter().map(|(_, d)| wm(d)).max())
                .unwrap_or(i64::MIN);
            *global = (*global).max(candidate);
        }
    };
    for s in segs {
        match s {
            Segment::Tick(ms) => {
                now = now.max(*ms);
                settle(&mut devices, now, &mut global);
            }
            Segment::Events(events) => {
                for &i in events {
                    let e = &case.events[i];
                    let at = match devices.iter().position(|(n, _)| *n == e.device) {
                        Some(p) => p,
                        None => {
                            devices.push((
                                e.device.clone(),
                                Dev {
                                    max_ts: i64::MIN,
                                    last_seen: i64::MIN,
                                    floor: i64::MIN,
                                    active: false,
                                    on_time: Vec::new(),
                                },
                            ));
                            devices.len() - 1
                        }
                    };
                    let d = &mut devices[at].1;
                    let is_late = e.ts < if per_device { wm(d) } else { global };
                    late[i] = is_late;
                    d.max_ts = d.max_ts.max(e.ts);
                    d.last_seen = d.last_seen.max(e.received_at);
                    d.active = true;
                    if !is_late {
                        d.on_time.push(e.ts);
                    }
                    now = now.max(e.received_at);
                    settle(&mut devices, now, &mut global);
                }
            }
        }
    }
    let released = case
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let final_wm = if per_device {
                devices
                    .iter()
                    .find(|(n, _)| *n == e.device)
                    .map_or(i64::MIN, |(_, d)| wm(d))
            } else {
                global
            };
            !late[i] && e.ts < final_wm
        })
        .collect();
    Reference { late, released }
}

fn shuffled(segs: &[Segment], case: &Case, rng: &mut Rng, strategy: usize) -> Vec<Segment> {
    segs.iter()
        .map(|s| match s {
            Segment::Tick(ms) => Segment::Tick(*ms),
            Segment::Events(e) => {
                let mut e = e.clone();
                match strategy % 3 {
                    // Any order.
                    0 => {
                        for i in (1..e.len()).rev() {
                            e.swap(i, rng.below(i + 1));
                        }
                    }
                    // Devices interleaved differently, each in its own order.
                    1 => {
                        let mut queues: Vec<(String, std::collections::VecDeque<usize>)> =
                            Vec::new();
                        for &i in &e {
                            let d = &case.events[i].device;
                            match queues.iter_mut().find(|(n, _)| n == d) {
                                Some((_, q)) => q.push_back(i),
                                None => queues.push((d.clone(), [i].into())),
                            }
                        }
                        e.clear();
                        while !queues.is_empty() {
                            let k = rng.below(queues.len());
                            e.extend(queues[k].1.pop_front());
                            if queues[k].1.is_empty() {
                                queues.remove(k);
                            }
                        }
                    }
                    // A few neighbours swapped.
                    _ => {
                        if e.len() > 1 {
                            for _ in 0..1 + rng.below(e.len()) {
                                let i = rng.below(e.len() - 1);
                                e.swap(i, i + 1);
                            }
                        }
                    }
                }
                Segment::Events(e)
            }
        })
        .collect()
}

// ------------------------------------------------------------- checking

fn diff(expected: &Outcome, got: &Outcome) -> String {
    let mut s = String::new();
    if expected.header != got.header {
        s += &format!(
            "  header: expected {:?}, got {:?}\n",
            expected.header, got.header
        );
    }
    for (what, e, g) in [
        ("rows", &expected.rows, &got.rows),
        ("late events (device_id,ts)", &expected.late, &got.late),
    ] {
        if e == g {
            continue;
        }
        s += &format!("  {what} (- expected only, + got only):\n");
        let (mut i, mut j) = (0, 0);
        while i < e.len() || j < g.len() {
            if j >= g.len() || (i < e.len() && e[i] < g[j]) {
                s += &format!("  - {}\n", e[i]);
                i += 1;
            } else if i >= e.len() || g[j] < e[i] {
                s += &format!("  + {}\n", g[j]);
                j += 1;
            } else {
                s += &format!("    {}\n", e[i]);
                i += 1;
                j += 1;
            }
        }
    }
    s
}

async fn check_case(case: &Case, rewrite: bool) -> Result<String, String> {
    let name = case.path.file_name().unwrap().to_string_lossy().to_string();
    let has_oracle = case.headers.contains_key("oracle");
    let segs = segments(&case.items);
    let mut rng = Rng::new(&name);
    let primary = run(case, &plan(&segs, Batching::OnePerRecord, &mut rng)).await?;

    if rewrite && !has_oracle {
        let text = case.render(&primary);
        if text != case.text {
            std::fs::write(&case.path, text).map_err(|e| e.to_string())?;
            return Ok(format!("{name}: rewritten"));
        }
    }
    let expected = case.expected.as_ref().ok_or_else(|| {
        if has_oracle {
            "no `expected rows:` section; run python3 tests/golden/oracle.py".to_string()
        } else {
            "no `expected rows:` section; run with TRIBUTARY_GOLDEN=rewrite".to_string()
        }
    })?;
    if *expected != primary {
        return Err(format!(
            "one event per record, in file order:\n{}",
            diff(expected, &primary)
        ));
    }

    // The mode the case declares must be the one the engine uses.
    let compiled = compile(case).await?;
    let window = Window::from_explain(&compiled.explain);
    let engine_per_device = compiled
        .explain
        .iter()
        .any(|l| l.contains("each device's own watermark"));
    match (case.mode(), window) {
        (Some("per_device"), Some(_)) if engine_per_device => {}
        (Some("global"), Some(_)) if !engine_per_device => {}
        (None, None) => {}
        (mode, _) => {
            return Err(format!(
                "`mode: {}` does not match the rule: {:?}",
                mode.unwrap_or("(none)"),
                compiled.explain
            ));
        }
    }

    let mut variants = 0;
    for batching in [
        Batching::OneRecordPerStretch,
        Batching::Random,
        Batching::Random,
        Batching::Random,
        Batching::RandomCalls,
        Batching::RandomCalls,
    ] {
        let got = run(case, &plan(&segs, batching, &mut rng)).await?;
        if got != *expected {
            return Err(format!(
                "file order, batching {batching:?}:\n{}",
                diff(expected, &got)
            ));
        }
        variants += 1;
    }

    let mut used = 0;
    let mut tried = 0;
    let reference = window.map(|w| {
        let per_device = case.mode() == Some("per_device");
        (
            w,
            per_device,
            reference_late(case, &segs, compiled.time, w, per_device),
        )
    });
    if let Some((_, _, reference)) = &reference {
        let want: Vec<String> = {
            let mut v: Vec<String> = reference
                .late
                .iter()
                .enumerate()
                .filter(|(_, l)| **l)
                .map(|(i, _)| {
                    format!(
                        "{},{}",
                        csv_field(&case.events[i].device),
                        case.events[i].ts
                    )
                })
                .collect();
            v.sort();
            v
        };
        if want != expected.late {
            return Err(format!(
                "the harness's reference model disagrees with the file about the late events: {want:?} vs {:?}",
                expected.late
            ));
        }
    }
    while used < 6 && tried < 80 {
        let order = shuffled(&segs, case, &mut rng, tried);
        tried += 1;
        if let Some((w, per_device, reference)) = &reference {
            let shuffled = reference_late(case, &order, compiled.time, *w, *per_device);
            // A per-event rule must also end with the same events released
            // (the others wait, unseen).
            if shuffled.late != reference.late
                || (*w == Window::Over && shuffled.released != reference.released)
            {
                continue;
            }
        }
        let batching = [
            Batching::OnePerRecord,
            Batching::Random,
            Batching::RandomCalls,
        ][used % 3];
        let got = run(case, &plan(&order, batching, &mut rng)).await?;
        if got != *expected {
            let order: Vec<String> = order
                .iter()
                .map(|s| match s {
                    Segment::Tick(ms) => format!("tick {ms}"),
                    Segment::Events(e) => e
                        .iter()
                        .map(|i| format!("{}@{}", case.events[*i].device, case.events[*i].ts))
                        .collect::<Vec<_>>()
                        .join(" "),
                })
                .collect();
            return Err(format!(
                "shuffled (every event as late or on time as in file order), batching {batching:?}, order {order:?}:\n{}",
                diff(expected, &got)
            ));
        }
        used += 1;
    }
    Ok(format!(
        "{name}: ok ({} rows, {} late; {} batchings, {used} of {tried} shuffles kept)",
        expected.rows.len(),
        expected.late.len(),
        variants + 1
    ))
}

#[tokio::test]
async fn golden_cases() {
    let rewrite = std::env::var("TRIBUTARY_GOLDEN").is_ok_and(|v| v == "rewrite");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no cases in {}", golden_dir().display());
    let mut failures = Vec::new();
    for path in &paths {
        let result = match Case::read(path) {
            Ok(case) => check_case(&case, rewrite).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(line) => println!("{line}"),
            Err(e) => failures.push(format!("{}:\n{e}", path.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden cases failed:\n\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n\n")
    );
}
