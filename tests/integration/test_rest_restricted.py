"""`--http-restricted-api` on a real `sluice serve`: every REST path of a
restricted group answers Triton's 403 `{"error": "This API is restricted,
expecting header '<h>'"}` without the header or with a wrong value, and works
with it; unrestricted groups stay open; the gRPC port is not affected.

The restriction sits in the HTTP frontend, before any executor: one server
(thread executor) covers it, whatever SLUICE_TEST_EXECUTORS says.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import ServerProcess
from tritonclient.utils import InferenceServerException

MODEL = "tabular_classifier"  # the bundled example: features FP32 [-1, 8]
ADMIN = {"admin-key": "s3cret"}  # inference, model-repository
READER = {"reader-key": "r"}  # metadata, model-config, statistics
INFER_BODY = {
    "inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]
}

# (method, path, JSON body or None, the headers that open it, status with them)
GUARDED: list[tuple[str, str, Any, dict[str, str], int]] = [
    ("GET", "/v2", None, READER, 200),
    ("GET", f"/v2/models/{MODEL}", None, READER, 200),
    ("GET", f"/v2/models/{MODEL}/versions/1", None, READER, 200),
    ("GET", f"/v2/models/{MODEL}/config", None, READER, 200),
    ("GET", f"/v2/models/{MODEL}/stats", None, READER, 200),
    ("GET", "/v2/models/stats", None, READER, 200),
    ("GET", f"/v2/models/{MODEL}/drift", None, READER, 0),  # 0: any status but 403
    ("POST", f"/v2/models/{MODEL}/infer", INFER_BODY, ADMIN, 200),
    ("POST", f"/v2/models/{MODEL}/versions/1/infer", INFER_BODY, ADMIN, 200),
    ("POST", "/v2/repository/index", {}, ADMIN, 200),
    ("POST", f"/v2/repository/models/{MODEL}/load", {}, ADMIN, 200),
    ("GET", f"/v2/models/{MODEL}/rollout", None, ADMIN, 200),
    ("POST", f"/v2/models/{MODEL}/rollout", {"no_such_field": 1}, ADMIN, 400),
    ("POST", f"/v2/models/{MODEL}/feedback", {"labels": []}, ADMIN, 0),
]
OPEN = ["/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", "/metrics"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    s = ServerProcess(
        None,
        [
            "--model-control-mode", "explicit",
            "--load-model", "*",
            "--http-restricted-api", "inference,model-repository:admin-key=s3cret",
            "--http-restricted-api", "metadata,model-config,statistics:Reader-Key=r",
        ],
    )  # fmt: skip
    yield s
    s.stop()


def _call(
    server: ServerProcess, method: str, path: str, body: Any = None, **headers: str
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@pytest.mark.parametrize(("method", "path", "body", "opens", "status"), GUARDED)
def test_restricted_paths_need_their_header(
    server: ServerProcess,
    method: str,
    path: str,
    body: Any,
    opens: dict[str, str],
    status: int,
) -> None:
    (header, value) = next(iter(opens.items()))
    refusal = {"error": f"This API is restricted, expecting header '{header}'"}
    for headers in ({}, {header: value + "x"}, {"other-key": value}):
        got, text = _call(server, method, path, body, **headers)
        assert (got, json.loads(text)) == (403, refusal), headers
    # The other group's header does not open it either.
    other = READER if opens is ADMIN else ADMIN
    assert _call(server, method, path, body, **other)[0] == 403
    got, text = _call(server, method, path, body, **{header.upper(): value})
    if status:
        assert got == status, text
    else:
        assert got != 403, text


@pytest.mark.parametrize("path", OPEN)
def test_unrestricted_groups_stay_open(server: ServerProcess, path: str) -> None:
    assert _call(server, "GET", path)[0] == 200


def test_unknown_paths_answer_404_not_403(server: ServerProcess) -> None:
    assert _call(server, "GET", "/v2/no/such/path")[0] == 404


def test_tritonclient_http_with_and_without_the_header(server: ServerProcess) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    try:
        x = httpclient.InferInput("features", [1, 8], "FP32")
        x.set_data_from_numpy(np.ones((1, 8), np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [x])
        assert info.value.status() == "403"
        assert info.value.message() == "This API is restricted, expecting header 'admin-key'"
        result = client.infer(MODEL, [x], headers=ADMIN)
        assert result.as_numpy(result.get_response()["outputs"][0]["name"]) is not None
        # Unload is refused without the header: the model keeps serving.
        with pytest.raises(InferenceServerException) as info:
            client.unload_model(MODEL)
        assert info.value.status() == "403"
        assert client.is_model_ready(MODEL)  # health is open
        client.unload_model(MODEL, headers=ADMIN)
        assert not client.is_model_ready(MODEL)
        client.load_model(MODEL, headers=ADMIN)
        assert client.is_model_ready(MODEL)
    finally:
        client.close()


def test_grpc_is_not_restricted_by_the_http_flags(server: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(server.url)
    try:
        x = grpcclient.InferInput("features", [1, 8], "FP32")
        x.set_data_from_numpy(np.ones((1, 8), np.float32))
        assert client.infer(MODEL, [x]).get_response().outputs
        assert client.get_model_metadata(MODEL).name == MODEL
    finally:
        client.close()
