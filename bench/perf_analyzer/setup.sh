#!/usr/bin/env bash
# Sets up Triton's perf_analyzer (its load generator) in build/perf_analyzer/, which git ignores:
#
#   build/perf_analyzer/perf_analyzer       the command: runs bin/perf_analyzer with lib/ on
#                                           LD_LIBRARY_PATH
#   build/perf_analyzer/bin/perf_analyzer   the binary, from the tritonclient 2.47.0 manylinux
#                                           wheel (the `perf-analyzer` name on PyPI is a
#                                           placeholder; later tritonclient wheels ship none)
#   build/perf_analyzer/lib/libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel: the binary
#                                           links it even when the server has no GPU
#
# and installs Debian's libb64-0d (apt-get) when the system lacks libb64.so.0d. Wheels come
# through pip (`pip download`, from the package index pip is set up for); nothing is installed
# into any Python environment. Running it again does nothing once the command works.
#
#   bash bench/perf_analyzer/setup.sh        # PYTHON=python3 by default (any Python with pip)
set -euo pipefail
cd "$(dirname "$0")/../.."

DIR=${PERF_ANALYZER_DIR:-build/perf_analyzer}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TRITONCLIENT=tritonclient==2.47.0
CUDART=nvidia-cuda-runtime-cu12==12.9.79

works() {
    [ -x "$DIR/perf_analyzer" ] && "$DIR/perf_analyzer" --version >/dev/null 2>&1
}
if works; then
    echo "perf_analyzer is set up: $DIR/perf_analyzer"
    exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "setup.sh: the perf_analyzer binary in the tritonclient wheel is for Linux x86_64 only" >&2
    exit 1
fi

if ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    echo "installing libb64-0d (Debian/Ubuntu) ..."
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq libb64-0d
fi

mkdir -p "$DIR/wheels" "$DIR/bin" "$DIR/lib"
echo "downloading $TRITONCLIENT and $CUDART ..."
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux1_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --dest "$DIR/wheels" "$TRITONCLIENT" "$CUDART"

"$PYTHON" - "$DIR" <<'PY'
import glob, os, sys, zipfile

out = sys.argv[1]
members = {"tritonclient-*.whl": ("tritonclient-2.47.0.data/data/bin/perf_analyzer",
                                  "bin/perf_analyzer"),
           "nvidia_cuda_runtime_cu12-*.whl": ("nvidia/cuda_runtime/lib/libcudart.so.12",
                                              "lib/libcudart.so.12")}
for pattern, (member, target) in members.items():
    wheel = sorted(glob.glob(os.path.join(out, "wheels", pattern)))[-1]
    with zipfile.ZipFile(wheel) as archive, open(os.path.join(out, target), "wb") as f:
        f.write(archive.read(member))
os.chmod(os.path.join(out, "bin/perf_analyzer"), 0o755)
PY

cat > "$DIR/perf_analyzer" <<'SH'
#!/usr/bin/env bash
# perf_analyzer from the tritonclient 2.47.0 wheel, with the CUDA runtime it links beside it.
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/bin/perf_analyzer" "$@"
SH
chmod +x "$DIR/perf_analyzer"

if ! works; then
    echo "setup.sh: $DIR/perf_analyzer does not run; missing libraries:" >&2
    LD_LIBRARY_PATH="$DIR/lib" ldd "$DIR/bin/perf_analyzer" | grep 'not found' >&2 || true
    exit 1
fi
echo "perf_analyzer is set up: $DIR/perf_analyzer"
