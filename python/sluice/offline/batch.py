"""`sluice batch`: offline scoring of a file with the serving runtime and config.

Flow: the input streams through in chunks of `chunk_rows` (sluice.offline.
batch_io); each chunk is split into batches of the batch size and scored on
the model's instances in parallel (local: the same sessions, thread budget and
config completion as `sluice serve`; or `--url`: a running server over one
ModelStreamInfer stream per chunk). Each finished chunk's outputs (and --keep
columns) go to `<output>.sluice-batch/chunk-N.npz` and the chunk number into
`state.json` there, each written through a temporary file and renamed. When
every chunk is done the output is assembled in input order into a temporary
file, fsynced and renamed into place, and the work folder removed.

`--resume` reuses the work folder when its state names the same input file
(size, mtime, first MiB), model, chunk size and columns: finished chunks are
not scored again. Without it a leftover work folder is discarded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sluice import config as cfg
from sluice import datatypes
from sluice.errors import SluiceError
from sluice.offline import batch_io
from sluice.offline.batch_io import InputSpec
from sluice.proto import model_config_pb2 as mc

if TYPE_CHECKING:  # grpc is imported only when scoring on a server
    from sluice.client import ClientTls

Array = np.ndarray[Any, Any]
log = logging.getLogger(__name__)

STATE_FILENAME = "state.json"
WORKDIR_SUFFIX = ".sluice-batch"
DEFAULT_CHUNK_ROWS = 65536
BATCH_CANDIDATES = (16, 64, 256, 1024, 4096)
MEASURE_MIN_S = 0.05  # per candidate batch size
_HEAD_BYTES = 1 << 20
STREAM_TIMEOUT_S = 600.0


class BatchError(SluiceError):
    pass


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    model: str
    input: Path
    output: Path
    repository: Path | None = None
    version: int | None = None
    url: str | None = None
    tls: ClientTls | None = None  # --url over TLS; None: plaintext
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    batch_size: int | None = None
    instances: int | None = None
    keep: tuple[str, ...] = ()
    resume: bool = False
    stop_after_chunks: int | None = None
    drift_report: Path | None = None
    progress: bool = True
    timeout_s: float = STREAM_TIMEOUT_S


@dataclasses.dataclass(frozen=True)
class BatchResult:
    rows: int
    chunks: int
    chunks_resumed: int
    complete: bool
    seconds: float
    batch_size: int
    instances: int
    threads_per_instance: int
    drift: dict[str, Any] | None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# ---- scorers -----------------------------------------------------------------------


class Scorer:
    """Scores a list of batches (inputs by name) into outputs by name, in order."""

    specs: list[InputSpec]
    outputs: list[str]
    output_dims: dict[str, tuple[tuple[int, ...], np.dtype[Any]]]
    max_batch_size: int
    measured_batch_size: bool
    instances: int
    threads: int
    identity: str  # what the resume state compares

    def score(self, batches: Sequence[Mapping[str, Array]]) -> list[dict[str, Array]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _spec(t: Any) -> InputSpec:
    dt = datatypes.BY_CONFIG[mc.DataType.Name(t.data_type)]
    if dt.numpy is None or dt.is_bytes:
        raise BatchError(f"input '{t.name}' is {dt.wire}; sluice batch scores numeric tensors")
    dims = tuple(t.reshape.shape) if t.HasField("reshape") else tuple(t.dims)
    return InputSpec(t.name, np.dtype(dt.numpy), tuple(int(d) for d in dims))


def _output_types(config: mc.ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    out = {}
    for o in config.output:
        dt = datatypes.BY_CONFIG[mc.DataType.Name(o.data_type)]
        if dt.numpy is None or dt.is_bytes:
            raise BatchError(f"output '{o.name}' is {dt.wire}; sluice batch writes numeric tensors")
        out[o.name] = (tuple(int(d) for d in o.dims), np.dtype(dt.numpy))
    return out


def _load_local(
    repository: Path, model: str, version: int | None, instances: int | None
) -> tuple[Any, mc.ModelConfig, mc.ModelConfig, Path, int]:
    from sluice.repository.policy import version_dirs
    from sluice.repository.registry.folders import check_model_name
    from sluice.runtime import RuntimeOptions, load_runtime

    check_model_name(model)
    model_dir = repository / model
    if not model_dir.is_dir():
        raise BatchError(f"no model '{model}' in {repository}")
    written, _ = cfg.read_config_file(model_dir)
    cfg.validate_static(written, model)
    if version is None:
        found = version_dirs(model_dir)
        if not found:
            raise BatchError(f"model '{model}' has no version folder")
        version = max(found)
    elif not (model_dir / str(version)).is_dir():
        raise BatchError(f"model '{model}' has no version {version}")
    config = mc.ModelConfig()
    config.CopyFrom(written)
    if instances is not None:
        if instances < 1:
            raise BatchError("--instances must be >= 1")
        del config.instance_group[:]
        config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    if "intra_op_allow_spinning" not in config.parameters:
        # Serving keeps onnxruntime's threads from spinning so the gRPC frontend
        # gets the cores; offline nothing else needs them between batches.
        config.parameters["intra_op_allow_spinning"].string_value = "1"
    path = cfg.model_file(model_dir, version, config)
    runtime, _ = load_runtime(path, config, model, RuntimeOptions())
    return runtime, written, config, path, version


class InProcessScorer(Scorer):
    def __init__(self, repository: Path, model: str, version: int | None, instances: int | None):
        runtime, written, config, path, version = _load_local(repository, model, version, instances)
        if config.max_batch_size <= 0:
            raise BatchError(
                f"model '{model}' does not batch (max_batch_size 0); sluice batch scores "
                "models whose inputs have a batch dimension"
            )
        self.runtime = runtime
        self.config = config
        self.version = version
        self.version_dir = path.parent
        self.specs = [_spec(t) for t in config.input]
        self.outputs = [o.name for o in config.output]
        self.output_dims = _output_types(config)
        # A max_batch_size the config file states is a limit; one completed
        # from the graph is Triton's default, not a property of the model.
        self.max_batch_size = written.max_batch_size
        self.measured_batch_size = written.max_batch_size == 0
        self.instances = runtime.instance_count
        self.threads = runtime.intra_op_threads
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(_HEAD_BYTES):
                sha.update(block)
        self.identity = f"{model}/{version}:{sha.hexdigest()}"
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.instances, thread_name_prefix="sluice-batch"
        )
        self._reshape = {
            t.name: tuple(t.reshape.shape) for t in config.input if t.HasField("reshape")
        }

    def _run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        shaped = {
            k: v.reshape((len(v), *self._reshape[k])) if k in self._reshape else v
            for k, v in feeds.items()
        }
        return dict(zip(self.outputs, self.runtime.run(shaped, self.outputs), strict=True))

    def score(self, batches: Sequence[Mapping[str, Array]]) -> list[dict[str, Array]]:
        return list(self._pool.map(self._run, batches))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class RemoteScorer(Scorer):
    """A running server: one ModelStreamInfer stream per chunk, every batch of the
    chunk in flight on it (the server's batcher and instances do the rest)."""

    def __init__(
        self,
        url: str,
        model: str,
        version: int | None,
        timeout_s: float,
        tls: ClientTls | None = None,
    ):
        from sluice.client import ClientError, connection_hint
        from sluice.server.stream_client import StreamClient

        self._client = StreamClient(url, timeout_s, tls)
        self._client_error = ClientError
        self.model = model
        self.version = "" if version is None else str(version)
        try:
            config = self._client.config(model, self.version)
        except ClientError as exc:
            self._client.close()
            hint = connection_hint(exc.message, tls)
            raise BatchError(f"{url}: {exc}{hint}") from None
        if config.max_batch_size <= 0:
            self._client.close()
            raise BatchError(f"model '{model}' does not batch on the server (max_batch_size 0)")
        self.config = config
        self.specs = [_spec(t) for t in config.input]
        self.outputs = [o.name for o in config.output]
        self.output_dims = _output_types(config)
        self.max_batch_size = config.max_batch_size
        self.measured_batch_size = False
        self.instances = sum(max(1, g.count) for g in config.instance_group) or 1
        self.threads = 0  # the server's
        self.identity = f"{url}/{model}/{self.version or 'default'}"
        self._wire = {s.name: datatypes.from_numpy(s.dtype).wire for s in self.specs}

    def score(self, batches: Sequence[Mapping[str, Array]]) -> list[dict[str, Array]]:
        try:
            return self._client.infer_many(
                self.model, self.version, batches, self._wire, self.outputs
            )
        except self._client_error as exc:
            raise BatchError(f"the server refused a batch: {exc}") from None

    def close(self) -> None:
        self._client.close()


# ---- batch size ------------------------------------------------------------------


def score_measuring(
    scorer: Scorer, feeds: Mapping[str, Array], limit: int
) -> tuple[int, list[dict[str, Array]]]:
    """Scores the first chunk while finding the batch size with the most rows/s:
    consecutive slices of the chunk run at growing sizes (2 batches per instance
    each, at least MEASURE_MIN_S), until a size is clearly slower (by a quarter)
    than the best so far; the rest of the chunk runs at the largest size within
    5 % of the best, since on a busy machine a larger batch is the safer pick.
    The measuring work is real scoring, so finding the size costs nothing but
    the slower sizes' time. Returns (the size, the chunk's results in order)."""
    rows = len(next(iter(feeds.values())))
    per_round = 2 * max(1, scorer.instances)
    rates: dict[int, float] = {}
    results: list[dict[str, Array]] = []
    pos = 0
    for size in BATCH_CANDIDATES:
        if size > limit or rows - pos < size * per_round:
            break
        done, start_ns = 0, time.monotonic_ns()
        while True:
            end = pos + size * per_round
            if end > rows:
                break
            results += scorer.score(
                [{k: v[i : i + size] for k, v in feeds.items()} for i in range(pos, end, size)]
            )
            done += end - pos
            pos = end
            elapsed_ns = time.monotonic_ns() - start_ns
            if elapsed_ns >= MEASURE_MIN_S * 1e9:
                break
        elapsed_ns = max(1, time.monotonic_ns() - start_ns)
        rates[size] = done / (elapsed_ns / 1e9)
        if rates[size] < 0.75 * max(rates.values()):
            break
    top = max(rates.values(), default=0.0)
    best = max((s for s, r in rates.items() if r >= 0.95 * top), default=BATCH_CANDIDATES[0])
    results += scorer.score(
        [{k: v[i : i + best] for k, v in feeds.items()} for i in range(pos, rows, best)]
    )
    return best, results


# ---- state -----------------------------------------------------------------------


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": head}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_chunk(path: Path, arrays: Mapping[str, Array]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def workdir_of(output: Path) -> Path:
    return output.with_name(output.name + WORKDIR_SUFFIX)


# ---- the batch command -----------------------------------------------------------


def _prefetched(chunks: Iterator[batch_io.Chunk]) -> Iterator[batch_io.Chunk]:
    """Reads the next chunk on a thread while the current one is scored."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sluice-read") as pool:
        future = pool.submit(next, chunks, None)
        while True:
            chunk = future.result()
            if chunk is None:
                return
            future = pool.submit(next, chunks, None)
            yield chunk


def run(options: BatchOptions, scorer_factory: Callable[[], Scorer] | None = None) -> BatchResult:
    """Scores options.input into options.output (see the module docstring)."""
    if options.chunk_rows < 1:
        raise BatchError("--chunk-rows must be >= 1")
    if options.batch_size is not None and options.batch_size < 1:
        raise BatchError("--batch-size must be >= 1")
    if options.url is None and options.repository is None:
        raise BatchError("give --model-repository DIR, or --url HOST:PORT of a running server")
    if options.drift_report is not None and options.repository is None:
        raise BatchError("--drift-report reads the version's profile: give --model-repository")
    if options.output.resolve() == options.input.resolve():
        raise BatchError("--output must not be the input file")
    if scorer_factory is None:
        if options.url:
            url = options.url

            def scorer_factory() -> Scorer:
                return RemoteScorer(
                    url, options.model, options.version, options.timeout_s, options.tls
                )
        else:
            repository = options.repository
            assert repository is not None

            def scorer_factory() -> Scorer:
                return InProcessScorer(
                    repository, options.model, options.version, options.instances
                )

    scorer = scorer_factory()
    try:
        return _run(options, scorer)
    finally:
        scorer.close()


def _run(options: BatchOptions, scorer: Scorer) -> BatchResult:
    from tqdm import tqdm

    reader = batch_io.open_reader(options.input, scorer.specs, options.keep)
    clash = [k for k in options.keep if k in scorer.outputs]
    if clash:
        raise BatchError(f"--keep column(s) {clash} have the name of a model output")
    columns = [*options.keep, *scorer.outputs]
    batch_io.check_output_suffix(options.output, scorer.outputs, options.keep)
    drift = _DriftAccumulator.create(options, scorer)

    workdir = workdir_of(options.output)
    state = {
        "format": 1,
        "input": _fingerprint(options.input),
        "model": scorer.identity,
        "chunk_rows": options.chunk_rows,
        "keep": list(options.keep),
        "outputs": scorer.outputs,
        "batch_size": options.batch_size,
        "done": [],
    }
    done: set[int] = set()
    if workdir.exists() and options.resume:
        try:
            old = json.loads((workdir / STATE_FILENAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        same = isinstance(old, dict) and all(
            old.get(k) == state[k]
            for k in ("format", "input", "model", "chunk_rows", "keep", "outputs")
        )
        if not same:
            raise BatchError(
                f"{workdir.name} belongs to another run (input, model, chunk size or columns "
                "differ); remove it, or run without --resume to start over"
            )
        assert isinstance(old, dict)
        done = {int(i) for i in old.get("done", [])}
        state["batch_size"] = old.get("batch_size")
    elif workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state["done"] = sorted(done)
    _write_json(workdir / STATE_FILENAME, state)

    stored = state.get("batch_size")
    batch_size: int | None = options.batch_size or (stored if isinstance(stored, int) else None)
    start_ns = time.monotonic_ns()
    total = reader.rows
    progress = tqdm(
        total=total,
        unit="rows",
        unit_scale=True,
        disable=not options.progress,
        file=sys.stderr,
        desc=f"sluice batch {options.model}",
        dynamic_ncols=True,
    )
    index = 0
    scored_chunks = 0
    rows_scored = 0
    complete = True
    try:
        for index, (feeds, kept) in enumerate(_prefetched(reader.chunks(options.chunk_rows))):
            rows = len(next(iter(feeds.values())))
            chunk_file = workdir / f"chunk-{index:08d}.npz"
            if index in done and chunk_file.is_file():
                if drift is not None:
                    with np.load(chunk_file, allow_pickle=False) as z:
                        drift.update(feeds, {n: z[n] for n in scorer.outputs})
                progress.update(rows)
                continue
            if options.stop_after_chunks is not None and scored_chunks >= options.stop_after_chunks:
                complete = False
                break
            results: list[dict[str, Array]] | None = None
            try:
                if batch_size is None:
                    limit = scorer.max_batch_size or max(BATCH_CANDIDATES)
                    if scorer.measured_batch_size:
                        batch_size, results = score_measuring(scorer, feeds, limit)
                    else:
                        batch_size = limit
                    state["batch_size"] = batch_size
                if scorer.max_batch_size and isinstance(scorer, RemoteScorer):
                    # The server refuses larger requests; in process the config's
                    # limit is a serving setting and --batch-size may exceed it.
                    batch_size = min(batch_size, scorer.max_batch_size)
                if results is None:
                    results = scorer.score(
                        [
                            {k: v[i : i + batch_size] for k, v in feeds.items()}
                            for i in range(0, rows, batch_size)
                        ]
                    )
            except SluiceError:
                raise
            except Exception as exc:  # onnxruntime's errors name the tensor
                raise BatchError(
                    f"the model failed on rows {index * options.chunk_rows}.."
                    f"{index * options.chunk_rows + rows - 1}: {exc}"
                ) from None
            outputs = {n: np.concatenate([r[n] for r in results]) for n in scorer.outputs}
            if drift is not None:
                drift.update(feeds, outputs)
            _save_chunk(chunk_file, {**kept, **outputs})
            done.add(index)
            state["done"] = sorted(done)
            _write_json(workdir / STATE_FILENAME, state)
            scored_chunks += 1
            rows_scored += rows
            progress.update(rows)
    finally:
        progress.close()
    seconds = (time.monotonic_ns() - start_ns) / 1e9
    chunk_count = len(done)
    if complete:
        chunk_files = [workdir / f"chunk-{i:08d}.npz" for i in sorted(done)]
        if sorted(done) != list(range(len(done))):
            raise BatchError(f"{workdir.name}: chunks are missing; run without --resume")
        if not chunk_files:
            raise BatchError(f"{options.input.name} has no rows")
        shapes = dict(scorer.output_dims)
        with np.load(chunk_files[0], allow_pickle=False) as z:
            for k in options.keep:
                shapes[k] = (tuple(z[k].shape[1:]), z[k].dtype)
            for n in scorer.outputs:
                shapes[n] = (tuple(z[n].shape[1:]), z[n].dtype)
        batch_io.write_output(options.output, columns, chunk_files, shapes)
        shutil.rmtree(workdir, ignore_errors=True)
    report = drift.report() if drift is not None and complete else None
    if report is not None and options.drift_report is not None:
        _write_report(options.drift_report, report)
    return BatchResult(
        rows=rows_scored,
        chunks=chunk_count,
        chunks_resumed=chunk_count - scored_chunks,
        complete=complete,
        seconds=seconds,
        batch_size=int(batch_size or 0),
        instances=scorer.instances,
        threads_per_instance=scorer.threads,
        drift=report,
    )


def _write_report(path: Path, report: Mapping[str, Any]) -> None:
    from sluice.cli.drift import format_report

    if path.suffix.lower() == ".json":
        text = json.dumps(report, indent=2) + "\n"
    else:
        text = format_report(report) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class _DriftAccumulator:
    """The batch against the version's stored profile: the same windows and the
    same report `sluice drift --data` computes, fed chunk by chunk."""

    def __init__(self, model: str, version: int, tensors: list[Any]) -> None:
        from sluice import _core

        self.model, self.version = model, version
        self.tensors = tensors
        self.windows = {id(tp): _core.DriftWindow(tp.profile) for tp in tensors}

    @classmethod
    def create(cls, options: BatchOptions, scorer: Scorer) -> _DriftAccumulator | None:
        if options.drift_report is None:
            return None
        from sluice.monitoring import drift
        from sluice.repository.policy import version_dirs

        assert options.repository is not None
        version = getattr(scorer, "version", None)
        if not isinstance(version, int):
            version = options.version
        if version is None:
            found = version_dirs(options.repository / options.model)
            if not found:
                raise BatchError(f"model '{options.model}' has no version folder")
            version = max(found)
        tensors = drift.load(options.repository / options.model / str(version))
        if tensors is None:
            raise BatchError(
                f"--drift-report: model '{options.model}' version {version} has no drift "
                "profile (run sluice profile)"
            )
        return cls(options.model, version, tensors)

    def update(self, feeds: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
        from sluice.monitoring import drift

        for tp in self.tensors:
            source = outputs if tp.output else feeds
            if tp.name in source:
                self.windows[id(tp)].update(drift.as_matrix(source[tp.name]), 0)

    def report(self) -> dict[str, Any]:
        from sluice.monitoring import drift

        result: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "available": True,
            "reason": "",
            "inputs": None,
            "outputs": None,
        }
        for tp in self.tensors:
            window = self.windows[id(tp)]
            if window.rows == 0:
                continue
            rep = drift.tensor_report(tp, window.statistics(), window)
            key = "outputs" if tp.output else "inputs"
            result[key] = drift.merge_reports(result[key], rep)
        return result


def describe(result: BatchResult, options: BatchOptions) -> str:
    where = options.url or "in process"
    threads = f" x {result.threads_per_instance} threads" if result.threads_per_instance else ""
    head = "done" if result.complete else "stopped"
    return (
        f"sluice batch: {head}: scored {result.rows} rows ({result.chunks} chunks done, "
        f"{result.chunks_resumed} of them resumed) in {result.seconds:.2f} s, "
        f"{result.rows_per_s:.0f} rows/s; batch size "
        f"{result.batch_size}, {result.instances} instance(s){threads}, {where}"
        + ("" if result.complete else f"; rerun with --resume to finish {options.output.name}")
    )
