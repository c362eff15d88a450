"""Port ownership: a second server on a port another process listens on stops
at start with one line naming the port and the holder, unless it opts in."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable

from conftest import ServerProcess


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_second_server_on_a_held_grpc_port_fails_naming_the_holder(
    example_server: ServerProcess,
) -> None:
    result = _serve("--grpc-port", str(example_server.grpc_port), "--http-port", "0")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line, line
    assert "Traceback" not in line
    assert f"gRPC port 127.0.0.1:{example_server.grpc_port} is in use by process" in line
    assert str(example_server.proc.pid) in line
    assert "--reuse-port" in line


def test_a_busy_http_port_is_one_clear_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _serve("--grpc-port", "0", "--http-port", str(port))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line, line
    assert "Traceback" not in line
    assert f"HTTP port 127.0.0.1:{port} is in use" in line


def test_reuse_port_opts_in_to_sharing(
    example_server: ServerProcess, start_server: Callable[..., ServerProcess]
) -> None:
    shared = start_server(None, "--reuse-port", "--grpc-port", str(example_server.grpc_port))
    assert shared.grpc_port == example_server.grpc_port
