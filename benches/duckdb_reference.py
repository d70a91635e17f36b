"""The DuckDB reference for the `window_tumble_avg` bench.

Usage: duckdb_reference.py EVENTS.parquet QUERY [RUNS]

Loads the Parquet file into an in-memory table `events` (not timed), then
times QUERY, materialized into a temporary table so that no rows cross into
Python, first with DuckDB's default thread count (all cores) and then with
one thread. Prints one line per setting:

    RESULT threads=N best_s=... median_s=... runs=R rows=... events=...

or `SKIP <reason>` when the duckdb module is missing. The bench
(benches/benches/window_tumble.rs) runs this and reads those lines.
"""

import statistics
import sys
import time


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, query = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    try:
        import duckdb
    except ImportError:
        print(f"SKIP the duckdb module is not installed for {sys.executable}")
        return 0

    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE events AS SELECT * FROM read_parquet(?)", [path])
    events = con.execute("SELECT count(*) FROM events").fetchone()[0]
    default_threads = int(con.execute("SELECT current_setting('threads')").fetchone()[0])
    timed = f"CREATE OR REPLACE TEMP TABLE result AS {query}"
    for threads in dict.fromkeys([default_threads, 1]):
        con.execute(f"SET threads = {threads}")
        con.execute(timed)  # warm-up
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            con.execute(timed)
            times.append(time.perf_counter() - started)
        rows = con.execute("SELECT count(*) FROM result").fetchone()[0]
        print(
            f"RESULT threads={threads} best_s={min(times):.6f} "
            f"median_s={statistics.median(times):.6f} runs={runs} rows={rows} "
            f"events={events} duckdb={duckdb.__version__}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
