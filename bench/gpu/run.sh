#!/usr/bin/env bash
# Run THERE (the GPU machine, no network), from the repository root, after bench/gpu/prepare.sh
# ran here and with bench/gpu/wheels carried along:
#
#   device tool: run(command="bash bench/gpu/run.sh", carry=["bench/gpu/wheels"], timeout_s=540)
#
# 1. installs the carried wheels into a temporary folder (pip --no-index --no-deps --target);
#    the checkout's own client/ and server/ come first on PYTHONPATH, so the code tested is
#    this checkout's;
# 2. runs the `cuda` tests (tests/test_cuda.py; precision figures to $OUT/precision.json);
# 3. runs the GPU benchmark (bench/bench_gpu.py --device cuda: resnet50 and the default model,
#    batch 1..64, engine / Captum / pytorch-grad-cam / forward in process, gRPC with 1, 16, 64
#    callers) and writes its tables to $OUT (bench_gpu.md, bench_gpu.json) when OUT is set.
#
# Budget: about 5 minutes on an H100/H200 (tests about 1, the benchmark about 4); it must stay
# under 8. BENCH_ARGS adds or overrides benchmark flags.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$(mktemp -d)}
SITE=$(mktemp -d)
WHEELS=bench/gpu/wheels
export PYTHONUNBUFFERED=1
started=$(date +%s)

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "no wheels in $WHEELS: run bench/gpu/prepare.sh on a machine with network and carry" \
    "bench/gpu/wheels" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$WHEELS"/*.whl || exit 2
if ! "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/pytest/*.whl || exit 2
fi
export PYTHONPATH="$PWD/client:$PWD/server:$PWD/tests:$SITE${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, torchvision, grpc, google.protobuf as p; print('python', \
__import__('sys').version.split()[0], 'torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'grpcio', grpc.__version__, 'protobuf', p.__version__, 'cuda', \
torch.cuda.is_available())"
  git log -1 --format='commit %H %s' 2>/dev/null || true
} 2>&1 | tee "$OUT_DIR/machine.txt"

echo "== cuda tests =="
CAMSERVE_FIGURES="$OUT_DIR" timeout 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider \
  tests/test_cuda.py 2>&1 | tee "$OUT_DIR/test_cuda.log"
tests=${PIPESTATUS[0]}
echo "cuda tests: exit status $tests after $(( $(date +%s) - started )) s"

echo "== GPU benchmark =="
left=$(( 460 - ($(date +%s) - started) ))
timeout "$left" "$PY" bench/bench_gpu.py --device cuda --markdown "$OUT_DIR/bench_gpu.md" \
  --json "$OUT_DIR/bench_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT_DIR/bench_gpu.log"
bench=${PIPESTATUS[0]}
echo "benchmark: exit status $bench after $(( $(date +%s) - started )) s"
echo "results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
