"""Model configuration: Triton's ModelConfig (our protos/ subset-compatible copy),
read from config.pbtxt (protobuf text format) or config.yaml (same field names),
then completed from and checked against the model's graph signature.

The config *is* the generated ModelConfig message: the ModelConfig RPC returns it
as is, and there is no second representation to keep in sync.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format, text_format

from sluice import datatypes, defaults
from sluice.errors import ModelLoadError
from sluice.proto import model_config_pb2 as mc

log = logging.getLogger(__name__)

ModelConfig = mc.ModelConfig
CONFIG_FILENAMES = ("config.pbtxt", "config.yaml", "config.yml")
SUPPORTED_PLATFORMS = ("", "onnxruntime_onnx")
SUPPORTED_BACKENDS = ("", "onnxruntime", "onnx")
DEFAULT_MODEL_FILENAME = "model.onnx"
# Triton's autocomplete default for models whose graph can batch.
DEFAULT_MAX_BATCH_SIZE = defaults.DEFAULT_MAX_BATCH_SIZE


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the runtime sees it: -1 marks a dynamic dim."""

    name: str
    onnx_type: str  # e.g. "tensor(float)", "seq(map(int64,tensor(float)))"
    shape: tuple[int, ...]

    @property
    def is_tensor(self) -> bool:
        return self.onnx_type in datatypes.BY_ONNX


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def read_config_file(model_dir: Path) -> tuple[mc.ModelConfig, Path | None]:
    """Parses the model's config file, if any. Raises ModelLoadError with the
    file and the parser's message when it is malformed."""
    found = [model_dir / n for n in CONFIG_FILENAMES if (model_dir / n).is_file()]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(
            f"model '{model_dir.name}' has several config files ({names}); keep one"
        )
    config = mc.ModelConfig()
    if not found:
        return config, None
    path = found[0]
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".pbtxt":
            text_format.Parse(text, config)
        else:
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ValueError("the top level must be a mapping of ModelConfig fields")
            json_format.ParseDict(data, config)
    except (text_format.ParseError, json_format.ParseError, yaml.YAMLError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot parse {path.name} of model '{model_dir.name}': {exc}"
        ) from exc
    return config, path


def validate_static(config: mc.ModelConfig, model_name: str) -> None:
    """Checks that need no graph: platform, name, batch size, scheduling."""
    if config.name and config.name != model_name:
        raise ModelLoadError(
            f"config name '{config.name}' does not match the model folder '{model_name}'"
        )
    if config.platform not in SUPPORTED_PLATFORMS or config.backend not in SUPPORTED_BACKENDS:
        raise ModelLoadError(
            f"model '{model_name}': platform '{config.platform}' / backend '{config.backend}' "
            "is not supported; sluice serves ONNX models (platform 'onnxruntime_onnx' or "
            "backend 'onnxruntime')"
        )
    if config.max_batch_size < 0:
        raise ModelLoadError(f"model '{model_name}': max_batch_size must be >= 0")
    which = config.WhichOneof("scheduling_choice")
    if which in ("sequence_batching", "ensemble_scheduling"):
        raise ModelLoadError(
            f"model '{model_name}': {which} is not supported (stateful sequences and ensembles "
            "are out of scope); use dynamic_batching or no scheduler"
        )
    for group in config.instance_group:
        if group.count < 0:
            raise ModelLoadError(f"model '{model_name}': instance_group count must be >= 0")
    problem = bounds_problem(config)
    if problem is not None:
        raise ModelLoadError(f"model '{model_name}': {problem}")


# Sane bounds on config values: each value sizes something the server allocates
# (queues per priority level, sessions per instance, warm-up tensors), and a
# config override comes from a client. Far above real use, far below harm.
MAX_BATCH_SIZE = 1 << 16
MAX_PREFERRED_SIZES = 64
MAX_QUEUE_DELAY_US = 60_000_000  # a minute
MAX_PRIORITY_LEVELS = 1024
MAX_QUEUE_SIZE = 1 << 20
MAX_QUEUE_TIMEOUT_US = 86_400_000_000  # a day; its ns fit int64 with room
MAX_INSTANCES = 64  # all instance groups together
MAX_TENSORS = 1024  # declared inputs or outputs
MAX_DIM = 1 << 31
MAX_WARMUPS = 16
MAX_WARMUP_COUNT = 1000
MAX_WARMUP_ELEMENTS = 1 << 28  # per warm-up tensor
MAX_THREADS = 1024
THREAD_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count")


def _over(what: str, value: int, low: int, high: int) -> str | None:
    if low <= value <= high:
        return None
    return f"{what} is {value}; it must be in [{low}, {high}]"


def bounds_problem(config: mc.ModelConfig) -> str | None:
    """Why a config value is out of its sane range, or None when all are in."""
    checks: list[str | None] = [
        _over("max_batch_size", config.max_batch_size, 0, MAX_BATCH_SIZE),
        _over(
            "the total instance_group count",
            sum(g.count for g in config.instance_group),
            0,
            MAX_INSTANCES,
        ),
        _over("the number of inputs", len(config.input), 0, MAX_TENSORS),
        _over("the number of outputs", len(config.output), 0, MAX_TENSORS),
        _over("the number of model_warmup entries", len(config.model_warmup), 0, MAX_WARMUPS),
    ]
    tensors: list[mc.ModelInput | mc.ModelOutput] = [*config.input, *config.output]
    for t in tensors:
        dims = list(t.reshape.shape) if t.HasField("reshape") else []
        for d in (*t.dims, *dims):
            checks.append(_over(f"a dim of tensor '{t.name}'", d, -1, MAX_DIM))
    if config.HasField("dynamic_batching"):
        db = config.dynamic_batching
        checks += [
            _over(
                "the number of preferred_batch_size values",
                len(db.preferred_batch_size),
                0,
                MAX_PREFERRED_SIZES,
            ),
            _over(
                "max_queue_delay_microseconds",
                db.max_queue_delay_microseconds,
                0,
                MAX_QUEUE_DELAY_US,
            ),
            _over("priority_levels", db.priority_levels, 0, MAX_PRIORITY_LEVELS),
            _over("default_priority_level", db.default_priority_level, 0, MAX_PRIORITY_LEVELS),
        ]
        policies = [("default_queue_policy", db.default_queue_policy)]
        for level, policy in db.priority_queue_policy.items():
            checks.append(_over("a priority_queue_policy level", level, 1, MAX_PRIORITY_LEVELS))
            policies.append((f"priority_queue_policy[{level}]", policy))
        for where, q in policies:
            checks += [
                _over(f"{where}.max_queue_size", max(0, q.max_queue_size), 0, MAX_QUEUE_SIZE),
                _over(
                    f"{where}.default_timeout_microseconds",
                    q.default_timeout_microseconds,
                    0,
                    MAX_QUEUE_TIMEOUT_US,
                ),
            ]
    for w in config.model_warmup:
        checks += [
            _over(f"model_warmup '{w.name}' count", w.count, 0, MAX_WARMUP_COUNT),
            _over(
                f"model_warmup '{w.name}' batch_size",
                w.batch_size,
                0,
                max(1, config.max_batch_size),
            ),
        ]
        for input_name, spec in w.inputs.items():
            if any(d < 0 for d in spec.dims):
                checks.append(f"model_warmup '{w.name}' input '{input_name}' has a negative dim")
                continue
            elements = math.prod(spec.dims) * max(1, w.batch_size)
            checks.append(
                _over(
                    f"model_warmup '{w.name}' input '{input_name}' elements",
                    elements,
                    0,
                    MAX_WARMUP_ELEMENTS,
                )
            )
    for key in THREAD_PARAMETERS:
        if key in config.parameters:
            raw = config.parameters[key].string_value
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
                checks.append(f"parameter {key} must be a whole number, not {raw[:40]!r}")
            else:
                checks.append(_over(f"parameter {key}", int(raw), 0, MAX_THREADS))
    return next((c for c in checks if c is not None), None)


def model_file(model_dir: Path, version: int, config: mc.ModelConfig) -> Path:
    """The ONNX file of a version; `model.onnx` may also be a folder holding
    `model.onnx` next to its external-data files, as Triton allows. Raises
    ModelLoadError when the name leaves the model folder."""
    # default_model_filename comes from the config, which a client can override
    # (RepositoryModelLoad): the layout keeps it inside the model folder.
    # Imported here: sluice.repository imports this module.
    from sluice.repository import layout

    return layout.model_file(
        model_dir, version, config.default_model_filename, DEFAULT_MODEL_FILENAME
    )


def _batchable(signature: Signature) -> bool:
    """Whether every input and tensor output has a dynamic first dim."""
    tensors = [*signature.inputs, *(o for o in signature.outputs if o.is_tensor)]
    return bool(tensors) and all(len(t.shape) >= 1 and t.shape[0] == -1 for t in tensors)


def _datatype_of(spec: TensorSpec) -> datatypes.DataType:
    return datatypes.BY_ONNX[spec.onnx_type]


def complete_and_check(
    config: mc.ModelConfig,
    signature: Signature,
    model_name: str,
    *,
    default_max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> list[str]:
    """Fills what the config leaves out from the graph and checks what it states.

    Returns notes worth logging (left-out outputs, batching decisions). Raises
    ModelLoadError naming the tensor when the config contradicts the graph.
    """
    notes: list[str] = []
    config.name = model_name
    if not config.platform and not config.backend:
        config.platform = "onnxruntime_onnx"
    for spec in signature.inputs:
        if not spec.is_tensor:
            raise ModelLoadError(
                f"model '{model_name}': input '{spec.name}' has non-tensor type {spec.onnx_type}, "
                "which the inference protocol cannot carry"
            )
    tensor_outputs = [o for o in signature.outputs if o.is_tensor]
    for o in signature.outputs:
        if not o.is_tensor:
            notes.append(
                f"output '{o.name}' has non-tensor type {o.onnx_type} and is not served "
                "(the inference protocol carries tensors only)"
            )
    if not tensor_outputs:
        raise ModelLoadError(
            f"model '{model_name}': no output is a tensor "
            f"({', '.join(o.onnx_type for o in signature.outputs)}); nothing can be served"
        )

    autocomplete = not config.input
    if autocomplete:
        if _batchable(signature):
            if config.max_batch_size == 0:
                config.max_batch_size = default_max_batch_size
                notes.append(
                    f"graph has a dynamic first dim on every tensor: max_batch_size set to "
                    f"{default_max_batch_size}"
                )
            if config.max_batch_size > 0 and not config.WhichOneof("scheduling_choice"):
                # As Triton's autocomplete does: a batchable model gets the dynamic batcher.
                config.dynamic_batching.SetInParent()
        elif config.max_batch_size > 0:
            culprit = next(
                t for t in (*signature.inputs, *tensor_outputs) if not t.shape or t.shape[0] != -1
            )
            raise ModelLoadError(
                f"model '{model_name}': max_batch_size {config.max_batch_size} needs a dynamic "
                f"first (batch) dim on every input and output, but '{culprit.name}' has shape "
                f"{list(culprit.shape)}"
            )
        else:
            notes.append("graph has no common dynamic first dim: max_batch_size 0 (no batching)")
        batch = 1 if config.max_batch_size > 0 else 0
        for spec in signature.inputs:
            config.input.add(
                name=spec.name,
                data_type=mc.DataType.Value(_datatype_of(spec).config),
                dims=list(spec.shape[batch:]),
            )
    if not config.output:
        batch = 1 if config.max_batch_size > 0 else 0
        for spec in tensor_outputs:
            config.output.add(
                name=spec.name,
                data_type=mc.DataType.Value(_datatype_of(spec).config),
                dims=list(spec.shape[batch:]),
            )

    _check_tensors(config.input, signature.inputs, config.max_batch_size, model_name, "input")
    _check_tensors(config.output, signature.outputs, config.max_batch_size, model_name, "output")
    declared = {i.name for i in config.input}
    missing = [s.name for s in signature.inputs if s.name not in declared]
    if missing:
        raise ModelLoadError(
            f"model '{model_name}': the config does not declare model input(s) "
            f"{', '.join(repr(m) for m in missing)}"
        )
    if not config.instance_group:
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    for group in config.instance_group:
        if group.count == 0:
            group.count = 1
    return notes


def _check_tensors(
    declared: Sequence[Any],
    graph: Sequence[TensorSpec],
    max_batch_size: int,
    model_name: str,
    kind: str,
) -> None:
    by_name = {s.name: s for s in graph}
    seen: set[str] = set()
    for t in declared:
        where = f"model '{model_name}': {kind} '{t.name}'"
        if t.name in seen:
            raise ModelLoadError(f"{where} is declared twice")
        seen.add(t.name)
        spec = by_name.get(t.name)
        if spec is None:
            raise ModelLoadError(
                f"{where} is not in the model; the model's {kind}s are "
                f"{', '.join(repr(n) for n in by_name) or 'none'}"
            )
        if not spec.is_tensor:
            raise ModelLoadError(
                f"{where} has non-tensor type {spec.onnx_type} in the model, which the "
                "inference protocol cannot carry; leave it out of the config"
            )
        want = _datatype_of(spec)
        got = mc.DataType.Name(t.data_type)
        if got != want.config:
            raise ModelLoadError(f"{where} is {got} in the config but {want.config} in the model")
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        if t.HasField("reshape"):
            continue  # reshape decouples wire dims from graph dims
        full = ([-1] if max_batch_size > 0 else []) + dims
        if max_batch_size > 0 and (not spec.shape or spec.shape[0] != -1):
            raise ModelLoadError(
                f"{where}: max_batch_size > 0 needs a dynamic first (batch) dim, but the model's "
                f"shape is {list(spec.shape)}"
            )
        if len(full) != len(spec.shape) or any(
            g != -1 and c != g for c, g in zip(full, spec.shape, strict=True)
        ):
            shown = list(spec.shape[1:]) if max_batch_size > 0 else list(spec.shape)
            raise ModelLoadError(
                f"{where} has dims {dims} in the config but the model's shape is "
                f"{list(spec.shape)} (expected dims {shown}"
                + (", the batch dim excluded)" if max_batch_size > 0 else ")")
            )


def to_text(config: mc.ModelConfig) -> str:
    """The config in Triton's text format (for logs and `sluice models show`)."""
    return text_format.MessageToString(config)
