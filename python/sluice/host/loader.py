"""The loader the composition root injects into the lifecycle manager: builds
one version's runtime on its executor (thread or process) and its scheduler."""

from __future__ import annotations

from pathlib import Path

from sluice.executors.attempt import LoadAttempt
from sluice.executors.base import PROCESS, Executor, executor_kind
from sluice.proto import model_config_pb2 as mc
from sluice.runtime import RuntimeInfo, RuntimeOptions, instance_count, load_runtime
from sluice.runtime.warmup import warm_up


class ExecutorLoader:
    """Loads versions on the executor their config (or the server) asks for.

    `load` blocks (session creation, child start-up, warm-up): the lifecycle
    manager calls it off the event loop, on the thread of a LoadAttempt with a
    time budget. It completes `config` from the graph in place and raises
    ModelLoadError with the reason. The executor it returns is loaded and
    warmed up, and not yet attached to a scheduler. Process executors kill
    their children when the attempt is abandoned; a thread executor's session
    creation runs to its end (see executors/attempt.py).
    """

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options

    def load(
        self,
        name: str,
        version: int,
        model_file: Path,
        model_dir: Path,
        config: mc.ModelConfig,
        attempt: LoadAttempt | None = None,
    ) -> tuple[Executor, RuntimeInfo, list[str]]:
        from sluice.executors.process import ProcessExecutor, launch_spec
        from sluice.executors.thread import ThreadExecutor

        if executor_kind(config, self.options.executor) == PROCESS:
            spec = launch_spec(
                name, version, model_file, model_dir, config, self.options, instance_count(config)
            )
            process = ProcessExecutor(spec)
            completed, notes, info = process.launch(attempt)
            config.CopyFrom(completed)
            return process, info, notes
        runtime, notes = load_runtime(model_file, config, name, self.options, model_dir=model_dir)
        warm_up(
            runtime,
            config,
            model_dir,
            on_abandon=attempt.on_abandon if attempt is not None else None,
        )
        return ThreadExecutor(runtime), runtime.info(), notes
