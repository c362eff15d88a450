"""ModelManager: loads the repository's models and resolves requests to versions.

Threading: all public methods run on the event loop; the blocking work
(session creation, warm-up, inference) runs on worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

from sluice import config as cfg
from sluice.errors import ModelLoadError, NotFoundError, UnavailableError
from sluice.monitoring import InferStats
from sluice.proto import model_config_pb2 as mc
from sluice.repository.lifecycle import VersionState, check_transition
from sluice.repository.policy import select_versions, version_dirs
from sluice.runtime import ModelRuntime, RuntimeOptions, load_runtime
from sluice.runtime.warmup import warm_up
from sluice.scheduling import Scheduler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelVersion:
    name: str
    version: int
    config: mc.ModelConfig
    state: VersionState = VersionState.LOADING
    reason: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    runtime: ModelRuntime | None = None
    scheduler: Scheduler | None = None
    load_seconds: float = 0.0
    stats: InferStats = dataclasses.field(default_factory=InferStats)

    def transition(self, new: VersionState, reason: str = "") -> None:
        check_transition(self.state, new)
        self.state = new
        self.reason = reason

    @property
    def ready(self) -> bool:
        return self.state is VersionState.READY


@dataclasses.dataclass
class Model:
    name: str
    directory: Path
    versions: dict[int, ModelVersion] = dataclasses.field(default_factory=dict)
    config: mc.ModelConfig = dataclasses.field(default_factory=mc.ModelConfig)
    reason: str = ""  # why the model as a whole cannot load (config errors)

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


class ModelManager:
    def __init__(self, repository: Path, options: RuntimeOptions) -> None:
        self.repository = repository
        self.options = options
        self.models: dict[str, Model] = {}

    # ---- loading -------------------------------------------------------------

    def scan(self) -> None:
        """Reads every model folder's config and version list. Never raises for
        one model: a broken model records its reason and the rest go on."""
        if not self.repository.is_dir():
            raise NotFoundError(f"model repository {self.repository} is not a directory")
        for model_dir in sorted(p for p in self.repository.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            model = Model(model_dir.name, model_dir)
            self.models[model.name] = model
            try:
                model.config, _ = cfg.read_config_file(model_dir)
                cfg.validate_static(model.config, model.name)
                available = version_dirs(model_dir)
                chosen = select_versions(available, model.config.version_policy)
                policy = model.config.version_policy
                if policy.WhichOneof("policy_choice") == "specific":
                    absent = sorted(set(policy.specific.versions) - set(available))
                    if absent:
                        log.warning(
                            "model '%s': version policy names version(s) %s, which have no folder",
                            model.name,
                            absent,
                        )
                if not chosen:
                    raise ModelLoadError(
                        f"model '{model.name}' has no version folder that its version policy "
                        f"selects (found: {available or 'none'})"
                    )
            except ModelLoadError as exc:
                model.reason = exc.message
                log.error("model '%s' is unavailable: %s", model.name, exc.message)
                continue
            for v in chosen:
                version_config = mc.ModelConfig()
                version_config.CopyFrom(model.config)
                model.versions[v] = ModelVersion(model.name, v, version_config)

    async def load_all(self, parallelism: int = 2) -> None:
        """Loads every scanned version; failures stay local to their version."""
        gate = asyncio.Semaphore(parallelism)
        loop = asyncio.get_running_loop()

        async def one(model: Model, mv: ModelVersion) -> None:
            async with gate:
                await asyncio.to_thread(self._load_version, model, mv, loop)

        await asyncio.gather(
            *(one(m, v) for m in self.models.values() for v in m.versions.values())
        )

    def _load_version(
        self, model: Model, mv: ModelVersion, loop: asyncio.AbstractEventLoop
    ) -> None:
        # Runs on a worker thread; mutates only `mv`, which no request sees
        # until its state becomes READY (set last).
        started = time.monotonic()
        try:
            path = cfg.model_file(model.directory, mv.version, mv.config)
            runtime, notes = load_runtime(path, mv.config, model.name, self.options)
            warm_up(runtime, mv.config, model.directory)
            scheduler = Scheduler(mv.name, mv.version, mv.config, runtime, mv.stats, loop)
        except ModelLoadError as exc:
            mv.transition(VersionState.FAILED, exc.message)
            log.error("model '%s' version %d failed to load: %s", mv.name, mv.version, exc.message)
            return
        mv.runtime = runtime
        mv.notes = notes
        mv.scheduler = scheduler
        mv.load_seconds = time.monotonic() - started
        for note in notes:
            log.info("model '%s' version %d: %s", mv.name, mv.version, note)
        reason = runtime.degraded_reason or ""
        mv.transition(VersionState.READY, reason)
        log.info(
            "model '%s' version %d ready in %.2fs on %s (max_batch_size %d, %d instance(s))",
            mv.name,
            mv.version,
            mv.load_seconds,
            ",".join(runtime.providers),
            mv.config.max_batch_size,
            runtime.instance_count,
        )

    async def unload_all(self) -> None:
        """Takes every version out of routing, drains its queue, releases it."""
        for model in self.models.values():
            for mv in model.versions.values():
                if mv.state is VersionState.READY:
                    mv.transition(VersionState.DRAINING)
                if mv.scheduler is not None:
                    await mv.scheduler.stop()
                    mv.scheduler = None
                if mv.state in (VersionState.DRAINING, VersionState.FAILED):
                    mv.transition(VersionState.UNLOADED)
                mv.runtime = None

    # ---- resolving -----------------------------------------------------------

    def model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            raise NotFoundError(f"Request for unknown model: '{name}' is not found")
        return model

    def resolve(self, name: str, version: str) -> ModelVersion:
        """The version a request for (name, version) goes to. An empty version
        means the highest ready version, as in Triton."""
        model = self.model(name)
        if version:
            if not (version.isascii() and version.isdigit()) or version.startswith("0"):
                raise NotFoundError(
                    f"Request for unknown model: '{name}' version '{version}' is not found"
                )
            mv = model.versions.get(int(version))
            if mv is None:
                raise NotFoundError(
                    f"Request for unknown model: '{name}' version {version} is not found"
                )
            if not mv.ready:
                raise UnavailableError(
                    f"model '{name}' version {version} is not ready: {mv.reason or mv.state.value}"
                )
            return mv
        ready = model.ready_versions()
        if not ready:
            raise UnavailableError(f"model '{name}' is not ready: {model.unavailable_reason()}")
        return ready[-1]

    def all_loaded(self) -> bool:
        """No version is still loading (the server's readiness after start-up)."""
        return all(
            v.state is not VersionState.LOADING
            for m in self.models.values()
            for v in m.versions.values()
        )
