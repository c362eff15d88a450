#!/usr/bin/env bash
# Builds and runs every fuzz target for a fixed time each, from the committed
# seed corpora (copied: the seeds stay as committed). Prints, per target, the
# executions and the coverage libFuzzer/atheris report. A crash, a leak or an
# out-of-memory fails the script and leaves the input under build/fuzz/findings/
# (turn it into a regression test).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     default 300; .ci/run uses 25
# Needs clang with libFuzzer (Debian: clang, libclang-rt-14-dev) and atheris.
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${1:-300}"
python="${PYTHON:-python3}"

CC=clang CXX=clang++ cmake -S . -B build/fuzz -DSLUICE_BUILD_PYTHON=OFF \
    -DSLUICE_BUILD_FUZZERS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/fuzz -j2 --target bytes_codec_fuzz drift_profile_fuzz >/dev/null

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p build/fuzz/findings
limits=(-max_total_time="$budget" -malloc_limit_mb=1024 -rss_limit_mb=2048 -timeout=10
        -print_final_stats=1 -artifact_prefix=build/fuzz/findings/)

summary() {  # the last coverage line and the execution count of a libFuzzer log
  local name="$1" log="$2"
  local cov runs
  cov="$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)"
  runs="$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | grep -oE '[0-9]+$' || true)"
  echo "fuzz $name: ${runs:-?} executions in ${budget}s, ${cov:-cov: ?}"
}

for target in bytes_codec drift_profile; do
  mkdir -p "$work/$target"
  log="$work/$target.log"
  if ! "build/fuzz/${target}_fuzz" "$work/$target" "csrc/fuzz/corpus/$target" "${limits[@]}" \
      >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz $target: FAILED (input saved under build/fuzz/findings/)"
    exit 1
  fi
  summary "$target" "$log"
done

mkdir -p "$work/decode_request"
log="$work/decode_request.log"
if ! "$python" scripts/fuzz/decode_request_fuzz.py "$work/decode_request" \
    scripts/fuzz/corpus/decode_request "${limits[@]}" >"$log" 2>&1; then
  tail -n 40 "$log"
  echo "fuzz decode_request: FAILED (input saved under build/fuzz/findings/)"
  exit 1
fi
summary decode_request "$log"
