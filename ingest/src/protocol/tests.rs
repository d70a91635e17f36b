//! Codec tests: round trips, the documented test vectors, streaming input
//! and hostile input.

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use serde_json::json;

use super::*;

const SPEC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, ProtocolError> {
    let mut decoder = FrameDecoder::default();
    decoder.push(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame()? {
        frames.push(frame);
    }
    decoder.finish()?;
    Ok(frames)
}

fn decode_one(bytes: &[u8]) -> Result<Frame, ProtocolError> {
    let mut frames = decode_all(bytes)?;
    assert_eq!(frames.len(), 1, "{frames:?}");
    Ok(frames.remove(0))
}

fn command() -> Command {
    Command {
        id: "cmd-1".into(),
        name: "reboot".into(),
        payload: json!({"delay_s": 5}),
        created_at: Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap(),
        expires_at: Utc.with_ymd_and_hms(2025, 1, 2, 4, 4, 5).unwrap(),
        call: false,
    }
}

/// The frames the valid vectors in docs/protocol.md stand for.
fn documented_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                version: 1,
                device_id: "sensor-1".into(),
                token: "s3cr3t".into(),
                commands: true,
                idempotent: false,
                group: None,
                twin: false,
            }),
        ),
        (
            "hello_group",
            Frame::Hello(Hello {
                version: 1,
                device_id: "sensor-9".into(),
                token: "s3cr3t".into(),
                commands: true,
                idempotent: false,
                group: Some("factory-7".into()),
                twin: true,
            }),
        ),
        (
            "hello_certificate",
            Frame::Hello(Hello {
                version: 1,
                device_id: "sensor-1".into(),
                token: String::new(),
                commands: true,
                idempotent: false,
                group: None,
                twin: true,
            }),
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                version: 1,
                device_id: "sensor-1".into(),
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
                max_events_per_frame: DEFAULT_MAX_EVENTS_PER_FRAME,
            }),
        ),
        (
            "events",
            Frame::Events(Events {
                seq: 1,
                stream: "telemetry".into(),
                encoding: Encoding::Json,
                payload: Bytes::from_static(br#"{"temp":21.5}"#),
            }),
        ),
        ("ack", Frame::Ack(Ack { seq: 1, count: 1 })),
        (
            "reject",
            Frame::Reject(Reject {
                seq: 2,
                code: RejectCode::InvalidField,
                message: r#"event 0: field 'temp' must be a number (DOUBLE), got string "hot""#
                    .into(),
                event: Some(0),
                field: Some("temp".into()),
                retry_after_ms: None,
            }),
        ),
        ("command", Frame::Command(command())),
        (
            "command_call",
            Frame::Command(Command {
                id: "cmd-2".into(),
                name: "get_uptime".into(),
                payload: serde_json::Value::Null,
                expires_at: Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 15).unwrap(),
                call: true,
                ..command()
            }),
        ),
        (
            "command_ack",
            Frame::CommandAck(CommandAck::acknowledged("cmd-1")),
        ),
        (
            "command_ack_rejected",
            Frame::CommandAck(CommandAck {
                status: Some(AckStatus::Rejected),
                reason: Some("busy".into()),
                ..CommandAck::acknowledged("cmd-1")
            }),
        ),
        (
            "command_ack_response",
            Frame::CommandAck(CommandAck {
                response: Some(json!({"uptime_s": 42})),
                ..CommandAck::acknowledged("cmd-2")
            }),
        ),
        ("ping", Frame::Ping(0x0102_0304_0506_0708)),
        ("pong", Frame::Pong(0x0102_0304_0506_0708)),
        (
            "renew",
            Frame::Renew(Renew {
                token: "s3cr3t-2".into(),
            }),
        ),
        (
            "renewed",
            Frame::Renewed(Renewed {
                expires_at: Some(1_767_229_200),
            }),
        ),
        (
            "desired",
            Frame::Desired(Desired {
                version: 3,
                properties: object(json!({"interval_s": 30})),
            }),
        ),
        (
            "report",
            Frame::Report(Report {
                id: 7,
                patch: object(json!({"firmware": "1.4.2"})),
                replace: false,
            }),
        ),
        ("reported", Frame::Reported(Reported { id: 7, version: 12 })),
        (
            "error",
            Frame::Error(ErrorBody::from(ProtocolError::unsupported_version(2))),
        ),
        (
            "refused",
            Frame::Refused(Refused {
                request: RefusedRequest::Renew,
                id: None,
                code: RefusedCode::Unauthorized,
                message: "the token of device 'sensor-1' expired at 2026-01-01T00:00:00Z; the \
                          session goes on with its current token"
                    .into(),
            }),
        ),
    ]
}

fn object(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

struct Vector {
    name: String,
    expect_error: Option<String>,
    bytes: Vec<u8>,
}

/// Reads the ```hex blocks of the spec: `# vector: NAME`, optional
/// `# expect error: CODE`, hex digits with `#` comments.
fn spec_vectors() -> Vec<Vector> {
    let mut vectors = Vec::new();
    let mut current: Option<Vector> = None;
    for line in SPEC.lines() {
        let line = line.trim();
        match &mut current {
            None if line == "```hex" => {
                current = Some(Vector {
                    name: String::new(),
                    expect_error: None,
                    bytes: Vec::new(),
                })
            }
            None => {}
            Some(_) if line == "```" => vectors.push(current.take().unwrap()),
            Some(v) => {
                if let Some(name) = line.strip_prefix("# vector:") {
                    v.name = name.trim().to_string();
                } else if let Some(code) = line.strip_prefix("# expect error:") {
                    v.expect_error = Some(code.split_whitespace().next().unwrap().to_string());
                }
                let hex: String = line.split('#').next().unwrap().split_whitespace().collect();
                assert!(
                    hex.len().is_multiple_of(2),
                    "odd hex digits in {:?}: {line}",
                    v.name
                );
                for i in (0..hex.len()).step_by(2) {
                    v.bytes
                        .push(u8::from_str_radix(&hex[i..i + 2], 16).unwrap());
                }
            }
        }
    }
    assert!(current.is_none(), "unterminated hex block in the spec");
    vectors
}

#[test]
fn spec_vectors_decode_and_encode_byte_exact() {
    let vectors = spec_vectors();
    let expected = documented_frames();
    let valid: Vec<_> = vectors
        .iter()
        .filter(|v| v.expect_error.is_none())
        .collect();
    let names: Vec<_> = valid.iter().map(|v| v.name.as_str()).collect();
    let expected_names: Vec<_> = expected.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, expected_names, "valid vectors in docs/protocol.md");
    for (vector, (name, frame)) in valid.iter().zip(&expected) {
        assert_eq!(
            &decode_one(&vector.bytes).unwrap(),
            frame,
            "decoding {name}"
        );
        assert_eq!(frame.encode_to_vec(), vector.bytes, "encoding {name}");
    }
    // Every frame type has a documented vector.
    let types: std::collections::HashSet<_> =
        expected.iter().map(|(_, f)| f.frame_type()).collect();
    assert_eq!(types.len(), 16);
}

#[test]
fn spec_invalid_vectors_fail_with_the_documented_code() {
    let invalid: Vec<_> = spec_vectors()
        .into_iter()
        .filter(|v| v.expect_error.is_some())
        .collect();
    assert!(invalid.len() >= 5);
    for v in invalid {
        let mut decoder = FrameDecoder::default();
        decoder.push(&v.bytes);
        let err = decoder.next_frame().unwrap_err();
        assert_eq!(
            Some(err.code.as_str()),
            v.expect_error.as_deref(),
            "{}: {err}",
            v.name
        );
    }
}

fn all_frames() -> Vec<Frame> {
    let mut frames: Vec<Frame> = documented_frames().into_iter().map(|(_, f)| f).collect();
    frames.extend([
        Frame::Events(Events {
            seq: u64::MAX,
            stream: "ä".repeat(32),
            encoding: Encoding::Unknown(0x7f),
            payload: Bytes::new(),
        }),
        Frame::Reject(Reject {
            seq: 0,
            code: RejectCode::Unavailable,
            message: "log is full".into(),
            event: None,
            field: None,
            retry_after_ms: None,
        }),
        Frame::Reject(Reject {
            seq: 3,
            code: RejectCode::RateLimited,
            message: "device 'd1' may send 100 events/s".into(),
            event: None,
            field: None,
            retry_after_ms: Some(250),
        }),
        Frame::Command(Command {
            payload: json!([1, "two", {"three": null}, 4.5, true]),
            ..command()
        }),
        Frame::Error(ErrorBody {
            code: ErrorCode::ServerShutdown,
            message: "bye".into(),
            supported_versions: None,
        }),
        Frame::Ping(0),
        Frame::Pong(u64::MAX),
        Frame::Renewed(Renewed { expires_at: None }),
        Frame::Report(Report {
            id: u64::MAX,
            patch: object(json!({"a": {"b": null}, "c": [1, 2]})),
            replace: true,
        }),
        Frame::Desired(Desired {
            version: 1,
            properties: serde_json::Map::new(),
        }),
        Frame::Refused(Refused {
            request: RefusedRequest::Report,
            id: Some(0),
            code: RefusedCode::InvalidProperties,
            message: "too big".into(),
        }),
    ]);
    frames
}

#[test]
fn every_frame_round_trips() {
    for frame in all_frames() {
        let bytes = frame.encode_to_vec();
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4, "{frame:?}");
        assert_eq!(bytes[4], frame.frame_type().as_u8());
        assert_eq!(decode_one(&bytes).unwrap(), frame);
    }
}

#[test]
fn decoder_fed_one_byte_at_a_time() {
    let frames = all_frames();
    let mut stream = Vec::new();
    for frame in &frames {
        frame.encode(&mut stream);
    }
    let mut decoder = FrameDecoder::default();
    let mut out = Vec::new();
    for byte in &stream {
        decoder.push(std::slice::from_ref(byte));
        while let Some(frame) = decoder.next_frame().unwrap() {
            out.push(frame);
        }
    }
    assert_eq!(out, frames);
    assert_eq!(decoder.buffered(), 0);
    decoder.finish().unwrap();

    // The same through `Extend`, all at once.
    let mut decoder = FrameDecoder::default();
    decoder.extend(&stream);
    let mut count = 0;
    while decoder.next_frame().unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, frames.len());
}

#[test]
fn a_large_frame_is_held_in_a_buffer_no_larger_than_itself() {
    // Two 80 KB frames arriving in QUIC-sized pieces: the buffer grows to
    // the frame, not past it (doubling took it to 128 KiB and more).
    let frames: Vec<Frame> = (1..=2)
        .map(|seq| {
            Frame::Events(Events {
                seq,
                stream: "sim".into(),
                encoding: Encoding::Json,
                payload: Bytes::from(vec![b' '; 80_000]),
            })
        })
        .collect();
    let mut stream = Vec::new();
    for frame in &frames {
        frame.encode(&mut stream);
    }
    let frame_len = stream.len() / 2;
    let piece = 1_200;
    let mut decoder = FrameDecoder::default();
    let mut out = Vec::new();
    let mut most = 0;
    for chunk in stream.chunks(piece) {
        decoder.push(chunk);
        most = most.max(decoder.capacity());
        while let Some(frame) = decoder.next_frame().unwrap() {
            out.push(frame);
        }
    }
    assert_eq!(out, frames);
    assert!(
        most <= frame_len + piece,
        "the buffer grew to {most} bytes for frames of {frame_len}"
    );

    // A length field alone reserves nothing: a header announcing a large
    // frame gets room for what has arrived, not for what it announces.
    let mut decoder = FrameDecoder::default();
    let mut header = frame_bytes(frames[0].frame_type().as_u8(), &[]);
    header[..4].copy_from_slice(&3_000_000u32.to_be_bytes());
    decoder.push(&header);
    decoder.push(&[0; 10_000]);
    assert!(
        decoder.capacity() <= 2 * decoder.buffered(),
        "{} bytes of room for {} received",
        decoder.capacity(),
        decoder.buffered()
    );
}

#[test]
fn oversize_frame_is_refused_from_the_header_alone() {
    let mut decoder = FrameDecoder::new(100);
    decoder.push(&[0, 0, 0, 100]);
    assert_eq!(decoder.next_frame(), Ok(None), "100 bytes is allowed");

    let mut decoder = FrameDecoder::new(100);
    decoder.push(&[0, 0, 0]);
    assert_eq!(decoder.next_frame(), Ok(None));
    decoder.push(&[101]);
    let err = decoder.next_frame().unwrap_err();
    assert_eq!(err.code, ErrorCode::FrameTooLarge);
    assert!(
        err.message.contains("101") && err.message.contains("100"),
        "{err}"
    );

    // A limit learned from WELCOME applies to the next header.
    let mut decoder = FrameDecoder::new(100);
    decoder.set_max_frame_bytes(200);
    decoder.push(&[0, 0, 0, 150]);
    assert_eq!(decoder.next_frame(), Ok(None));
    assert_eq!(decoder.max_frame_bytes(), 200);
}

#[test]
fn unknown_type_is_refused_before_the_body_arrives() {
    let mut decoder = FrameDecoder::default();
    let mut ok = Vec::new();
    Frame::Ping(1).encode(&mut ok);
    decoder.push(&ok);
    decoder.push(&[0, 0, 1, 0, 0x7F]);
    assert_eq!(decoder.next_frame(), Ok(Some(Frame::Ping(1))));
    let err = decoder.next_frame().unwrap_err();
    assert_eq!(err.code, ErrorCode::ProtocolError);
    assert!(err.message.contains("0x7f"), "{err}");
    assert!(err.message.contains("byte offset 17"), "{err}");
}

#[test]
fn errors_are_final() {
    let mut decoder = FrameDecoder::default();
    decoder.push(&[0, 0, 0, 0]);
    let err = decoder.next_frame().unwrap_err();
    assert!(err.message.contains("length 0"), "{err}");
    decoder.push(&Frame::Ping(1).encode_to_vec());
    assert_eq!(decoder.next_frame(), Err(err.clone()));
    assert_eq!(decoder.finish(), Err(err));
    assert_eq!(decoder.buffered(), 0);
}

#[test]
fn stream_ending_mid_frame_is_reported() {
    let bytes = Frame::Ack(Ack { seq: 1, count: 2 }).encode_to_vec();
    let mut decoder = FrameDecoder::default();
    decoder.push(&bytes[..10]);
    assert_eq!(decoder.next_frame(), Ok(None));
    let err = decoder.finish().unwrap_err();
    assert!(err.message.contains("10 of 17 bytes"), "{err}");

    let mut decoder = FrameDecoder::default();
    decoder.push(&bytes[..2]);
    let err = decoder.finish().unwrap_err();
    assert!(err.message.contains("2 of the 4 length bytes"), "{err}");
}

fn frame_bytes(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len() + 1)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    out.push(ty);
    out.extend_from_slice(body);
    out
}

fn events_body(name: &[u8], name_len: u8) -> Vec<u8> {
    let mut body = 9u64.to_be_bytes().to_vec();
    body.push(name_len);
    body.extend_from_slice(name);
    body.push(1);
    body.extend_from_slice(b"{}");
    body
}

#[test]
fn malformed_events_headers() {
    let check = |body: &[u8], needle: &str| {
        let err = decode_one(&frame_bytes(0x03, body)).unwrap_err();
        assert_eq!(err.code, ErrorCode::ProtocolError);
        assert!(err.message.contains(needle), "{needle:?} not in {err}");
        assert!(
            err.message.contains("EVENTS frame at byte offset 0"),
            "{err}"
        );
    };
    check(&[0; 5], "8-byte seq");
    check(&[0; 8], "stream name length");
    check(&events_body(&[b'a'; 65], 65), "length 65");
    check(&events_body(b"", 0), "length 0");
    check(&events_body(&[0xff, 0xfe], 2), "not UTF-8");
    // Name length pointing past the end of the body.
    let mut body = 1u64.to_be_bytes().to_vec();
    body.extend_from_slice(&[10, b'a', b'b']);
    check(&body, "10-byte stream name");

    // 64 bytes is the longest name; a payload may be empty.
    let frame = decode_one(&frame_bytes(0x03, &events_body(&[b'a'; 64], 64))).unwrap();
    let Frame::Events(events) = frame else {
        panic!("{frame:?}")
    };
    assert_eq!(events.stream.len(), 64);
    assert_eq!(events.payload, Bytes::from_static(b"{}"));
}

#[test]
fn fixed_size_bodies_must_be_exact() {
    for (ty, len) in [(0x04u8, 12usize), (0x08, 8), (0x09, 8)] {
        for wrong in [len - 1, len + 1, 0] {
            let err = decode_one(&frame_bytes(ty, &vec![0; wrong])).unwrap_err();
            assert!(
                err.message.contains(&format!("expected exactly {len}")),
                "{err}"
            );
        }
    }
    let err = decode_one(&frame_bytes(0x05, &[0; 7])).unwrap_err();
    assert!(err.message.contains("REJECT"), "{err}");
}

#[test]
fn json_bodies_are_checked_and_unknown_keys_ignored() {
    let ack = decode_one(&frame_bytes(0x07, br#"{"id":"c1","extra":[1,2]}"#)).unwrap();
    assert_eq!(ack, Frame::CommandAck(CommandAck::acknowledged("c1")));

    // Answers: a null response is no response, a failure keeps its reason,
    // an unknown status is refused.
    let ack = decode_one(&frame_bytes(
        0x07,
        br#"{"id":"c1","status":"failed","reason":"stalled","response":null}"#,
    ))
    .unwrap();
    assert_eq!(
        ack,
        Frame::CommandAck(CommandAck {
            status: Some(AckStatus::Failed),
            reason: Some("stalled".into()),
            ..CommandAck::acknowledged("c1")
        })
    );
    let err = decode_one(&frame_bytes(0x07, br#"{"id":"c1","status":"maybe"}"#)).unwrap_err();
    assert_eq!(err.code, ErrorCode::ProtocolError);

    // `call` is optional, and absent when false.
    let body = br#"{"id":"c","name":"n","payload":1,"created_at":"2025-01-02T03:04:05.000Z","expires_at":"2025-01-02T04:04:05.000Z","call":false}"#;
    let Frame::Command(cmd) = decode_one(&frame_bytes(0x06, body)).unwrap() else {
        panic!()
    };
    assert!(!cmd.call);
    let encoded = Frame::Command(cmd).encode_to_vec();
    assert!(!String::from_utf8_lossy(&encoded).contains("call"));

    let err = decode_one(&frame_bytes(0x07, br#"{"id":5}"#)).unwrap_err();
    assert_eq!(err.code, ErrorCode::ProtocolError);
    assert!(
        err.message
            .starts_with("COMMAND_ACK frame at byte offset 0: invalid JSON body")
    );

    let err = decode_one(&frame_bytes(0x02, b"\xff\xfe")).unwrap_err();
    assert_eq!(err.code, ErrorCode::ProtocolError);

    let bad_time = br#"{"id":"c","name":"n","payload":null,"created_at":"yesterday","expires_at":"2025-01-01T00:00:00Z"}"#;
    let err = decode_one(&frame_bytes(0x06, bad_time)).unwrap_err();
    assert!(err.message.contains("yesterday"), "{err}");

    // Timestamps with any offset are read as UTC.
    let body = br#"{"id":"c","name":"n","payload":{},"created_at":"2025-01-02T05:04:05+02:00","expires_at":"2025-01-02T04:04:05.000Z"}"#;
    let Frame::Command(cmd) = decode_one(&frame_bytes(0x06, body)).unwrap() else {
        panic!()
    };
    assert_eq!(cmd.created_at, command().created_at);

    // REJECT without `event` / `field` keys still decodes.
    let mut body = 3u64.to_be_bytes().to_vec();
    body.extend_from_slice(br#"{"code":"empty_frame","message":"no events"}"#);
    let Frame::Reject(reject) = decode_one(&frame_bytes(0x05, &body)).unwrap() else {
        panic!()
    };
    assert_eq!(
        (reject.seq, reject.code, reject.event),
        (3, RejectCode::EmptyFrame, None)
    );
}

#[test]
fn codes_from_newer_peers_still_decode() {
    let mut body = 3u64.to_be_bytes().to_vec();
    body.extend_from_slice(br#"{"code":"quota_exceeded","message":"m","event":null,"field":null}"#);
    let Frame::Reject(reject) = decode_one(&frame_bytes(0x05, &body)).unwrap() else {
        panic!()
    };
    assert_eq!(reject.code, RejectCode::Unknown);
    assert!(!reject.code.is_retryable());

    let frame = decode_one(&frame_bytes(
        0x0F,
        br#"{"code":"maintenance","message":"m"}"#,
    ))
    .unwrap();
    let Frame::Error(body) = frame else { panic!() };
    assert_eq!(body.code, ErrorCode::Unknown);
}

#[test]
fn hello_of_another_version_is_unsupported_not_malformed() {
    // A future HELLO shape: only `version` is readable.
    let err = decode_one(&frame_bytes(0x01, br#"{"version":2,"identity":{"x":1}}"#)).unwrap_err();
    assert_eq!(err.code, ErrorCode::UnsupportedVersion);
    assert!(err.message.contains("version 2") && err.message.contains("supported versions: 1"));
    let body = ErrorBody::from(&err);
    assert_eq!(body.supported_versions, Some(vec![1]));

    // A v1 body that is broken is a protocol error.
    let err = decode_one(&frame_bytes(0x01, br#"{"version":1,"device_id":"d"}"#)).unwrap_err();
    assert_eq!(err.code, ErrorCode::ProtocolError);
    assert!(err.message.contains("token"), "{err}");

    // Tokens stay out of logs.
    let hello = Hello {
        version: 1,
        device_id: "d".into(),
        token: "s3cr3t".into(),
        commands: true,
        idempotent: false,
        group: Some("g".into()),
        twin: true,
    };
    assert!(!format!("{:?}", Frame::Hello(hello)).contains("s3cr3t"));
    let renew = Frame::Renew(Renew {
        token: "s3cr3t".into(),
    });
    assert!(!format!("{renew:?}").contains("s3cr3t"));

    // A well-formed HELLO of another version decodes; the session refuses it.
    let frame = decode_one(&frame_bytes(
        0x01,
        br#"{"version":7,"device_id":"d","token":"t"}"#,
    ))
    .unwrap();
    assert!(matches!(frame, Frame::Hello(Hello { version: 7, .. })));
}

#[test]
fn codes_and_directions() {
    let closes: Vec<_> = ErrorCode::ALL.iter().map(|c| c.close_code()).collect();
    assert_eq!(closes, [1, 2, 3, 4, 5, 6, 7]);
    for code in ErrorCode::ALL {
        assert_eq!(
            ErrorCode::from_close_code(code.close_code().into()),
            Some(code)
        );
        assert_eq!(
            serde_json::to_value(code).unwrap(),
            json!(code.as_str()),
            "serde and as_str agree"
        );
    }
    assert_eq!(ErrorCode::from_close_code(CLOSE_NORMAL.into()), None);
    assert_eq!(ErrorCode::from_close_code(99), None);
    assert_eq!(
        ProtocolError::protocol("bad").to_string(),
        "protocol_error: bad"
    );

    let reject_codes = [
        RejectCode::UnknownStream,
        RejectCode::InvalidJson,
        RejectCode::InvalidEvent,
        RejectCode::UnknownField,
        RejectCode::InvalidField,
        RejectCode::InvalidDeviceId,
        RejectCode::TooManyEvents,
        RejectCode::EmptyFrame,
        RejectCode::UnsupportedEncoding,
        RejectCode::InvalidArrow,
        RejectCode::Unavailable,
    ];
    for code in reject_codes {
        assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        assert!(
            SPEC.contains(&format!("| `{}` |", code.as_str())),
            "{code} documented"
        );
        assert_eq!(code.is_retryable(), code == RejectCode::Unavailable);
    }
    for code in ErrorCode::ALL {
        assert!(
            SPEC.contains(&format!("| `{}` | `0x{:02x}` |", code, code.close_code())),
            "{code} documented with its close code"
        );
    }
    for code in RefusedCode::ALL {
        assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        assert!(
            SPEC.contains(&format!("| `{}` | RENEW |", code.as_str()))
                || SPEC.contains(&format!("| `{}` | REPORT |", code.as_str()))
                || SPEC.contains(&format!("| `{}` | both |", code.as_str())),
            "REFUSED code {code} documented"
        );
        assert_eq!(code.is_retryable(), code == RefusedCode::Unavailable);
    }

    for byte in 0..=255u8 {
        if let Some(ty) = FrameType::from_u8(byte) {
            assert_eq!(ty.as_u8(), byte);
            assert!(ty.sent_by_client() || ty.sent_by_server(), "{}", ty.name());
            assert!(SPEC.contains(&format!("| `0x{byte:02X}` | {} |", ty.name())));
        }
    }
    assert!(FrameType::Events.sent_by_client() && !FrameType::Events.sent_by_server());
    assert!(FrameType::Ping.sent_by_client() && FrameType::Ping.sent_by_server());
    for ty in [FrameType::Renew, FrameType::Report] {
        assert!(ty.sent_by_client() && !ty.sent_by_server(), "{}", ty.name());
    }
    for ty in [
        FrameType::Renewed,
        FrameType::Desired,
        FrameType::Reported,
        FrameType::Refused,
    ] {
        assert!(ty.sent_by_server() && !ty.sent_by_client(), "{}", ty.name());
    }
    assert_eq!(Encoding::from_u8(1), Encoding::Json);
    assert_eq!(Encoding::from_u8(2), Encoding::Arrow);
    assert_eq!(Encoding::from_u8(3), Encoding::Unknown(3));
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Feeds `bytes` in random pieces and drains the decoder, as a server would.
fn drain(bytes: &[u8], rng: &mut Rng, max: u32) {
    let mut decoder = FrameDecoder::new(max);
    let mut rest = bytes;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(rng.below(rest.len()) + 1);
        rest = tail;
        decoder.push(piece);
        while let Ok(Some(frame)) = decoder.next_frame() {
            // Whatever decodes must survive a round trip.
            assert_eq!(decode_one(&frame.encode_to_vec()), Ok(frame));
        }
    }
    let _ = decoder.finish();
}

#[test]
fn garbage_never_panics() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let valid: Vec<Vec<u8>> = all_frames().iter().map(Frame::encode_to_vec).collect();
    for round in 0..20_000 {
        let bytes: Vec<u8> = match round % 3 {
            // Pure noise, biased towards small lengths so bodies get parsed.
            0 => {
                let len = rng.below(64);
                let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if b.len() >= 5 {
                    b[..3].fill(0);
                    b[4] = (rng.below(16)) as u8;
                }
                b
            }
            // A valid frame with a few bytes flipped.
            1 => {
                let mut b = valid[rng.below(valid.len())].clone();
                for _ in 0..=rng.below(3) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                b
            }
            // A valid frame, truncated or with a wrong length field.
            _ => {
                let mut b = valid[rng.below(valid.len())].clone();
                if rng.below(2) == 0 {
                    b.truncate(rng.below(b.len()));
                } else if b.len() >= 4 {
                    let len = rng.next() as u32 % 300;
                    b[..4].copy_from_slice(&len.to_be_bytes());
                }
                b
            }
        };
        drain(&bytes, &mut rng, 256);
    }
}

#[test]
fn malformed_twin_and_renewal_frames_are_protocol_errors() {
    let check = |ty: u8, body: &[u8], needle: &str| {
        let err = decode_one(&frame_bytes(ty, body)).unwrap_err();
        assert_eq!(err.code, ErrorCode::ProtocolError, "{err}");
        assert!(err.message.contains(needle), "{needle:?} not in {err}");
    };
    check(
        0x0A,
        br#"{}"#,
        "RENEW frame at byte offset 0: invalid JSON body",
    );
    check(0x0A, br#"{"token":7}"#, "RENEW");
    check(0x0D, br#"{"id":1,"patch":[1]}"#, "REPORT frame");
    check(0x0D, br#"{"id":-1,"patch":{}}"#, "REPORT frame");
    check(0x0D, br#"{"patch":{}}"#, "id");
    check(0x0D, br#"{"id":1,"patch":{},"replace":"yes"}"#, "REPORT");
    check(0x0C, br#"{"version":1,"properties":null}"#, "DESIRED");
    check(0x0E, br#"{"id":1}"#, "version");
    check(0x0B, br#"{"expires_at":"soon"}"#, "RENEWED");
    check(
        0x10,
        br#"{"request":"RENEW","id":null,"code":"unauthorized"}"#,
        "message",
    );
    // Nested too deep for the JSON reader: an error, not a stack overflow.
    let mut deep = br#"{"id":1,"patch":{"a":"#.to_vec();
    deep.extend(std::iter::repeat_n(b'[', 100_000));
    check(0x0D, &deep, "REPORT");

    // A missing `replace` is false, a missing `expires_at` null; unknown
    // requests and codes from a newer server still decode.
    let report = decode_one(&frame_bytes(
        0x0D,
        br#"{"id":2,"patch":{"x":1},"more":true}"#,
    ));
    assert_eq!(
        report,
        Ok(Frame::Report(Report {
            id: 2,
            patch: object(json!({"x": 1})),
            replace: false,
        }))
    );
    assert_eq!(
        decode_one(&frame_bytes(0x0B, b"{}")),
        Ok(Frame::Renewed(Renewed { expires_at: None }))
    );
    let refused = decode_one(&frame_bytes(
        0x10,
        br#"{"request":"RESET","id":3,"code":"quota","message":"m"}"#,
    ))
    .unwrap();
    let Frame::Refused(refused) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(refused.request, RefusedRequest::Unknown);
    assert_eq!(refused.code, RefusedCode::Unknown);
    assert!(!refused.code.is_retryable());
}
