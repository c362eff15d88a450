"""What tools and new users meet first: unimplemented RPCs answer UNIMPLEMENTED
quietly, /metrics passes promtool, readiness follows --strict-readiness."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess
from tritonclient.utils import InferenceServerException

EXAMPLE_MODELS = Path(__file__).resolve().parents[2] / "python" / "sluice" / "examples" / "models"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_system_shared_memory_status(),
        lambda c: c.get_cuda_shared_memory_status(),
        lambda c: c.get_trace_settings(),
        lambda c: c.get_log_settings(),
    ],
    ids=["system_shm", "cuda_shm", "trace", "log"],
)
def test_unimplemented_rpcs_answer_unimplemented_without_a_traceback(
    example_server: ServerProcess, call: object
) -> None:
    client = grpcclient.InferenceServerClient(example_server.url)
    try:
        with pytest.raises(InferenceServerException) as info:
            call(client)  # type: ignore[operator]
        assert info.value.status() == str(grpc.StatusCode.UNIMPLEMENTED)
        assert "not implemented by sluice" in (info.value.message() or "")
        assert client.is_server_live()  # a round trip after it: its log lines are out
    finally:
        client.close()
    assert "Traceback" not in example_server.log
    assert "NotImplementedError" not in example_server.log


# promtool's linter (`promtool check metrics`) flags six of Triton's own names,
# which sluice keeps on purpose so that Triton's dashboards work unchanged:
# "metric names should not contain abbreviated units" for the five
# nv_inference_*_duration_us counters, and 'non-histogram and non-summary metrics
# should not have "_count" suffix' for the nv_inference_pending_request_count
# gauge. promtool then exits 3 (lint findings); a syntax error in the exposition
# would exit 1. Debian 12's promtool (2.42) has no switch to turn the linter off
# for `check metrics` (its --lint/--lint-fatal belong to `check config` and
# `check rules`), so the test proves both halves: the lints are exactly these,
# and the same scrape without these six families passes with exit 0.
ABBREVIATED_UNITS = "metric names should not contain abbreviated units"
COUNT_SUFFIX = 'non-histogram and non-summary metrics should not have "_count" suffix'
TRITON_NAME_LINTS = {
    **{
        f"nv_inference_{phase}_duration_us": ABBREVIATED_UNITS
        for phase in ("request", "queue", "compute_input", "compute_infer", "compute_output")
    },
    "nv_inference_pending_request_count": COUNT_SUFFIX,
}


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (.ci/run installs Debian's prometheus)")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return promtool


def _check_metrics(promtool: str, text: bytes) -> tuple[int, list[str]]:
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    lines = (result.stdout + result.stderr).decode().splitlines()
    return result.returncode, [line.strip() for line in lines if line.strip()]


def _without_families(text: bytes, names: set[str]) -> bytes:
    """The exposition minus the HELP, TYPE and sample lines of `names`."""
    kept = []
    for line in text.decode().splitlines():
        words = line.split()
        name = words[2] if line.startswith("#") and len(words) > 2 else re.split(r"[{ ]", line)[0]
        if name not in names:
            kept.append(line)
    return ("\n".join(kept) + "\n").encode()


def test_metrics_pass_promtool_but_for_triton_names(example_server: ServerProcess) -> None:
    promtool = _promtool()
    client = grpcclient.InferenceServerClient(example_server.url)
    try:
        x = grpcclient.InferInput("features", [1, 8], "FP32")
        x.set_data_from_numpy(np.zeros((1, 8), np.float32))
        client.infer("tabular_classifier", [x])  # so every per-model series exists
    finally:
        client.close()
    url = f"http://127.0.0.1:{example_server.http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read()
    assert b"# HELP nv_inference_count " in text
    for name in TRITON_NAME_LINTS:
        assert f"\n# TYPE {name} ".encode() in text, name
    rc, lines = _check_metrics(promtool, text)
    assert rc == 3, lines  # lint findings only: 1 would be an exposition it cannot parse
    assert sorted(lines) == sorted(f"{n} {lint}" for n, lint in TRITON_NAME_LINTS.items())
    # Everything else lints clean: the exit 3 is these six names and nothing more.
    assert _check_metrics(promtool, _without_families(text, set(TRITON_NAME_LINTS))) == (0, [])


def test_promtool_exit_codes_tell_lint_from_a_broken_exposition() -> None:
    """What the test above relies on: 3 for lint findings, 1 for bad syntax."""
    promtool = _promtool()
    lint = b"# HELP a_duration_us x\n# TYPE a_duration_us gauge\na_duration_us 1\n"
    assert _check_metrics(promtool, lint) == (3, [f"a_duration_us {ABBREVIATED_UNITS}"])
    assert _check_metrics(promtool, b"# TYPE a counter\na{ 1\n")[0] == 1
    assert _check_metrics(promtool, b"# HELP a x\n# TYPE a gauge\na 1\n") == (0, [])


# ---- strict readiness ---------------------------------------------------------------------


def _repository_with_a_broken_model(root: Path) -> Path:
    shutil.copytree(EXAMPLE_MODELS / "tabular_classifier", root / "tabular_classifier")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    return root


def _ready(server: ServerProcess) -> tuple[int, bool]:
    """(HTTP status of /v2/health/ready, gRPC ServerReady)."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{server.http_port}/v2/health/ready", timeout=10
        ) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:
        with exc:
            status = exc.code
    client = grpcclient.InferenceServerClient(server.url)
    try:
        return status, bool(client.is_server_ready())
    finally:
        client.close()


def test_strict_readiness_waits_for_every_model_that_should_load(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(_repository_with_a_broken_model(tmp_path))
    assert _ready(server) == (503, False)
    client = grpcclient.InferenceServerClient(server.url)
    try:
        assert client.is_server_live()
        assert client.is_model_ready("tabular_classifier")  # the rest still serves
    finally:
        client.close()


def test_strict_readiness_ignores_an_explicitly_unloaded_model(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(
        _repository_with_a_broken_model(tmp_path),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "tabular_classifier",
    )
    assert _ready(server) == (200, True)
    client = grpcclient.InferenceServerClient(server.url)
    try:
        with pytest.raises(InferenceServerException):
            client.load_model("broken")
        assert _ready(server) == (503, False)  # asked for, and unavailable
        client.unload_model("broken")
        assert _ready(server) == (200, True)  # no longer asked for
    finally:
        client.close()


def test_readiness_not_strict_keeps_the_old_behaviour(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(_repository_with_a_broken_model(tmp_path), "--strict-readiness", "false")
    assert _ready(server) == (200, True)
