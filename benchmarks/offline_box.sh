#!/usr/bin/env bash
# Runs sluice's benchmarks on a many-core Linux machine with no network access,
# with the load generator on other cores than the servers.
#
# Usage: benchmarks/offline_box.sh CARRY OUTDIR SERVER_CPUS LOADGEN_CPUS SCRIPT [ARGS...]
#   e.g. benchmarks/offline_box.sh .carry "$OUT" 0-7 8-15 benchmarks/frontends.py --frontends 1,2,4
#
# The machine must have python3 with numpy, onnx, onnxruntime, uvloop, aiohttp,
# prometheus-client, pyyaml, psutil, ml-dtypes, urllib3, pybind11,
# scikit-build-core, cmake and a C++ compiler. Everything else is carried in
# CARRY, prepared on a machine with network access:
#   CARRY/whl  wheels for that python: grpcio, grpcio-tools, protobuf,
#              grpcio-health-checking, grpcio-reflection, orjson, tritonclient
#              (pip download --no-deps --only-binary=:all: --python-version ...)
#   CARRY/pa   perf_analyzer (from the tritonclient==2.41.1 wheel's bin/),
#              libcudart.so.12 (nvidia-cuda-runtime-cu12) and libb64.so.0d (Debian's libb64-0d)
set -euo pipefail
CARRY=$(readlink -f "$1")
OUT=$(readlink -f "$2")
SERVER_CPUS=$3
LOADGEN_CPUS=$4
shift 4
SITE=${SLUICE_OFFLINE_SITE:-/tmp/sluice-site}
mkdir -p "$OUT" "$SITE"

python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/whl/*.whl
export PYTHONPATH="$SITE"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
# Builds the C++ core and the protobuf modules with the machine's compiler.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
export PATH="$SITE/bin:$PATH"
python3 -c "import sluice._core, sluice.server.app; print('sluice imports')"

# perf_analyzer through the wrapper the harness expects (<venv>/bin/pa).
PA_VENV=/tmp/pa-venv
mkdir -p "$PA_VENV/bin"
cat > "$PA_VENV/bin/pa" <<EOF
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$CARRY/pa\${LD_LIBRARY_PATH:+:\${LD_LIBRARY_PATH}}"
exec "$CARRY/pa/perf_analyzer" "\$@"
EOF
chmod +x "$PA_VENV/bin/pa" "$CARRY/pa/perf_analyzer"
export PERF_ANALYZER_VENV=$PA_VENV
"$PA_VENV/bin/pa" --version 2>&1 | head -1 || true

export SLUICE_BENCH_SERVER_CPUS="$SERVER_CPUS"
export PYTHONUNBUFFERED=1
nproc > "$OUT/nproc.txt"
taskset -c "$LOADGEN_CPUS" python3 "$@"
