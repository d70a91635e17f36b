"""The DuckDB side of the query comparison (benches/src/queries.rs).

Reads one JSON object on stdin (or from the file named as the first
argument):

    {"parquet_dir": "<data>/storage/sim", "stream": "sim", "runs": 5,
     "devices": [{"id": "sim-0", "status": "enabled", "site": "site-0"}, ...],
     "queries": [{"name": "count", "sql": "SELECT count(*) AS n FROM sim"}, ...]}

opens an in-memory DuckDB, makes `<stream>` a view over every Parquet file
under `parquet_dir` (hive_partitioning off: the `date=`/`hour=` folders
would otherwise add columns), loads `devices` as a table, and runs each
query once to warm up (keeping its rows) and `runs` times timed, each
materialized as an Arrow table. Prints one JSON object:

    {"duckdb": "<version>", "threads": N,
     "results": [{"name", "median_ms", "times_ms", "columns", "rows", "error"}]}

Timestamps in rows are epoch milliseconds; other values as JSON has them.
"""

import datetime
import decimal
import json
import statistics
import sys
import time

import duckdb


def plain(value):
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return round(value.timestamp() * 1000)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    return value


def arrow(cursor):
    """The result as an Arrow table (the method's name changed in DuckDB 2)."""
    if hasattr(cursor, "to_arrow_table"):
        return cursor.to_arrow_table()
    return cursor.fetch_arrow_table()


def main():
    if len(sys.argv) > 1:
        with open(sys.argv[1]) as f:
            spec = json.load(f)
    else:
        spec = json.load(sys.stdin)
    runs = max(1, int(spec.get("runs", 5)))
    stream = spec.get("stream", "sim")
    db = duckdb.connect()
    # Timestamps in Parquet are UTC instants; bucket them in UTC as the
    # server does.
    db.execute("SET TimeZone = 'UTC'")
    pattern = spec["parquet_dir"].rstrip("/") + "/**/*.parquet"
    db.execute(
        f"CREATE VIEW {stream} AS SELECT * FROM "
        f"read_parquet('{pattern}', hive_partitioning = false)"
    )
    db.execute("CREATE TABLE devices (id VARCHAR, status VARCHAR, site VARCHAR)")
    devices = spec.get("devices", [])
    if devices:
        db.executemany(
            "INSERT INTO devices VALUES (?, ?, ?)",
            [(d.get("id"), d.get("status"), d.get("site")) for d in devices],
        )
    threads = db.execute("SELECT current_setting('threads')").fetchone()[0]

    results = []
    for q in spec["queries"]:
        out = {"name": q["name"], "sql": q["sql"]}
        try:
            cursor = db.execute(q["sql"])
            out["columns"] = [c[0] for c in cursor.description]
            out["rows"] = [[plain(v) for v in row] for row in cursor.fetchall()]
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                arrow(db.execute(q["sql"]))
                times.append((time.perf_counter() - started) * 1000.0)
            out["times_ms"] = times
            out["median_ms"] = statistics.median(times)
        except Exception as e:  # reported per query, the others still run
            out["error"] = str(e)
        results.append(out)
    json.dump(
        {"duckdb": duckdb.__version__, "threads": threads, "results": results},
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
