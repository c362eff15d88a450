"""Composition root: builds the server from options, starts it, and stops it in
a fixed order (not ready -> stop accepting -> finish accepted -> unload)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import sluice
from sluice import defaults, limits
from sluice.executors import attempt
from sluice.host import DataPlane, ExecutorLoader, ModelManager
from sluice.limits import RequestLimits
from sluice.monitoring.cost import CostModel
from sluice.monitoring.metrics import VersionView, build_registry
from sluice.proto import grpc_service_pb2 as pb
from sluice.proto import grpc_service_pb2_grpc as pb_grpc
from sluice.proto import sluice_service_pb2 as spb
from sluice.proto import sluice_service_pb2_grpc as spb_grpc
from sluice.repository import SwapPolicy
from sluice.runtime import RuntimeOptions
from sluice.server import security
from sluice.server.edge import EdgeServer
from sluice.server.extension import SluiceServicer
from sluice.server.frontends import Dispatcher, FrontendCollector, FrontendConfig, FrontendPool
from sluice.server.inference import InferenceServicer
from sluice.server.ports import ensure_free
from sluice.server.rest import IDLE_TIMEOUT_S as HTTP_IDLE_TIMEOUT_S
from sluice.server.rest import MAX_CONNECTIONS as HTTP_MAX_CONNECTIONS
from sluice.server.rest import RestLimits, RestServer
from sluice.server.status_page import ServerFacts, StatusPage

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSION_NAME = spb.DESCRIPTOR.services_by_name["SluiceService"].full_name
EXAMPLES = defaults.EXAMPLES


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    model_repository: Path = EXAMPLES
    host: str = defaults.HOST
    grpc_port: int = defaults.GRPC_PORT
    http_port: int = defaults.HTTP_PORT
    grace_seconds: float = defaults.GRACE_SECONDS
    max_message_bytes: int = defaults.MAX_MESSAGE_BYTES  # why this size: sluice.defaults
    # On SIGTERM: seconds spent reporting not ready while still serving, before the
    # gRPC port stops accepting. Load balancers that watch readiness (Kubernetes
    # endpoints, KServe) stop routing here during it; 0 stops accepting at once.
    drain_delay_seconds: float = 0.0
    # Open the gRPC port only once the initial load is done (HTTP health and
    # /metrics listen from the start). For load balancers that do not check
    # readiness (nginx): a loading replica refuses connections, which they retry
    # elsewhere, instead of answering UNAVAILABLE.
    grpc_listen_after_load: bool = False
    runtime: RuntimeOptions = dataclasses.field(default_factory=RuntimeOptions)
    cost: CostModel = dataclasses.field(default_factory=CostModel)
    # Triton's --model-control-mode: none (load all at start), poll (rescan every
    # repository_poll_secs), explicit (load/unload RPCs; load_models at start).
    control_mode: str = "none"
    repository_poll_secs: float = defaults.REPOSITORY_POLL_SECS
    load_models: tuple[str, ...] = ()
    swap_policy: SwapPolicy = SwapPolicy.AVAILABILITY
    # Triton's --allow-metrics: false serves no /metrics and skips the histograms
    # (ModelStatistics counters stay: the protocol needs them).
    allow_metrics: bool = True
    # Share the gRPC port with another process on purpose (SO_REUSEPORT); by
    # default a port another process listens on fails the start.
    reuse_port: bool = False
    # Triton's --strict-readiness: ready only while every model that should load
    # has a ready version; False: ready once the start-up load has run.
    strict_readiness: bool = True
    # ---- security (issue 15): TLS per port, restricted API groups, bounds
    grpc_tls: security.TlsOptions | None = None
    http_tls: security.TlsOptions | None = None
    grpc_restricted: tuple[security.Restriction, ...] = ()
    http_restricted: tuple[security.Restriction, ...] = ()
    reflection: bool = True
    http_idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S
    http_max_connections: int = HTTP_MAX_CONNECTIONS
    limits: RequestLimits = dataclasses.field(default_factory=RequestLimits)
    # gRPC frontend processes on the gRPC port (server/frontends.py). 1 serves
    # gRPC in this process; N > 1 starts N processes that forward to this one.
    frontends: int = 1
    # A version whose load takes longer is UNAVAILABLE with the reason (0: no limit).
    model_load_timeout_s: float = defaults.MODEL_LOAD_TIMEOUT_S


class SluiceServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        # The loader is injected here: the lifecycle manager only decides what
        # to load and when; the loader decides how (thread or process executors).
        self.models = ModelManager(
            options.model_repository,
            ExecutorLoader(options.runtime),
            swap_policy=options.swap_policy,
            on_change=self._set_health,
            detailed_stats=options.allow_metrics,
            load_timeout_s=options.model_load_timeout_s,
        )
        self._poller: asyncio.Task[None] | None = None
        self._ready = False
        self.dataplane = DataPlane(
            self.models,
            server_name="sluice",
            server_version=sluice.__version__,
            is_ready=self.is_ready,
            explicit_control=options.control_mode == "explicit",
        )
        self._health = health.aio.HealthServicer()
        limit = options.max_message_bytes
        # Security (issue 15): request bounds, the restricted-API interceptor.
        limits.configure(options.limits)
        receive_limit = min(limit, options.limits.max_request_bytes)
        # The restriction runs first: a refused call never reaches the error edge.
        interceptors: list[grpc.aio.ServerInterceptor] = (
            [security.RestrictedApiInterceptor(options.grpc_restricted)]
            if options.grpc_restricted
            else []
        )
        inference = InferenceServicer(self.dataplane)
        extension = SluiceServicer(self.dataplane)
        self._grpc: grpc.aio.Server | None = None
        self._pool: FrontendPool | None = None
        if options.frontends > 1:
            # gRPC lives in the frontend processes; they forward here.
            self._pool = FrontendPool(
                options.frontends,
                FrontendConfig(
                    host=options.host,
                    port=options.grpc_port,
                    receive_limit=receive_limit,
                    send_limit=limit,
                    tls=_tls_config(options.grpc_tls),
                    restrictions=[
                        {"groups": sorted(r.groups), "header": r.header, "value": r.value}
                        for r in options.grpc_restricted
                    ],
                    reflection=options.reflection,
                    services=[SERVICE_NAME, EXTENSION_NAME],
                ),
                Dispatcher(inference, extension),
            )
        else:
            self._grpc = grpc.aio.server(
                interceptors=interceptors or None,  # none: grpc.aio's per-call fast path
                options=[
                    ("grpc.max_receive_message_length", receive_limit),
                    ("grpc.max_send_message_length", limit),
                ],
            )
            # sluice's services behind the error edge; health and reflection
            # are grpc's own.
            pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, EdgeServer(self._grpc))
            spb_grpc.add_SluiceServiceServicer_to_server(extension, EdgeServer(self._grpc))
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
            if options.reflection:
                reflection.enable_server_reflection(
                    (SERVICE_NAME, EXTENSION_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                    self._grpc,
                )
        if not options.reuse_port:
            ensure_free(options.host, options.grpc_port, "gRPC", "--grpc-port")
            ensure_free(options.host, options.http_port, "HTTP", "--http-port")
        self.grpc_port = 0
        if not options.grpc_listen_after_load and self._grpc is not None:
            self._listen_grpc()
        registry = (
            build_registry(self._version_views, sluice.__version__, options.cost)
            if options.allow_metrics
            else None
        )
        if registry is not None and self._pool is not None:
            registry.register(FrontendCollector(self._pool))
        # KServe v2 REST and /metrics on the HTTP port, on this same event loop.
        self._rest = RestServer(
            self.dataplane,
            options.host,
            options.http_port,
            registry,
            RestLimits(
                max_body_bytes=limit,
                idle_timeout_s=options.http_idle_timeout_s,
                max_connections=options.http_max_connections,
            ),
            tls=security.ReloadingSslContext(options.http_tls) if options.http_tls else None,
            restricted=options.http_restricted,
            status=StatusPage(self.dataplane, self._status_facts),
        )
        for warning in security.exposure_warnings(
            options.host,
            options.grpc_tls,
            options.http_tls,
            options.grpc_restricted,
            options.http_restricted,
        ):
            log.warning("SECURITY: %s", warning)
        self.http_port = self._rest.port

    def _listen_grpc(self) -> None:
        assert self._grpc is not None
        address = f"{self.options.host}:{self.options.grpc_port}"
        tls = self.options.grpc_tls
        if tls is not None:  # issue 15: TLS/mTLS, certificates reloaded on change
            credentials = security.grpc_server_credentials(tls)
            self.grpc_port = self._grpc.add_secure_port(address, credentials)
        else:
            self.grpc_port = self._grpc.add_insecure_port(address)  # binds and listens
        if self.grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {address}")

    def is_ready(self) -> bool:
        if not self._ready:
            return False
        return not (self.options.strict_readiness and self.models.unavailable())

    def _status_facts(self) -> ServerFacts:
        o = self.options
        return ServerFacts(
            sluice.__version__,
            o.host,
            self.grpc_port,
            self.http_port,
            o.allow_metrics,
            o.cost,
            o.frontends,
        )

    def _version_views(self) -> Iterator[VersionView]:
        for m in list(self.models.models.values()):
            for v in list(m.versions.values()):
                scheduler = v.scheduler
                queued = scheduler.queued_requests if scheduler is not None else 0
                yield VersionView(
                    m.name,
                    str(v.version),
                    v.state.value,
                    queued,
                    v.load_seconds,
                    v.stats,
                    v.drift,
                    executor=scheduler.executor.kind if scheduler is not None else "",
                    executor_restarts=scheduler.executor.restarts if scheduler is not None else 0,
                )

    def _health_statuses(self) -> dict[str, bool]:
        """Serving or not, per gRPC health service name: the server, the
        inference service, and each model."""
        ready = self.is_ready()
        statuses = {"": ready, SERVICE_NAME: ready}
        for name, model in self.models.models.items():
            statuses[name] = self._ready and any(v.serving for v in model.ready_versions())
        return statuses

    async def _set_health(self) -> None:
        statuses = self._health_statuses()
        if self._pool is not None:
            self._pool.push_health(statuses)  # the frontends answer health
            return
        for service, serving in statuses.items():
            await self._health.set(
                service,
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

    async def _start_grpc(self) -> None:
        if self._pool is not None:
            await self._pool.start()
            self.grpc_port = self._pool.port
            return
        assert self._grpc is not None
        if self.grpc_port == 0:
            self._listen_grpc()
        await self._grpc.start()

    async def start(self) -> None:
        """Listens first (live, not ready), loads the repository, then turns ready."""
        await self._set_health()
        if not self.options.grpc_listen_after_load:
            await self._start_grpc()
        await self._rest.start()
        log.info(
            "listening: grpc %s:%s, http %s:%d",
            self.options.host,
            self.grpc_port or "after the initial load",
            self.options.host,
            self.http_port,
        )
        mode = self.options.control_mode
        if mode == "explicit":
            wanted = list(self.options.load_models)
            if wanted:
                await self.models.sync(None if "*" in wanted else wanted)
        else:
            await self.models.sync()
        if mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="sluice-repository-poll")
        if self.options.grpc_listen_after_load:
            await self._start_grpc()
        self._ready = True
        await self._set_health()

    async def _poll(self) -> None:
        """Poll mode: rescan on a fixed period; each pass reconciles what changed."""
        while True:
            await asyncio.sleep(self.options.repository_poll_secs)
            try:
                await self.models.sync()
            except Exception:  # a bad pass must not end polling
                log.exception("repository poll failed")

    async def stop(self) -> None:
        """Stops in order: not ready (still serving for the drain delay); refuse
        new requests; let accepted ones finish (gRPC and REST) within the grace
        period; unload models."""
        self._ready = False
        if self._poller is not None:
            self._poller.cancel()
        if self.options.drain_delay_seconds > 0:
            await self._set_health()  # NOT_SERVING everywhere, RPCs still answered
            log.info("not ready; accepting for %.1fs more", self.options.drain_delay_seconds)
            await asyncio.sleep(self.options.drain_delay_seconds)
        await self._health.enter_graceful_shutdown()
        grace = self.options.grace_seconds
        grpc_stopped = self._pool.stop(grace) if self._pool is not None else self._grpc_stop(grace)
        await asyncio.gather(grpc_stopped, self._rest.stop(grace))
        await self.models.unload_all()

    async def _grpc_stop(self, grace: float) -> None:
        assert self._grpc is not None
        await self._grpc.stop(grace)

    def ready_banner(self) -> str:
        paths = "KServe v2 REST, /metrics" if self.options.allow_metrics else "KServe v2 REST"
        lines = [
            f"sluice {sluice.__version__} ready: grpc {self.options.host}:{self.grpc_port}, "
            f"http {self.options.host}:{self.http_port} ({paths})",
            f"model repository: {self.options.model_repository}",
        ]
        if self._pool is not None:
            pids = ", ".join(str(p) for p in self._pool.pids())
            lines.insert(1, f"gRPC frontends: {self._pool.count} processes (pids {pids})")
        for name, model in sorted(self.models.models.items()):
            ready = [str(v.version) for v in model.ready_versions()]
            state = (
                f"READY (versions {', '.join(ready)})"
                if ready
                else "UNAVAILABLE: " + model.unavailable_reason()
            )
            lines.append(f"  {name}: {state}")
        example = next(
            (n for n, m in sorted(self.models.models.items()) if m.ready_versions()), None
        )
        if example is not None:
            lines.append(
                f"try: sluice infer {example} --random --url {self.options.host}:{self.grpc_port}"
            )
        return "\n".join(lines)


def _tls_config(tls: security.TlsOptions | None) -> dict[str, object] | None:
    if tls is None:
        return None
    return {
        "server_cert": str(tls.server_cert),
        "server_key": str(tls.server_key),
        "root_cert": str(tls.root_cert) if tls.root_cert else None,
        "mutual": tls.mutual,
    }


async def serve(options: ServerOptions) -> None:
    server = SluiceServer(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A stop during the initial load ends it: loads still running are abandoned
    # (executors/attempt.py), so a model that hangs never holds the exit.
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # a failed start raises here
        print(server.ready_banner(), flush=True)
        await stopping
    else:
        log.info("stopping during the initial load")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
    log.info("stopping: finishing accepted requests (grace %.0fs)", options.grace_seconds)
    await server.stop()
    log.info("stopped")


def run(options: ServerOptions) -> None:
    """Runs the server on uvloop (where available) until SIGINT/SIGTERM."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(serve(options))
        _exit_past_abandoned_loads()
        return
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(options))
    else:  # pragma: no cover
        uvloop.install()
        asyncio.run(serve(options))
    _exit_past_abandoned_loads()


def _exit_past_abandoned_loads() -> None:
    """A load abandoned after its budget may still run in a thread (onnxruntime
    cannot interrupt a session creation). Finalizing the interpreter under it
    aborts the process (onnxruntime's globals are destroyed while that thread
    uses them), so the server exits at once instead, with status 0: everything
    it owns (ports, executors, models) is released by now."""
    alive = attempt.abandoned_threads_alive()
    if not alive:
        return
    log.warning(
        "%d abandoned model load(s) still running in a thread; exiting without waiting", alive
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
