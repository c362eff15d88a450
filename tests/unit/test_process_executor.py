"""The process executor without a server: a real child process running a real
onnxruntime session, killed on purpose. Nothing it accepted hangs."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import onnx_models
import pytest
from sluice.errors import UnavailableError
from sluice.executors import process
from sluice.executors.process import ProcessExecutor, launch_spec
from sluice.monitoring.stats import InferStats
from sluice.proto import model_config_pb2 as mc
from sluice.runtime import RuntimeOptions
from sluice.scheduling.scheduler import Scheduler


def _executor(tmp_path: Path) -> tuple[ProcessExecutor, mc.ModelConfig]:
    path = tmp_path / "m" / "1" / "model.onnx"
    onnx_models.build_scaler(path, 3.0)
    config = mc.ModelConfig(name="m", max_batch_size=8)
    spec = launch_spec("m", 1, path, path.parent.parent, config, RuntimeOptions(), 1)
    executor = ProcessExecutor(spec)
    completed, _, _ = executor.launch()
    return executor, completed


async def _serve(executor: ProcessExecutor, config: mc.ModelConfig) -> Scheduler:
    loop = asyncio.get_running_loop()
    s = Scheduler("m", 1, config, executor, 1, InferStats(detailed=False), loop)
    executor.attach(s, s.batcher, loop, s.output_names)
    executor.start()
    return s


def _x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), value, dtype=np.float32)}


def _child_pid(executor: ProcessExecutor) -> int:
    proc = executor._instances[0].proc
    assert proc is not None
    return proc.pid


async def _wait_for(predicate: object, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline
        await asyncio.sleep(0.01)  # polling the executor's state


def test_a_killed_child_is_restarted_and_serves_again(tmp_path: Path) -> None:
    async def main() -> None:
        executor, config = _executor(tmp_path)
        s = await _serve(executor, config)
        first = await s.submit(_x(1.0), 1, 0)
        assert first.outputs["y"].tolist() == [[3.0] * 4]
        old = _child_pid(executor)
        os.kill(old, signal.SIGKILL)
        await _wait_for(lambda: executor.restarts == 1 and executor._idle)
        assert _child_pid(executor) != old
        again = await s.submit(_x(2.0), 1, 0)
        assert again.outputs["y"].tolist() == [[6.0] * 4]
        await s.stop()
        assert executor._instances[0].proc is None  # stopped and reaped

    asyncio.run(main())


def test_when_no_instance_can_come_back_waiting_requests_are_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "RESTART_BACKOFF_S", (0.01, 0.05))

    async def main() -> None:
        executor, config = _executor(tmp_path)
        s = await _serve(executor, config)
        (tmp_path / "m" / "1" / "model.onnx").unlink()  # every restart now fails
        os.kill(_child_pid(executor), signal.SIGKILL)
        await _wait_for(lambda: not executor._idle and executor._instances[0].sock is None)
        waiting = [asyncio.ensure_future(s.submit(_x(float(i)), 1, 0)) for i in range(3)]
        results = await asyncio.wait_for(
            asyncio.gather(*waiting, return_exceptions=True), timeout=20
        )
        assert all(isinstance(r, UnavailableError) for r in results), results
        assert not executor.available
        await s.stop()

    asyncio.run(main())
