"""Defaults shared by the command line and the server options: one place for the
ports, the host, the client URL and the timeouts."""

from __future__ import annotations

import os
from pathlib import Path

# The bundled example repository: what `sluice serve` and the commands that only
# read a repository use when not given one.
EXAMPLES = Path(__file__).resolve().parent / "examples" / "models"
HOST = "127.0.0.1"
GRPC_PORT = 8001
HTTP_PORT = 8002
GRACE_SECONDS = 30.0
# Triton accepts up to 2 GiB; a smaller default bounds what one client can make
# the server hold. Larger messages get RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
REPOSITORY_POLL_SECS = 15.0
# A model version whose load (session creation, executor start-up, warm-up) takes
# longer is UNAVAILABLE with the reason; the server goes on. Generous: a TensorRT
# engine build for a large model takes minutes.
MODEL_LOAD_TIMEOUT_S = 600.0
DEFAULT_MAX_BATCH_SIZE = 4  # Triton's autocomplete default (sluice.config uses it)
CLIENT_TIMEOUT_S = 30.0  # per call, for every client command

# Client commands talk to $SLUICE_URL when it is set, so a shell (or a test) can
# point them at a server on other ports without adding --url to each command.
URL_ENV = "SLUICE_URL"
METRICS_URL_ENV = "SLUICE_METRICS_URL"
LOCAL_URL = f"{HOST}:{GRPC_PORT}"


def client_url() -> str:
    """The gRPC host:port a client command uses when --url is not given."""
    return os.environ.get(URL_ENV) or LOCAL_URL


def client_metrics_url() -> str | None:
    """$SLUICE_METRICS_URL, or None: then derived from the gRPC URL."""
    return os.environ.get(METRICS_URL_ENV) or None


def metrics_url_for(grpc_url: str) -> str:
    """The Prometheus page of the server at `grpc_url`, assuming it serves HTTP
    on the default port: http://HOST:8002/metrics."""
    target = grpc_url.split("///")[-1]  # tolerate grpc's "dns:///host:port"
    host = target.rpartition(":")[0] if ":" in target else target
    return f"http://{host or HOST}:{HTTP_PORT}/metrics"
