#!/usr/bin/env bash
# A benchmark (default benchmarks/executors.py; BENCH=benchmarks/frontends.py
# for the frontends one) on a many-core Linux box that cannot download
# anything: builds sluice from this source tree into a target folder, then runs
# the benchmark with the servers on one set of cores and perf_analyzer on the
# others, and writes the JSON result and the log to $OUT.
#
#   OUT=/tmp/out CARRY=/path/to/carry benchmarks/device_bench.sh [benchmark args]
#
# WORK (default: a new temporary folder) holds the build; WORK=... REUSE_BUILD=1
# runs again without rebuilding.
#
# Default executors.py args: --measurement-interval 2000 --rounds 2 --max-minutes 8
# (the device machine allows 10 minutes a command).
#
# Expected preinstalled (Python 3.12): numpy onnx onnxruntime grpcio protobuf
# uvloop aiohttp prometheus-client pybind11 cmake scikit-build-core (+ make, a
# C++17 compiler, taskset, unzip or python's zipfile, dpkg-deb).
#
# Not preinstalled, so carried in $CARRY (cp312 manylinux x86_64 wheels, the
# versions pyproject.toml pins; `pip download --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 -d carry ...`):
#   build:         grpcio-tools (protoc for the generated protobuf modules; the
#                  same minor version as the installed grpcio)
#   sluice serve:  grpcio-health-checking grpcio-reflection pyyaml psutil tqdm orjson
#   the benchmark: tritonclient (>= 2.50, the [grpc] extra's python-rapidjson
#                  and packaging) for statistics; psutil for CPU from /proc
#   perf_analyzer: tritonclient-2.41.1-*.whl (the binary inside it, as
#                  install_perf_analyzer.sh uses), libb64-0d_*.deb (Debian/Ubuntu
#                  package; only its libb64.so.0d is unpacked, nothing is
#                  installed) and nvidia_cuda_runtime_cu12-*.whl (libcudart.so.12,
#                  which perf_analyzer links even for CPU-only runs).
#   Alternatively set PA=/path/to/a/perf_analyzer wrapper that runs as is.
#
# Cores: SERVER_CPUS (default: the first half) run the servers and their
# executor processes; CLIENT_CPUS (default: the second half) run perf_analyzer.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?set OUT to the folder for results}"
CARRY="${CARRY:-${SRC}/carry}"
WORK="${WORK:-$(mktemp -d /tmp/sluice-device.XXXXXX)}"
PY="${PYTHON:-python3}"
NCPU="$(nproc)"
HALF=$((NCPU / 2))
SERVER_CPUS="${SERVER_CPUS:-0-$((HALF - 1))}"
CLIENT_CPUS="${CLIENT_CPUS:-${HALF}-$((NCPU - 1))}"
mkdir -p "${OUT}" "${WORK}"
export CMAKE_BUILD_PARALLEL_LEVEL="${NCPU}"
log() { echo "[device_bench] $*" >&2; }

# --- 1. carried Python packages, then sluice itself, into one target folder ---
SITE="${WORK}/site"
export PYTHONPATH="${SITE}${PYTHONPATH:+:${PYTHONPATH}}"
pip_install() {
  "${PY}" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --no-index --target "${SITE}" "$@"
}
wheels=()
for w in "${CARRY}"/*.whl; do
  case "$(basename "${w}")" in
    tritonclient-2.41.1-*) ;;  # only its perf_analyzer binary is used (step 2)
    nvidia_cuda_runtime_cu12-*) ;;  # only libcudart.so.12 (step 2)
    *) [ -e "${w}" ] && wheels+=("${w}") ;;
  esac
done
if [ -n "${REUSE_BUILD:-}" ] && [ -d "${SITE}/sluice" ]; then
  log "REUSE_BUILD: keeping ${SITE} and ${WORK}/src as they are"
else
  if [ "${#wheels[@]}" -gt 0 ]; then
    log "installing ${#wheels[@]} carried wheels into ${SITE}"
    pip_install "${wheels[@]}"
  fi
  # A clean copy of the tree: no build folder or venv of the machine it came from.
  rm -rf "${WORK}/src" && mkdir -p "${WORK}/src"
  tar -C "${SRC}" --exclude=./build --exclude='./.venv*' --exclude=./benchmarks/.repo \
    --exclude=./benchmarks/.venv-perf --exclude=./carry -cf - . | tar -C "${WORK}/src" -xf -
  log "building sluice (C++ core + generated protos) into ${SITE}"
  (cd "${WORK}/src" && pip_install .)
fi
"${PY}" -c "import sluice, sluice._core; print('sluice', sluice.__version__, 'from', sluice.__file__)"
# `sluice` for harness.sluice_server: the target folder has no console scripts
# that name this interpreter, so write one.
mkdir -p "${WORK}/bin"
printf '#!/usr/bin/env bash\nexec "%s" -m sluice.cli "$@"\n' "$(command -v "${PY}")" > "${WORK}/bin/sluice"
chmod +x "${WORK}/bin/sluice"
export PATH="${WORK}/bin:${PATH}"

# --- 2. perf_analyzer, pinned to the client cores ---------------------------------
PA_VENV="${WORK}/pa"  # harness.perf_analyzer_path() runs $PERF_ANALYZER_VENV/bin/pa
mkdir -p "${PA_VENV}/bin" "${PA_VENV}/lib"
if [ -n "${PA:-}" ]; then
  real_pa="${PA}"
  libdir=""
else
  "${PY}" - "${CARRY}" "${PA_VENV}" <<'PY'
import pathlib, sys, zipfile
carry, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def extract(pattern, member_suffix, target):
    wheels = sorted(carry.glob(pattern))
    if not wheels:
        sys.exit(f"no {pattern} in {carry} (see the header of this script)")
    with zipfile.ZipFile(wheels[-1]) as z:
        name = next(n for n in z.namelist() if n.endswith(member_suffix))
        out = dest / target
        out.write_bytes(z.read(name))
        out.chmod(0o755)
extract("tritonclient-2.41.1-*.whl", "bin/perf_analyzer", "bin/perf_analyzer")
extract("nvidia_cuda_runtime_cu12-*.whl", "lib/libcudart.so.12", "lib/libcudart.so.12")
PY
  deb="$(ls "${CARRY}"/libb64-0d_*.deb 2>/dev/null | tail -n1 || true)"
  [ -n "${deb}" ] || { log "no libb64-0d_*.deb in ${CARRY}"; exit 1; }
  dpkg-deb -x "${deb}" "${WORK}/libb64"
  cp "$(find "${WORK}/libb64" -name 'libb64.so.0d*' | head -n1)" "${PA_VENV}/lib/libb64.so.0d"
  real_pa="${PA_VENV}/bin/perf_analyzer"
  libdir="${PA_VENV}/lib"
fi
cat > "${PA_VENV}/bin/pa" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="${libdir}\${LD_LIBRARY_PATH:+:\${LD_LIBRARY_PATH}}"
exec taskset -c ${CLIENT_CPUS} "${real_pa}" "\$@"
WRAP
chmod +x "${PA_VENV}/bin/pa"
# perf_analyzer has no --help: it prints its usage and exits non-zero.
help_out="$("${PA_VENV}/bin/pa" --help 2>&1 || true)"
grep -q -- --concurrency-range <<<"${help_out}" || {
  log "perf_analyzer does not run:"; head -n 5 <<<"${help_out}" >&2; exit 1; }
export PERF_ANALYZER_VENV="${PA_VENV}"

# --- 3. the benchmark: servers (and their executor processes) on SERVER_CPUS ------
log "servers on cores ${SERVER_CPUS}, perf_analyzer on ${CLIENT_CPUS}"
args=("$@")
[ "${#args[@]}" -gt 0 ] || args=(--measurement-interval 2000 --rounds 2 --max-minutes 8)
BENCH="${BENCH:-benchmarks/executors.py}"
name="$(basename "${BENCH}" .py)"
cd "${WORK}/src"
taskset -c "${SERVER_CPUS}" "${PY}" "${BENCH}" "${args[@]}" \
  --out "${OUT}/${name}-device.json" 2>&1 | tee "${OUT}/${name}-device.log"
nproc > "${OUT}/cores.txt"
echo "server cores ${SERVER_CPUS}; client cores ${CLIENT_CPUS}" >> "${OUT}/cores.txt"
