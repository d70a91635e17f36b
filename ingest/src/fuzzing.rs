//! Fuzz target bodies, shared by the cargo-fuzz targets in `fuzz/` and the
//! stable corpus replay in `ingest/tests/fuzz_corpus.rs`, so the two cannot
//! drift. Each takes arbitrary bytes and must return without panicking;
//! they also assert properties that hold for every input.
//!
//! Not part of the crate's API.

use std::sync::{Once, OnceLock};

use tributary_engine::event::{ColumnDef, ColumnType, StreamDef};

use crate::decode::{decode_arrow, decode_json};
use crate::protocol::{Encoding, Frame, FrameDecoder};

/// The frame size limit the frame decoder target runs with: small, so the
/// fuzzer reaches `frame_too_large` easily.
pub const MAX_FRAME_BYTES: u32 = 4096;
/// The event limit the payload targets run with.
pub const MAX_EVENTS: usize = 64;
/// The authenticated device the payload targets decode for.
pub const DEVICE: &str = "sensor-1";
/// The receive time the payload targets decode with.
pub const RECEIVED_AT_MS: i64 = 1_700_000_000_000;

/// The stream the payload targets decode against: one column of every type.
pub fn stream_def() -> &'static StreamDef {
    static DEF: OnceLock<StreamDef> = OnceLock::new();
    DEF.get_or_init(|| {
        let col = |name: &str, ty| ColumnDef {
            name: name.into(),
            ty,
        };
        let columns = vec![
            col("ok", ColumnType::Boolean),
            col("count", ColumnType::Int32),
            col("total", ColumnType::Int64),
            col("ratio", ColumnType::Float32),
            col("temp", ColumnType::Float64),
            col("label", ColumnType::Utf8),
            col("seen", ColumnType::Timestamp),
        ];
        match StreamDef::new("telemetry", columns, 4) {
            Ok(def) => def,
            Err(err) => panic!("the fuzz stream definition is invalid: {err}"),
        }
    })
}

/// For the cargo-fuzz targets: libfuzzer-sys aborts on every panic, even
/// one that would be caught. [`decode_arrow`] catches the panics of arrow's
/// IPC reader on malformed input (turning them into `invalid_arrow`), so
/// this hook lets just those unwind, silently, and hands every other panic
/// to the hook that was installed before (which aborts). The gateway
/// installs it too, so that those panics print nothing.
pub fn contain_arrow_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !crate::decode::panic_is_contained() {
                previous(info);
            }
        }));
    });
}

/// Feeds `data` to a [`FrameDecoder`] in pieces, decoding every frame (and
/// an EVENTS frame's payload) until the stream errors or runs out.
///
/// The first two bytes choose the piece sizes; the rest is the stream. Every
/// frame decoded must encode back to bytes that decode to the same frame.
pub fn frame_decoder(data: &[u8]) {
    let (seed, stream) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => (0, data),
    };
    let mut decoder = FrameDecoder::new(MAX_FRAME_BYTES);
    let mut rng = u32::from(seed) | 1;
    let mut rest = stream;
    while !rest.is_empty() {
        // xorshift32; piece sizes 1 to 64, so frames straddle pieces.
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let take = (rng % 64 + 1) as usize;
        let (piece, tail) = rest.split_at(take.min(rest.len()));
        rest = tail;
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => check_frame(&frame),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
}

fn check_frame(frame: &Frame) {
    let bytes = frame.encode_to_vec();
    let mut again = FrameDecoder::new(u32::MAX);
    again.push(&bytes);
    match again.next_frame() {
        Ok(Some(decoded)) => assert_eq!(&decoded, frame, "a frame must survive re-encoding"),
        other => panic!("{frame:?} re-encoded to bytes that decode to {other:?}"),
    }
    if let Frame::Events(events) = frame {
        let def = stream_def();
        match events.encoding {
            Encoding::Json => {
                let _ = decode_json(def, &events.payload, DEVICE, RECEIVED_AT_MS, MAX_EVENTS);
            }
            Encoding::Arrow => {
                let _ = decode_arrow(def, &events.payload, DEVICE, RECEIVED_AT_MS, MAX_EVENTS);
            }
            Encoding::Unknown(_) => {}
        }
    }
}

/// Decodes `data` as a JSON EVENTS payload for [`stream_def`].
pub fn json_payload(data: &[u8]) {
    let def = stream_def();
    if let Ok(batch) = decode_json(def, data, DEVICE, RECEIVED_AT_MS, MAX_EVENTS) {
        assert_eq!(batch.schema(), def.schema());
        assert!((1..=MAX_EVENTS).contains(&batch.num_rows()));
    }
}

/// Decodes `data` as an Arrow IPC EVENTS payload for [`stream_def`].
pub fn arrow_payload(data: &[u8]) {
    let def = stream_def();
    if let Ok(batch) = decode_arrow(def, data, DEVICE, RECEIVED_AT_MS, MAX_EVENTS) {
        assert_eq!(batch.schema(), def.schema());
        assert!((1..=MAX_EVENTS).contains(&batch.num_rows()));
    }
}
