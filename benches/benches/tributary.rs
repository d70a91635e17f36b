//! Tributary's criterion benchmarks, one group per hot path, most reported
//! as events per second:
//!
//! - `decode_json`: a JSON EVENTS payload into an Arrow batch (the gateway's
//!   per-frame work);
//! - `decode_arrow`: the same events as an Arrow IPC payload, as the
//!   simulator sends them (a one-row frame carries its schema too), by a
//!   connection's decoder that has seen the schema (`session`) and by a
//!   fresh one (`cold`);
//! - `log_append`: appending batches to the embedded log, without fsync so
//!   the number is the log's own cost, not the disk's;
//! - `rule_filter`: a compiled filter-and-project rule over a batch;
//! - `window_tumble_avg`: a per-device 10-second tumbling average over
//!   10,000 devices, fed as the rule runtime feeds it, with DuckDB's rate on
//!   the same events as a reference (see `window_tumble.rs`);
//! - `window_checkpoint`: taking and restoring that rule's state with
//!   10,000 windows open (a rule checkpoint, less the disk write), reported
//!   as windows per second.
//!
//! Run: `cargo bench -p tributary-cli -p tributary-benches --bench tributary`
//! (add `-- <group>` for one group, e.g. `-- window_tumble_avg`). Naming the
//! CLI too makes cargo resolve the same features as `benches/e2e.sh`'s
//! build, so the release DataFusion it built is reused; `-p
//! tributary-benches` alone resolves others and builds DataFusion again.
//! The data is generated from a fixed seed, so runs compare.

mod window_tumble;

use std::hint::black_box;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tributary_engine::catalog::Catalog;
use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};
use tributary_engine::log::{EmbeddedLog, EventStream, LogOptions, Record};
use tributary_engine::rule::Output;
use tributary_ingest::decode::{ArrowDecoder, decode_arrow, decode_json, encode_arrow};
use tributary_sql::rule::compile_rule;
use tributary_sql::statement::{Statement, parse};

fn telemetry() -> StreamDef {
    let col = |name: &str, ty| ColumnDef {
        name: name.into(),
        ty,
    };
    StreamDef::new(
        "telemetry",
        vec![
            col("temp", ColumnType::Float64),
            col("humidity", ColumnType::Float64),
            col("status", ColumnType::Utf8),
            col("seq", ColumnType::Int64),
        ],
        4,
    )
    .expect("a valid stream")
}

/// A small deterministic generator (xorshift), so every run sees the same events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 10_000) as f64 / 10_000.0
    }
}

fn payload(events: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let lines: Vec<String> = (0..events)
        .map(|i| {
            format!(
                r#"{{"temp": {:.2}, "humidity": {:.1}, "status": "{}", "seq": {i}, "ts": {}}}"#,
                20.0 + 70.0 * rng.unit(),
                30.0 + 40.0 * rng.unit(),
                if rng.next().is_multiple_of(10) {
                    "warn"
                } else {
                    "ok"
                },
                1_764_000_000_000i64 + i as i64 * 100,
            )
        })
        .collect();
    lines.join("\n").into_bytes()
}

fn batch(events: usize, seed: u64) -> RecordBatch {
    decode_json(
        &telemetry(),
        &payload(events, seed),
        "bench-device",
        0,
        usize::MAX,
    )
    .expect("valid events")
}

fn decode(c: &mut Criterion) {
    let def = telemetry();
    let mut group = c.benchmark_group("decode_json");
    for events in [1usize, 100, 1000] {
        let bytes = payload(events, 7);
        group.throughput(Throughput::Elements(events as u64));
        group.bench_with_input(BenchmarkId::from_parameter(events), &bytes, |b, bytes| {
            b.iter(|| {
                decode_json(&def, black_box(bytes), "bench-device", 0, usize::MAX).expect("valid")
            })
        });
    }
    group.finish();
}

/// The events of [`payload`] as an Arrow IPC stream, typed as a device
/// would send them (`ts` a UTC millisecond timestamp).
fn arrow_payload(events: usize, seed: u64) -> Vec<u8> {
    let decoded = batch(events, seed);
    let payload = decoded
        .project(&[1, 3, 4, 5, 6])
        .expect("ts and the declared columns");
    encode_arrow(&payload.schema(), &[payload]).expect("encodes")
}

fn decode_ipc(c: &mut Criterion) {
    let def = telemetry();
    let mut group = c.benchmark_group("decode_arrow");
    for events in [1usize, 100, 1000] {
        let bytes = arrow_payload(events, 7);
        group.throughput(Throughput::Elements(events as u64));
        // As the gateway decodes: one decoder per connection, which has
        // read this schema before.
        let mut session = ArrowDecoder::default();
        group.bench_with_input(BenchmarkId::new("session", events), &bytes, |b, bytes| {
            b.iter(|| {
                session
                    .decode(&def, black_box(bytes), "bench-device", 0, usize::MAX)
                    .expect("valid")
            })
        });
        // A fresh decoder for every payload: the schema parsed each time.
        group.bench_with_input(BenchmarkId::new("cold", events), &bytes, |b, bytes| {
            b.iter(|| {
                decode_arrow(&def, black_box(bytes), "bench-device", 0, usize::MAX).expect("valid")
            })
        });
    }
    group.finish();
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = Arc::new(
        EmbeddedLog::open(
            dir.path(),
            LogOptions {
                fsync: false,
                ..LogOptions::default()
            },
        )
        .expect("open the log"),
    );
    rt.block_on(log.create_stream(&telemetry()))
        .expect("create the stream");
    let mut group = c.benchmark_group("log_append");
    for events in [1usize, 100, 1000] {
        let b = batch(events, 11);
        group.throughput(Throughput::Elements(events as u64));
        group.bench_with_input(BenchmarkId::from_parameter(events), &b, |bench, b| {
            bench.iter(|| {
                rt.block_on(log.append("telemetry", "bench-device", b.clone()))
                    .expect("append")
            })
        });
    }
    group.finish();
}

fn rule(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let catalog = Catalog::in_memory();
    catalog.add_stream(telemetry()).expect("add the stream");
    let Ok(Statement::CreateRule(stmt)) = parse(
        "CREATE RULE hot AS INSERT INTO commands SELECT device_id, 'fan_on' AS name, CAST(temp AS VARCHAR) AS payload FROM telemetry WHERE temp > 80 AND status = 'ok'",
    ) else {
        panic!("the rule parses");
    };
    let mut compiled = rt
        .block_on(compile_rule(&stmt, &catalog, 0))
        .expect("the rule compiles");
    let mut group = c.benchmark_group("rule_filter");
    for events in [100usize, 10_000] {
        // One record, as the runtime would read a frame of that many events.
        let records = [Record {
            partition: 0,
            offset: 0,
            batch: batch(events, 13),
        }];
        group.throughput(Throughput::Elements(events as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(events),
            &records,
            |bench, records| {
                bench.iter(|| {
                    let mut out = Output::default();
                    compiled
                        .program
                        .process(black_box(records), &mut out)
                        .expect("runs");
                    assert!(out.errors.is_empty(), "{:?}", out.errors);
                    out
                })
            },
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    decode,
    decode_ipc,
    append,
    rule,
    window_tumble::window_tumble_avg,
    window_tumble::window_checkpoint
);
criterion_main!(benches);
