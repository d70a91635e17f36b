//! `window_tumble_avg`: a windowed rule, the average temperature per device
//! over 10-second tumbling windows, run the way the rule runtime runs it,
//! reported as events per second; then the same events through DuckDB as a
//! reference, in the same run.
//!
//! The rule is
//! `SELECT device_id, 'avg', avg(temp) FROM t GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)`
//! over 10,000 devices. Each device sends one event per second of event time
//! in frames of 10 to 50 events; frames arrive in the order they were sent
//! (devices interleave), one log record per frame, spread over the stream's
//! 4 partitions. The rule is fed as the runtime feeds it: per partition in
//! turn, the records of up to 8192 events per `process` call. Every iteration
//! starts from a freshly compiled program (compiling is not timed), so
//! windows open and close many times (about 20 per device).
//!
//! The reference writes the same events to a Parquet file and runs
//! `benches/duckdb_reference.py`, which loads them into an in-memory DuckDB
//! table (not timed) and times
//! `SELECT device_id, (ts_ms // 10000) * 10000 AS window_start, avg(temp) FROM events GROUP BY ALL`
//! with all of DuckDB's threads and with one. Python is `$TRIBUTARY_PYTHON`
//! (default `python3`); without it or without the `duckdb` module the
//! reference is skipped with a note, and the bench goes on.
//!
//! Run: `TRIBUTARY_PYTHON=/path/to/venv/bin/python cargo bench -p tributary-cli -p tributary-benches --bench tributary -- window_tumble_avg`
//! The events come from a fixed seed, so runs compare.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::TimestampMillisecondArray;
use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use criterion::{BatchSize, Criterion, Throughput};
use tributary_engine::catalog::Catalog;
use tributary_engine::event::{ColumnDef, ColumnType, StreamDef, TIME_ZONE};
use tributary_engine::log::{Record, partition_for};
use tributary_engine::rule::{Output, RuleProgram};
use tributary_engine::snapshot::Snapshot;
use tributary_sql::rule::compile_rule;
use tributary_sql::statement::{Statement, parse};

use crate::Rng;

/// The group's name, also what `cargo bench -- <filter>` matches.
const GROUP: &str = "window_tumble_avg";
const RULE: &str = "CREATE RULE r AS INSERT INTO commands SELECT device_id, 'avg', avg(temp) FROM t GROUP BY device_id, tumble(ts, INTERVAL '10' SECOND)";
const DUCKDB_QUERY: &str = "SELECT device_id, (ts_ms // 10000) * 10000 AS window_start, avg(temp) FROM events GROUP BY ALL";
const DEVICES: usize = 10_000;
const EVENTS: usize = 2_000_000;
const PARTITIONS: u32 = 4;
/// What the runtime reads from one partition per call (engine/src/rule.rs).
const READ_CHUNK: usize = 8192;
const FRAME_EVENTS: std::ops::RangeInclusive<u64> = 10..=50;
const WINDOW_MS: i64 = 10_000;
/// 2025-11-24T16:00:00Z, a whole number of windows.
const START_MS: i64 = 1_764_000_000_000;

fn stream() -> StreamDef {
    StreamDef::new(
        "t",
        vec![ColumnDef {
            name: "temp".into(),
            ty: ColumnType::Float64,
        }],
        PARTITIONS,
    )
    .expect("a valid stream")
}

/// One device's frame, as the gateway appends it.
struct Frame {
    device: usize,
    /// Event times, one second apart.
    ts: Vec<i64>,
    temps: Vec<f64>,
    /// When the frame arrived (stamped on every event of it).
    received_at: i64,
}

/// The events, in arrival order: each device sends a frame of 10 to 50
/// events (one per second of event time) when its last event is taken, and
/// it arrives a little later; the devices start at staggered times.
fn frames(seed: u64) -> Vec<Frame> {
    let mut rng = Rng(seed);
    let span = |rng: &mut Rng| {
        *FRAME_EVENTS.start() + rng.next() % (FRAME_EVENTS.end() - FRAME_EVENTS.start() + 1)
    };
    // Per device: the time of its next event and its base temperature.
    let mut next_ts = Vec::with_capacity(DEVICES);
    let mut base = Vec::with_capacity(DEVICES);
    let mut pending = BinaryHeap::new();
    for device in 0..DEVICES {
        next_ts.push(START_MS + (rng.next() % 50_000) as i64);
        base.push(15.0 + 20.0 * rng.unit());
        let n = span(&mut rng) as i64;
        let last = next_ts[device] + (n - 1) * 1000;
        pending.push(Reverse((last + 50 + (rng.next() % 200) as i64, device, n)));
    }
    let mut out = Vec::new();
    let mut events = 0;
    while events < EVENTS {
        let Some(Reverse((received_at, device, n))) = pending.pop() else {
            break;
        };
        let n = (n as usize).min(EVENTS - events);
        let first = next_ts[device];
        let ts: Vec<i64> = (0..n as i64).map(|i| first + i * 1000).collect();
        let temps = (0..n)
            .map(|_| base[device] + 5.0 * rng.unit() - 2.5)
            .collect();
        next_ts[device] = first + n as i64 * 1000;
        events += n;
        out.push(Frame {
            device,
            ts,
            temps,
            received_at,
        });
        let n = span(&mut rng) as i64;
        let last = next_ts[device] + (n - 1) * 1000;
        pending.push(Reverse((last + 50 + (rng.next() % 200) as i64, device, n)));
    }
    out
}

fn device_name(device: usize) -> String {
    format!("sensor-{device:05}")
}

fn timestamps(values: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from(values).with_timezone(TIME_ZONE))
}

/// The frames as log records, cut into the `process` calls the runtime
/// makes when it works through a backlog: per partition in turn, records
/// until at least 8192 events.
fn calls(def: &StreamDef, frames: &[Frame]) -> Vec<Vec<Record>> {
    let schema = def.schema();
    let names: Vec<String> = (0..DEVICES).map(device_name).collect();
    let mut partitions: Vec<VecDeque<Record>> = vec![VecDeque::new(); PARTITIONS as usize];
    let mut ends = vec![0u64; PARTITIONS as usize];
    for f in frames {
        let p = partition_for(&names[f.device], PARTITIONS);
        let n = f.ts.len();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![names[f.device].as_str(); n])),
                timestamps(f.ts.clone()),
                timestamps(vec![f.received_at; n]),
                Arc::new(Float64Array::from(f.temps.clone())),
            ],
        )
        .expect("a batch in the stream's schema");
        partitions[p as usize].push_back(Record {
            partition: p,
            offset: ends[p as usize],
            batch,
        });
        ends[p as usize] += n as u64;
    }
    let mut out = Vec::new();
    while partitions.iter().any(|p| !p.is_empty()) {
        for p in partitions.iter_mut() {
            let mut call = Vec::new();
            let mut events = 0;
            while events < READ_CHUNK {
                let Some(r) = p.pop_front() else { break };
                events += r.batch.num_rows();
                call.push(r);
            }
            if !call.is_empty() {
                out.push(call);
            }
        }
    }
    out
}

fn compile(rt: &tokio::runtime::Runtime, catalog: &Catalog) -> Box<dyn RuleProgram> {
    let Ok(Statement::CreateRule(stmt)) = parse(RULE) else {
        panic!("the rule parses");
    };
    rt.block_on(compile_rule(&stmt, catalog, 0))
        .expect("the rule compiles")
        .program
}

/// Runs a fresh program over every call; returns the rows it emitted.
fn run(mut program: Box<dyn RuleProgram>, calls: &[Vec<Record>]) -> (usize, Box<dyn RuleProgram>) {
    let mut rows = 0;
    for records in calls {
        let mut out = Output::default();
        program.process(black_box(records), &mut out).expect("runs");
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        rows += out.rows.iter().map(|e| e.batch.num_rows()).sum::<usize>();
        black_box(out);
    }
    // The state is dropped by the caller, outside the timing.
    (rows, program)
}

/// What both benches start from: the stream, the events and the calls.
struct Setup {
    rt: tokio::runtime::Runtime,
    catalog: Catalog,
    frames: Vec<Frame>,
    calls: Vec<Vec<Record>>,
}

fn setup() -> Setup {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let def = stream();
    let catalog = Catalog::in_memory();
    catalog.add_stream(def.clone()).expect("add the stream");
    let frames = frames(42);
    let calls = calls(&def, &frames);
    Setup {
        rt,
        catalog,
        frames,
        calls,
    }
}

pub fn window_tumble_avg(c: &mut Criterion) {
    let Setup {
        rt,
        catalog,
        frames,
        calls,
    } = setup();
    let events: usize = frames.iter().map(|f| f.ts.len()).sum();

    // Once, untimed: the rule emits what a plain group-by says it must.
    let (rows, program) = run(compile(&rt, &catalog), &calls);
    let open = program.stats().open_windows as usize;
    drop(program);
    let windows = distinct_windows(&frames);
    assert_eq!(
        rows + open,
        windows,
        "every (device, window) is emitted once or still open"
    );

    let mut group = c.benchmark_group(GROUP);
    group.throughput(Throughput::Elements(events as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function(format!("{DEVICES}_devices/{events}_events"), |b| {
        b.iter_batched(
            || compile(&rt, &catalog),
            |program| run(program, &calls),
            BatchSize::PerIteration,
        )
    });
    group.finish();

    if reference_wanted() {
        reference(&rt, &catalog, &frames, &calls, events, rows);
    }
}

/// `window_checkpoint`: what a rule checkpoint costs the rule itself: the
/// rule above, stopped halfway through the events (each of the 10,000
/// devices has a window or two open), has its state taken (`snapshot`, then
/// encoded to the bytes the checkpoint file holds), and a freshly compiled
/// program takes it back (decoded, then `restore`). Writing the file is the
/// disk's time, not the rule's, and is not measured here.
pub fn window_checkpoint(c: &mut Criterion) {
    let Setup {
        rt, catalog, calls, ..
    } = setup();
    let (_, mut program) = run(compile(&rt, &catalog), &calls[..calls.len() / 2]);
    let open = program.stats().open_windows;
    let bytes = program
        .snapshot()
        .expect("a snapshot")
        .expect("windowed rules save their state")
        .encode()
        .expect("encodes");
    println!(
        "window_checkpoint: {open} open windows, {} bytes of state ({:.1} bytes per window)",
        bytes.len(),
        bytes.len() as f64 / open.max(1) as f64
    );
    let mut group = c.benchmark_group("window_checkpoint");
    group.throughput(Throughput::Elements(open));
    group.sample_size(20);
    group.bench_function(format!("{open}_windows/save"), |b| {
        b.iter(|| {
            let snapshot = program.snapshot().expect("a snapshot").expect("state");
            black_box(snapshot.encode().expect("encodes"))
        })
    });
    group.bench_function(format!("{open}_windows/restore"), |b| {
        b.iter_batched(
            || compile(&rt, &catalog),
            |mut fresh| {
                let snapshot = Snapshot::decode(&bytes).expect("decodes");
                fresh.restore(&snapshot).expect("restores");
                fresh
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn distinct_windows(frames: &[Frame]) -> usize {
    let mut seen = std::collections::HashSet::new();
    for f in frames {
        for t in &f.ts {
            seen.insert((f.device, t.div_euclid(WINDOW_MS)));
        }
    }
    seen.len()
}

/// Whether this run includes the group: not under `--list`, `--test` or
/// `--profile-time`, and only when the name filter (if any) matches it.
fn reference_wanted() -> bool {
    // Criterion's options that take a value (the value is not a filter).
    const WITH_VALUE: &[&str] = &[
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--output-format",
        "--color",
        "--plotting-backend",
        "--format",
        "-c",
        "-s",
        "-b",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| a == "--list" || a == "--test" || a == "--profile-time")
    {
        return false;
    }
    let mut filter = None;
    let mut skip = false;
    for a in &args {
        if skip {
            skip = false;
        } else if a.starts_with('-') {
            skip = WITH_VALUE.contains(&a.as_str());
        } else {
            filter = Some(a.as_str());
            break;
        }
    }
    filter.is_none_or(|f| GROUP.contains(f) || f.contains(GROUP))
}

/// Our rate measured by hand (best and median of a few runs), DuckDB's from
/// the Python script, and a table of both.
fn reference(
    rt: &tokio::runtime::Runtime,
    catalog: &Catalog,
    frames: &[Frame],
    calls: &[Vec<Record>],
    events: usize,
    rows: usize,
) {
    let mut ours = Vec::new();
    for _ in 0..5 {
        let program = compile(rt, catalog);
        let started = Instant::now();
        let out = run(program, calls);
        ours.push(started.elapsed().as_secs_f64());
        drop(out);
    }
    let (ours_best, ours_median) = best_and_median(&mut ours);
    let rate = |s: f64| events as f64 / s;

    println!();
    println!("{GROUP}: {events} events, {DEVICES} devices, {rows} windows emitted");
    println!(
        "  {:<34} {:>14} {:>14} {:>12} {:>12}",
        "engine", "best ev/s", "median ev/s", "ours/this", "ours(med)/this"
    );
    let line = |name: &str, best: f64, median: f64| {
        println!(
            "  {:<34} {:>14.0} {:>14.0} {:>12.2} {:>12.2}",
            name,
            rate(best),
            rate(median),
            rate(ours_best) / rate(best),
            rate(ours_median) / rate(median),
        );
    };
    line("tributary rule (1 thread)", ours_best, ours_median);

    match duckdb(frames) {
        Ok(results) => {
            for r in results {
                line(
                    &format!(
                        "duckdb ({} thread{})",
                        r.threads,
                        if r.threads == 1 { "" } else { "s" }
                    ),
                    r.best,
                    r.median,
                );
            }
        }
        Err(why) => println!("  duckdb reference skipped: {why}"),
    }
    println!(
        "  (machine: {} cores; DuckDB times {DUCKDB_QUERY:?} on an in-memory table, load not timed)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
}

fn best_and_median(times: &mut [f64]) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    (times[0], times[times.len() / 2])
}

struct DuckDb {
    threads: u64,
    best: f64,
    median: f64,
}

/// Writes the events to Parquet and times DuckDB over them.
fn duckdb(frames: &[Frame]) -> Result<Vec<DuckDb>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("no temporary directory: {e}"))?;
    let path = dir.path().join("events.parquet");
    write_parquet(frames, &path).map_err(|e| format!("writing Parquet failed: {e}"))?;
    let python = std::env::var("TRIBUTARY_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("duckdb_reference.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(&path)
        .arg(DUCKDB_QUERY)
        .output()
        .map_err(|e| {
            format!("cannot run {python} ({e}); set TRIBUTARY_PYTHON to a Python with duckdb")
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if let Some(skip) = stdout.lines().find_map(|l| l.strip_prefix("SKIP ")) {
        return Err(format!(
            "{skip} (Python: {python}; set TRIBUTARY_PYTHON to a Python with duckdb)"
        ));
    }
    if !output.status.success() {
        return Err(format!(
            "{python} {} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let mut results = Vec::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("RESULT ") else {
            continue;
        };
        let field = |name: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let (Some(threads), Some(best), Some(median)) =
            (field("threads"), field("best_s"), field("median_s"))
        {
            results.push(DuckDb {
                threads: threads as u64,
                best,
                median,
            });
        }
    }
    if results.is_empty() {
        return Err(format!("no result from {}: {stdout}", script.display()));
    }
    Ok(results)
}

fn write_parquet(frames: &[Frame], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts_ms", DataType::Int64, false),
        Field::new("temp", DataType::Float64, false),
    ]));
    let file = std::fs::File::create(path)?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)?;
    for chunk in frames.chunks(4096) {
        let names: Vec<String> = chunk
            .iter()
            .flat_map(|f| std::iter::repeat_n(device_name(f.device), f.ts.len()))
            .collect();
        let ts: Vec<i64> = chunk.iter().flat_map(|f| f.ts.iter().copied()).collect();
        let temps: Vec<f64> = chunk.iter().flat_map(|f| f.temps.iter().copied()).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(names)),
                Arc::new(Int64Array::from(ts)),
                Arc::new(Float64Array::from(temps)),
            ],
        )?;
        writer.write(&batch)?;
    }
    writer.close()?;
    Ok(())
}
