#!/usr/bin/env bash
# Run NVIDIA perf_analyzer against a KServe-v2 gRPC endpoint (e.g. sluice).
#
# Usage: benchmarks/perf_analyzer.sh MODEL [URL] [CONCURRENCY_RANGE] [-- EXTRA_PA_ARGS...]
#   MODEL              model name as served
#   URL                gRPC host:port (default 127.0.0.1:8001)
#   CONCURRENCY_RANGE  start:end:step (default 1:8:7, i.e. concurrency 1 and 8)
#   EXTRA_PA_ARGS      anything after the positionals (optionally after `--`)
#                      is passed to perf_analyzer verbatim, e.g. --shape, -b,
#                      --input-data, --async
#
# Writes benchmarks/results/<model>_<timestamp>_c<range>.csv and prints its
# path on the last line of stdout (new CSVs there are git-ignored: `git add -f`
# the one a README cites). Installs perf_analyzer first (see
# install_perf_analyzer.sh) if the wrapper is missing.
#
# Exit status: perf_analyzer's when it fails; 3 when it reports that it could
# not get a stable measurement (its numbers are then not a result); 1 when it
# wrote no CSV.
#
# Environment:
#   PERF_ANALYZER_VENV  venv holding perf_analyzer (default benchmarks/.venv-perf)
#   PA_RESULTS_DIR      where CSVs go (default benchmarks/results)
set -euo pipefail

usage() {
  sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then usage; fi

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

VENV="${PERF_ANALYZER_VENV:-benchmarks/.venv-perf}"
case "${VENV}" in
  /*) ;;
  *) VENV="${REPO_ROOT}/${VENV}" ;;
esac
PA="${VENV}/bin/pa"

MODEL="$1"; shift
URL="127.0.0.1:8001"
RANGE="1:8:7"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then URL="$1"; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then RANGE="$1"; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
EXTRA=("$@")

if [ ! -x "${PA}" ]; then
  echo "[perf_analyzer.sh] ${PA} missing; installing perf_analyzer" >&2
  PERF_ANALYZER_VENV="${VENV}" "${SCRIPT_DIR}/install_perf_analyzer.sh" >&2
fi

RESULTS_DIR="${PA_RESULTS_DIR:-${SCRIPT_DIR}/results}"
mkdir -p "${RESULTS_DIR}"
RESULTS_DIR="$(cd "${RESULTS_DIR}" && pwd)"
safe_model="$(printf '%s' "${MODEL}" | tr -c 'A-Za-z0-9._-' '_')"
safe_range="$(printf '%s' "${RANGE}" | tr ':' '-')"
CSV="${RESULTS_DIR}/${safe_model}_$(date +%Y%m%d-%H%M%S)_c${safe_range}.csv"

# Flags:
#   -i grpc -u URL          KServe-v2 gRPC (perf_analyzer defaults to HTTP)
#   --concurrency-range     closed-loop load at each concurrency level
#   --measurement-interval  3 s windows (default 5 s); a level is reported once
#                           3 consecutive windows agree within 10 %
#   --percentile=99         stabilise on p99 instead of the mean
#   -f CSV                  p50/p90/p95/p99 latency columns are always written
#   --verbose-csv           adds "request/response" and "response wait" columns
cmd=("${PA}" -i grpc -u "${URL}" -m "${MODEL}"
     --concurrency-range "${RANGE}"
     --measurement-interval 3000
     --percentile=99
     --verbose-csv
     -f "${CSV}"
     ${EXTRA[@]+"${EXTRA[@]}"})

echo "[perf_analyzer.sh] ${cmd[*]}" >&2
LOG="$(mktemp)"
trap 'rm -f "${LOG}"' EXIT
status=0
"${cmd[@]}" 2>&1 | tee "${LOG}" >&2 || status=${PIPESTATUS[0]}
if [ "${status}" -ne 0 ]; then
  echo "[perf_analyzer.sh] perf_analyzer exited with status ${status}" >&2
  exit "${status}"
fi
# perf_analyzer exits 0 even when a concurrency level never stabilised.
if grep -q "Failed to obtain stable measurement" "${LOG}"; then
  echo "[perf_analyzer.sh] perf_analyzer could not get a stable measurement" \
       "(see above; try a longer --measurement-interval or a quieter machine)" >&2
  exit 3
fi
if [ ! -s "${CSV}" ]; then
  echo "[perf_analyzer.sh] perf_analyzer wrote no CSV at ${CSV}" >&2
  exit 1
fi
echo "${CSV}"
