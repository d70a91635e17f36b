//! Arbitrary bytes as a JSON EVENTS payload (decode_json).
//! The body lives in `tributary_ingest::fuzzing`, shared with the stable
//! corpus replay in `ingest/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tributary_ingest::fuzzing::json_payload(data));
