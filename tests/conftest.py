"""Shared fixtures: a real `sluice serve` process on free ports.

The server prints a banner line containing "ready: grpc HOST:PORT" once every
model has finished loading; fixtures wait for that line (an event), never sleep.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # lets tests import onnx_models and sluice_proto_pool

# Before anything imports sluice's generated protos: keep them out of protobuf's
# default pool, which tritonclient's identical `inference` package occupies.
import sluice_proto_pool  # noqa: E402, F401

T = TypeVar("T")


def wait_until(
    what: str,
    attempt: Callable[[], T | None],
    timeout_s: float = 30,
    interval_s: float = 0.01,
) -> T:
    """Re-checks a state (a server's index, statistics, metrics; a counter a
    load thread advances) until attempt() returns something other than None or
    False, and returns it; fails naming `what` after timeout_s. The one polling
    helper of the suite: what it waits on is a state, never an amount of time."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = attempt()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


_BANNER = re.compile(r"ready: grpc ([\d.]+):(\d+), http [\d.]+:(\d+)")


# Every test that starts a server runs once per executor (see the `executor`
# fixture); SLUICE_TEST_EXECUTORS=thread (or process) narrows it for a quick run.
EXECUTORS = tuple(os.environ.get("SLUICE_TEST_EXECUTORS", "thread,process").split(","))
# SLUICE_TEST_FRONTENDS=N runs every server with --frontends N (the suite's
# gRPC tests then go through frontend processes; tests that pass their own
# --frontends keep theirs).
FRONTENDS = os.environ.get("SLUICE_TEST_FRONTENDS", "")


class ServerProcess:
    """A running `sluice serve`; `url` is host:port for gRPC clients."""

    def __init__(
        self,
        repository: Path | None,
        extra_args: list[str],
        start_timeout_s: float = 60,
        executor: str = "thread",
    ):
        self.executor = executor
        cmd = [
            sys.executable,
            "-m",
            "sluice.cli",
            "--log-level",
            "INFO",
            "serve",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--executor",
            executor,
            *(["--frontends", FRONTENDS] if FRONTENDS else []),
            *extra_args,
        ]
        if repository is not None:
            cmd += ["--model-repository", str(repository)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._ready = threading.Event()
        self.grpc_port = 0
        self.http_port = 0
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._readers:
            t.start()
        if not self._ready.wait(start_timeout_s) or not self.grpc_port:
            self.stop()
            raise RuntimeError(
                "sluice serve did not become ready:\n" + "".join(self.stderr_lines[-40:])
            )

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            m = _BANNER.search(line)
            if m:
                self.grpc_port, self.http_port = int(m.group(2)), int(m.group(3))
                self._ready.set()
        self._ready.set()  # process ended: unblock the waiter

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for t in self._readers:
            t.join(timeout=5)
        # Close the pipes ourselves: left to the garbage collector they raise
        # ResourceWarning, an error under filterwarnings=error.
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return rc


@pytest.fixture(scope="session", params=EXECUTORS)
def executor(request: pytest.FixtureRequest) -> str:
    """The server's --executor: tests that start a server run with each."""
    return str(request.param)


@pytest.fixture
def start_server(executor: str) -> Iterator[object]:
    """Factory: start_server(repository=None, *extra_args) -> ServerProcess.
    Every server started is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(repository: Path | None = None, *extra_args: str) -> ServerProcess:
        server = ServerProcess(repository, list(extra_args), executor=executor)
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def example_server(executor: str) -> Iterator[ServerProcess]:
    """One server on the bundled example repository, shared by read-only tests."""
    server = ServerProcess(None, [], executor=executor)
    yield server
    server.stop()
