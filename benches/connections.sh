#!/usr/bin/env bash
# The load check of many concurrent device connections (docs/benchmarks.md,
# "Connections"): builds the release server and the runner, then opens
# DEVICES QUIC connections to a fresh server and reports its memory per
# connection, the time to connect them all, and any errors.
#
#   benches/connections.sh                      # 10,000 devices
#   DEVICES=2000 HOLD_S=10 benches/connections.sh
#   benches/connections.sh -- --max-connections 20000   # extra `serve` flags
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-10000}
PER_ENDPOINT=${PER_ENDPOINT:-1000}
PARALLEL=${PARALLEL:-200}
HOLD_S=${HOLD_S:-60}

cargo build --release -p tributary-cli -p tributary-benches --bin tributary --bin connections
target_dir=${CARGO_TARGET_DIR:-target}

# One UDP socket per client endpoint and one for the server: the open-files
# limit is not what bounds QUIC connections, but say what it is.
echo "ulimit -n: $(ulimit -n)"
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
date -u +"date: %Y-%m-%dT%H:%M:%SZ"

TRIBUTARY_BIN="$target_dir/release/tributary" exec "$target_dir/release/connections" \
    --devices "$DEVICES" --per-endpoint "$PER_ENDPOINT" --parallel "$PARALLEL" --hold-s "$HOLD_S" "$@"
