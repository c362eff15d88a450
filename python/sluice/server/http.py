"""The HTTP port: /metrics (Prometheus text) and /v2/health/{live,ready}.

A small WSGI app on a threaded stdlib server, so scrapes never wait on the
event loop; prometheus-client renders the exposition. Bounded: a connection idle
for `idle_timeout_s` is closed and at most `max_connections` are served at once
(one thread each), so half-sent connections cannot pile up threads.
"""

from __future__ import annotations

import contextlib
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from sluice.server.security import ReloadingSslContext, Restriction, http_refusal

StartResponse = Callable[..., Any]


# A connection that sends nothing for this long is closed; scrapes and probes
# send their request at once.
IDLE_TIMEOUT_S = 30.0
# Connections served at once (one thread each); more are refused with 503.
MAX_CONNECTIONS = 64

_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per connection, at most `max_connections` of them: a client
    cannot make the server hold a thread per half-sent request without bound."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # listen backlog: bursts wait in the kernel, not in threads

    def __init__(
        self, address: tuple[str, int], handler: type[WSGIRequestHandler], max_connections: int
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    before_accept: Callable[[], None] | None = None  # e.g. reload TLS certificates

    def get_request(self) -> tuple[Any, Any]:
        if self.before_accept is not None:
            self.before_accept()
        return super().get_request()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_REFUSED)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT_S  # socket timeout per read (StreamRequestHandler.setup)

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ssl.SSLError, ConnectionError):
            self.close_connection = True  # idle, half-sent or a failed handshake: drop it

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry | None,
        is_ready: Callable[[], bool],
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        tls: ReloadingSslContext | None = None,
        restricted: Sequence[Restriction] = (),
    ) -> None:
        # registry None: metrics disabled (--allow-metrics false); /metrics is 404.
        self._metrics = make_wsgi_app(registry) if registry is not None else None
        self._is_ready = is_ready
        handler = type("_Handler", (_QuietHandler,), {"timeout": idle_timeout_s})
        self._server = _ThreadingWSGIServer((host, port), handler, max_connections)
        self._server.set_app(self._app)
        self._restricted = tuple(restricted)
        if tls is not None:
            # The handshake runs in the connection's thread (lazily, on first read),
            # so a slow or silent TLS client holds one bounded slot, not the acceptor.
            self._server.socket = tls.context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
            self._server.before_accept = tls.maybe_reload
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sluice-http", daemon=True
        )

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if self._restricted:
            headers = {
                k[5:].replace("_", "-").lower(): v
                for k, v in environ.items()
                if k.startswith("HTTP_")
            }
            refusal = http_refusal(self._restricted, path, headers)
            if refusal is not None:
                start_response("403 Forbidden", [("Content-Type", "text/plain")])
                return [refusal.encode() + b"\n"]
        if path == "/metrics" and self._metrics is not None:
            body: Iterable[bytes] = self._metrics(environ, start_response)
            return body
        if path == "/v2/health/live":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b""]
        if path == "/v2/health/ready":
            ok = self._is_ready()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b""]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
