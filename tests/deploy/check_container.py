"""Checks a running sluice container from outside: called by docker/build_and_test.sh.

  check_container.py ready   GRPC_PORT HTTP_PORT TIMEOUT_S  -> waits for ready, prints seconds
  check_container.py serve   GRPC_PORT HTTP_PORT            -> infer, health, /metrics
  check_container.py drain   GRPC_PORT HTTP_PORT -- STOP_CMD...

`drain` runs STOP_CMD (podman stop) and checks the drain as a load balancer sees
it: gRPC health turns NOT_SERVING first, requests are still answered during the
drain delay, requests in flight when the port closes still complete, and STOP_CMD
exits 0. Exits non-zero, with the reason, on any failure.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tabular_classifier"


def fail(message: str) -> None:
    print(f"check_container: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def health(grpc_port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            status: int = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            ).status
            return status
        except grpc.RpcError:
            return -1


def infer(client: grpcclient.InferenceServerClient, rows: int = 1) -> str:
    features = grpcclient.InferInput("features", [rows, 8], "FP32")
    features.set_data_from_numpy(np.random.default_rng().random((rows, 8), dtype=np.float32))
    result = client.infer(MODEL, [features], client_timeout=30)
    if result.as_numpy("probabilities").shape != (rows, 3):
        fail(f"wrong output shape {result.as_numpy('probabilities').shape}")
    version: str = result.get_response().model_version
    return version


def ready(grpc_port: int, http_port: int, timeout_s: float) -> None:
    start_s = time.monotonic()
    while http_status(f"http://127.0.0.1:{http_port}/v2/health/ready") != 200:
        if time.monotonic() - start_s > timeout_s:
            fail(f"not ready after {timeout_s}s")
        time.sleep(0.1)
    print(f"{time.monotonic() - start_s:.1f}")


def serve(grpc_port: int, http_port: int) -> None:
    if health(grpc_port) != health_pb2.HealthCheckResponse.SERVING:
        fail("grpc.health.v1 Check('') is not SERVING")
    if health(grpc_port, MODEL) != health_pb2.HealthCheckResponse.SERVING:
        fail(f"grpc.health.v1 Check({MODEL!r}) is not SERVING")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        if not index or any(state != "READY" for state in index.values()):
            fail(f"not every bundled model is READY: {index}")
        requests = 50
        for _ in range(requests):
            infer(client, rows=2)
    finally:
        client.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    success = {
        (sample.labels.get("model"), sample.labels.get("version")): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "nv_inference_request_success"
    }
    if success.get((MODEL, "1")) != requests:
        fail(f"/metrics nv_inference_request_success for {MODEL} is {success}, not {requests}")
    print(
        f"models {sorted(index)} READY; {requests} tritonclient requests OK; "
        f"grpc health SERVING; /metrics counts them"
    )


def drain(grpc_port: int, http_port: int, stop_cmd: list[str]) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    pool = concurrent.futures.ThreadPoolExecutor(8)
    try:
        start_s = time.monotonic()
        stopper = subprocess.Popen(stop_cmd, stdout=subprocess.DEVNULL)
        while health(grpc_port) != health_pb2.HealthCheckResponse.NOT_SERVING:
            if stopper.poll() is not None or time.monotonic() - start_s > 10:
                fail("gRPC health never turned NOT_SERVING before the server stopped")
            time.sleep(0.02)
        not_ready_s = time.monotonic() - start_s
        if http_status(f"http://127.0.0.1:{http_port}/v2/health/ready") != 503:
            fail("/v2/health/ready is not 503 while draining")
        # Within the drain delay: still answered. 8 at once, so that some are in
        # flight on the server's connections as it goes on.
        answered = sum(1 for _ in pool.map(lambda _: infer(client, rows=4), range(64)))
        rc = stopper.wait(60)
        if rc != 0:
            fail(f"{' '.join(stop_cmd)} exited {rc}")
        print(
            f"drain: NOT_SERVING {not_ready_s:.2f}s after stop; {answered} requests "
            f"answered while draining; stopped {time.monotonic() - start_s:.1f}s after stop"
        )
    finally:
        pool.shutdown()
        client.close()


def main(argv: list[str]) -> None:
    command, grpc_port, http_port = argv[0], int(argv[1]), int(argv[2])
    if command == "ready":
        ready(grpc_port, http_port, float(argv[3]))
    elif command == "serve":
        serve(grpc_port, http_port)
    elif command == "drain" and argv[3] == "--":
        drain(grpc_port, http_port, argv[4:])
    else:
        fail(f"usage: see {__file__}")


if __name__ == "__main__":
    main(sys.argv[1:])
