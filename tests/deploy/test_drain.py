"""`sluice serve --drain-delay-secs`: after SIGTERM the server reports not ready
(gRPC health and /v2/health/ready) while it still answers inference, for the
delay; then it refuses new RPCs and exits 0."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

DRAIN_DELAY_S = 3.0


def health(url: str) -> int:
    with grpc.insecure_channel(url) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        status: int = reply.status
        return status


def ready_status(http_port: int) -> int:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5
        ) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code


def infer(client: grpcclient.InferenceServerClient) -> None:
    features = grpcclient.InferInput("features", [1, 8], "FP32")
    features.set_data_from_numpy(np.zeros((1, 8), dtype=np.float32))
    client.infer("tabular_classifier", [features], client_timeout=10)


def test_not_ready_but_serving_during_the_drain_delay(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(None, "--drain-delay-secs", str(DRAIN_DELAY_S))
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert health(server.url) == health_pb2.HealthCheckResponse.SERVING
        sigterm_s = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        deadline_s = sigterm_s + DRAIN_DELAY_S
        while health(server.url) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline_s, "health still SERVING after the delay"
        assert ready_status(server.http_port) == 503
        answered = 0
        while time.monotonic() < deadline_s - 1.0:  # well inside the delay
            infer(client)
            answered += 1
        assert answered > 0
        assert server.proc.wait(30) == 0
        assert time.monotonic() - sigterm_s >= DRAIN_DELAY_S
        with pytest.raises(Exception, match="UNAVAILABLE"):
            infer(client)
    finally:
        client.close()
