"""A server restarted on its port at once (a rolling restart) must start even
though the connections it closed linger in TIME_WAIT; a live listener on the
port must still stop the start."""

from __future__ import annotations

import socket

import pytest
from sluice.server.ports import PortInUseError, ensure_free


def test_time_wait_connections_do_not_block_a_restart() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    with pytest.raises(PortInUseError):
        ensure_free("127.0.0.1", port, "gRPC", "--grpc-port")
    accepted.close()  # the server closes first: its side goes to TIME_WAIT
    client.recv(1)  # the FIN has arrived
    client.close()
    listener.close()
    ensure_free("127.0.0.1", port, "gRPC", "--grpc-port")
