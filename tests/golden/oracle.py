#!/usr/bin/env python3
"""Computes the expected output of the streaming golden cases independently
of Tributary's engine.

For every `tests/golden/*.case` with an `oracle:` header this script:

1. replays the case's events (and `tick` lines) through a plain Python model
   of the watermark semantics (per device or global, from the case's `mode:`)
   and finds the late events;
2. loads the on-time events into DuckDB as table `on_time` (plus columns
   `seq`, the arrival order, and `released`, whether a per-event OVER rule
   emits the event's row: its watermark passed it by the end), with the final
   watermarks as tables `device_wm(device_id, wm)` and `global_wm(wm)`;
3. runs the case's oracle SQL and rewrites the `expected rows:` and
   `expected late:` sections.

Usage:
    python3 tests/golden/oracle.py           # rewrite the cases
    python3 tests/golden/oracle.py --check   # exit 1 if a case would change
    python3 tests/golden/oracle.py FILE...   # only these cases

Needs the `duckdb` module (e.g. `python3 -m venv v && v/bin/pip install duckdb`).
Cases without an `oracle:` header are stateless and owned by the Rust harness
(`TRIBUTARY_GOLDEN=rewrite cargo test -p tributary-tests --test integration golden`).

The case format is described in tests/golden/README.md.
"""

import datetime
import decimal
import glob
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NEG_INF = float("-inf")
# What an unset watermark is shown as in DuckDB (BIGINT has no -infinity).
NO_WATERMARK = -(2**62)


# ---------------------------------------------------------------- the format


class Case:
    def __init__(self, path):
        self.path = path
        with open(path, encoding="utf-8") as f:
            self.text = f.read()
        lines = self.text.split("\n")
        self.headers = {}
        self.events = []  # list of ("event", fields) / ("tick", ms)
        self.event_header = None
        self.prefix_lines = []
        section = "head"
        last_key = None
        for line in lines:
            stripped = line.strip()
            if section in ("head", "events") and stripped == "expected rows:":
                break
            self.prefix_lines.append(line)
            if section == "head":
                if stripped == "events:":
                    section = "events"
                    continue
                if not stripped or stripped.startswith("#"):
                    continue
                if line[0] in " \t" and last_key:
                    self.headers[last_key] += "\n" + stripped
                    continue
                m = re.match(r"^([a-z_]+):\s*(.*)$", line)
                if not m:
                    raise SystemExit(f"{path}: cannot read header line {line!r}")
                last_key = m.group(1)
                self.headers[last_key] = m.group(2).strip()
            elif section == "events":
                if not stripped or stripped.startswith("#"):
                    continue
                if self.event_header is None:
                    self.event_header = [c.strip() for c in stripped.split(",")]
                    continue
                m = re.match(r"^tick\s+(-?\d+)$", stripped)
                if m:
                    self.events.append(("tick", int(m.group(1))))
                else:
                    self.events.append(("event", split_csv(stripped)))
        while self.prefix_lines and not self.prefix_lines[-1].strip():
            self.prefix_lines.pop()


def split_csv(line):
    out, cur, quoted, i = [], [], False, 0
    while i < len(line):
        c = line[i]
        if quoted:
            if c == '"' and i + 1 < len(line) and line[i + 1] == '"':
                cur.append('"')
                i += 1
            elif c == '"':
                quoted = False
            else:
                cur.append(c)
        elif c == '"':
            quoted = True
        elif c == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def csv_field(s):
    if any(c in s for c in ',"\n') or s != s.strip():
        return '"' + s.replace('"', '""') + '"'
    return s


def fmt_float(x):
    """9 significant digits, no exponent between 1e-7 and 1e16: the Rust
    harness formats floats the same way."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    mant, exp = f"{x:.8e}".split("e")
    exp = int(exp)
    neg = mant.startswith("-")
    digits = mant.lstrip("-").replace(".", "").rstrip("0") or "0"
    if -7 <= exp < 16:
        if exp >= 0:
            whole = digits[: exp + 1].ljust(exp + 1, "0")
            frac = digits[exp + 1 :]
        else:
            whole = "0"
            frac = "0" * (-exp - 1) + digits
        s = whole + ("." + frac if frac else "")
    else:
        s = digits[0] + ("." + digits[1:] if len(digits) > 1 else "") + "e" + str(exp)
    return ("-" if neg else "") + s


def fmt_value(v):
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return fmt_float(v)
    if isinstance(v, decimal.Decimal):
        return fmt_float(float(v))
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=datetime.timezone.utc)
        delta = v - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return str(delta // datetime.timedelta(milliseconds=1))
    return csv_field(str(v))


# ------------------------------------------------------------ the stream


def parse_duration(text):
    m = re.match(r"^\s*'?\s*(\d+)\s*([a-z]+)\s*'?\s*$", text.lower())
    if not m:
        raise ValueError(f"not a duration: {text}")
    n, unit = int(m.group(1)), m.group(2)
    scale = {
        "ms": 1, "millisecond": 1, "milliseconds": 1,
        "s": 1000, "sec": 1000, "second": 1000, "seconds": 1000,
        "m": 60000, "min": 60000, "minute": 60000, "minutes": 60000,
        "h": 3600000, "hour": 3600000, "hours": 3600000,
        "d": 86400000, "day": 86400000, "days": 86400000,
    }[unit]
    return n * scale


def parse_interval(text):
    m = re.match(r"^\s*INTERVAL\s+'(\d+)'\s+([A-Za-z]+)\s*$", text, re.I)
    if not m:
        raise ValueError(f"cannot read interval {text!r}")
    return parse_duration(m.group(1) + m.group(2).lower())


DUCK_TYPES = {
    "DOUBLE": "DOUBLE", "FLOAT8": "DOUBLE", "FLOAT64": "DOUBLE",
    "REAL": "FLOAT", "FLOAT": "FLOAT", "FLOAT4": "FLOAT", "FLOAT32": "FLOAT",
    "INT": "INTEGER", "INTEGER": "INTEGER", "INT4": "INTEGER", "INT32": "INTEGER",
    "BIGINT": "BIGINT", "INT8": "BIGINT", "INT64": "BIGINT",
    "BOOLEAN": "BOOLEAN", "BOOL": "BOOLEAN",
    "VARCHAR": "VARCHAR", "TEXT": "VARCHAR", "STRING": "VARCHAR",
}


class Stream:
    def __init__(self, sql):
        m = re.match(
            r"^\s*CREATE\s+STREAM\s+(\w+)\s*\((.*?)\)\s*(?:WITH\s*\((.*)\))?\s*;?\s*$",
            sql, re.I | re.S,
        )
        if not m:
            raise ValueError(f"cannot read stream {sql!r}")
        self.name = m.group(1)
        self.columns = []
        for col in m.group(2).split(","):
            name, ty = col.split(None, 1)
            base = ty.split("(")[0].strip().upper()
            self.columns.append((name.lower(), DUCK_TYPES[base]))
        self.delay = 5000
        self.idle = 60000
        for opt in (m.group(3) or "").split(","):
            if "=" not in opt:
                continue
            k, v = [x.strip() for x in opt.split("=", 1)]
            if k.lower() == "watermark_delay":
                self.delay = parse_duration(v)
            elif k.lower() == "idle_timeout":
                self.idle = parse_duration(v)


class Window:
    """The rule's window, only needed for a per-device rule's silent
    devices: their open windows close and their watermark rises to the
    newest end among them. A per-event rule (OVER) has kind "over": a silent
    device's waiting events are released, its watermark rising just past the
    newest of them."""

    def __init__(self, rule):
        iv = r"(INTERVAL\s+'\d+'\s+[A-Za-z]+)"
        if re.search(r"\bOVER\b", rule, re.I):
            self.kind = "over"
            return
        m = re.search(r"tumble\s*\(\s*ts\s*,\s*" + iv + r"\s*\)", rule, re.I)
        if m:
            self.kind, self.size = "tumble", parse_interval(m.group(1))
            return
        m = re.search(r"hop\s*\(\s*ts\s*,\s*" + iv + r"\s*,\s*" + iv + r"\s*\)", rule, re.I)
        if m:
            self.kind = "hop"
            self.slide, self.size = parse_interval(m.group(1)), parse_interval(m.group(2))
            return
        m = re.search(r"session\s*\(\s*ts\s*,\s*" + iv + r"\s*\)", rule, re.I)
        if m:
            self.kind, self.gap = "session", parse_interval(m.group(1))
            return
        raise ValueError("the rule has no tumble/hop/session window")

    def newest_end(self, ts):
        """The end of the newest window holding an event at ts (for sessions,
        the end the event gives its session at least)."""
        if self.kind == "over":
            return ts + 1
        if self.kind == "tumble":
            return ts - ts % self.size + self.size
        if self.kind == "hop":
            return ts - ts % self.slide + self.size
        return ts + self.gap


# ------------------------------------------------------ watermark reference


class Device:
    def __init__(self):
        self.max_ts = NEG_INF
        self.last_seen = NEG_INF
        self.floor = NEG_INF
        self.active = False
        self.on_time = []


def replay(stream, window, per_device, items):
    """Returns (late flags per event, final device watermarks, final global
    watermark), following the semantics of the stream's watermarks."""
    devices = {}
    order = []
    glob_wm = NEG_INF
    now = NEG_INF
    late_flags = []

    def wm(d):
        return max(d.max_ts - stream.delay, d.floor)

    def expire():
        silent = []
        for name in order:
            d = devices[name]
            if d.active and d.last_seen < now - stream.idle:
                d.active = False
                silent.append(name)
        return silent

    def update_global():
        nonlocal glob_wm
        active = [wm(devices[n]) for n in order if devices[n].active]
        cand = min(active) if active else max((wm(devices[n]) for n in order), default=NEG_INF)
        glob_wm = max(glob_wm, cand)

    def close_silent(silent):
        # A per-device rule closes every window of a silent device and
        # raises its watermark to the newest end among them.
        for name in silent:
            d = devices[name]
            current = wm(d)
            ends = [window.newest_end(t) for t in d.on_time]
            ends = [e for e in ends if e > current]
            if ends:
                d.floor = max(d.floor, max(ends))

    for kind, item in items:
        if kind == "tick":
            now = max(now, item)
            silent = expire()
            if per_device:
                close_silent(silent)
            else:
                update_global()
            continue
        name, ts, received = item
        if name not in devices:
            devices[name] = Device()
            order.append(name)
        d = devices[name]
        late = ts < (wm(d) if per_device else glob_wm)
        late_flags.append(late)
        d.max_ts = max(d.max_ts, ts)
        d.last_seen = max(d.last_seen, received)
        d.active = True
        if not late:
            d.on_time.append(ts)
        now = max(now, received)
        silent = expire()
        if per_device:
            close_silent(silent)
        else:
            update_global()
    finals = {n: wm(devices[n]) for n in order}
    return late_flags, finals, glob_wm


def as_bigint(x):
    return NO_WATERMARK if x == NEG_INF else int(x)


# ------------------------------------------------------------------ running


def expected_sections(case):
    try:
        import duckdb  # imported here so that --help works without it
    except ImportError:
        raise SystemExit(
            "oracle.py needs the duckdb module: run it with a venv that has it, "
            "e.g. /tmp/venv/bin/python tests/golden/oracle.py"
        )

    stream = Stream(case.headers["stream"])
    mode = case.headers.get("mode", "").strip()
    if mode not in ("per_device", "global"):
        raise SystemExit(f"{case.path}: an oracle case needs `mode: per_device` or `mode: global`")
    per_device = mode == "per_device"
    window = Window(case.headers["rule"])
    header = case.event_header
    names = ["device_id", "ts", "received_at"] + [c for c, _ in stream.columns]
    for h in header:
        if h not in names:
            raise SystemExit(f"{case.path}: event column {h!r} is not in the stream")
    for required in ("device_id", "ts"):
        if required not in header:
            raise SystemExit(f"{case.path}: events need a {required} column")

    rows = []
    items = []
    for kind, item in case.events:
        if kind == "tick":
            items.append(("tick", item))
            continue
        if len(item) != len(header):
            raise SystemExit(f"{case.path}: event {item} does not match header {header}")
        raw = dict(zip(header, item))
        ts = int(raw["ts"])
        received = int(raw["received_at"]) if raw.get("received_at", "") != "" else ts
        row = {"device_id": raw["device_id"], "ts": ts, "received_at": received}
        for c, ty in stream.columns:
            v = raw.get(c, "")
            if v == "" or v == "NULL":
                row[c] = None
            elif ty in ("DOUBLE", "FLOAT"):
                row[c] = float(v)
            elif ty in ("INTEGER", "BIGINT"):
                row[c] = int(v)
            elif ty == "BOOLEAN":
                row[c] = v.lower() == "true"
            else:
                row[c] = v
        rows.append(row)
        items.append(("event", (row["device_id"], ts, received)))

    late_flags, finals, glob_wm = replay(stream, window, per_device, items)

    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    cols = [("device_id", "VARCHAR"), ("ts", "BIGINT"), ("received_at", "BIGINT")] + stream.columns
    # Two more columns: `seq`, the event's position in the file (arrival
    # order, to break ties of ts), and `released`, whether a per-event (OVER)
    # rule has emitted the event's row by the end: an event waits until the
    # watermark passes it (ts < watermark; the device's own in per-device
    # mode, the global one otherwise), and one still waiting is not emitted,
    # though it is not late either.
    extra = [("seq", "BIGINT"), ("released", "BOOLEAN")]
    ddl = ", ".join(f'"{c}" {t}' for c, t in cols + extra)
    con.execute(f"CREATE TABLE on_time ({ddl})")
    con.execute(f"CREATE TABLE late_events ({ddl})")
    placeholders = ", ".join("?" for _ in cols + extra)
    for seq, (row, late) in enumerate(zip(rows, late_flags)):
        table = "late_events" if late else "on_time"
        wm = finals[row["device_id"]] if per_device else glob_wm
        released = not late and row["ts"] < wm
        values = [row[c] for c, _ in cols] + [seq, released]
        con.execute(f"INSERT INTO {table} VALUES ({placeholders})", values)
    con.execute("CREATE TABLE device_wm (device_id VARCHAR, wm BIGINT)")
    for name, w in finals.items():
        con.execute("INSERT INTO device_wm VALUES (?, ?)", [name, as_bigint(w)])
    con.execute("CREATE TABLE global_wm (wm BIGINT)")
    con.execute("INSERT INTO global_wm VALUES (?)", [as_bigint(glob_wm)])

    result = con.execute(case.headers["oracle"])
    columns = [d[0] for d in result.description]
    out_rows = sorted(",".join(fmt_value(v) for v in r) for r in result.fetchall())
    late_rows = sorted(
        f"{csv_field(r['device_id'])},{r['ts']}" for r, late in zip(rows, late_flags) if late
    )
    lines = ["expected rows:", ",".join(csv_field(c) for c in columns)] + out_rows
    lines += ["", "expected late:", "device_id,ts"] + late_rows
    return lines


def render(case, sections):
    return "\n".join(case.prefix_lines + [""] + sections) + "\n"


def main(argv):
    check = "--check" in argv
    files = [a for a in argv if not a.startswith("--")]
    if not files:
        files = sorted(glob.glob(os.path.join(HERE, "*.case")))
    changed = []
    for path in files:
        case = Case(path)
        if "oracle" not in case.headers:
            continue
        new = render(case, expected_sections(case))
        if new != case.text:
            changed.append(path)
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    verb = "would change" if check else "rewritten"
    for path in changed:
        print(f"{verb}: {os.path.relpath(path)}")
    if check and changed:
        print("the expected sections above are out of date; run python3 tests/golden/oracle.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
