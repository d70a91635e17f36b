//! The fuzz targets' bounded run on the stable toolchain (`docs/fuzzing.md`).
//!
//! 1. Every committed corpus file in `fuzz/corpus/<target>/` goes through
//!    its target.
//! 2. A deterministic mutation loop (fixed seed, xorshift; bit flips, byte
//!    writes, truncations, insertions and splices of corpus entries) feeds
//!    each target a few thousand more inputs.
//!
//! The targets are the very functions the cargo-fuzz targets call
//! (`tributary_ingest::fuzzing`), so a panic here is a fuzz crash: minimise
//! it with `cargo +nightly fuzz tmin`, fix it, and add a regression test.
//!
//! `cargo test -p tributary-ingest --test fuzz_corpus -- --ignored
//! write_seed_corpus` rewrites the seed inputs (`seed-*` files) from the
//! protocol test vectors and a few payloads built here.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int8Array, Int32Array, Int64Array,
    LargeStringArray, NullArray, RecordBatch, StringArray, StringViewArray,
    TimestampMicrosecondArray, TimestampMillisecondArray, TimestampNanosecondArray,
    TimestampSecondArray, UInt64Array,
};
use arrow::datatypes::{Field, Schema};
use bytes::Bytes;
use tributary_ingest::decode::encode_arrow;
use tributary_ingest::fuzzing;
use tributary_ingest::protocol::{Encoding, Events, Frame};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 3] = [
    ("frame_decoder", fuzzing::frame_decoder),
    ("json_payload", fuzzing::json_payload),
    ("arrow_payload", fuzzing::arrow_payload),
];

/// Mutated inputs per target; together they stay well under 30 s in a
/// debug build.
const ITERATIONS: usize = 20_000;
/// Mutated inputs are cut to this size: big inputs add time, not coverage.
const MAX_INPUT: usize = 8 * 1024;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files.iter().map(|path| fs::read(path).unwrap()).collect()
}

#[test]
fn corpus_replays_without_panicking() {
    for (name, target) in TARGETS {
        let inputs = corpus(name);
        assert!(!inputs.is_empty(), "fuzz/corpus/{name} is empty");
        for input in &inputs {
            target(input);
        }
    }
}

/// xorshift64*: a fixed seed, so a failure reproduces exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that make decoders take unusual branches.
const INTERESTING: [u8; 10] = [0x00, 0x01, 0x02, 0x03, 0x7f, 0x80, 0xff, b'"', b'{', b'}'];

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            // Flip one bit.
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            // Overwrite a byte with an interesting one.
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            // Overwrite a little-endian / big-endian word (lengths!).
            2 if data.len() >= 4 => {
                let i = rng.below(data.len() - 3);
                let word = match rng.below(4) {
                    0 => 0,
                    1 => u32::MAX,
                    2 => i32::MAX as u32,
                    _ => rng.next() as u32 % 4096,
                };
                let bytes = if rng.below(2) == 0 {
                    word.to_le_bytes()
                } else {
                    word.to_be_bytes()
                };
                data[i..i + 4].copy_from_slice(&bytes);
            }
            // Truncate.
            3 => {
                let len = rng.below(data.len() + 1);
                data.truncate(len);
            }
            // Delete a range.
            4 if !data.is_empty() => {
                let start = rng.below(data.len());
                let end = (start + 1 + rng.below(16)).min(data.len());
                data.drain(start..end);
            }
            // Splice: this entry's head, another's tail.
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(data.len() + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            // Duplicate a range in place.
            _ if !data.is_empty() => {
                let start = rng.below(data.len());
                let end = (start + 1 + rng.below(32)).min(data.len());
                let copy = data[start..end].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, copy);
            }
            _ => {}
        }
    }
    data.truncate(MAX_INPUT);
    data
}

#[test]
fn bounded_mutation_run_does_not_panic() {
    for (index, (name, target)) in TARGETS.into_iter().enumerate() {
        let corpus = corpus(name);
        let mut rng = Rng(0x7269_6275_7461_7279 ^ index as u64);
        for iteration in 0..ITERATIONS {
            let input = mutate(&mut rng, &corpus);
            let outcome = std::panic::catch_unwind(|| target(&input));
            assert!(
                outcome.is_ok(),
                "{name}: mutated input {iteration} panicked; input (hex): {}",
                hex(&input)
            );
        }
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Rewrites the seed files (`seed-*`) of every corpus. Run by hand after
/// changing the protocol vectors or the decoders' inputs; then minimise
/// with `cargo fuzz cmin` (docs/fuzzing.md).
#[test]
#[ignore = "writes fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus_dir(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };

    let jsons: [(&str, &[u8]); 8] = [
        ("object", br#"{"temp":21.5}"#),
        (
            "all_types",
            br#"{"ok":true,"count":-7,"total":9223372036854775807,"ratio":0.5,"temp":1e300,"label":"h\u00e9llo \"x\"","seen":"2024-02-29T23:59:59.999+02:00","ts":1700000000000,"device_id":"sensor-1"}"#,
        ),
        ("array", br#"[{"temp":1},{"temp":null,"label":"a"},{}]"#),
        ("lines", b"{\"count\":1}\n{\"count\":2}\n\n{\"seen\":0}\n"),
        ("bad_type", br#"{"count":"three","ts":"not a time"}"#),
        ("unknown_and_repeat", br#"{"humidity":1} {"temp":1,"temp":2}"#),
        ("device_and_received", br#"{"device_id":"other"} {"received_at":1}"#),
        ("nested", br#"[[{"temp":[1,{"a":null}]}], 3, "x", true]"#),
    ];
    for (name, json) in jsons {
        write("json_payload", name, json);
    }

    let arrows = arrow_payloads();
    for (name, payload) in &arrows {
        write("arrow_payload", name, payload);
    }

    // Frames: each protocol test vector, all valid ones in one stream, and
    // EVENTS frames carrying the payloads above. Two leading bytes seed the
    // chunking.
    let vectors = protocol_vectors();
    let mut stream = vec![0x5a, 0xa5];
    for (name, bytes, valid) in &vectors {
        let mut seed = vec![0x01, 0x00];
        seed.extend_from_slice(bytes);
        write("frame_decoder", &format!("vector-{name}"), &seed);
        if *valid {
            stream.extend_from_slice(bytes);
        }
    }
    write("frame_decoder", "all_valid_vectors", &stream);
    for (encoding, (name, payload)) in jsons
        .iter()
        .take(3)
        .map(|(n, p)| (Encoding::Json, (*n, p.to_vec())))
        .chain(
            arrows
                .iter()
                .take(3)
                .map(|(n, p)| (Encoding::Arrow, (&**n, p.clone()))),
        )
    {
        let frame = Frame::Events(Events {
            seq: 1,
            stream: "telemetry".into(),
            encoding,
            payload: Bytes::from(payload),
        });
        let mut seed = vec![0x07, 0x00];
        seed.extend_from_slice(&frame.encode_to_vec());
        write("frame_decoder", &format!("events-{name}"), &seed);
    }
}

fn arrow_payloads() -> Vec<(String, Vec<u8>)> {
    fn ipc(columns: Vec<(&str, ArrayRef)>, batches: usize) -> Vec<u8> {
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let batch = RecordBatch::try_new(
            schema.clone(),
            columns.into_iter().map(|(_, a)| a).collect(),
        )
        .unwrap();
        encode_arrow(&schema, &vec![batch; batches]).unwrap()
    }
    let a = |x: ArrayRef| x;
    vec![
        (
            "all_types".into(),
            ipc(
                vec![
                    (
                        "ok",
                        a(Arc::new(BooleanArray::from(vec![Some(true), None]))),
                    ),
                    ("count", a(Arc::new(Int32Array::from(vec![Some(1), None])))),
                    ("total", a(Arc::new(Int64Array::from(vec![Some(2), None])))),
                    (
                        "ratio",
                        a(Arc::new(Float32Array::from(vec![Some(0.5), None]))),
                    ),
                    (
                        "temp",
                        a(Arc::new(Float64Array::from(vec![Some(21.5), None]))),
                    ),
                    (
                        "label",
                        a(Arc::new(StringArray::from(vec![Some("hall"), None]))),
                    ),
                    (
                        "seen",
                        a(Arc::new(
                            TimestampMillisecondArray::from(vec![Some(5), None])
                                .with_timezone("UTC"),
                        )),
                    ),
                    (
                        "ts",
                        a(Arc::new(TimestampMillisecondArray::from(vec![
                            Some(1),
                            None,
                        ]))),
                    ),
                    (
                        "device_id",
                        a(Arc::new(StringArray::from(vec![Some("sensor-1"), None]))),
                    ),
                ],
                1,
            ),
        ),
        (
            "conversions".into(),
            ipc(
                vec![
                    ("count", a(Arc::new(Int8Array::from(vec![1, -1])))),
                    ("total", a(Arc::new(UInt64Array::from(vec![1, u64::MAX])))),
                    ("label", a(Arc::new(LargeStringArray::from(vec!["a", "b"])))),
                    (
                        "seen",
                        a(Arc::new(TimestampNanosecondArray::from(vec![1, -1]))),
                    ),
                    (
                        "ts",
                        a(Arc::new(TimestampSecondArray::from(vec![1, i64::MAX]))),
                    ),
                ],
                1,
            ),
        ),
        (
            "three_batches".into(),
            ipc(
                vec![
                    (
                        "label",
                        a(Arc::new(StringViewArray::from(vec![
                            "short",
                            "a string longer than twelve bytes",
                        ]))),
                    ),
                    (
                        "seen",
                        a(Arc::new(TimestampMicrosecondArray::from(vec![1, 2]))),
                    ),
                    ("temp", a(Arc::new(NullArray::new(2)))),
                ],
                3,
            ),
        ),
        (
            "unknown_column".into(),
            ipc(
                vec![("humidity", a(Arc::new(Float64Array::from(vec![1.0]))))],
                1,
            ),
        ),
        (
            "wrong_type".into(),
            ipc(
                vec![("ratio", a(Arc::new(Float64Array::from(vec![1.0]))))],
                1,
            ),
        ),
        (
            "bad_device".into(),
            ipc(
                vec![("device_id", a(Arc::new(StringArray::from(vec!["x"]))))],
                1,
            ),
        ),
        (
            "no_rows".into(),
            ipc(
                vec![("count", a(Arc::new(Int32Array::from(Vec::<i32>::new()))))],
                1,
            ),
        ),
    ]
}

/// `(name, bytes, valid)` for each hex block of `docs/protocol.md`.
fn protocol_vectors() -> Vec<(String, Vec<u8>, bool)> {
    let spec =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"))
            .unwrap();
    let mut vectors = Vec::new();
    let mut current: Option<(String, Vec<u8>, bool)> = None;
    let mut in_block = false;
    for line in spec.lines() {
        if line.trim() == "```hex" {
            in_block = true;
            current = None;
            continue;
        }
        if !in_block {
            continue;
        }
        if line.trim() == "```" {
            in_block = false;
            vectors.extend(current.take());
            continue;
        }
        if let Some(name) = line.trim().strip_prefix("# vector:") {
            let name = name.trim().to_owned();
            let valid = !name.starts_with("bad_");
            current = Some((name, Vec::new(), valid));
            continue;
        }
        let code = line.split('#').next().unwrap_or("");
        if let Some((_, bytes, _)) = &mut current {
            for word in code.split_whitespace() {
                bytes.push(u8::from_str_radix(word, 16).unwrap());
            }
        }
    }
    assert!(vectors.len() > 10, "found {} vectors", vectors.len());
    vectors
}
