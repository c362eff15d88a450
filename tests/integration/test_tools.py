"""What tools and new users meet first: unimplemented RPCs answer UNIMPLEMENTED
quietly, /metrics passes promtool, readiness follows --strict-readiness."""

from __future__ import annotations

import grpc
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess
from tritonclient.utils import InferenceServerException


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
