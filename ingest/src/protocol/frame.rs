//! Frames: their types, their bodies and how they are written.

use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, ProtocolError, RefusedCode, RejectCode};
use super::{LENGTH_PREFIX_BYTES, SUPPORTED_VERSIONS};

/// The type byte that follows a frame's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Hello = 0x01,
    Welcome = 0x02,
    Events = 0x03,
    Ack = 0x04,
    Reject = 0x05,
    Command = 0x06,
    CommandAck = 0x07,
    Ping = 0x08,
    Pong = 0x09,
    Renew = 0x0A,
    Renewed = 0x0B,
    Desired = 0x0C,
    Report = 0x0D,
    Reported = 0x0E,
    Error = 0x0F,
    Refused = 0x10,
}

impl FrameType {
    /// The frame type a type byte stands for, if any.
    pub fn from_u8(byte: u8) -> Option<FrameType> {
        Some(match byte {
            0x01 => FrameType::Hello,
            0x02 => FrameType::Welcome,
            0x03 => FrameType::Events,
            0x04 => FrameType::Ack,
            0x05 => FrameType::Reject,
            0x06 => FrameType::Command,
            0x07 => FrameType::CommandAck,
            0x08 => FrameType::Ping,
            0x09 => FrameType::Pong,
            0x0A => FrameType::Renew,
            0x0B => FrameType::Renewed,
            0x0C => FrameType::Desired,
            0x0D => FrameType::Report,
            0x0E => FrameType::Reported,
            0x0F => FrameType::Error,
            0x10 => FrameType::Refused,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The name the specification uses, for messages.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "HELLO",
            FrameType::Welcome => "WELCOME",
            FrameType::Events => "EVENTS",
            FrameType::Ack => "ACK",
            FrameType::Reject => "REJECT",
            FrameType::Command => "COMMAND",
            FrameType::CommandAck => "COMMAND_ACK",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Renew => "RENEW",
            FrameType::Renewed => "RENEWED",
            FrameType::Desired => "DESIRED",
            FrameType::Report => "REPORT",
            FrameType::Reported => "REPORTED",
            FrameType::Error => "ERROR",
            FrameType::Refused => "REFUSED",
        }
    }

    /// Whether a client may send this frame type. Receiving a frame its
    /// sender may not send is a `protocol_error`; the session layer checks.
    pub fn sent_by_client(self) -> bool {
        matches!(
            self,
            FrameType::Hello
                | FrameType::Events
                | FrameType::CommandAck
                | FrameType::Ping
                | FrameType::Pong
                | FrameType::Renew
                | FrameType::Report
        )
    }

    /// Whether a server may send this frame type.
    pub fn sent_by_server(self) -> bool {
        matches!(
            self,
            FrameType::Welcome
                | FrameType::Ack
                | FrameType::Reject
                | FrameType::Command
                | FrameType::Ping
                | FrameType::Pong
                | FrameType::Error
                | FrameType::Renewed
                | FrameType::Desired
                | FrameType::Reported
                | FrameType::Refused
        )
    }
}

/// One protocol frame, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Events(Events),
    Ack(Ack),
    Reject(Reject),
    Command(Command),
    CommandAck(CommandAck),
    /// Keep-alive probe with its nonce; answered by [`Frame::Pong`].
    Ping(u64),
    /// Answer to [`Frame::Ping`], echoing its nonce.
    Pong(u64),
    Renew(Renew),
    Renewed(Renewed),
    Desired(Desired),
    Report(Report),
    Reported(Reported),
    Error(ErrorBody),
    Refused(Refused),
}

/// HELLO (client → server), the first frame of every session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub device_id: String,
    pub token: String,
    /// Whether this session wants COMMAND frames (default true). A process
    /// that only sends events says false, so commands go to the device's
    /// listening sessions.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub commands: bool,
    /// Whether EVENTS `seq` numbers are the device's own, strictly
    /// increasing across connections and restarts (default false). The
    /// server then stores a resent frame once (protocol.md, section 7).
    #[serde(default, skip_serializing_if = "is_false")]
    pub idempotent: bool,
    /// The enrollment group the device belongs to: the server enrolls a
    /// device it does not know yet with the group's tags, its token signed
    /// with a key derived from the group's (protocol.md, section 4.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Whether the client understands DESIRED frames (default false): only
    /// then does the server send the device's desired properties. Clients
    /// written before twins would take the unknown frame type for a
    /// protocol error.
    #[serde(default, skip_serializing_if = "is_false")]
    pub twin: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Frames end up in logs; the token must not.
impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("device_id", &self.device_id)
            .field("token", &"<redacted>")
            .field("commands", &self.commands)
            .field("idempotent", &self.idempotent)
            .field("group", &self.group)
            .field("twin", &self.twin)
            .finish()
    }
}

/// WELCOME (server → client): the device is authenticated; these are the
/// limits the server enforces on this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u32,
    pub device_id: String,
    pub max_frame_bytes: u32,
    pub max_events_per_frame: u32,
}

/// EVENTS (client → server): a batch of events for one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Events {
    pub seq: u64,
    pub stream: String,
    pub encoding: Encoding,
    /// The encoded events, shared with the receive buffer (no copy).
    pub payload: Bytes,
}

/// How an EVENTS payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// 0x01: one JSON object, an array of objects, or JSON lines.
    Json,
    /// 0x02: an Arrow IPC stream (schema, record batches, optional
    /// end-of-stream marker).
    Arrow,
    /// Any other byte. Reserved: the server answers `unsupported_encoding`
    /// rather than failing the connection, so the frame still decodes.
    Unknown(u8),
}

impl Encoding {
    pub fn from_u8(byte: u8) -> Encoding {
        match byte {
            0x01 => Encoding::Json,
            0x02 => Encoding::Arrow,
            other => Encoding::Unknown(other),
        }
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Encoding::Json => 0x01,
            Encoding::Arrow => 0x02,
            Encoding::Unknown(byte) => byte,
        }
    }
}

/// ACK (server → client): the EVENTS frame `seq` is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
    /// Number of events appended.
    pub count: u32,
}

/// REJECT (server → client): the EVENTS frame `seq` was refused and nothing
/// of it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub seq: u64,
    pub code: RejectCode,
    pub message: String,
    /// 0-based index of the first bad event, when one event is to blame.
    pub event: Option<usize>,
    /// The offending field of that event, when one field is to blame.
    pub field: Option<String>,
    /// With `rate_limited`: how long to wait before sending again, in
    /// milliseconds. Absent from the JSON otherwise.
    pub retry_after_ms: Option<u64>,
}

/// The JSON part of REJECT; `event` and `field` are always present, as null
/// when unknown, so clients need not special-case missing keys;
/// `retry_after_ms` only when it applies.
#[derive(Serialize)]
struct RejectJsonOut<'a> {
    code: RejectCode,
    message: &'a str,
    event: Option<usize>,
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

#[derive(Deserialize)]
struct RejectJsonIn {
    code: RejectCode,
    message: String,
    #[serde(default)]
    event: Option<usize>,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// COMMAND (server → client): a queued command for this device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique id; a command may be delivered more than once, so clients
    /// deduplicate by it.
    pub id: String,
    pub name: String,
    pub payload: serde_json::Value,
    /// Written as RFC 3339 in UTC with millisecond precision.
    #[serde(with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// After this instant the command is no longer delivered.
    #[serde(with = "rfc3339")]
    pub expires_at: DateTime<Utc>,
    /// A caller waits for the device's answer (a direct method call): the
    /// device should answer with a `response`. Absent from the JSON when
    /// false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub call: bool,
}

/// COMMAND_ACK (client → server): the device's answer to command `id`.
/// `{"id": ...}` alone acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    pub id: String,
    /// How the command ended; `acknowledged` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AckStatus>,
    /// Why it was rejected or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The answer to a call: any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<serde_json::Value>,
}

impl CommandAck {
    /// A plain acknowledgement: `{"id": ...}`.
    pub fn acknowledged(id: impl Into<String>) -> Self {
        CommandAck {
            id: id.into(),
            status: None,
            reason: None,
            response: None,
        }
    }
}

/// How a device says a command ended, in COMMAND_ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// Done (the default).
    Acknowledged,
    /// The device will not do it (unknown command, bad arguments, busy).
    Rejected,
    /// The device tried and failed.
    Failed,
}

/// RENEW (client → server): a new token for the session's device, to go on
/// past the expiry of the one it authenticated with.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renew {
    pub token: String,
}

/// Frames end up in logs; the token must not.
impl fmt::Debug for Renew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Renew")
            .field("token", &"<redacted>")
            .finish()
    }
}

/// RENEWED (server → client): the session runs on the RENEW's token now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewed {
    /// When the new token expires, seconds since the Unix epoch; `None`
    /// (JSON null) for a legacy token, which does not expire.
    pub expires_at: Option<u64>,
}

/// DESIRED (server → client): the device's desired properties, whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    /// Goes up by one with every change; a client applies only a version
    /// newer than the last one it applied.
    pub version: u64,
    pub properties: serde_json::Map<String, serde_json::Value>,
}

/// REPORT (client → server): a change to the device's reported properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Chosen by the client; the answer carries it.
    pub id: u64,
    /// A JSON merge patch (RFC 7386), or with `replace` the whole object.
    pub patch: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub replace: bool,
}

/// REPORTED (server → client): the REPORT `id` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub id: u64,
    /// The reported properties' version after the change.
    pub version: u64,
}

/// REFUSED (server → client): a RENEW or REPORT was not carried out. Not
/// fatal: the session goes on as before the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The frame type refused.
    pub request: RefusedRequest,
    /// The REPORT's `id`; `None` (JSON null) for RENEW.
    pub id: Option<u64>,
    pub code: RefusedCode,
    pub message: String,
}

/// Which request a REFUSED answers, by its frame name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefusedRequest {
    #[serde(rename = "RENEW")]
    Renew,
    #[serde(rename = "REPORT")]
    Report,
    /// A request this build does not know, from a newer server. Never sent.
    #[serde(other)]
    Unknown,
}

/// ERROR (server → client): a fatal error; the connection closes after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// Only with `unsupported_version`: the versions the server speaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_versions: Option<Vec<u32>>,
}

impl From<&ProtocolError> for ErrorBody {
    fn from(err: &ProtocolError) -> Self {
        ErrorBody {
            code: err.code,
            message: err.message.clone(),
            supported_versions: (err.code == ErrorCode::UnsupportedVersion)
                .then(|| SUPPORTED_VERSIONS.to_vec()),
        }
    }
}

impl From<ProtocolError> for ErrorBody {
    fn from(err: ProtocolError) -> Self {
        ErrorBody::from(&err)
    }
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Events(_) => FrameType::Events,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Reject(_) => FrameType::Reject,
            Frame::Command(_) => FrameType::Command,
            Frame::CommandAck(_) => FrameType::CommandAck,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Renew(_) => FrameType::Renew,
            Frame::Renewed(_) => FrameType::Renewed,
            Frame::Desired(_) => FrameType::Desired,
            Frame::Report(_) => FrameType::Report,
            Frame::Reported(_) => FrameType::Reported,
            Frame::Error(_) => FrameType::Error,
            Frame::Refused(_) => FrameType::Refused,
        }
    }

    /// Appends the frame, length prefix included, to `out`.
    ///
    /// The caller keeps frames within the peer's `max_frame_bytes`; only an
    /// EVENTS payload can grow large, so a client checks its payload size
    /// before building the frame. A frame longer than `u32::MAX` (which no
    /// peer accepts) gets the length `u32::MAX`, so the peer fails it with
    /// `frame_too_large` rather than misreading the stream.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; LENGTH_PREFIX_BYTES]);
        out.push(self.frame_type().as_u8());
        match self {
            Frame::Hello(body) => write_json(out, body),
            Frame::Welcome(body) => write_json(out, body),
            Frame::Events(events) => {
                out.extend_from_slice(&events.seq.to_be_bytes());
                // Longer names are the caller's bug; the receiver rejects any
                // name over 64 bytes, so saturating cannot go unnoticed.
                let name = events.stream.as_bytes();
                out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(name);
                out.push(events.encoding.as_u8());
                out.extend_from_slice(&events.payload);
            }
            Frame::Ack(ack) => {
                out.extend_from_slice(&ack.seq.to_be_bytes());
                out.extend_from_slice(&ack.count.to_be_bytes());
            }
            Frame::Reject(reject) => {
                out.extend_from_slice(&reject.seq.to_be_bytes());
                write_json(
                    out,
                    &RejectJsonOut {
                        code: reject.code,
                        message: &reject.message,
                        event: reject.event,
                        field: reject.field.as_deref(),
                        retry_after_ms: reject.retry_after_ms,
                    },
                );
            }
            Frame::Command(body) => write_json(out, body),
            Frame::CommandAck(body) => write_json(out, body),
            Frame::Ping(nonce) | Frame::Pong(nonce) => out.extend_from_slice(&nonce.to_be_bytes()),
            Frame::Renew(body) => write_json(out, body),
            Frame::Renewed(body) => write_json(out, body),
            Frame::Desired(body) => write_json(out, body),
            Frame::Report(body) => write_json(out, body),
            Frame::Reported(body) => write_json(out, body),
            Frame::Error(body) => write_json(out, body),
            Frame::Refused(body) => write_json(out, body),
        }
        let len = out.len() - start - LENGTH_PREFIX_BYTES;
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        out[start..start + LENGTH_PREFIX_BYTES].copy_from_slice(&len.to_be_bytes());
    }

    /// The frame as a new buffer, length prefix included.
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes one frame's body. `offset` is where the frame starts in the
    /// session stream, for messages.
    pub(super) fn decode_body(
        ty: FrameType,
        body: Bytes,
        offset: u64,
    ) -> Result<Frame, ProtocolError> {
        let at = || format!("{} frame at byte offset {offset}", ty.name());
        Ok(match ty {
            FrameType::Hello => Frame::Hello(decode_hello(&body, &at)?),
            FrameType::Welcome => Frame::Welcome(read_json(&body, &at)?),
            FrameType::Events => Frame::Events(decode_events(body, &at)?),
            FrameType::Ack => {
                let (seq, count) = split_ack(fixed::<12>(&body, &at)?);
                Frame::Ack(Ack {
                    seq: u64::from_be_bytes(seq),
                    count: u32::from_be_bytes(count),
                })
            }
            FrameType::Reject => {
                let Some((seq, json)) = body.split_first_chunk::<8>() else {
                    return Err(ProtocolError::protocol(format!(
                        "{}: body is {} bytes, shorter than its 8-byte seq",
                        at(),
                        body.len()
                    )));
                };
                let json: RejectJsonIn = read_json(json, &at)?;
                Frame::Reject(Reject {
                    seq: u64::from_be_bytes(*seq),
                    code: json.code,
                    message: json.message,
                    event: json.event,
                    field: json.field,
                    retry_after_ms: json.retry_after_ms,
                })
            }
            FrameType::Command => Frame::Command(read_json(&body, &at)?),
            FrameType::CommandAck => Frame::CommandAck(read_json(&body, &at)?),
            FrameType::Ping => Frame::Ping(u64::from_be_bytes(fixed::<8>(&body, &at)?)),
            FrameType::Pong => Frame::Pong(u64::from_be_bytes(fixed::<8>(&body, &at)?)),
            FrameType::Renew => Frame::Renew(read_json(&body, &at)?),
            FrameType::Renewed => Frame::Renewed(read_json(&body, &at)?),
            FrameType::Desired => Frame::Desired(read_json(&body, &at)?),
            FrameType::Report => Frame::Report(read_json(&body, &at)?),
            FrameType::Reported => Frame::Reported(read_json(&body, &at)?),
            FrameType::Error => Frame::Error(read_json(&body, &at)?),
            FrameType::Refused => Frame::Refused(read_json(&body, &at)?),
        })
    }
}

/// Serializes a body that cannot fail to serialize: every field is a
/// string, number, bool, `serde_json::Value` (whose map keys are strings) or
/// a timestamp written as a string, and `Vec`'s writer never fails.
fn write_json<T: Serialize>(out: &mut Vec<u8>, body: &T) {
    if let Err(err) = serde_json::to_writer(&mut *out, body) {
        unreachable!("frame bodies always serialize: {err}");
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(
    body: &[u8],
    at: &dyn Fn() -> String,
) -> Result<T, ProtocolError> {
    serde_json::from_slice(body)
        .map_err(|err| ProtocolError::protocol(format!("{}: invalid JSON body: {err}", at())))
}

/// HELLO is where versions are negotiated, so a body that does not parse as a
/// v1 HELLO but names another version is `unsupported_version`, not a
/// protocol error: a future version may well change the other fields.
fn decode_hello(body: &[u8], at: &dyn Fn() -> String) -> Result<Hello, ProtocolError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u64,
    }
    match serde_json::from_slice::<Hello>(body) {
        Ok(hello) => Ok(hello),
        Err(err) => match serde_json::from_slice::<VersionOnly>(body) {
            Ok(v)
                if !SUPPORTED_VERSIONS
                    .iter()
                    .any(|s| u64::from(*s) == v.version) =>
            {
                Err(ProtocolError::unsupported_version(v.version))
            }
            _ => Err(ProtocolError::protocol(format!(
                "{}: invalid JSON body: {err}",
                at()
            ))),
        },
    }
}

fn decode_events(body: Bytes, at: &dyn Fn() -> String) -> Result<Events, ProtocolError> {
    // seq (8) + name length (1) come first; the name starts at byte 9.
    const NAME_START: usize = 9;
    let short = |what: &str| {
        ProtocolError::protocol(format!(
            "{}: body is {} bytes, too short for {what}",
            at(),
            body.len()
        ))
    };
    let Some((seq, rest)) = body.split_first_chunk::<8>() else {
        return Err(short("its 8-byte seq"));
    };
    let seq = u64::from_be_bytes(*seq);
    let Some((&name_len, _)) = rest.split_first() else {
        return Err(short("its stream name length"));
    };
    let name_len = usize::from(name_len);
    if name_len == 0 || name_len > super::MAX_STREAM_NAME_BYTES {
        return Err(ProtocolError::protocol(format!(
            "{}: stream name length {name_len} at body byte 8 is outside 1..={}",
            at(),
            super::MAX_STREAM_NAME_BYTES
        )));
    }
    let encoding_at = NAME_START + name_len;
    let Some(&encoding) = body.get(encoding_at) else {
        return Err(short(&format!(
            "a {name_len}-byte stream name and the encoding byte"
        )));
    };
    let stream = std::str::from_utf8(&body[NAME_START..encoding_at]).map_err(|err| {
        ProtocolError::protocol(format!(
            "{}: stream name is not UTF-8 ({err}; name starts at body byte {NAME_START})",
            at()
        ))
    })?;
    Ok(Events {
        seq,
        stream: stream.to_owned(),
        encoding: Encoding::from_u8(encoding),
        payload: body.slice(encoding_at + 1..),
    })
}

/// A body that must be exactly `N` bytes long.
fn fixed<const N: usize>(body: &[u8], at: &dyn Fn() -> String) -> Result<[u8; N], ProtocolError> {
    <[u8; N]>::try_from(body).map_err(|_| {
        ProtocolError::protocol(format!(
            "{}: body is {} bytes, expected exactly {N}",
            at(),
            body.len()
        ))
    })
}

/// Splits ACK's fixed 12-byte body into its `seq` and `count`.
fn split_ack(body: [u8; 12]) -> ([u8; 8], [u8; 4]) {
    let mut seq = [0; 8];
    let mut count = [0; 4];
    seq.copy_from_slice(&body[..8]);
    count.copy_from_slice(&body[8..]);
    (seq, count)
}

/// RFC 3339 timestamps in UTC with millisecond precision, the format the
/// rest of Tributary's JSON uses. Any offset is accepted when reading.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|err| D::Error::custom(format!("invalid RFC 3339 timestamp {text:?}: {err}")))
    }
}
