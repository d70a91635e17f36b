//! Arbitrary bytes as an Arrow IPC EVENTS payload (decode_arrow).
//! The body lives in `tributary_ingest::fuzzing`, shared with the stable
//! corpus replay in `ingest/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tributary_ingest::fuzzing::contain_arrow_panics();
    tributary_ingest::fuzzing::arrow_payload(data);
});
