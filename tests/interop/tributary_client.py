"""Independent Python client for the Tributary device protocol, version 1.

Written from docs/protocol.md and docs/security.md alone (no server source),
on top of aioquic. Pieces:

* token derivation (security.md section 2) and group key derivation
  (security.md section 6);
* a sans-IO frame codec (protocol.md section 3 and 5): ``encode_frame``,
  ``FrameDecoder`` and ``parse_frame``;
* ``TributaryClient``: an asyncio session over QUIC + TLS 1.3 with ALPN
  ``tributary/1``, one bidirectional session stream.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# --------------------------------------------------------------------------
# Constants (protocol.md sections 1, 3, 9)
# --------------------------------------------------------------------------

ALPN = "tributary/1"
PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024

HELLO = 0x01
WELCOME = 0x02
EVENTS = 0x03
ACK = 0x04
REJECT = 0x05
COMMAND = 0x06
COMMAND_ACK = 0x07
PING = 0x08
PONG = 0x09
RENEW = 0x0A
RENEWED = 0x0B
DESIRED = 0x0C
REPORT = 0x0D
REPORTED = 0x0E
ERROR = 0x0F
REFUSED = 0x10

FRAME_NAMES = {
    HELLO: "HELLO", WELCOME: "WELCOME", EVENTS: "EVENTS", ACK: "ACK",
    REJECT: "REJECT", COMMAND: "COMMAND", COMMAND_ACK: "COMMAND_ACK",
    PING: "PING", PONG: "PONG", RENEW: "RENEW", RENEWED: "RENEWED",
    DESIRED: "DESIRED", REPORT: "REPORT", REPORTED: "REPORTED",
    ERROR: "ERROR", REFUSED: "REFUSED",
}
CLIENT_TO_SERVER = {HELLO, EVENTS, COMMAND_ACK, PING, PONG, RENEW, REPORT}
SERVER_TO_CLIENT = {WELCOME, ACK, REJECT, COMMAND, PING, PONG, RENEWED,
                    DESIRED, REPORTED, ERROR, REFUSED}
JSON_TYPES = {HELLO, WELCOME, COMMAND, COMMAND_ACK, RENEW, RENEWED, DESIRED,
              REPORT, REPORTED, ERROR, REFUSED}

ENCODING_JSON = 0x01

CLOSE_CODES = {
    "no_error": 0x00,
    "unauthorized": 0x01,
    "protocol_error": 0x02,
    "unsupported_version": 0x03,
    "frame_too_large": 0x04,
    "hello_timeout": 0x05,
    "server_shutdown": 0x06,
    "unavailable": 0x07,
}
CLOSE_NAMES = {v: k for k, v in CLOSE_CODES.items()}

# QUIC transport error codes we care about (RFC 9000 section 20.1, RFC 9001 4.8)
QUIC_CONNECTION_REFUSED = 0x02
QUIC_CRYPTO_ERROR_BASE = 0x0100


# --------------------------------------------------------------------------
# Credentials (security.md sections 2 and 6)
# --------------------------------------------------------------------------

def make_token(device_id: str, key_b64: str, expires_at: int) -> str:
    """``trb1.<expires_at>.<base64url-nopad(HMAC-SHA256(key, "trb1\\nid\\nexp"))>``."""
    if isinstance(expires_at, bool) or not isinstance(expires_at, int) or expires_at < 0:
        raise ValueError("expires_at must be a non-negative integer")
    if "\n" in device_id:
        raise ValueError("device ids cannot contain a newline")
    key = base64.b64decode(key_b64, validate=True)
    msg = b"trb1\n" + device_id.encode("utf-8") + b"\n" + str(expires_at).encode()
    sig = hmac.new(key, msg, hashlib.sha256).digest()
    return "trb1.%d.%s" % (expires_at, base64.urlsafe_b64encode(sig).rstrip(b"=").decode())


def derive_group_device_key(group_key: bytes, device_id: str) -> str:
    """Enrollment groups: ``device_key = HMAC-SHA256(group_key, device_id)``, base64."""
    return base64.b64encode(hmac.new(group_key, device_id.encode("utf-8"), hashlib.sha256).digest()).decode()


def token_expires_at(token: str) -> Optional[int]:
    parts = token.split(".")
    if len(parts) == 3 and parts[0] == "trb1" and parts[1].isdigit():
        return int(parts[1])
    return None


# Test vectors from docs/security.md
TOKEN_VECTOR = {
    "device_id": "sensor-1",
    "key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    "expires_at": 1767225600,
    "token": "trb1.1767225600.Tl0OYWa7mRgQ5blsrf7TEvpTvGBBfhjHw1Aan1ciTio",
}
GROUP_VECTOR = {
    "group_key_hex": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    "device_id": "sensor-1",
    "device_key": "n5hp4ukLeAS7SxeF5FRQVLr8H+gphAmzs4FeKjULmFc=",
}


def check_security_vectors() -> dict:
    tok = make_token(TOKEN_VECTOR["device_id"], TOKEN_VECTOR["key"], TOKEN_VECTOR["expires_at"])
    grp = derive_group_device_key(bytes.fromhex(GROUP_VECTOR["group_key_hex"]), GROUP_VECTOR["device_id"])
    return {
        "token": tok == TOKEN_VECTOR["token"],
        "token_got": tok,
        "group_key": grp == GROUP_VECTOR["device_key"],
        "group_key_got": grp,
    }


# --------------------------------------------------------------------------
# Frame codec (protocol.md sections 3 and 5)
# --------------------------------------------------------------------------

class FrameError(Exception):
    """A fatal framing error; ``code`` is one of the fatal codes of section 9."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Frame:
    type: int
    body: bytes
    fields: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return FRAME_NAMES.get(self.type, "0x%02x" % self.type)


def encode_frame(ftype: int, body: bytes) -> bytes:
    length = 1 + len(body)
    if length > 0xFFFFFFFF:
        raise ValueError("frame too long for a u32 length")
    return struct.pack(">IB", length, ftype) + body


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_json_frame(ftype: int, obj: dict) -> bytes:
    return encode_frame(ftype, _json_bytes(obj))


def encode_events(seq: int, stream: str, payload: bytes, encoding: int = ENCODING_JSON) -> bytes:
    name = stream.encode("utf-8")
    if not 1 <= len(name) <= 64:
        raise ValueError("stream name must be 1 to 64 bytes")
    return encode_frame(EVENTS, struct.pack(">QB", seq, len(name)) + name + bytes([encoding]) + payload)


def encode_ping(nonce: int, pong: bool = False) -> bytes:
    return encode_frame(PONG if pong else PING, struct.pack(">Q", nonce))


def _parse_json_object(body: bytes, what: str) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError("protocol_error", f"{what}: body is not UTF-8 JSON: {e}")
    if not isinstance(obj, dict):
        raise FrameError("protocol_error", f"{what}: body is not a JSON object")
    return obj


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require(obj: dict, key: str, check: Callable[[Any], bool], what: str, optional: bool = False):
    if key not in obj:
        if optional:
            return
        raise FrameError("protocol_error", f"{what}: missing key '{key}'")
    if not check(obj[key]):
        raise FrameError("protocol_error", f"{what}: key '{key}' has the wrong type: {obj[key]!r}")


_is_str = lambda v: isinstance(v, str)  # noqa: E731
_is_bool = lambda v: isinstance(v, bool)  # noqa: E731
_is_int_or_null = lambda v: v is None or _is_int(v)  # noqa: E731
_is_str_or_null = lambda v: v is None or isinstance(v, str)  # noqa: E731


def parse_frame(ftype: int, body: bytes) -> dict:
    """Decode a frame body into a dict of fields, validating the layout of section 5.

    Works for both directions (the vectors include client frames)."""
    name = FRAME_NAMES.get(ftype)
    if name is None:
        raise FrameError("protocol_error", "unknown frame type 0x%02x" % ftype)
    if ftype in (PING, PONG):
        if len(body) != 8:
            raise FrameError("protocol_error", f"{name} body must be 8 bytes, got {len(body)}")
        return {"nonce": struct.unpack(">Q", body)[0]}
    if ftype == ACK:
        if len(body) != 12:
            raise FrameError("protocol_error", f"ACK body must be 12 bytes, got {len(body)}")
        seq, count = struct.unpack(">QI", body)
        return {"seq": seq, "count": count}
    if ftype == REJECT:
        if len(body) < 8:
            raise FrameError("protocol_error", "REJECT body shorter than its seq")
        seq = struct.unpack(">Q", body[:8])[0]
        obj = _parse_json_object(body[8:], name)
        _require(obj, "code", _is_str, name)
        _require(obj, "message", _is_str, name)
        _require(obj, "event", _is_int_or_null, name, optional=True)
        _require(obj, "field", _is_str_or_null, name, optional=True)
        _require(obj, "retry_after_ms", _is_int, name, optional=True)
        return dict(obj, seq=seq)
    if ftype == EVENTS:
        if len(body) < 8 + 1:
            raise FrameError("protocol_error", "EVENTS body too short")
        seq = struct.unpack(">Q", body[:8])[0]
        slen = body[8]
        if not 1 <= slen <= 64:
            raise FrameError("protocol_error", f"EVENTS stream name length {slen} not in 1..64")
        if len(body) < 9 + slen + 1:
            raise FrameError("protocol_error", "EVENTS body too short for stream name and encoding")
        try:
            stream = body[9:9 + slen].decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("protocol_error", "EVENTS stream name is not UTF-8")
        encoding = body[9 + slen]
        payload = body[10 + slen:]
        out = {"seq": seq, "stream": stream, "encoding": encoding, "payload": payload}
        if encoding == ENCODING_JSON:
            out["events"] = parse_json_payload(payload)
        return out
    # JSON bodies
    obj = _parse_json_object(body, name)
    if ftype == HELLO:
        _require(obj, "version", _is_int, name)
        _require(obj, "device_id", _is_str, name)
        _require(obj, "token", _is_str, name)
        for k in ("commands", "idempotent", "twin"):
            _require(obj, k, _is_bool, name, optional=True)
        _require(obj, "group", _is_str, name, optional=True)
    elif ftype == WELCOME:
        _require(obj, "version", _is_int, name)
        _require(obj, "device_id", _is_str, name)
        _require(obj, "max_frame_bytes", _is_int, name)
        _require(obj, "max_events_per_frame", _is_int, name)
    elif ftype == COMMAND:
        _require(obj, "id", _is_str, name)
        _require(obj, "name", _is_str, name)
        if "payload" not in obj:
            raise FrameError("protocol_error", "COMMAND: missing key 'payload'")
        _require(obj, "created_at", _is_str, name)
        _require(obj, "expires_at", _is_str, name)
        _require(obj, "call", _is_bool, name, optional=True)
    elif ftype == COMMAND_ACK:
        _require(obj, "id", _is_str, name)
        _require(obj, "status", lambda v: v in ("acknowledged", "rejected", "failed"), name, optional=True)
        _require(obj, "reason", _is_str, name, optional=True)
    elif ftype == RENEW:
        _require(obj, "token", _is_str, name)
    elif ftype == RENEWED:
        if "expires_at" not in obj or not _is_int_or_null(obj["expires_at"]):
            raise FrameError("protocol_error", "RENEWED: expires_at must be an integer or null")
    elif ftype == DESIRED:
        _require(obj, "version", _is_int, name)
        _require(obj, "properties", lambda v: isinstance(v, dict), name)
    elif ftype == REPORT:
        _require(obj, "id", _is_int, name)
        _require(obj, "patch", lambda v: isinstance(v, dict), name)
        _require(obj, "replace", _is_bool, name, optional=True)
    elif ftype == REPORTED:
        _require(obj, "id", _is_int, name)
        _require(obj, "version", _is_int, name)
    elif ftype == ERROR:
        _require(obj, "code", _is_str, name)
        _require(obj, "message", _is_str, name)
        _require(obj, "supported_versions", lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
                 name, optional=True)
    elif ftype == REFUSED:
        _require(obj, "request", _is_str, name)
        if "id" not in obj or not _is_int_or_null(obj["id"]):
            raise FrameError("protocol_error", "REFUSED: id must be an integer or null")
        _require(obj, "code", _is_str, name)
        _require(obj, "message", _is_str, name)
    return obj


def parse_json_payload(payload: bytes) -> list:
    """Section 6: one object, an array of objects, or JSON lines (whitespace separated)."""
    text = payload.decode("utf-8")
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        return json.loads(stripped)
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete frames.

    ``max_frame_bytes`` is this receiver's limit on ``length`` (type byte plus
    body). Oversized lengths are detected from the 4 length bytes alone."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 allowed_types: Optional[set] = None):
        self.max_frame_bytes = max_frame_bytes
        self.allowed_types = allowed_types
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        self._buf += data
        frames = []
        while True:
            if len(self._buf) < 4:
                return frames
            length = struct.unpack(">I", self._buf[:4])[0]
            if length == 0:
                raise FrameError("protocol_error", "frame length 0")
            if self.max_frame_bytes and length > self.max_frame_bytes:
                raise FrameError("frame_too_large",
                                 f"frame length {length} exceeds the maximum {self.max_frame_bytes}")
            if len(self._buf) < 4 + length:
                return frames
            ftype = self._buf[4]
            body = bytes(self._buf[5:4 + length])
            del self._buf[:4 + length]
            if ftype not in FRAME_NAMES:
                raise FrameError("protocol_error", "unknown frame type 0x%02x" % ftype)
            if self.allowed_types is not None and ftype not in self.allowed_types:
                raise FrameError("protocol_error", f"frame {FRAME_NAMES[ftype]} sent in the wrong direction")
            frames.append(Frame(ftype, body, parse_frame(ftype, body)))

    @property
    def pending(self) -> int:
        return len(self._buf)


# --------------------------------------------------------------------------
# The asyncio session over aioquic
# --------------------------------------------------------------------------

class SessionClosed(Exception):
    def __init__(self, close: "CloseInfo", error: Optional[dict]):
        self.close = close
        self.error = error
        super().__init__(f"session closed: error={error} close={close}")


@dataclass
class CloseInfo:
    code: int
    application: bool          # application close (CONNECTION_CLOSE 0x1d) vs transport close
    reason: str
    by_peer: bool = True

    @property
    def name(self) -> str:
        if self.application:
            return CLOSE_NAMES.get(self.code, "0x%02x" % self.code)
        if self.code == QUIC_CONNECTION_REFUSED:
            return "CONNECTION_REFUSED"
        if QUIC_CRYPTO_ERROR_BASE <= self.code < QUIC_CRYPTO_ERROR_BASE + 0x100:
            return "CRYPTO_ERROR(alert %d)" % (self.code - QUIC_CRYPTO_ERROR_BASE)
        return "transport 0x%x" % self.code

    def as_dict(self) -> dict:
        return {"code": self.code, "name": self.name, "application": self.application,
                "reason": self.reason, "by_peer": self.by_peer}


def _make_protocol_class():
    from aioquic.asyncio.protocol import QuicConnectionProtocol
    from aioquic.quic import events as qev

    class _Proto(QuicConnectionProtocol):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.on_stream_data: Optional[Callable[[int, bytes, bool], None]] = None
            self.on_terminated: Optional[Callable[[Any], None]] = None
            self.on_reset: Optional[Callable[[int, int], None]] = None

        def quic_event_received(self, event) -> None:
            if isinstance(event, qev.StreamDataReceived):
                if self.on_stream_data:
                    self.on_stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, qev.StreamReset):
                if self.on_reset:
                    self.on_reset(event.stream_id, event.error_code)
            elif isinstance(event, qev.ConnectionTerminated):
                if self.on_terminated:
                    self.on_terminated(event)

    return _Proto


class TributaryClient:
    """One device session. Use ``await TributaryClient.connect(...)``.

    Server PINGs are answered with PONG automatically. COMMAND frames are
    collected (deduplicated by id) in ``commands``; DESIRED frames in
    ``desired``. If ``auto_ack_commands`` is true, COMMAND_ACK is sent as soon
    as a command arrives."""

    def __init__(self):
        self.proto = None
        self._ctx = None
        self.stream_id: Optional[int] = None
        self.decoder = FrameDecoder(allowed_types=SERVER_TO_CLIENT)
        self.welcome: Optional[dict] = None
        self.error: Optional[dict] = None          # the ERROR frame, if any
        self.close_info: Optional[CloseInfo] = None
        self.closed = asyncio.Event()
        self.frames_log: list = []                 # (name, fields) of every frame received
        self.commands: "asyncio.Queue[dict]" = asyncio.Queue()
        self.seen_command_ids: set = set()
        self.duplicate_commands: list = []
        self.desired: "asyncio.Queue[dict]" = asyncio.Queue()
        self.auto_ack_commands = False
        self.stream_finished_by_peer = False
        self.local_error: Optional[FrameError] = None
        self._welcome_fut: Optional[asyncio.Future] = None
        self._answers: dict = {}                   # seq -> Future(ACK/REJECT fields)
        self._pongs: dict = {}                     # nonce -> Future
        self._renews: list = []                    # FIFO of futures
        self._reports: dict = {}                   # id -> Future
        self._next_seq = 1
        self._next_report_id = 1
        self.server_pings = 0

    # ---- connection ----
    @classmethod
    async def connect(cls, host: str, port: int, ca_path: str, server_name: str = "localhost",
                      cert_path: Optional[str] = None, key_path: Optional[str] = None,
                      alpn: str = ALPN, idle_timeout: float = 30.0) -> "TributaryClient":
        from aioquic.asyncio import connect as quic_connect
        from aioquic.quic.configuration import QuicConfiguration

        self = cls()
        cfg = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name=server_name,
                                idle_timeout=idle_timeout)
        cfg.verify_mode = ssl.CERT_REQUIRED
        cfg.load_verify_locations(cafile=ca_path)
        if cert_path:
            cfg.load_cert_chain(cert_path, key_path)
        self._ctx = quic_connect(host, port, configuration=cfg, create_protocol=_make_protocol_class(),
                                 wait_connected=True)
        self.proto = await self._ctx.__aenter__()
        self.proto.on_stream_data = self._on_stream_data
        self.proto.on_terminated = self._on_terminated
        self.proto.on_reset = self._on_reset
        if self.proto._quic.tls.alpn_negotiated != ALPN:  # noqa: SLF001
            await self.close(CLOSE_CODES["protocol_error"], "ALPN tributary/1 not negotiated")
            raise ConnectionError("server did not negotiate ALPN tributary/1")
        self.stream_id = self.proto._quic.get_next_available_stream_id(is_unidirectional=False)  # noqa: SLF001
        return self

    def _send_raw(self, data: bytes, end_stream: bool = False) -> None:
        if self.closed.is_set():
            raise SessionClosed(self.close_info, self.error)
        self.proto._quic.send_stream_data(self.stream_id, data, end_stream=end_stream)  # noqa: SLF001
        self.proto.transmit()

    def send_frame(self, ftype: int, body: bytes) -> None:
        self._send_raw(encode_frame(ftype, body))

    def send_json(self, ftype: int, obj: dict) -> None:
        self._send_raw(encode_json_frame(ftype, obj))

    # ---- receive path ----
    def _on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id != self.stream_id:
            return  # the server never opens streams in v1
        if self.local_error is None:
            try:
                for fr in self.decoder.feed(data):
                    self._dispatch(fr)
            except FrameError as e:
                self.local_error = e
                self._fatal_local(e.code, e.message)
                return
        if end:
            self.stream_finished_by_peer = True

    def _on_reset(self, stream_id: int, code: int) -> None:
        pass

    def _fatal_local(self, code: str, message: str) -> None:
        try:
            self.proto._quic.close(error_code=CLOSE_CODES.get(code, 2), reason_phrase=message)  # noqa: SLF001
            self.proto.transmit()
        except Exception:
            pass

    def _dispatch(self, fr: Frame) -> None:
        f = fr.fields
        self.frames_log.append((fr.name, {k: v for k, v in f.items() if k != "payload"}))
        t = fr.type
        if t == WELCOME:
            if self._welcome_fut and not self._welcome_fut.done():
                self._welcome_fut.set_result(f)
            if f.get("max_frame_bytes"):
                # The server never sends more than it advertised.
                self.decoder.max_frame_bytes = f["max_frame_bytes"]
        elif t in (ACK, REJECT):
            fut = self._answers.pop(f["seq"], None)
            ans = dict(f, type=fr.name)
            if fut and not fut.done():
                fut.set_result(ans)
        elif t == PING:
            self.server_pings += 1
            self._send_raw(encode_ping(f["nonce"], pong=True))
        elif t == PONG:
            fut = self._pongs.pop(f["nonce"], None)
            if fut and not fut.done():
                fut.set_result(f)
        elif t == COMMAND:
            if f["id"] in self.seen_command_ids:
                self.duplicate_commands.append(f)
            else:
                self.seen_command_ids.add(f["id"])
            if self.auto_ack_commands:
                self.command_ack(f["id"])
            self.commands.put_nowait(f)
        elif t == DESIRED:
            self.desired.put_nowait(f)
        elif t == RENEWED:
            if self._renews:
                fut = self._renews.pop(0)
                fut.set_result(dict(f, type="RENEWED"))
        elif t == REPORTED:
            fut = self._reports.pop(f["id"], None)
            if fut and not fut.done():
                fut.set_result(dict(f, type="REPORTED"))
        elif t == REFUSED:
            if f["request"] == "RENEW" and self._renews:
                self._renews.pop(0).set_result(dict(f, type="REFUSED"))
            elif f["request"] == "REPORT":
                fut = self._reports.pop(f.get("id"), None)
                if fut and not fut.done():
                    fut.set_result(dict(f, type="REFUSED"))
        elif t == ERROR:
            self.error = f

    def _on_terminated(self, ev) -> None:
        by_peer = self.local_error is None and not getattr(self, "_closing_locally", False)
        self.close_info = CloseInfo(code=ev.error_code, application=ev.frame_type is None,
                                    reason=ev.reason_phrase or "", by_peer=by_peer)
        exc = SessionClosed(self.close_info, self.error)
        futs = list(self._answers.values()) + list(self._pongs.values()) + self._renews + \
            list(self._reports.values())
        if self._welcome_fut:
            futs.append(self._welcome_fut)
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)
        self._answers.clear(); self._pongs.clear(); self._renews.clear(); self._reports.clear()  # noqa: E702
        self.closed.set()

    # ---- session API ----
    async def hello(self, device_id: str, token: str, *, version: int = PROTOCOL_VERSION,
                    commands: Optional[bool] = None, idempotent: Optional[bool] = None,
                    twin: Optional[bool] = None, group: Optional[str] = None,
                    timeout: float = 10.0, extra: Optional[dict] = None) -> dict:
        """Send HELLO; return WELCOME's fields, or raise SessionClosed (ERROR + close)."""
        body = {"version": version, "device_id": device_id, "token": token}
        if commands is not None:
            body["commands"] = commands
        if idempotent is not None:
            body["idempotent"] = idempotent
        if group is not None:
            body["group"] = group
        if twin is not None:
            body["twin"] = twin
        if extra:
            body.update(extra)
        self._welcome_fut = asyncio.get_running_loop().create_future()
        self.send_json(HELLO, body)
        self.welcome = await asyncio.wait_for(self._welcome_fut, timeout)
        return self.welcome

    def next_seq(self) -> int:
        s = self._next_seq
        self._next_seq += 1
        return s

    def send_events(self, stream: str, payload, seq: Optional[int] = None,
                    encoding: int = ENCODING_JSON) -> "tuple[int, asyncio.Future]":
        """Send one EVENTS frame; payload is bytes, a dict (one object) or a list (array).

        Returns (seq, future of the ACK/REJECT fields)."""
        if isinstance(payload, (dict, list)):
            payload = _json_bytes(payload)
        elif isinstance(payload, str):
            payload = payload.encode("utf-8")
        if seq is None:
            seq = self.next_seq()
        else:
            self._next_seq = max(self._next_seq, seq + 1)
        fut = asyncio.get_running_loop().create_future()
        self._answers[seq] = fut
        self._send_raw(encode_events(seq, stream, payload, encoding))
        return seq, fut

    async def send_events_wait(self, stream: str, payload, seq: Optional[int] = None,
                               timeout: float = 10.0) -> dict:
        _, fut = self.send_events(stream, payload, seq)
        return await asyncio.wait_for(fut, timeout)

    async def ping(self, nonce: Optional[int] = None, timeout: float = 10.0) -> dict:
        if nonce is None:
            nonce = int.from_bytes(os.urandom(8), "big")
        fut = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = fut
        self._send_raw(encode_ping(nonce))
        pong = await asyncio.wait_for(fut, timeout)
        return {"nonce": nonce, "pong": pong}

    def command_ack(self, command_id: str, status: Optional[str] = None, reason: Optional[str] = None,
                    response: Any = None, has_response: bool = False) -> None:
        """COMMAND_ACK; ``{"id": ...}`` alone acknowledges. status: acknowledged|rejected|failed."""
        body: dict = {"id": command_id}
        if status is not None:
            body["status"] = status
        if reason is not None:
            body["reason"] = reason
        if has_response or response is not None:
            body["response"] = response
        self.send_json(COMMAND_ACK, body)

    async def next_command(self, timeout: float = 10.0) -> dict:
        return await asyncio.wait_for(self.commands.get(), timeout)

    async def renew(self, token: str, timeout: float = 10.0) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self._renews.append(fut)
        self.send_json(RENEW, {"token": token})
        return await asyncio.wait_for(fut, timeout)

    async def report(self, patch: dict, replace: Optional[bool] = None, timeout: float = 10.0) -> dict:
        rid = self._next_report_id
        self._next_report_id += 1
        body = {"id": rid, "patch": patch}
        if replace is not None:
            body["replace"] = replace
        fut = asyncio.get_running_loop().create_future()
        self._reports[rid] = fut
        self.send_json(REPORT, body)
        return await asyncio.wait_for(fut, timeout)

    def start_keepalive(self, interval: float = 10.0) -> "asyncio.Task":
        """Section 11: a client with nothing to send SHOULD PING at least every 10 s."""
        async def run():
            while not self.closed.is_set():
                await asyncio.sleep(interval)
                if self.closed.is_set():
                    return
                try:
                    await self.ping(timeout=interval)
                except Exception:  # noqa: BLE001
                    return
        self._keepalive = asyncio.get_running_loop().create_task(run())
        return self._keepalive

    async def wait_closed(self, timeout: float = 10.0) -> CloseInfo:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_info

    async def close(self, code: int = 0, reason: str = "") -> None:
        """Close the connection with an application close code (0x00 = done)."""
        if self.proto is None:
            return
        ka = getattr(self, "_keepalive", None)
        if ka:
            ka.cancel()
        if not self.closed.is_set():
            self._closing_locally = True
            self.proto._quic.close(error_code=code, reason_phrase=reason)  # noqa: SLF001
            self.proto.transmit()
        try:
            await asyncio.wait_for(self.proto.wait_closed(), 5)
        except Exception:
            pass
        try:
            await self._ctx.__aexit__(None, None, None)
        except Exception:
            pass


def default_token(device_id: str, key_b64: str, ttl_s: int = 3600) -> str:
    return make_token(device_id, key_b64, int(time.time()) + ttl_s)
