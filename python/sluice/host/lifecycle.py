"""The lifecycle manager: moves every model toward what the repository (or an
explicit load) asks for, and resolves requests to loaded versions.

Threading: all public methods run on the event loop, which only swaps results
in: repository scans, labels writes, loads and warm-ups run on worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sluice import config as cfg
from sluice import defaults
from sluice.errors import (
    InvalidArgumentError,
    ModelLoadError,
    NotFoundError,
    UnavailableError,
    shown,
)
from sluice.executors.attempt import LoadAttempt, run_with_budget
from sluice.host.loader import ExecutorLoader
from sluice.host.routing import Route, Router
from sluice.monitoring import InferStats
from sluice.monitoring.drift import DriftMonitor, create_monitor
from sluice.proto import model_config_pb2 as mc
from sluice.repository import layout
from sluice.repository.aspired import AspiredModel, model_names, read_aspired
from sluice.repository.lifecycle import VersionState, check_transition
from sluice.repository.policy import version_dirs
from sluice.repository.registry.labels import Labels, update_labels
from sluice.repository.registry.metadata import read_metadata
from sluice.repository.rollout import CanaryGuard, GuardLimits
from sluice.repository.swap_policy import SwapPolicy, order
from sluice.runtime import RuntimeInfo
from sluice.scheduling import Scheduler

log = logging.getLogger(__name__)

DEFAULT_LOAD_TIMEOUT_S = defaults.MODEL_LOAD_TIMEOUT_S


@dataclasses.dataclass
class ModelVersion:
    name: str
    version: int
    config: mc.ModelConfig
    state: VersionState = VersionState.LOADING
    reason: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    runtime: RuntimeInfo | None = None
    scheduler: Scheduler | None = None
    load_seconds: float = 0.0
    stats: InferStats = dataclasses.field(default_factory=InferStats)
    fingerprint: str = ""  # of the config and model file it was loaded from
    drift: DriftMonitor | None = None  # set when the version has a drift profile
    drift_reason: str = "the version has no drift profile (run sluice profile)"
    # Requests routed here and not yet answered (see Route). Drain waits for 0.
    leases: int = 0
    signature: Any = None  # host.validation.Signature, read on the first request
    _no_leases: asyncio.Event | None = None

    def transition(self, new: VersionState, reason: str = "") -> None:
        check_transition(self.state, new)
        self.state = new
        self.reason = reason

    @property
    def ready(self) -> bool:
        return self.state is VersionState.READY

    @property
    def serving(self) -> bool:
        """READY, and its executor can run batches (an instance may be restarting)."""
        return self.ready and (self.scheduler is None or self.scheduler.executor.available)

    def acquire(self) -> None:
        self.leases += 1

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0 and self._no_leases is not None:
            self._no_leases.set()

    async def drained(self) -> None:
        """Returns once every request routed here has been answered."""
        if self.leases == 0:
            return
        self._no_leases = asyncio.Event()
        await self._no_leases.wait()


@dataclasses.dataclass
class Model:
    name: str
    directory: Path
    versions: dict[int, ModelVersion] = dataclasses.field(default_factory=dict)
    config: mc.ModelConfig = dataclasses.field(default_factory=mc.ModelConfig)
    reason: str = ""  # why the model as a whole cannot load (config errors), or "unloaded"
    failed_reloads: dict[int, str] = dataclasses.field(default_factory=dict)
    labels: Labels = dataclasses.field(default_factory=Labels)
    guard: CanaryGuard | None = None  # set while a canary is live
    # The repository or an explicit load asks for this model (False once it is
    # unloaded or removed): strict readiness waits for every wanted model.
    wanted: bool = True
    # Requests of every version accepted and not yet answered (--max-inflight-per-model).
    inflight: int = 0

    def ready_versions(self) -> list[ModelVersion]:
        return [v for _, v in sorted(self.versions.items()) if v.ready]

    def unavailable_reason(self) -> str:
        if self.reason:
            return self.reason
        failed = [f"version {v.version}: {v.reason}" for v in self.versions.values() if v.reason]
        if failed:
            return "; ".join(failed)
        if any(v.state is VersionState.LOADING for v in self.versions.values()):
            return "still loading"
        return "no version is ready"


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


class ModelManager:
    """Holds the live versions of every model and moves them toward what the
    repository (or an explicit load) asks for.

    Swaps are invisible to clients: a new version is routable only once it is
    loaded and warmed up (READY); the version it replaces then leaves routing
    (DRAINING), finishes what it had queued, and is released (UNLOADED). A
    version that fails to load never replaces one that serves.
    """

    def __init__(
        self,
        repository: Path,
        loader: ExecutorLoader,
        *,
        swap_policy: SwapPolicy = SwapPolicy.AVAILABILITY,
        on_change: Callable[[], Awaitable[None]] | None = None,
        guard_limits: GuardLimits = GuardLimits(),  # noqa: B008 - frozen dataclass
        detailed_stats: bool = True,
        load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
    ) -> None:
        self.repository = repository
        self.load_timeout_s = load_timeout_s  # 0: no limit
        # Loads abandoned after their budget whose thread still runs (thread
        # executor: onnxruntime cannot be interrupted), by (model, version): the
        # same version is not loaded again until it ends, so a load that hangs
        # holds at most one thread.
        self._abandoned: dict[tuple[str, int], LoadAttempt] = {}
        self.loader = loader
        self.swap_policy = swap_policy
        self.models: dict[str, Model] = {}
        self._on_change = on_change
        self._lock = asyncio.Lock()  # one reconciliation at a time
        self._load_gate = asyncio.Semaphore(2)
        self.guard_limits = guard_limits
        self.detailed_stats = detailed_stats
        self.router = Router(guard_limits, random.Random())

    # ---- desired state -------------------------------------------------------

    def scan(self) -> dict[str, AspiredModel]:
        """What the repository asks for, model by model."""
        if not self.repository.is_dir():
            raise NotFoundError(f"model repository {self.repository} is not a directory")
        return {n: read_aspired(self.repository, n) for n in model_names(self.repository)}

    async def sync(self, names: list[str] | None = None, *, unload_missing: bool = True) -> None:
        """Reconciles the named models (every model folder when None) with the
        repository. With unload_missing, live models whose folder is gone unload."""
        async with self._lock:
            aspired = await asyncio.to_thread(self.scan)
            if names is not None:
                unknown = [n for n in names if n not in aspired]
                if unknown:
                    raise NotFoundError(
                        f"no model folder for {', '.join(repr(n) for n in unknown)} in "
                        f"{self.repository}"
                    )
                aspired = {n: aspired[n] for n in names}
            await asyncio.gather(*(self._reconcile(a) for a in aspired.values()))
            if unload_missing and names is None:
                for name in [n for n in self.models if n not in aspired]:
                    await self._unload_model(self.models[name], "removed from the repository")
        await self._changed()

    async def load(self, name: str, override: mc.ModelConfig | None = None) -> None:
        """Explicit load (or reload) of one model, optionally with a config override.
        Raises UnavailableError with the reason when no version of it is ready after."""
        layout.check_name(name)  # a client's name is data, never a path
        if not await asyncio.to_thread((self.repository / name).is_dir):
            raise NotFoundError(f"no model folder '{shown(name)}' in {self.repository}")
        async with self._lock:
            aspired = await asyncio.to_thread(read_aspired, self.repository, name, override)
            failures = await self._reconcile(aspired, retry_failed=True)
        await self._changed()
        model = self.models[name]
        if not model.ready_versions():
            raise UnavailableError(f"failed to load '{shown(name)}': {model.unavailable_reason()}")
        if failures:
            # Something serves, but not everything that was asked for loaded.
            serving = ", ".join(str(v.version) for v in model.ready_versions())
            raise UnavailableError(
                f"failed to load '{shown(name)}': {'; '.join(failures)}; version(s) {serving} "
                "keep serving"
            )

    async def unload(self, name: str) -> None:
        """Explicit unload: every version drains and is released."""
        layout.check_name(name)
        async with self._lock:
            model = self.models.get(name)
            if model is None:
                if not await asyncio.to_thread((self.repository / name).is_dir):
                    raise NotFoundError(f"Request for unknown model: '{shown(name)}' is not found")
                return
            await self._unload_model(model, "unloaded")
        await self._changed()

    async def unload_all(self) -> None:
        """Takes every version out of routing, drains it and releases it."""
        async with self._lock:
            for model in list(self.models.values()):
                await self._unload_model(model, "server stopped")

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    # ---- reconciliation ------------------------------------------------------

    async def _reconcile(self, aspired: AspiredModel, retry_failed: bool = False) -> list[str]:
        """Moves one model toward `aspired`; returns why the parts of it that
        did not load failed (empty when all of it loaded)."""
        model = self.models.setdefault(aspired.name, Model(aspired.name, aspired.directory))
        model.directory = aspired.directory
        model.wanted = True
        if aspired.reason:
            model.reason = aspired.reason
            serving = model.ready_versions()
            if serving:
                log.error(
                    "model '%s': %s; version(s) %s keep serving",
                    model.name,
                    aspired.reason,
                    ", ".join(str(v.version) for v in serving),
                )
            else:
                log.error("model '%s' is unavailable: %s", model.name, aspired.reason)
            return [aspired.reason]
        model.reason = ""
        model.config = aspired.config
        self._apply_labels(model, aspired.labels)
        live = model.versions
        # A version (re)loads when it is new or its config or file changed; a
        # failed load is retried when its files change, or on an explicit load.
        to_load = [
            v
            for v, fp in aspired.versions.items()
            if v not in live or live[v].fingerprint != fp or (retry_failed and not live[v].ready)
        ]
        to_unload = [v for v in live if v not in aspired.versions]
        failures: list[str] = []
        for step, v in order(self.swap_policy, to_load, to_unload):
            if step == "load":
                failed = await self._load_and_swap(model, v, aspired)
                if failed:
                    failures.append(f"version {v}: {failed}")
                continue
            keeps_service = any(live[a].ready for a in aspired.versions if a in live)
            if self.swap_policy is SwapPolicy.AVAILABILITY and live[v].ready and not keeps_service:
                # Availability first: never unload the last serving version for
                # one that failed to load.
                log.error(
                    "model '%s': keeping version %d serving, no version it should give way "
                    "to is ready",
                    model.name,
                    v,
                )
                continue
            await self._retire(live.pop(v), "no longer in the version policy")
        return failures

    async def _load_and_swap(self, model: Model, version: int, aspired: AspiredModel) -> str:
        """Loads one version and swaps it in; returns why it failed, or ""."""
        config = mc.ModelConfig()
        config.CopyFrom(aspired.config)
        new = ModelVersion(
            model.name,
            version,
            config,
            fingerprint=aspired.versions[version],
            stats=InferStats(detailed=self.detailed_stats),
        )
        old = model.versions.get(version)
        if old is not None and self.swap_policy is SwapPolicy.RESOURCE:
            await self._retire(model.versions.pop(version), "replaced (resource-first)")
            old = None
        loop = asyncio.get_running_loop()
        label = f"model '{model.name}' version {version}"
        stuck = self._abandoned.get((model.name, version))
        if stuck is not None and stuck.thread is not None and stuck.thread.is_alive():
            new.transition(
                VersionState.FAILED,
                f"an earlier load of this version ran past its {stuck.budget_s:g} s budget and "
                "is still running (onnxruntime cannot interrupt session creation); not loading "
                "it again until that ends",
            )
        else:
            self._abandoned.pop((model.name, version), None)
            attempt = LoadAttempt(label, self.load_timeout_s)
            log.info("%s loading", label)
            async with self._load_gate:
                try:
                    await run_with_budget(
                        attempt, lambda: self._load_version(model, new, loop, attempt)
                    )
                except TimeoutError:
                    reason = (
                        f"loading took longer than its {self.load_timeout_s:g} s budget "
                        "(--model-load-timeout-secs); abandoned"
                    )
                    new.transition(VersionState.FAILED, reason)
                    log.error("%s failed to load: %s", label, reason)
                    self._abandoned[(model.name, version)] = attempt
        if new.scheduler is not None:
            new.scheduler.executor.start()  # on the loop, before any request can reach it
        if new.ready or old is None or not old.ready:
            model.versions[version] = new  # the swap: routing sees `new` from here on
            if old is not None:
                await self._retire(old, f"replaced by a new load of version {version}")
        else:
            # A failed reload never replaces a serving version.
            model.failed_reloads[version] = new.reason
            log.error(
                "model '%s' version %d: reload failed, the loaded one keeps serving: %s",
                model.name,
                version,
                new.reason,
            )
        if new.ready:
            model.failed_reloads.pop(version, None)
            return ""
        return new.reason

    async def _retire(self, mv: ModelVersion, why: str) -> None:
        """Out of routing first, then drain what it accepted, then release."""
        if mv.state is VersionState.READY:
            mv.transition(VersionState.DRAINING, why)
        # Requests routed here before it left routing hold leases; they are
        # answered by its scheduler, which keeps running until they are.
        await mv.drained()
        if mv.scheduler is not None:
            await mv.scheduler.stop()
            mv.scheduler = None
        if mv.state in (VersionState.DRAINING, VersionState.FAILED):
            mv.transition(VersionState.UNLOADED, why)
        mv.runtime = None
        log.info("model '%s' version %d unloaded (%s)", mv.name, mv.version, why)

    async def _unload_model(self, model: Model, why: str) -> None:
        for v in sorted(model.versions):
            await self._retire(model.versions.pop(v), why)
        model.failed_reloads.clear()
        model.reason = why
        model.wanted = False

    def _load_version(
        self,
        model: Model,
        mv: ModelVersion,
        loop: asyncio.AbstractEventLoop,
        attempt: LoadAttempt,
    ) -> None:
        # Runs on the attempt's thread; mutates only `mv`, which no request sees
        # until it is swapped into the model's versions on the loop, and only
        # after committing (an abandoned attempt leaves `mv` to the loop).
        started = time.monotonic()
        try:
            scheduler, info, notes = self._build(model, mv, loop, attempt)
        except ModelLoadError as exc:
            if not attempt.commit():
                log.info("%s: abandoned load ended: %s", attempt.label, exc.message)
                return
            mv.transition(VersionState.FAILED, exc.message)
            log.error("model '%s' version %d failed to load: %s", mv.name, mv.version, exc.message)
            return
        except Exception as exc:  # anything else while loading is this version's, not the server's
            if not attempt.commit():
                log.info("%s: abandoned load ended: %s", attempt.label, exc)
                return
            reason = f"loading failed: {type(exc).__name__}: {exc}"
            mv.transition(VersionState.FAILED, reason)
            log.exception("model '%s' version %d failed to load", mv.name, mv.version)
            return
        mv.runtime = info
        mv.notes = notes
        mv.scheduler = scheduler
        mv.load_seconds = time.monotonic() - started
        for note in notes:
            log.info("model '%s' version %d: %s", mv.name, mv.version, note)
        mv.transition(VersionState.READY, info.degraded_reason or "")
        log.info(
            "model '%s' version %d ready in %.2fs on %s (max_batch_size %d, %d instance(s), "
            "%s executor)",
            mv.name,
            mv.version,
            mv.load_seconds,
            ",".join(info.providers),
            mv.config.max_batch_size,
            info.instance_count,
            scheduler.executor.kind,
        )

    def _build(
        self,
        model: Model,
        mv: ModelVersion,
        loop: asyncio.AbstractEventLoop,
        attempt: LoadAttempt,
    ) -> tuple[Scheduler, RuntimeInfo, list[str]]:
        """Loads the version on its executor (completing mv.config from the
        graph) and builds its scheduler. Raises ModelLoadError."""
        path = cfg.model_file(model.directory, mv.version, mv.config)
        # The loader completes a copy: an abandoned load must not write into a
        # config the loop may be reading (the version is listed, FAILED).
        config = mc.ModelConfig()
        config.CopyFrom(mv.config)
        executor, info, notes = self.loader.load(
            mv.name, mv.version, path, model.directory, config, attempt
        )
        if not attempt.commit():  # the budget ran out meanwhile: never served
            executor.close()
            raise ModelLoadError("abandoned after its load budget")
        mv.config.CopyFrom(config)
        try:
            self._attach_drift(model, mv)
            scheduler = Scheduler(
                mv.name,
                mv.version,
                mv.config,
                executor,
                info.intra_op_threads,
                mv.stats,
                loop,
                drift=mv.drift,
            )
            executor.attach(scheduler, scheduler.batcher, loop, scheduler.output_names)
        except BaseException:
            executor.close()
            raise
        return scheduler, info, notes

    @staticmethod
    def _attach_drift(model: Model, mv: ModelVersion) -> None:
        """Drift windows for a version with a profile; a profile that cannot be
        used is logged and the version serves without drift monitoring."""
        version_dir = model.directory / str(mv.version)
        try:
            metadata = read_metadata(version_dir) or {}
            metrics = metadata.get("metrics") if isinstance(metadata, dict) else None
            mv.drift = create_monitor(
                version_dir, mv.config, metrics if isinstance(metrics, dict) else None
            )
        except Exception as exc:  # a bad or stale profile never fails the load
            mv.drift = None
            mv.drift_reason = f"the drift profile cannot be used: {exc}"
            log.error("model '%s' version %d: %s", mv.name, mv.version, mv.drift_reason)
            return
        if mv.drift is not None:
            mv.drift_reason = ""
            log.info(
                "model '%s' version %d: drift monitoring on (%d tensor(s), %gs window)",
                mv.name,
                mv.version,
                len(mv.drift.tensors),
                mv.drift.window_seconds,
            )

    # ---- progressive delivery ---------------------------------------------------

    async def change_labels(self, name: str, change: Callable[[Labels], Labels]) -> Labels:
        """Changes the model's labels.json (under its lock) and applies it now,
        loading any newly labelled version. Raises NotFoundError for an unknown
        model, InvalidArgumentError for a labelled version with no folder."""
        directory = layout.model_dir(self.repository, name)  # a client's name: never a path
        if not await asyncio.to_thread(directory.is_dir):
            raise NotFoundError(f"Request for unknown model: '{shown(name)}' is not found")
        available = set(await asyncio.to_thread(version_dirs, directory))

        def checked(current: Labels) -> Labels:
            updated = change(current)
            missing = sorted(updated.versions() - available)
            if missing:
                raise InvalidArgumentError(
                    f"model '{shown(name)}' has no version folder {', '.join(map(str, missing))}"
                )
            return updated

        async with self._lock:
            labels = await asyncio.to_thread(update_labels, directory, checked)
            await self._reconcile(await asyncio.to_thread(read_aspired, self.repository, name))
        await self._changed()
        return labels

    def _apply_labels(self, model: Model, labels: Labels) -> None:
        Router.new_guard(model, labels, self.guard_limits)

    def route(self, name: str, version: str, request_id: str) -> Route:
        """The version a request goes to, with a lease on it (see Route)."""
        return self.router.route(self.model(name), version, request_id, self.resolve)

    def unavailable(self) -> list[str]:
        """Models that should serve and have no ready version (strict readiness)."""
        return [n for n, m in self.models.items() if m.wanted and not m.ready_versions()]

    # ---- index -----------------------------------------------------------------

    async def index(self) -> list[IndexEntry]:
        """Every model folder with its versions' states (Triton's RepositoryIndex)."""
        entries: list[IndexEntry] = []
        names = set(self.models)
        names |= set(await asyncio.to_thread(self._folder_names))
        for name in sorted(names):
            model = self.models.get(name)
            if model is None or (not model.versions and not model.failed_reloads):
                reason = model.reason if model is not None else "unloaded"
                entries.append(IndexEntry(name, "", "UNAVAILABLE", reason))
                continue
            for v, mv in sorted(model.versions.items()):
                reason = mv.reason
                if v in model.failed_reloads:
                    reason = f"reload failed, previous load serving: {model.failed_reloads[v]}"
                entries.append(IndexEntry(name, str(v), mv.state.value, reason))
        return entries

    def _folder_names(self) -> list[str]:
        return model_names(self.repository) if self.repository.is_dir() else []

    # ---- resolving -----------------------------------------------------------

    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise NotFoundError(f"Request for unknown model: '{shown(name)}' is not found")
        return model

    def resolve(self, name: str, version: str) -> ModelVersion:
        """The version a request for (name, version) goes to. An empty version
        means the highest ready version, as in Triton."""
        model = self.model(name)
        if version:
            if not (version.isascii() and version.isdigit()) or version.startswith("0"):
                raise NotFoundError(
                    f"Request for unknown model: '{shown(name)}' version '{shown(version)}' is "
                    "not found"
                )
            mv = model.versions.get(int(version))
            if mv is None:
                raise NotFoundError(
                    f"Request for unknown model: '{shown(name)}' version {version} is not found"
                )
            if not mv.ready:
                raise UnavailableError(
                    f"model '{shown(name)}' version {version} is not ready: "
                    f"{mv.reason or mv.state.value}"
                )
            return mv
        ready = model.ready_versions()
        if not ready:
            raise UnavailableError(
                f"model '{shown(name)}' is not ready: {model.unavailable_reason()}"
            )
        return ready[-1]
