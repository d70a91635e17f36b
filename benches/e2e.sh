#!/usr/bin/env bash
# The end-to-end benchmark (docs/benchmarks.md, "End-to-end benchmark"), from
# a clean clone in one command: installs what it measures against (Debian's
# mosquitto and mosquitto-clients, when root and they are missing; DuckDB and
# pyarrow from PyPI into target/bench-venv), builds the release server and
# the runner, then runs benches/src/bin/e2e.rs, which starts a server on a
# temporary data directory, measures ingest (beside mosquitto), event →
# command latency, storage, queries (beside DuckDB) and window throughput,
# and writes the results into docs/benchmarks.md and target/e2e-results.json.
#
#   benches/e2e.sh                    # the full run (well under 15 minutes)
#   benches/e2e.sh --quick            # a reduced matrix, for a smoke test
#   benches/e2e.sh --duration-s 8     # longer ingest runs (default 4 s each)
#   benches/e2e.sh --no-window        # skip the criterion window bench
#   benches/e2e.sh -- --fsync never   # extra `tributary serve` flags
set -euo pipefail
cd "$(dirname "$0")/.."

want_window=1
for arg in "$@"; do
    case "$arg" in
        --no-window) want_window=0 ;;
        --) break ;;
    esac
done

say() { echo "[e2e.sh] $*" >&2; }

# mosquitto, the ingest peer. Without it the run still goes on and reports
# it as not installed.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] \
    || ! command -v mosquitto_pub >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing mosquitto and mosquitto-clients (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto mosquitto-clients >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto mosquitto-clients >/dev/null; } \
            || say "warning: could not install mosquitto; its rows will say 'not installed'"
    else
        say "warning: mosquitto is missing (apt-get install mosquitto mosquitto-clients); its rows will say 'not installed'"
    fi
fi

# DuckDB (and pyarrow, which its Arrow results need) in a local venv.
venv=target/bench-venv
python=$venv/bin/python
if ! "$python" -c 'import duckdb, pyarrow' >/dev/null 2>&1; then
    say "setting up $venv with duckdb and pyarrow (PyPI)"
    mkdir -p target
    python3 -m venv "$venv" || {
        echo "error: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
    "$venv/bin/pip" install -q --disable-pip-version-check duckdb pyarrow || {
        echo "error: pip could not install duckdb and pyarrow into $venv" >&2
        exit 1
    }
fi

say "building the release binaries (the first build takes a while)"
# One cargo invocation for the server, the runner and the criterion bench:
# cargo resolves one feature set for them all, so DataFusion is built once.
# (A separate `cargo bench` would resolve the bench's dev-dependencies on
# their own, with other features of serde, serde_json and the like, and
# build DataFusion a second time.)
target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$target_dir"
build_log=$target_dir/e2e-build.jsonl
cargo build --release -p tributary-cli -p tributary-benches \
    --bin tributary --bin e2e --bench tributary \
    --message-format json-render-diagnostics >"$build_log"
window_bench=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("name") == "tributary" \
            and "bench" in t.get("kind", []) and m.get("executable"):
        print(m["executable"])
' "$build_log")
if [ "$want_window" = 1 ] && [ -z "$window_bench" ]; then
    echo "error: cargo built no window bench executable (see $build_log)" >&2
    exit 1
fi

E2E_COMMAND="benches/e2e.sh${*:+ $*}" exec "$target_dir/release/e2e" \
    --bin "$target_dir/release/tributary" --python "$python" \
    ${window_bench:+--window-bench "$window_bench"} \
    --out docs/benchmarks.md --results "$target_dir/e2e-results.json" "$@"
