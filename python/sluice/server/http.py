"""The HTTP port: /metrics (Prometheus text) and /v2/health/{live,ready}.

A small WSGI app on a threaded stdlib server, so scrapes never wait on the
event loop; prometheus-client renders the exposition.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

StartResponse = Callable[..., Any]


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry | None,
        is_ready: Callable[[], bool],
    ) -> None:
        # registry None: metrics disabled (--allow-metrics false); /metrics is 404.
        self._metrics = make_wsgi_app(registry) if registry is not None else None
        self._is_ready = is_ready
        self._server = make_server(
            host, port, self._app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sluice-http", daemon=True
        )

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
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
