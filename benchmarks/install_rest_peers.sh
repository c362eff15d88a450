#!/usr/bin/env bash
# Install KServe's and MLServer's model servers, each with onnxruntime, into
# virtual environments of their own, for benchmarks/rest.py (the fixtures that
# serve an ONNX model with them are in benchmarks/peers/).
#
# Idempotent: re-running skips a venv whose pinned versions are already there.
#
# Environment:
#   REST_PEERS_DIR  where the venvs go (default: benchmarks, relative to the
#                   repository root): <dir>/.venv-kserve and <dir>/.venv-mlserver
#   PYTHON          interpreter used to create the venvs (default: python3)
#
# Separate from the project's environment (and from each other): both pull in
# FastAPI, uvicorn, pydantic, grpcio and protobuf at versions of their choosing.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

DIR="${REST_PEERS_DIR:-benchmarks}"
case "${DIR}" in
  /*) ;;
  *) DIR="${REPO_ROOT}/${DIR}" ;;
esac
PYTHON="${PYTHON:-python3}"

KSERVE_VERSION="0.21.0"
MLSERVER_VERSION="1.7.1"
ORT_VERSION="1.32.0"  # the onnxruntime sluice is measured with

# MLServer 1.7.1 asks its worker processes (parallel_workers >= 1, its default)
# for asyncio.get_event_loop() before any loop runs; uvloop >= 0.22's policy
# raises there ("There is no current event loop"), so every worker dies at start.
MLSERVER_EXTRA="uvloop<0.22"

log() { echo "[install_rest_peers] $*" >&2; }

install() {  # install VENV_NAME PACKAGE VERSION IMPORTS [EXTRA_SPEC]
  local venv="${DIR}/$1" package="$2" version="$3" extra="${5:-}"
  if [ ! -x "${venv}/bin/python" ]; then
    log "creating venv at ${venv}"
    "${PYTHON}" -m venv "${venv}"
  fi
  if "${venv}/bin/python" - "${package}" "${version}" "${ORT_VERSION}" "${extra}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
package, wanted, ort, extra = sys.argv[1:]
ok = version(package) == wanted and version("onnxruntime") == ort
if extra:
    req = Requirement(extra)
    ok = ok and req.specifier.contains(version(req.name))
sys.exit(0 if ok else 1)
PY
  then
    log "${package} ${version}, onnxruntime ${ORT_VERSION} ${extra} already in ${venv}"
  else
    log "installing ${package}==${version}, onnxruntime==${ORT_VERSION} ${extra} into ${venv}"
    "${venv}/bin/python" -m pip install --disable-pip-version-check --quiet --upgrade pip
    "${venv}/bin/python" -m pip install --disable-pip-version-check --quiet \
      "${package}==${version}" "onnxruntime==${ORT_VERSION}" ${extra:+"${extra}"}
  fi
  # The fixture must import in it (a broken install fails here, not mid-benchmark).
  PYTHONPATH="${SCRIPT_DIR}/peers" "${venv}/bin/python" -c "import $4" \
    || { log "ERROR: cannot import $4 in ${venv}"; exit 1; }
}

install .venv-kserve kserve "${KSERVE_VERSION}" "kserve, onnxruntime"
install .venv-mlserver mlserver "${MLSERVER_VERSION}" "mlserver_onnx" "${MLSERVER_EXTRA}"
log "OK: ${DIR}/.venv-kserve/bin/python, ${DIR}/.venv-mlserver/bin/mlserver"
