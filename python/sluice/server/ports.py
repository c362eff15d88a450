"""Port ownership. gRPC binds its port with SO_REUSEPORT, so a second server
started on a port another one holds would silently take half of its
connections. Before listening, sluice checks that nobody else listens there
(a bind without SO_REUSEPORT fails when somebody does) and names the holder."""

from __future__ import annotations

import errno
import socket


class PortInUseError(OSError):
    """A port another process listens on; the message names it and the way out."""


def _holder(port: int) -> str:
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return "another process"
                try:
                    proc = psutil.Process(conn.pid)
                    return f"process {conn.pid} ({' '.join(proc.cmdline()[:4])})"
                except psutil.Error:
                    return f"process {conn.pid}"
    except (ImportError, OSError, RuntimeError):
        pass  # not allowed to look: say what we know
    return "another process"


def ensure_free(host: str, port: int, what: str, flag: str) -> None:
    """Raises PortInUseError when `port` (not 0) on `host` has a listener."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: connections of a server that just stopped, left in
        # TIME_WAIT, must not block its restart (a rolling restart); a listener
        # still makes the bind fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(
                exc.errno,
                f"the {what} port {host}:{port} is in use by {_holder(port)}; stop it, choose "
                f"another port with {flag}, or pass --reuse-port to share the port on purpose",
            ) from None
