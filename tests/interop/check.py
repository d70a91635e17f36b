#!/usr/bin/env python3
"""Interop check of a running Tributary server against docs/protocol.md, with an
independent client (tributary_client.py, aioquic).

Two modes:

  check.py --vectors docs/protocol.md
      decode every hex test vector of section 13 with our own frame decoder
      and compare with the values the document gives; also check the token
      and group-key vectors of docs/security.md.

  check.py --data-dir DIR [--device ID --key BASE64KEY] [--quic HOST:PORT]
           [--http HOST:PORT] [--ca PATH] [--admin-token TOKEN] [--stream NAME]
      run the session scenario against a live server.

Both print a one-line JSON summary on stdout and exit 0 only if every step
matched the spec (1 otherwise). Progress goes to stderr (--verbose).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import traceback
import urllib.error
import urllib.request
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tributary_client as tc  # noqa: E402

VERBOSE = False


def log(*a):
    if VERBOSE:
        print(*a, file=sys.stderr, flush=True)


class Steps:
    def __init__(self):
        self.steps = []

    def add(self, name: str, ok: bool, **detail):
        self.steps.append(dict(step=name, ok=bool(ok), **detail))
        log(("PASS " if ok else "FAIL ") + name, json.dumps(detail, default=str)[:600])
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s["ok"] for s in self.steps)

    def summary(self, mode: str, **extra) -> dict:
        failed = [s for s in self.steps if not s["ok"]]
        return dict(mode=mode, ok=self.ok, passed=len(self.steps) - len(failed), failed=len(failed),
                    failed_steps=failed, steps=[s["step"] for s in self.steps], **extra)


# ---------------------------------------------------------------------------
# --vectors mode
# ---------------------------------------------------------------------------

def parse_vectors(md_text: str) -> list:
    """Every ```hex block of section 13: name, bytes, expected error, line comments."""
    sec = md_text.find("## 13.")
    if sec < 0:
        raise ValueError("no section 13 in the document")
    text = md_text[sec:]
    blocks = re.findall(r"```hex\n(.*?)```", text, re.S)
    out = []
    for block in blocks:
        name, expect, data, comments = None, None, bytearray(), []
        for line in block.splitlines():
            code, sep, comment = line.partition("#")
            # the comment starts after "# " (one space); keep the rest verbatim
            if sep:
                comment = comment[1:] if comment.startswith(" ") else comment
                m = re.match(r"vector:\s*(\S+)", comment)
                if m and not code.strip():
                    name = m.group(1)
                m = re.match(r"expect error:\s*(\S+)", comment)
                if m and not code.strip():
                    expect = m.group(1)
            hexbytes = code.split()
            for hb in hexbytes:
                if not re.fullmatch(r"[0-9a-fA-F]{2}", hb):
                    raise ValueError(f"vector {name}: bad hex token {hb!r}")
            if hexbytes:
                data += bytes(int(h, 16) for h in hexbytes)
                comments.append((len(hexbytes), comment if sep else ""))
            elif sep:
                comments.append((0, comment))
        out.append(dict(name=name, data=bytes(data), expect_error=expect, comments=comments))
    return out


def _expected_json_text(comments) -> str:
    """The JSON body as the line comments spell it (after the '# body: JSON' marker)."""
    parts, on = [], False
    for nbytes, c in comments:
        if nbytes == 0 and c.startswith("body: JSON"):
            on = True
            continue
        if on and nbytes:
            parts.append(c)
    return "".join(parts)


def check_vector(v: dict, steps: Steps) -> None:
    name = v["name"] or "<unnamed>"
    data = v["data"]
    if v["expect_error"]:
        dec = tc.FrameDecoder()  # default limits, either direction
        try:
            frames = dec.feed(data)
            steps.add(f"vector:{name}", False, expected=v["expect_error"], got="decoded",
                      frames=[f.name for f in frames], leftover=dec.pending)
        except tc.FrameError as e:
            steps.add(f"vector:{name}", e.code == v["expect_error"], expected=v["expect_error"],
                      got=e.code, message=e.message)
        return
    dec = tc.FrameDecoder()
    try:
        frames = dec.feed(data)
    except tc.FrameError as e:
        steps.add(f"vector:{name}", False, error=str(e))
        return
    problems = []
    if len(frames) != 1 or dec.pending:
        problems.append(f"expected exactly one frame and no leftover; got {len(frames)} frames, {dec.pending} bytes left")
        steps.add(f"vector:{name}", False, problems=problems)
        return
    fr = frames[0]
    f = fr.fields
    # Check every "key: value" comment of the binary part against what we decoded.
    for nbytes, c in v["comments"]:
        m = re.match(r"([a-z ]+):\s*(.*)$", c)
        if not m or nbytes == 0:
            continue
        key, val = m.group(1).strip(), m.group(2).strip()
        if key == "length":
            exp = int(val.split()[0])
            if exp != len(data) - 4:
                problems.append(f"length comment {exp} != actual {len(data) - 4}")
        elif key == "type":
            if val.split()[0] != fr.name:
                problems.append(f"type comment {val} != decoded {fr.name}")
        elif key in ("seq", "count"):
            exp = int(val.split()[0].rstrip(","))
            if f.get(key) != exp:
                problems.append(f"{key}: doc {exp} != decoded {f.get(key)}")
        elif key == "nonce":
            if f.get("nonce") != int(val.split()[0], 16):
                problems.append(f"nonce: doc {val} != decoded {f.get('nonce')}")
        elif key == "stream name length":
            if len(f.get("stream", "").encode()) != int(val):
                problems.append(f"stream name length: doc {val}")
        elif key == "stream name":
            if f.get("stream") != val:
                problems.append(f"stream: doc {val!r} != decoded {f.get('stream')!r}")
        elif key == "encoding":
            if val == "JSON" and f.get("encoding") != tc.ENCODING_JSON:
                problems.append("encoding is not JSON")
    # JSON part: the comments spell the body text; compare bytes and parsed values.
    exp_text = _expected_json_text(v["comments"])
    if fr.type == tc.EVENTS:
        got_text = f["payload"].decode()
        got_obj = f.get("events")
        exp_obj = tc.parse_json_payload(exp_text.encode())
        # "# payload: JSON" marker instead of "# body: JSON"
        if not exp_text:
            m = [c for n, c in v["comments"] if n]
            exp_text = m[-1]
            got_obj, exp_obj = f.get("events"), tc.parse_json_payload(exp_text.encode())
    elif fr.type == tc.REJECT:
        got_text = fr.body[8:].decode()
        got_obj = {k: val for k, val in f.items() if k != "seq"}
        exp_obj = json.loads(exp_text)
    elif fr.type in tc.JSON_TYPES:
        got_text = fr.body.decode()
        got_obj = f
        exp_obj = json.loads(exp_text)
    else:
        got_text = exp_text = ""
        got_obj = exp_obj = None
    if got_text != exp_text:
        problems.append(f"JSON text differs: doc {exp_text!r} decoded {got_text!r}")
    if got_obj != exp_obj:
        problems.append(f"JSON value differs: doc {exp_obj!r} decoded {got_obj!r}")
    fields = {k: (val.decode() if isinstance(val, bytes) else val) for k, val in f.items()}
    steps.add(f"vector:{name}", not problems, frame=fr.name, fields=fields, problems=problems)


def run_vectors(path: str) -> Steps:
    steps = Steps()
    sv = tc.check_security_vectors()
    steps.add("security:token_vector", sv["token"], got=sv["token_got"], expected=tc.TOKEN_VECTOR["token"])
    steps.add("security:group_key_vector", sv["group_key"], got=sv["group_key_got"],
              expected=tc.GROUP_VECTOR["device_key"])
    with open(path, encoding="utf-8") as fh:
        md = fh.read()
    vectors = parse_vectors(md)
    steps.add("vectors:found", len(vectors) > 0, count=len(vectors),
              names=[v["name"] for v in vectors])
    names_seen = set()
    for v in vectors:
        if v["name"] in names_seen:
            steps.add(f"vector:{v['name']}:unique_name", False)
        names_seen.add(v["name"])
        check_vector(v, steps)
    # All valid vectors back to back, fed one byte at a time: the decoder must
    # find the same frames (frames are self-delimiting on the stream).
    valid = [v for v in vectors if not v["expect_error"]]
    dec = tc.FrameDecoder()
    got = []
    try:
        for b in b"".join(v["data"] for v in valid):
            got += dec.feed(bytes([b]))
        ok = [f.body for f in got] == [v["data"][5:] for v in valid] and dec.pending == 0
        steps.add("vectors:byte_by_byte_stream", ok, frames=len(got))
    except tc.FrameError as e:
        steps.add("vectors:byte_by_byte_stream", False, error=str(e))
    # The HELLO example of section 5 carries the security.md test-vector token.
    m = re.search(r'\{"version":1,"device_id":"sensor-1","token":"(trb1\.[^"]+)"\}', md)
    if m:
        steps.add("doc:hello_example_token", m.group(1) == tc.TOKEN_VECTOR["token"], token=m.group(1))
    return steps


# ---------------------------------------------------------------------------
# live mode
# ---------------------------------------------------------------------------

class Api:
    def __init__(self, base: str, token: str):
        self.base = base.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")


def _hostport(s: str):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


RFC3339_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


async def connect_hello(args, token=None, device=None, **hello_kw):
    host, port = _hostport(args.quic)
    c = await tc.TributaryClient.connect(host, port, args.ca, server_name=args.server_name)
    try:
        await c.hello(device or args.device, token or tc.default_token(device or args.device, args.key),
                      **hello_kw)
    except tc.SessionClosed:
        pass
    return c


async def expect_fatal(c: tc.TributaryClient, timeout: float = 10.0):
    """Wait for the close; return (error_frame, close_info)."""
    try:
        await c.wait_closed(timeout)
    except asyncio.TimeoutError:
        pass
    return c.error, c.close_info


async def scenario(args, steps: Steps, api: Api | None) -> dict:
    info = {}
    stream = args.stream
    dev = args.device

    # 1. connect, HELLO, WELCOME ------------------------------------------------
    token = tc.default_token(dev, args.key, ttl_s=3600)
    host, port = _hostport(args.quic)
    c = await tc.TributaryClient.connect(host, port, args.ca, server_name=args.server_name)
    steps.add("connect", True, alpn=c.proto._quic.tls.alpn_negotiated)  # noqa: SLF001
    try:
        w = await c.hello(dev, token)
    except (tc.SessionClosed, asyncio.TimeoutError) as e:
        steps.add("hello_welcome", False, error=c.error, close=c.close_info.as_dict() if c.close_info else None,
                  exception=repr(e))
        await c.close()
        return info
    ok = (w.get("version") == 1 and w.get("device_id") == dev and tc._is_int(w.get("max_frame_bytes"))
          and w["max_frame_bytes"] > 0 and tc._is_int(w.get("max_events_per_frame")))
    steps.add("hello_welcome", ok, welcome=w)
    max_frame = w["max_frame_bytes"]
    info["welcome"] = w

    # 2. three EVENTS frames, pipelined: single object, array, JSON lines ----------
    now_ms = int(time.time() * 1000)
    payloads = [
        ({"temp": 21.5, "humidity": 40.0, "ts": now_ms}, 1, "single object"),
        ([{"temp": 21.6}, {"temp": 21.7, "humidity": None}], 2, "array"),
        (b'{"temp": 21.8}\n{"temp": 21.9, "device_id": "%s"}\n  {"humidity": 41}\n' % dev.encode(), 3,
         "JSON lines"),
    ]
    sent = [(c.send_events(stream, p)[0], n, label, c._answers[c._next_seq - 1]) for p, n, label in payloads]  # noqa: SLF001
    order_before = len(c.frames_log)
    for seq, n, label, fut in sent:
        try:
            a = await asyncio.wait_for(fut, 15)
        except Exception as e:  # noqa: BLE001
            steps.add(f"events_{label.replace(' ', '_')}", False, error=repr(e))
            continue
        steps.add(f"events_{label.replace(' ', '_')}", a["type"] == "ACK" and a["seq"] == seq and a["count"] == n,
                  seq=seq, expected_count=n, answer=a)
    answered = [f[1].get("seq") for f in c.frames_log[order_before:] if f[0] in ("ACK", "REJECT")]
    steps.add("events_answers_in_order", answered == [s[0] for s in sent], order=answered)

    # 3. wrong-typed field -> REJECT invalid_field, event index, field --------------
    seq, fut = c.send_events(stream, [{"temp": 1.5}, {"temp": "hot"}])
    a = await asyncio.wait_for(fut, 15)
    steps.add("reject_wrong_type", a["type"] == "REJECT" and a["seq"] == seq and a.get("code") == "invalid_field"
              and a.get("event") == 1 and a.get("field") == "temp" and isinstance(a.get("message"), str),
              answer=a)
    # more REJECT codes of sections 5, 6, 9 (frame-level, not fatal)
    for label, kwargs, exp in [
        ("unknown_stream", dict(stream="no_such_stream_interop", payload={"temp": 1.0}), ("unknown_stream", None, None)),
        ("unknown_field", dict(stream=stream, payload=[{"temp": 1.0}, {"temp": 2.0, "bogus": 1}]),
         ("unknown_field", 1, "bogus")),
        ("received_at", dict(stream=stream, payload={"received_at": 1}), ("unknown_field", 0, "received_at")),
        ("invalid_device_id", dict(stream=stream, payload=[{"device_id": dev + "-other"}]),
         ("invalid_device_id", 0, "device_id")),
        ("empty_frame", dict(stream=stream, payload=b" \n"), ("empty_frame", None, None)),
        ("empty_array", dict(stream=stream, payload=b"[]"), ("empty_frame", None, None)),
        ("invalid_event", dict(stream=stream, payload=b"[1]"), ("invalid_event", 0, None)),
        ("duplicate_key", dict(stream=stream, payload=b'{"temp":1,"temp":2}'), ("invalid_event", 0, "temp")),
        ("invalid_json", dict(stream=stream, payload=b'{"temp":'), ("invalid_json", None, None)),
        ("unsupported_encoding", dict(stream=stream, payload=b"\x00", encoding=0x7F),
         ("unsupported_encoding", None, None)),
    ]:
        seq, fut = c.send_events(kwargs["stream"], kwargs["payload"], encoding=kwargs.get("encoding", 1))
        try:
            a = await asyncio.wait_for(fut, 15)
        except Exception as e:  # noqa: BLE001
            steps.add(f"reject_{label}", False, error=repr(e))
            break
        code, ev, fld = exp
        ok = a["type"] == "REJECT" and a.get("code") == code and a["seq"] == seq
        # event/field: only checked where the table of section 6 says what they are
        if label != "invalid_json":
            ok = ok and a.get("event") == ev and a.get("field") == fld
        steps.add(f"reject_{label}", ok, answer=a, expected=dict(code=code, event=ev, field=fld))
    # the session must still be alive after REJECTs
    a = await c.send_events_wait(stream, {"temp": 22.0})
    steps.add("ack_after_rejects", a["type"] == "ACK" and a["count"] == 1, answer=a)

    # 4. PING / PONG ----------------------------------------------------------------
    nonce = 0x0102030405060708
    p = await c.ping(nonce)
    steps.add("ping_pong", p["pong"]["nonce"] == nonce, pong=p["pong"])
    nonce2 = int.from_bytes(os.urandom(8), "big")
    p = await c.ping(nonce2)
    steps.add("ping_pong_random_nonce", p["pong"]["nonce"] == nonce2, nonce=nonce2)

    # 5. operator command -> COMMAND -> COMMAND_ACK ------------------------------------
    cmd_id = None
    if api:
        st, body = api.call("POST", f"/api/v1/devices/{dev}/commands",
                            {"name": "interop-reboot", "payload": {"delay_s": 5, "why": "interop"}})
        steps.add("api_command_created", st == 201 and isinstance(body, dict) and "id" in body, status=st, body=body)
        if st == 201:
            cmd_id = body["id"]
            got = None
            deadline = time.time() + 15
            try:
                while time.time() < deadline:
                    cmd = await c.next_command(timeout=deadline - time.time())
                    if cmd["id"] == cmd_id:
                        got = cmd
                        break
                    c.command_ack(cmd["id"])  # an older queued command: settle it
            except asyncio.TimeoutError:
                pass
            ok = bool(got) and got["name"] == "interop-reboot" and got["payload"] == {"delay_s": 5, "why": "interop"}
            if got:
                for k in ("created_at", "expires_at"):
                    ok = ok and bool(RFC3339_MS_Z.match(got[k]))
                # created_at / expires_at must match the API's epoch milliseconds
                ca = datetime.fromisoformat(got["created_at"].replace("Z", "+00:00")).timestamp() * 1000
                ea = datetime.fromisoformat(got["expires_at"].replace("Z", "+00:00")).timestamp() * 1000
                ok = ok and abs(ca - body["created_at"]) < 1 and abs(ea - body["expires_at"]) < 1
            steps.add("command_received", ok, command=got, api=body)
            if got:
                c.command_ack(cmd_id)
                # a PING after the ACK: the server has read the ACK once the PONG comes back
                await c.ping()
                steps.add("command_ack_sent", True, id=cmd_id)
        # a second command that we do NOT acknowledge: must be redelivered next connection
        st, body2 = api.call("POST", f"/api/v1/devices/{dev}/commands", {"name": "interop-unacked"})
        info["unacked_command"] = body2.get("id") if isinstance(body2, dict) else None
        if st == 201:
            try:
                cmd2 = await c.next_command(timeout=15)
                steps.add("command_null_payload", cmd2["id"] == body2["id"] and cmd2["payload"] is None
                          and "payload" in cmd2, command=cmd2)
            except asyncio.TimeoutError:
                steps.add("command_null_payload", False, error="no COMMAND")
    elif args.expect_command:
        # the harness queues the command (before or during the run); we wait for it by name
        got = None
        deadline = time.time() + args.command_wait
        try:
            while time.time() < deadline:
                cmd = await c.next_command(timeout=deadline - time.time())
                if cmd["name"] == args.expect_command:
                    got = cmd
                    break
        except asyncio.TimeoutError:
            pass
        ok = bool(got) and all(bool(RFC3339_MS_Z.match(got[k])) for k in ("created_at", "expires_at"))
        steps.add("command_received", ok, command=got, expected_name=args.expect_command)
        if got:
            c.command_ack(got["id"])
            await c.ping()
            steps.add("command_ack_sent", True, id=got["id"])
    else:
        steps.add("api_command_created", False,
                  error="no --http/admin token to queue a command, and no --expect-command NAME")

    # 6. a frame longer than max_frame_bytes -> ERROR frame_too_large, close 0x04 --------
    # Only the 4 length bytes and the type byte go out: the server must decide from the
    # length alone (section 3).
    c._send_raw((max_frame + 1).to_bytes(4, "big") + bytes([tc.EVENTS]))  # noqa: SLF001
    err, close = await expect_fatal(c)
    ok = (err is not None and err.get("code") == "frame_too_large" and close is not None and close.application
          and close.code == tc.CLOSE_CODES["frame_too_large"])
    steps.add("frame_too_large", ok, error=err, close=close.as_dict() if close else None)
    steps.add("close_reason_is_error_message", bool(err and close and close.reason == err.get("message")),
              reason=close.reason if close else None, message=err.get("message") if err else None)
    steps.add("no_unexpected_frames", not c.duplicate_commands and c.local_error is None,
              local_error=str(c.local_error) if c.local_error else None)
    await c.close()

    # 7. reconnect: the acknowledged command is not redelivered, the unacked one is ----------
    if api and cmd_id:
        c = await connect_hello(args)
        seen = []
        try:
            while True:
                cmd = await c.next_command(timeout=3)
                seen.append(cmd["id"])
        except asyncio.TimeoutError:
            pass
        steps.add("acked_command_not_redelivered", cmd_id not in seen, seen=seen)
        if info.get("unacked_command"):
            steps.add("unacked_command_redelivered", info["unacked_command"] in seen, seen=seen)
        for i in seen:
            c.command_ack(i)
        # 8. twin: REPORT -> REPORTED; desired via API -> DESIRED only with twin:true ----
        r = await c.report({"firmware": "interop-1", "x": {"a": 1}})
        steps.add("report_reported", r["type"] == "REPORTED" and r["id"] == 1 and tc._is_int(r.get("version")),
                  answer=r)
        r2 = await c.report({"x": {"a": None}})
        steps.add("report_reported_2", r2["type"] == "REPORTED" and r2["id"] == 2
                  and r2["version"] == r["version"] + 1, answer=r2)
        st, twin = api.call("GET", f"/api/v1/devices/{dev}/twin")
        steps.add("twin_reported_merged", st == 200 and twin.get("reported", {}).get("firmware") == "interop-1"
                  and twin["reported"].get("x") == {}, twin=twin)
        # 9. RENEW with a fresh token -> RENEWED with its expires_at
        new_exp = int(time.time()) + 7200
        rn = await c.renew(tc.make_token(dev, args.key, new_exp))
        steps.add("renew_renewed", rn["type"] == "RENEWED" and rn.get("expires_at") == new_exp, answer=rn)
        rn = await c.renew(tc.make_token(dev, args.key, new_exp)[:-2] + "AA")
        steps.add("renew_bad_token_refused", rn["type"] == "REFUSED" and rn.get("code") == "unauthorized"
                  and rn.get("request") == "RENEW" and rn.get("id") is None, answer=rn)
        a = await c.send_events_wait(stream, {"temp": 23.0})
        steps.add("session_alive_after_refused_renew", a["type"] == "ACK", answer=a)
        # clean close with 0x00
        await c.close(0)
        await asyncio.sleep(1.0)
        st, d = api.call("GET", f"/api/v1/devices/{dev}")
        conn = (d or {}).get("connection") or {}
        steps.add("connection_state_closed_by_device", st == 200 and conn.get("connected") is False
                  and conn.get("reason") == "closed by the device", connection=conn)

        # twin:true session receives DESIRED right after WELCOME
        st, tw = api.call("PATCH", f"/api/v1/devices/{dev}/twin/desired", {"interval_s": 30})
        c = await connect_hello(args, twin=True, commands=False)
        try:
            d1 = await asyncio.wait_for(c.desired.get(), 10)
            steps.add("desired_after_welcome", d1.get("properties", {}).get("interval_s") == 30
                      and d1.get("version") == tw.get("desired_version"), desired=d1, api=tw)
        except asyncio.TimeoutError:
            steps.add("desired_after_welcome", False, error="no DESIRED", api=tw)
        st, tw = api.call("PATCH", f"/api/v1/devices/{dev}/twin/desired", {"interval_s": 10})
        try:
            d2 = await asyncio.wait_for(c.desired.get(), 10)
            steps.add("desired_on_change", d2.get("properties", {}).get("interval_s") == 10
                      and d2.get("version") == tw.get("desired_version"), desired=d2)
        except asyncio.TimeoutError:
            steps.add("desired_on_change", False, error="no DESIRED")
        await c.close(0)
        # a session without twin:true never sees DESIRED
        c = await connect_hello(args, commands=False)
        await c.ping()
        await asyncio.sleep(1.0)
        steps.add("no_desired_without_twin", c.desired.empty() and not any(n == "DESIRED" for n, _ in c.frames_log),
                  frames=[n for n, _ in c.frames_log])
        await c.close(0)

    # 10. HELLO failures ------------------------------------------------------------
    c = await connect_hello(args, token=tc.make_token(dev, args.key, int(time.time()) + 600)[:-3] + "AAA")
    err, close = await expect_fatal(c)
    steps.add("hello_bad_signature_unauthorized",
              bool(err and err["code"] == "unauthorized" and close and close.application and close.code == 0x01
                   and err["message"] == f"device '{dev}': unknown device, or a token not signed by its keys"),
              error=err, close=close.as_dict() if close else None)
    await c.close()
    exp_past = int(time.time()) - 10
    c = await connect_hello(args, token=tc.make_token(dev, args.key, exp_past))
    err, close = await expect_fatal(c)
    exp_iso = datetime.fromtimestamp(exp_past, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    steps.add("hello_expired_token_unauthorized",
              bool(err and err["code"] == "unauthorized" and close and close.code == 0x01
                   and err["message"] == f"the token of device '{dev}' expired at {exp_iso}"),
              error=err, close=close.as_dict() if close else None)
    await c.close()
    c = await connect_hello(args, version=2)
    err, close = await expect_fatal(c)
    steps.add("hello_unsupported_version",
              bool(err and err["code"] == "unsupported_version" and err.get("supported_versions") == [1]
                   and close and close.application and close.code == 0x03),
              error=err, close=close.as_dict() if close else None)
    await c.close()

    # 11. protocol errors detected by the server ----------------------------------------
    c = await connect_hello(args)
    c._send_raw(tc.encode_frame(tc.ACK, bytes(12)))  # noqa: SLF001  wrong direction
    err, close = await expect_fatal(c)
    steps.add("wrong_direction_protocol_error",
              bool(err and err["code"] == "protocol_error" and close and close.code == 0x02),
              error=err, close=close.as_dict() if close else None)
    await c.close()
    c = await connect_hello(args)
    await c.send_events_wait(stream, {"temp": 1.0}, seq=5)
    c._send_raw(tc.encode_events(5, stream, b'{"temp":1}'))  # noqa: SLF001  seq not increasing
    err, close = await expect_fatal(c)
    steps.add("seq_not_increasing_protocol_error",
              bool(err and err["code"] == "protocol_error" and close and close.code == 0x02),
              error=err, close=close.as_dict() if close else None)
    await c.close()
    if args.extended:
        await extended(args, steps, api)
    if args.strict:
        await strict(args, steps, api)
    return info


async def strict(args, steps: Steps, api: Api | None) -> None:
    """Checks of promises where this server was seen to differ from the document
    (see FINDINGS.md). Off by default so that the main scenario stays green."""
    stream = args.stream
    # Section 4/5: "one ERROR frame and then closes": nothing may follow the ERROR.
    c = await connect_hello(args, idempotent=True)
    base = int(time.time() * 1e6)
    c._answers[base] = asyncio.get_running_loop().create_future()  # noqa: SLF001
    frame = tc.encode_events(base, stream, b'{"temp":1}')
    c._send_raw(frame + frame)  # noqa: SLF001  the same seq twice in one write, the first still unanswered
    err, close = await expect_fatal(c)
    names = [n for n, _ in c.frames_log]
    if err is None:  # the first copy was answered before the second was read: legal, inconclusive
        steps.add("strict_nothing_after_error", True, frames=names, note="inconclusive (race)")
    else:
        after = names[names.index("ERROR") + 1:]
        steps.add("strict_nothing_after_error", err["code"] == "protocol_error" and after == [],
                  frames=names, error=err)
    await c.close()
    # Section 3: "the server never sends a frame longer than the maximum it advertised".
    if api:
        d = "interop-big-%d" % int(time.time() * 1000)
        st, b = api.call("POST", "/api/v1/devices", {"id": d})
        if st == 201:
            c = await tc.TributaryClient.connect(*_hostport(args.quic), args.ca, server_name=args.server_name)
            await c.hello(d, tc.default_token(d, b["primary_key"]), twin=True)
            limit = c.welcome["max_frame_bytes"]
            size = min(limit + 100, 60000)  # commands carry up to 64 KiB of payload
            api.call("POST", f"/api/v1/devices/{d}/commands", {"name": "big", "payload": "x" * size})
            try:
                await c.next_command(timeout=5)
            except (asyncio.TimeoutError, tc.SessionClosed):
                pass
            steps.add("strict_server_respects_own_max_frame", c.local_error is None, max_frame_bytes=limit, payload=size,
                      local_error=str(c.local_error) if c.local_error else None,
                      note="only meaningful when the server runs with --max-frame-bytes below ~64 KiB")
            await c.close()
            api.call("DELETE", f"/api/v1/devices/{d}")


async def extended(args, steps: Steps, api: Api | None) -> None:
    """Slower or less central checks (about 15 s more)."""
    stream = args.stream
    host, port = _hostport(args.quic)
    # first frame other than HELLO -> protocol_error
    c = await tc.TributaryClient.connect(host, port, args.ca, server_name=args.server_name)
    c._send_raw(tc.encode_ping(1))  # noqa: SLF001
    err, close = await expect_fatal(c)
    steps.add("ext_first_frame_not_hello", bool(err and err["code"] == "protocol_error" and close and close.code == 2),
              error=err, close=close.as_dict() if close else None)
    await c.close()
    # the client finishing its sending half ends the session
    c = await connect_hello(args)
    await c.send_events_wait(stream, {"temp": 1.0})
    c._send_raw(b"", end_stream=True)  # noqa: SLF001
    err, close = await expect_fatal(c)
    steps.add("ext_fin_ends_session", bool(close and close.application and close.code == 0 and err is None),
              close=close.as_dict() if close else None, server_finished_too=c.stream_finished_by_peer)
    await c.close()
    # too many events in one frame
    c = await connect_hello(args)
    n = c.welcome["max_events_per_frame"]
    if 0 < n <= 100000:
        a = await c.send_events_wait(stream, b'{"temp":1}\n' * (n + 1), timeout=60)
        steps.add("ext_too_many_events", a["type"] == "REJECT" and a.get("code") == "too_many_events"
                  and a.get("event") is None and a.get("field") is None, answer=a, max_events_per_frame=n)
    # encoding 0x02 (Arrow IPC, section 6.1): bytes that are no Arrow IPC stream -> invalid_arrow
    seq, fut = c.send_events(stream, b"\x00\x01\x02", encoding=0x02)
    a = await asyncio.wait_for(fut, 15)
    steps.add("ext_invalid_arrow", a["type"] == "REJECT" and a.get("code") == "invalid_arrow"
              and a.get("event") is None and a.get("field") is None, answer=a)
    # COMMAND_ACK of an unknown id and an unsolicited PONG are ignored
    c.command_ack("cmd_interop_does_not_exist")
    c._send_raw(tc.encode_ping(42, pong=True))  # noqa: SLF001
    p = await c.ping(43)
    steps.add("ext_unknown_ack_and_stray_pong_ignored", p["pong"]["nonce"] == 43)
    await c.close(0)
    # idempotent sessions: resend -> ACK count 0; seq 0 -> protocol_error
    c = await connect_hello(args, idempotent=True)
    base = int(time.time() * 1e6)
    a1 = await c.send_events_wait(stream, {"temp": 5.0}, seq=base)
    a2 = await c.send_events_wait(stream, {"temp": 5.0}, seq=base - 1)
    await c.close(0)
    c = await connect_hello(args, idempotent=True)
    a3 = await c.send_events_wait(stream, {"temp": 5.0}, seq=base)
    steps.add("ext_idempotent_resend", a1["count"] == 1 and a2["count"] == 0 and a3["count"] == 0,
              answers=[a1, a2, a3])
    c._send_raw(tc.encode_events(0, stream, b'{"temp":1}'))  # noqa: SLF001
    err, close = await expect_fatal(c)
    steps.add("ext_idempotent_seq0", bool(err and err["code"] == "protocol_error" and close and close.code == 2),
              error=err)
    await c.close()
    # wrong ALPN: the server refuses the handshake
    try:
        c = await tc.TributaryClient.connect(host, port, args.ca, server_name=args.server_name, alpn="h3")
        steps.add("ext_wrong_alpn_refused", False, error="handshake succeeded with ALPN h3")
        await c.close()
    except ConnectionError as e:
        steps.add("ext_wrong_alpn_refused", True, error=repr(e))
    # enrollment group: derived key, first connection enrolls the device with the group's tags
    if api:
        import base64
        g = "interop-g%d" % int(time.time() * 1000)
        st, body = api.call("POST", "/api/v1/enrollment-groups", {"name": g, "tags": {"interop": "yes"}})
        if st == 201:
            d = g + "-dev"
            dk = tc.derive_group_device_key(base64.b64decode(body["secondary_key"]), d)
            c = await connect_hello(args, device=d, token=tc.default_token(d, dk), group=g)
            ok = c.welcome is not None and c.welcome.get("device_id") == d
            await c.close(0)
            st, dv = api.call("GET", f"/api/v1/devices/{d}")
            steps.add("ext_group_enrollment", ok and st == 200 and dv.get("tags") == {"interop": "yes"},
                      welcome=c.welcome, device=dv)
            api.call("DELETE", f"/api/v1/devices/{d}")
            api.call("DELETE", f"/api/v1/enrollment-groups/{g}")
        else:
            steps.add("ext_group_enrollment", False, status=st, body=body)
    # client certificate (sections 1, 4.2): issued by the development CA through the API
    if api:
        import tempfile
        d = "interop-cert-%d" % int(time.time() * 1000)
        api.call("POST", "/api/v1/devices", {"id": d})
        st, b = api.call("POST", f"/api/v1/devices/{d}/certificates", {"issue": True, "valid_days": 1})
        if st == 201:
            tmp = tempfile.mkdtemp(prefix="trb-interop-")
            crt, key = os.path.join(tmp, "d.crt"), os.path.join(tmp, "d.key")
            with open(crt, "w") as fh:
                fh.write(b["cert_pem"])
            with open(key, "w") as fh:
                fh.write(b["key_pem"])
            c = await tc.TributaryClient.connect(host, port, args.ca, server_name=args.server_name,
                                                 cert_path=crt, key_path=key)
            w = await c.hello(d, "")
            r = await c.renew(tc.make_token(d, args.key, int(time.time()) + 60))
            steps.add("ext_client_certificate", w.get("device_id") == d and r["type"] == "REFUSED"
                      and r.get("code") == "invalid_request", welcome=w, renew=r)
            await c.close(0)
            # a certificate from another CA: CRYPTO_ERROR 0x0100 + unknown_ca (0x30) = 0x130
            try:
                from cryptography import x509
                from cryptography.hazmat.primitives import hashes, serialization
                from cryptography.hazmat.primitives.asymmetric import ec
                from cryptography.x509.oid import NameOID
                import datetime as _dt
                k = ec.generate_private_key(ec.SECP256R1())
                n = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, d)])
                now = _dt.datetime.now(_dt.timezone.utc)
                cert = (x509.CertificateBuilder().subject_name(n).issuer_name(n).public_key(k.public_key())
                        .serial_number(1).not_valid_before(now - _dt.timedelta(days=1))
                        .not_valid_after(now + _dt.timedelta(days=1)).sign(k, hashes.SHA256()))
                with open(crt, "wb") as fh:
                    fh.write(cert.public_bytes(serialization.Encoding.PEM))
                with open(key, "wb") as fh:
                    fh.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
                close = None
                try:
                    c = await tc.TributaryClient.connect(host, port, args.ca, server_name=args.server_name,
                                                         cert_path=crt, key_path=key)
                    try:
                        await c.hello(d, "", timeout=5)
                    except (tc.SessionClosed, asyncio.TimeoutError):
                        pass
                    _, close = await expect_fatal(c, 5)
                    await c.close()
                except ConnectionError:
                    close = None
                steps.add("ext_other_ca_certificate_refused", bool(close and not close.application
                                                                   and close.code == 0x130),
                          close=close.as_dict() if close else None)
            except ImportError:
                pass
        api.call("DELETE", f"/api/v1/devices/{d}")
    # COMMAND_ACK with a status (section 5, COMMAND_ACK; section 8 statuses, SQL `commands`)
    if api:
        c = await connect_hello(args)
        st, b = api.call("POST", f"/api/v1/devices/{args.device}/commands", {"name": "interop-status"})
        got = None
        try:
            while True:
                cmd = await c.next_command(timeout=10)
                if cmd["id"] == b["id"]:
                    got = cmd
                    break
                c.command_ack(cmd["id"])
        except asyncio.TimeoutError:
            pass
        if got:
            c.command_ack(got["id"], status="rejected", reason="busy")
            await c.ping()
            await asyncio.sleep(0.3)
            st, q = api.call("POST", "/api/v1/sql",
                             {"sql": "SELECT id, status, reason FROM commands WHERE id = '%s'" % got["id"]})
            rows = q.get("rows") if isinstance(q, dict) else None
            steps.add("ext_command_ack_status", st == 200 and rows == [{"id": got["id"], "status": "rejected",
                                                                         "reason": "busy"}], sql=q)
        else:
            steps.add("ext_command_ack_status", False, error="no COMMAND", api=b)
        c.send_json(tc.COMMAND_ACK, {"id": "cmd_interop_x", "status": "bogus"})
        err, close = await expect_fatal(c)
        steps.add("ext_command_ack_bad_status", bool(err and err["code"] == "protocol_error" and close
                                                     and close.code == 2), error=err)
        await c.close()
    # per-device rate limit from the registry metadata (section 12): a frame taken into debt,
    # the next one REJECT rate_limited with retry_after_ms; then accepted again after the wait
    if api:
        d = "interop-rate-%d" % int(time.time() * 1000)
        st, b = api.call("POST", "/api/v1/devices", {"id": d, "metadata": {"limits": {"events_per_s": 10}}})
        if st == 201:
            c = await connect_hello(args, device=d, token=tc.default_token(d, b["primary_key"]))
            a1 = await c.send_events_wait(stream, [{"temp": 1.0}] * 20)
            a2 = await c.send_events_wait(stream, {"temp": 1.0})
            ok = (a1["type"] == "ACK" and a1["count"] == 20 and a2["type"] == "REJECT"
                  and a2.get("code") == "rate_limited" and tc._is_int(a2.get("retry_after_ms"))
                  and a2["retry_after_ms"] > 0)
            a3 = None
            if ok:
                await asyncio.sleep(a2["retry_after_ms"] / 1000 + 0.2)
                a3 = await c.send_events_wait(stream, {"temp": 1.0})
                ok = a3["type"] == "ACK"
            steps.add("ext_rate_limited", ok, answers=[a1, a2, a3])
            await c.close(0)
            api.call("DELETE", f"/api/v1/devices/{d}")
    # HELLO timeout: a connection that opened the stream but never completed HELLO
    c = await tc.TributaryClient.connect(host, port, args.ca, server_name=args.server_name)
    c._send_raw(b"\x00\x00")  # noqa: SLF001  half a length prefix
    err, close = await expect_fatal(c, timeout=20)
    steps.add("ext_hello_timeout", bool(err and err["code"] == "hello_timeout" and close and close.code == 5),
              error=err, close=close.as_dict() if close else None)
    await c.close()


async def live(args) -> Steps:
    steps = Steps()
    api = None
    if args.http and args.admin_token:
        api = Api("http://" + args.http, args.admin_token)
    if api and args.create_stream:
        st, body = api.call("POST", "/api/v1/sql",
                            {"sql": f"CREATE STREAM {args.stream} (temp DOUBLE, humidity DOUBLE)"})
        log("create stream:", st, body)
    if not args.key:
        if not api:
            steps.add("setup", False, error="no --key and no HTTP API to create a device")
            return steps
        dev = args.device or "interop-%d" % int(time.time() * 1000)
        st, body = api.call("POST", "/api/v1/devices", {"id": dev, "tags": {"purpose": "interop"}})
        if st != 201:
            steps.add("setup_create_device", False, status=st, body=body)
            return steps
        args.device, args.key = dev, body["primary_key"]
        steps.add("setup_create_device", True, device=dev)
    try:
        await asyncio.wait_for(scenario(args, steps, api), args.timeout)
    except Exception as e:  # noqa: BLE001
        steps.add("scenario_exception", False, error=repr(e), trace=traceback.format_exc()[-1500:])
    return steps


def main(argv=None) -> int:
    global VERBOSE
    ap = argparse.ArgumentParser(
        description="Interop check for the Tributary device protocol v1 (independent aioquic client). "
                    "Prints a one-line JSON summary on stdout; exit code 0 only if every step passed.")
    ap.add_argument("--vectors", metavar="PROTOCOL_MD",
                    help="only decode the hex test vectors of section 13 of this file (and check the "
                         "security.md token vectors); no server needed")
    ap.add_argument("--data-dir", help="server data dir: supplies tls/ca.pem, admin.token and server.json "
                                       "(quic/http addresses) unless given explicitly")
    ap.add_argument("--quic", metavar="HOST:PORT", help="QUIC address of the server")
    ap.add_argument("--http", metavar="HOST:PORT", help="HTTP API address (to queue a command, twins, state)")
    ap.add_argument("--ca", metavar="PATH", help="CA certificate (default DATA_DIR/tls/ca.pem)")
    ap.add_argument("--admin-token", help="admin token (default: DATA_DIR/admin.token, or $TRIBUTARY_TOKEN)")
    ap.add_argument("--device", metavar="ID", help="device id (created through the API if --key is absent)")
    ap.add_argument("--key", metavar="BASE64KEY", help="one of the device's keys (base64); the client signs "
                                                     "its own tokens with it")
    ap.add_argument("--stream", default="interop", help="stream with columns temp DOUBLE, humidity DOUBLE "
                                                       "(default: interop)")
    ap.add_argument("--create-stream", action="store_true",
                    help="CREATE STREAM <stream> (temp DOUBLE, humidity DOUBLE) through the API first "
                         "(an error, e.g. if it exists, is ignored)")
    ap.add_argument("--expect-command", metavar="NAME",
                    help="without the HTTP API: wait for a COMMAND of this name that the harness queues "
                         "(POST /api/v1/devices/{id}/commands) and acknowledge it")
    ap.add_argument("--command-wait", type=float, default=30.0, metavar="S",
                    help="seconds to wait for --expect-command (default 30)")
    ap.add_argument("--extended", action="store_true",
                    help="also run slower checks: HELLO timeout (10 s), FIN, too_many_events, idempotent "
                         "resends, wrong ALPN, enrollment group")
    ap.add_argument("--strict", action="store_true",
                    help="also check promises this server was seen to break (FINDINGS.md); expected to fail")
    ap.add_argument("--server-name", default="localhost", help="TLS server name (default localhost)")
    ap.add_argument("--timeout", type=float, default=180.0, help="overall scenario timeout in seconds")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every step to stderr")
    args = ap.parse_args(argv)
    VERBOSE = args.verbose

    if args.vectors:
        steps = run_vectors(args.vectors)
        print(json.dumps(steps.summary("vectors"), default=str))
        return 0 if steps.ok else 1

    if args.data_dir:
        sj = os.path.join(args.data_dir, "server.json")
        if os.path.exists(sj) and (not args.quic or not args.http):
            with open(sj) as fh:
                srv = json.load(fh)
            args.quic = args.quic or srv.get("quic")
            args.http = args.http or srv.get("http")
        args.ca = args.ca or os.path.join(args.data_dir, "tls", "ca.pem")
        tokf = os.path.join(args.data_dir, "admin.token")
        if not args.admin_token and os.path.exists(tokf):
            with open(tokf) as fh:
                args.admin_token = fh.read().strip()
    args.admin_token = args.admin_token or os.environ.get("TRIBUTARY_TOKEN")
    if not args.quic or not args.ca:
        ap.error("need --quic and --ca (or --data-dir)")
    steps = asyncio.run(live(args))
    print(json.dumps(steps.summary("live", device=args.device, quic=args.quic), default=str))
    return 0 if steps.ok else 1


if __name__ == "__main__":
    sys.exit(main())
