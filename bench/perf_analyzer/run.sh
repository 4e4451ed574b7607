#!/usr/bin/env bash
# Triton's perf_analyzer against camserve's Open Inference Protocol endpoint (docs/oip.md):
# closed-loop callers at each concurrency (1, 2, 4, 8, 16 by default), every request one real
# JPEG (tests/data/chelsea.jpg, 451x300) as input `image` (BYTES [1, 1]); prints throughput and
# p50/p99 latency per concurrency as a table.
#
#   bash bench/perf_analyzer/run.sh                  # starts camserve-server (default model)
#   bash bench/perf_analyzer/run.sh HOST:PORT        # a server that is already running
#   bash bench/perf_analyzer/run.sh HOST:PORT --request-parameter explain:true:bool
#                                                    # after the target: perf_analyzer flags
# Environment: CONCURRENCY ("1 2 4 8 16"), WINDOW_MS (measurement window, 4000), IMAGE,
# OIP_MODEL (camserve), SERVER_ARGS (flags for the server this script starts, e.g.
# "--model torchvision:resnet18 --weights w.pt"), PERF_ANALYZER_DIR (build/perf_analyzer).
# Run bench/perf_analyzer/setup.sh first (`make bench-oip` does both).
set -euo pipefail
cd "$(dirname "$0")/../.."

DIR=${PERF_ANALYZER_DIR:-build/perf_analyzer}
PA="$DIR/perf_analyzer"
CONCURRENCY=${CONCURRENCY:-1 2 4 8 16}
WINDOW_MS=${WINDOW_MS:-4000}
IMAGE=${IMAGE:-tests/data/chelsea.jpg}
OIP_MODEL=${OIP_MODEL:-camserve}
PY=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
[ -x "$PA" ] || { echo "run.sh: no $PA; run bench/perf_analyzer/setup.sh first" >&2; exit 1; }

target=
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then target=$1; shift; fi
work=$(mktemp -d)
server=
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$target" ]; then
    server_cmd=${CAMSERVE_SERVER:-$( [ -x .venv/bin/camserve-server ] && echo .venv/bin/camserve-server || echo camserve-server )}
    # shellcheck disable=SC2086  # SERVER_ARGS is a list of flags
    "$server_cmd" --host 127.0.0.1 --port 0 --oip-model-name "$OIP_MODEL" ${SERVER_ARGS:-} \
        >"$work/server.out" 2>"$work/server.log" &
    server=$!
    for _ in $(seq 600); do  # the model loads and warms up: at most 60 s
        grep -q "serving" "$work/server.out" 2>/dev/null && break
        kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
        sleep 0.1
    done
    grep -q "serving" "$work/server.out" || { echo "run.sh: the server did not start" >&2; exit 1; }
    target=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$work/server.out" | head -1)
    echo "started: $server_cmd --host 127.0.0.1 --port 0 --oip-model-name $OIP_MODEL ${SERVER_ARGS:-} ($target)"
fi

# --input-data: a BYTES element is its length (4 bytes, little-endian), then its bytes, base64'd.
"$PY" - "$IMAGE" "$work/input.json" <<'PY'
import base64, json, struct, sys

data = open(sys.argv[1], "rb").read()
element = base64.b64encode(struct.pack("<I", len(data)) + data).decode()
json.dump({"data": [{"image": {"content": {"b64": element}, "shape": [1]}}]},
          open(sys.argv[2], "w"))
PY

command=("$PA" -m "$OIP_MODEL" -i grpc -u "$target" --input-data "$work/input.json"
         --measurement-interval "$WINDOW_MS" --stability-percentage 20 --max-trials 8 "$@")
echo "perf_analyzer $("$PA" --version 2>&1 | head -1 | sed 's/.*Version //'): ${command[*]:1} --concurrency-range N -f CSV   (N in $CONCURRENCY)"
relaxed=
for n in $CONCURRENCY; do
    run=("${command[@]}" --concurrency-range "$n" -f "$work/c$n.csv")
    if ! "${run[@]}" >"$work/c$n.log" 2>&1; then
        # A busy machine may never give 3 windows within 20 % of each other: once more, with
        # windows twice as long and a 40 % band (the table marks such a row with *).
        relaxed="$relaxed $n"
        if ! "${run[@]}" --measurement-interval $((2 * WINDOW_MS)) --stability-percentage 40 \
                >"$work/c$n.log" 2>&1; then
            echo "concurrency $n failed:" >&2; tail -3 "$work/c$n.log" >&2
            rm -f "$work/c$n.csv"
        fi
    fi
done

RELAXED="$relaxed" "$PY" - "$work" $CONCURRENCY <<'PY'
import csv, os, sys

work, levels = sys.argv[1], sys.argv[2:]
relaxed = os.environ["RELAXED"].split()
print()
print("| concurrency | infer/s | p50 ms | p90 ms | p99 ms |")
print("|---:|---:|---:|---:|---:|")
for n in levels:
    path = os.path.join(work, f"c{n}.csv")
    if not os.path.exists(path):
        print(f"| {n} | failed | | | |")
        continue
    with open(path) as f:
        for row in csv.DictReader(f):
            ms = {k: float(row[f"{k} latency"]) / 1000 for k in ("p50", "p90", "p99")}
            mark = "*" if n in relaxed else ""
            print(f"| {row['Concurrency']}{mark} | {float(row['Inferences/Second']):.1f} | "
                  f"{ms['p50']:.1f} | {ms['p90']:.1f} | {ms['p99']:.1f} |")
if relaxed:
    print("\n* not stable within 20 % in 8 windows: measured again with windows twice as long, "
          "within 40 %")
PY
