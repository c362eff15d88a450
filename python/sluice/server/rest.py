"""KServe v2 REST (Triton's HTTP API) on the HTTP port, plus /metrics.

aiohttp on the server's own event loop (uvloop), beside grpc.aio: one process,
no thread hop per request, a C HTTP parser, and bounds aiohttp enforces itself
(body size, header line sizes, keep-alive). Thin by design like the gRPC
servicers: decode (server/rest_codec.py) -> DataPlane -> encode. Errors leave
through one middleware that maps SluiceError codes with server/errors.py and
answers Triton's `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sluice import _core
from sluice.errors import InvalidArgumentError, SluiceError, public_message, shown
from sluice.host.dataplane import DataPlane, FeedbackLabel, TensorMetadata
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import sluice_service_pb2 as spb
from sluice.server import rest_codec
from sluice.server.edge import RateLimitedLog
from sluice.server.errors import as_sluice_error, http_status
from sluice.server.extension import (
    drift_report,
    feedback_message,
    rollout_change,
    rollout_message,
)
from sluice.server.inference import config_override, statistics_message
from sluice.server.security import ReloadingSslContext, Restriction, http_refusal
from sluice.server.status_page import StatusPage

log = logging.getLogger(__name__)

UNEXPECTED = RateLimitedLog()
JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A connection without a complete request head for this long is closed (see
# RestLimits.idle_timeout_s); connections beyond MAX_CONNECTIONS get 503.
IDLE_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 1024


@dataclasses.dataclass(frozen=True)
class RestLimits:
    max_body_bytes: int = 256 * 1024 * 1024  # the gRPC max message size
    # A request's body must arrive within this; a slow sender gets 408.
    read_timeout_s: float = 60.0
    # A connection without a complete request head for this long is closed:
    # aiohttp runs this timer from the connection's start and after each
    # response, so it bounds slow-header clients as well as idle keep-alives.
    idle_timeout_s: float = IDLE_TIMEOUT_S
    # Connections beyond this are answered 503 and closed at once.
    max_connections: int = MAX_CONNECTIONS
    max_header_line_bytes: int = 8190


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type=JSON)


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status)


def _tensor(t: TensorMetadata) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


@web.middleware
async def _error_edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one edge: SluiceError (and the core's StatusError) -> HTTP status with
    Triton's error body; aiohttp's own HTTP errors keep their status and get the
    same body; anything unexpected is 500, logged at most once per period."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.reason, exc.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = as_sluice_error(exc)
        if error is None:
            UNEXPECTED.error(f"unexpected error in {request.method} {request.path}", exc)
            return _error(f"internal error: {type(exc).__name__}", 500)
        return _error(public_message(error.message), http_status(error))


class _Refuse(asyncio.Protocol):
    """Answers a connection over the limit with 503. It half-closes and drains
    what the client sends until the client closes (at most LINGER_S): closing
    a socket with unread input would reset it and could lose the 503."""

    LINGER_S = 2.0
    _BODY = b'{"error":"too many connections"}'
    _REPLY = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio's classes).
        transport = cast(asyncio.Transport, transport)
        transport.write(self._REPLY)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(self.LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # drained and ignored

    def eof_received(self) -> bool:
        return False  # the client closed: close our side too


def _open(handlers: Sequence[Any]) -> int:
    """Connections not yet closing: one the server has just closed stays in
    aiohttp's list until its connection_lost runs, after the client has seen
    the close and may already be connecting again."""
    return sum(1 for h in handlers if h.transport is not None and not h.transport.is_closing())


class RestServer:
    """Triton's HTTP/REST API over the data plane. Binds in the constructor (so
    a port in use fails at start-up, and port 0 is resolved); serves from
    start() on the running loop."""

    def __init__(
        self,
        dataplane: DataPlane,
        host: str,
        port: int,
        registry: CollectorRegistry | None,
        limits: RestLimits,
        *,
        tls: ReloadingSslContext | None = None,
        restricted: Sequence[Restriction] = (),
        status: StatusPage | None = None,
    ) -> None:
        self._dp = dataplane
        self._status = status
        self._tls = tls
        self._restricted = tuple(restricted)
        self._registry = registry
        self._limits = limits
        # One thread renders /metrics, so a scrape never runs on the loop
        # (the loop keeps answering inference while it renders).
        self._metrics_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._sock = socket.create_server((host, port), backlog=1024)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._app = self._build_app()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    # ---- app --------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        middlewares = [_error_edge]
        if self._restricted:
            middlewares.append(self._restriction)
        app = web.Application(client_max_size=self._limits.max_body_bytes, middlewares=middlewares)
        r = app.router
        r.add_get("/v2", self._server_metadata)
        r.add_get("/v2/health/live", self._live)
        r.add_get("/v2/health/ready", self._ready)
        r.add_get("/v2/models/stats", self._all_stats)  # before /v2/models/{model}
        r.add_post("/v2/repository/index", self._repository_index)
        r.add_post("/v2/repository/models/{model}/load", self._load)
        r.add_post("/v2/repository/models/{model}/unload", self._unload)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self._model_metadata)
            r.add_get(base + "/ready", self._model_ready)
            r.add_get(base + "/config", self._model_config)
            r.add_get(base + "/stats", self._model_stats)
            r.add_post(base + "/infer", self._infer)
            r.add_get(base + "/drift", self._drift)
            r.add_post(base + "/feedback", self._feedback)
        r.add_get("/v2/models/{model}/rollout", self._get_rollout)
        r.add_post("/v2/models/{model}/rollout", self._set_rollout)
        if self._registry is not None:
            r.add_get("/metrics", self._metrics)
        if self._status is not None:
            self._status.register(app)  # / and /status
        return app

    async def start(self) -> None:
        limits = self._limits
        self._runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=limits.idle_timeout_s,
            max_line_size=limits.max_header_line_bytes,
            max_field_size=limits.max_header_line_bytes,
        )
        await self._runner.setup()
        http = self._runner.server
        assert http is not None

        tls = self._tls

        def protocol() -> asyncio.Protocol:
            if tls is not None:
                tls.maybe_reload()  # new certificates take effect for new connections
            if len(http.connections) >= limits.max_connections and _open(http.connections) >= (
                limits.max_connections
            ):
                return _Refuse()
            return http()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, sock=self._sock, ssl=tls.context if tls is not None else None
        )
        if self._registry is not None:
            self._metrics_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="sluice-metrics"
            )

    async def stop(self, grace_s: float) -> None:
        """Stops accepting, gives requests in flight `grace_s` to finish, closes."""
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            http = self._runner.server
            if http is not None:
                await http.shutdown(grace_s)
            await self._runner.cleanup()
        if self._metrics_pool is not None:
            self._metrics_pool.shutdown(wait=False)

    @web.middleware
    async def _restriction(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Restricted API groups (issue 15): a request without the group's header
        gets 403 (the header names are lower case, as http_refusal expects)."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        refusal = http_refusal(self._restricted, request.path, headers)
        if refusal is not None:
            return web.Response(status=403, text=refusal + "\n")
        return await handler(request)

    async def _body(self, request: web.Request) -> bytes:
        try:
            return await asyncio.wait_for(request.read(), self._limits.read_timeout_s)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(
                reason=f"the request body did not arrive within {self._limits.read_timeout_s:g}s"
            ) from None

    @staticmethod
    def _version(request: web.Request) -> str:
        return request.match_info.get("version", "")

    # ---- health and metadata ------------------------------------------------------

    async def _server_metadata(self, request: web.Request) -> web.Response:
        info = self._dp.server_metadata()
        return _json(
            {"name": info.name, "version": info.version, "extensions": list(info.extensions)}
        )

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._dp.server_live() else 503)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._dp.server_ready() else 503)

    async def _model_ready(self, request: web.Request) -> web.Response:
        ready = self._dp.model_ready(request.match_info["model"], self._version(request))
        return web.Response(status=200 if ready else 503)

    async def _model_metadata(self, request: web.Request) -> web.Response:
        m = self._dp.model_metadata(request.match_info["model"], self._version(request))
        return _json(
            {
                "name": m.name,
                "versions": list(m.versions),
                "platform": m.platform,
                "inputs": [_tensor(t) for t in m.inputs],
                "outputs": [_tensor(t) for t in m.outputs],
            }
        )

    async def _model_config(self, request: web.Request) -> web.Response:
        config = self._dp.model_config(request.match_info["model"], self._version(request))
        return _json(rest_codec.message_json(config))

    def _stats(self, name: str, version: str) -> web.Response:
        versions = self._dp.model_statistics(name, version)
        message = pb.ModelStatisticsResponse(
            model_stats=[statistics_message(v.name, v.version, v.stats) for v in versions]
        )
        return _json(rest_codec.message_json(message))

    async def _all_stats(self, request: web.Request) -> web.Response:
        return self._stats("", "")

    async def _model_stats(self, request: web.Request) -> web.Response:
        return self._stats(request.match_info["model"], self._version(request))

    # ---- repository -------------------------------------------------------------

    async def _repository_index(self, request: web.Request) -> web.Response:
        body = rest_codec.parse_json_object(await self._body(request), "repository index")
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgumentError("'ready' in the repository index body must be a bool")
        entries = await self._dp.repository_index(ready)
        return _json(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in entries
            ]
        )

    async def _load(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        body = rest_codec.parse_json_object(await self._body(request), "model load")
        params = body.get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidArgumentError("'parameters' in the model load body must be an object")
        texts: dict[str, str] = {}
        for key, value in params.items():
            if key == "config" and not isinstance(value, str):
                raise InvalidArgumentError(
                    "the 'config' load parameter must be a string holding a JSON ModelConfig"
                )
            if isinstance(value, str):
                texts[key] = value
        await self._dp.load_model(name, config_override(name, texts))
        return web.Response(status=200)

    async def _unload(self, request: web.Request) -> web.Response:
        rest_codec.parse_json_object(await self._body(request), "model unload")
        await self._dp.unload_model(request.match_info["model"])
        return web.Response(status=200)

    # ---- inference ----------------------------------------------------------------

    async def _infer(self, request: web.Request) -> web.Response:
        received_ns = _core.monotonic_ns()
        model, version = request.match_info["model"], self._version(request)
        try:
            body = await self._body(request)
            decoded = rest_codec.decode_infer(
                body,
                request.headers.get(rest_codec.HEADER_LENGTH),
                model,
                version,
                received_ns,
            )
        except (SluiceError, _core.StatusError) as exc:
            # Undecodable input never reaches the data plane; count it here. (A body
            # over the size limit or too slow is refused by HTTP, uncounted, as gRPC
            # refuses an oversized message before sluice sees it.)
            self._dp.record_rejected(model, version, received_ns, as_sluice_error(exc) or exc)
            raise
        response = await self._dp.infer(decoded.request)
        payload, header_length = rest_codec.encode_infer(
            response, decoded.binary_default, decoded.binary_outputs
        )
        if header_length is None:
            return web.Response(body=payload, content_type=JSON)
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={rest_codec.HEADER_LENGTH: str(header_length)},
        )

    # ---- sluice's own operations ----------------------------------------------------

    def _version_number(self, request: web.Request, body: dict[str, Any] | None = None) -> int:
        text = self._version(request) or request.query.get("version", "")
        if not text and body is not None:
            value = body.get("version", 0)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError("'version' must be an integer")
            return value
        if not text:
            return 0
        if not text.isdigit() or len(text) > 18:
            raise InvalidArgumentError(f"version must be a positive integer, got '{shown(text)}'")
        return int(text)

    async def _drift(self, request: web.Request) -> web.Response:
        report = self._dp.drift_report(request.match_info["model"], self._version_number(request))
        return _json(rest_codec.message_json(drift_report(report)))

    async def _feedback(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        body = rest_codec.parse_json_object(await self._body(request), "feedback")
        version = self._version_number(request, body)
        message = spb.FeedbackRequest()
        rest_codec.parse_message({"labels": body.get("labels", [])}, message, "feedback")
        labels = [FeedbackLabel(x.request_id, tuple(x.values)) for x in message.labels]
        result = self._dp.feedback(name, version, labels)
        return _json(rest_codec.message_json(feedback_message(result)))

    async def _get_rollout(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        labels = await self._dp.get_rollout(name)
        return _json(rest_codec.message_json(rollout_message(name, labels)))

    async def _set_rollout(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        body = rest_codec.parse_json_object(await self._body(request), "rollout")
        message = spb.SetRolloutRequest()
        rest_codec.parse_message(body, message, "rollout")
        message.model_name = name  # the path names the model, whatever the body says
        labels = await self._dp.set_rollout(name, rollout_change(message))
        return _json(rest_codec.message_json(rollout_message(name, labels)))

    # ---- metrics ----------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self._registry is not None
        assert self._metrics_pool is not None
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        registry = self._registry
        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(self._metrics_pool, encoder, registry)
        response = web.Response(body=text)
        response.headers["Content-Type"] = content_type
        return response
