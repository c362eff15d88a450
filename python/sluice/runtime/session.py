"""One model version's onnxruntime sessions (one per instance) and how to run them.

Contract: `ModelRuntime.run` is thread-safe and blocking; onnxruntime releases
the GIL inside `run`, so callers run it on worker threads. Each call takes a
free session (instance) for its duration, so at most `instance_count` runs are
in flight per version.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import queue
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from sluice import config as cfg
from sluice import datatypes
from sluice.errors import ModelLoadError
from sluice.proto import model_config_pb2 as mc
from sluice.repository import layout
from sluice.runtime.resources import available_cores

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
_BF16_ONNX_ELEM_TYPE = 16  # TensorProto.BFLOAT16

FALLBACK_FAIL = "fail"
FALLBACK_CPU = "cpu"


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    # What to do when a requested GPU provider is not active after session
    # creation: "fail" the load (default) or serve on the CPU, flagged degraded.
    provider_fallback: str = FALLBACK_FAIL
    default_max_batch_size: int = cfg.DEFAULT_MAX_BATCH_SIZE
    cores: int | None = None  # None: detect (affinity and cgroup quota)
    log_severity: int = 3  # onnxruntime: 3 = errors only
    # Where batches run unless a model's `executor` parameter says otherwise:
    # "thread" (in the server process) or "process" (one child per instance).
    executor: str = "thread"


def _param(config: mc.ModelConfig, key: str) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value
    return None


# Provider options that name a path the provider reads or writes: they resolve
# inside the model's folder like every other file a model uses (a config override
# from a client must not make the server write elsewhere).
_PATH_OPTIONS = {
    "tensorrt": ("trt_engine_cache_path",),
    "openvino": ("cache_dir", "load_config"),
}


def _inside_model(model_dir: Path, accelerator: str, key: str, params: dict[str, str]) -> None:
    """Replaces the path option `key` (when set) by its resolved form inside
    `model_dir`; raises ModelLoadError for an absolute or escaping path."""
    if key in params:
        where = f"{accelerator} option {key}"
        params[key] = str(layout.inside(model_dir, params[key], where))


def _providers(config: mc.ModelConfig, model_dir: Path) -> list[tuple[str, dict[str, str]]]:
    """Execution providers the config asks for, in priority order, CPU last.
    Path options resolve inside `model_dir` (the model's folder)."""
    wanted: list[tuple[str, dict[str, str]]] = []
    gpu_kind = any(g.kind == mc.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
    device_id = next((g.gpus[0] for g in config.instance_group if g.gpus), 0)
    for acc in config.optimization.execution_accelerators.gpu_execution_accelerator:
        name = acc.name.lower()
        params = dict(acc.parameters)
        if name == "tensorrt":
            trt: dict[str, str] = {"device_id": str(device_id)}
            if params.get("precision_mode", "").upper() == "FP16":
                trt["trt_fp16_enable"] = "True"
            if "max_workspace_size_bytes" in params:
                trt["trt_max_workspace_size"] = params["max_workspace_size_bytes"]
            for key in ("trt_engine_cache_enable", "trt_engine_cache_path"):
                if key in params:
                    trt[key] = params[key]
            for key in _PATH_OPTIONS["tensorrt"]:
                _inside_model(model_dir, "tensorrt", key, trt)
            wanted.append((TENSORRT, trt))
        elif name == "cuda":
            wanted.append((CUDA, {"device_id": str(device_id)}))
        else:
            raise ModelLoadError(f"unknown gpu_execution_accelerator '{acc.name}'")
    if (gpu_kind or wanted) and CUDA not in [w[0] for w in wanted]:
        wanted.append((CUDA, {"device_id": str(device_id)}))
    for acc in config.optimization.execution_accelerators.cpu_execution_accelerator:
        if acc.name.lower() == "openvino":
            ov = dict(acc.parameters)
            for key in _PATH_OPTIONS["openvino"]:
                _inside_model(model_dir, "openvino", key, ov)
            wanted.append((OPENVINO, ov))
        else:
            raise ModelLoadError(f"unknown cpu_execution_accelerator '{acc.name}'")
    wanted.append((CPU, {}))
    return wanted


# More threads than this in one session is a typo, not a plan.
MAX_THREADS_PER_SESSION = 1024


def _thread_param(config: mc.ModelConfig, key: str) -> int:
    """A thread-count parameter (0 when absent); a value that is not a usable
    count fails this model's load with the reason, never the server."""
    text = _param(config, key)
    if not text:
        return 0
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_THREADS_PER_SESSION:
        raise ModelLoadError(
            f"parameter '{key}' must be an integer from 0 to {MAX_THREADS_PER_SESSION} "
            f"(0: decide from the cores), got {text!r}"
        )
    return value


def _session_options(
    config: mc.ModelConfig, instances: int, options: RuntimeOptions
) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = options.log_severity
    cores = options.cores or available_cores()
    # Budget: instances x intra-op threads <= cores, unless the config says otherwise.
    intra = _thread_param(config, "intra_op_thread_count")
    so.intra_op_num_threads = intra if intra else max(1, cores // max(1, instances))
    inter = _thread_param(config, "inter_op_thread_count")
    if inter:
        so.inter_op_num_threads = inter
    if _param(config, "execution_mode") == "1":
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if _param(config, "enable_mem_arena") == "0":
        so.enable_cpu_mem_arena = False
    if _param(config, "enable_mem_pattern") == "0":
        so.enable_mem_pattern = False
    # Spinning intra-op threads burn the cores the gRPC frontend needs; spin
    # only where the config asks for it.
    spin = _param(config, "intra_op_allow_spinning") or "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    level = config.optimization.graph.level
    so.graph_optimization_level = {
        -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return so


def _dim(d: Any) -> int:
    # onnxruntime reports symbolic dims as str, unnamed ones (and a stored -1) as None.
    return d if isinstance(d, int) and d >= 0 else -1


def _signature(session: ort.InferenceSession) -> cfg.Signature:
    def spec(a: Any) -> cfg.TensorSpec:
        shape = tuple(_dim(d) for d in a.shape) if a.type in datatypes.BY_ONNX else ()
        return cfg.TensorSpec(a.name, a.type, shape)

    return cfg.Signature(
        tuple(spec(a) for a in session.get_inputs()), tuple(spec(a) for a in session.get_outputs())
    )


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    """What the host needs to know about a loaded runtime, wherever it runs
    (in this process, or in executor processes)."""

    providers: tuple[str, ...]  # active providers, as onnxruntime reports them
    degraded_reason: str | None
    instance_count: int
    intra_op_threads: int  # threads one run may use (cost attribution)


class ModelRuntime:
    """The loaded sessions of one model version."""

    def __init__(
        self,
        sessions: list[ort.InferenceSession],
        signature: cfg.Signature,
        providers: list[str],
        degraded_reason: str | None,
    ) -> None:
        self.signature = signature
        self.providers = providers  # active providers, as onnxruntime reports them
        self.degraded_reason = degraded_reason
        self.instance_count = len(sessions)
        # Threads one run may use: what cost attribution charges per second of compute.
        self.intra_op_threads = max(1, sessions[0].get_session_options().intra_op_num_threads)
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for s in sessions:
            self._free.put(s)
        self._bf16 = any(
            t.onnx_type == "tensor(bfloat16)" for t in (*signature.inputs, *signature.outputs)
        )
        self._output_types = {o.name: o.onnx_type for o in signature.outputs}

    def info(self, instance_count: int | None = None) -> RuntimeInfo:
        return RuntimeInfo(
            tuple(self.providers),
            self.degraded_reason,
            instance_count if instance_count is not None else self.instance_count,
            self.intra_op_threads,
        )

    def run(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray[Any, Any]]:
        """Runs one instance on `inputs`; returns the outputs in `output_names` order.
        Raises onnxruntime's exception if the model fails on these inputs, or
        when `run_options.terminate` is set while it runs (warm-up abandoned)."""
        session = self._free.get()
        try:
            if self._bf16:
                return self._run_ort_values(session, inputs, output_names, run_options)
            outputs: list[np.ndarray[Any, Any]] = session.run(
                list(output_names), dict(inputs), run_options
            )
            return outputs
        finally:
            self._free.put(session)

    def _run_ort_values(
        self,
        session: ort.InferenceSession,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray[Any, Any]]:
        # numpy cannot hand bfloat16 to onnxruntime's Python API directly: pass
        # the bits as uint16 tagged BFLOAT16, and read results back the same way.
        feeds = {}
        for name, arr in inputs.items():
            if arr.dtype == datatypes.BY_WIRE["BF16"].numpy:
                feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(arr).view(np.uint16), _BF16_ONNX_ELEM_TYPE
                )
            else:
                feeds[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
        values = session.run_with_ort_values(list(output_names), feeds, run_options)
        results: list[np.ndarray[Any, Any]] = []
        for name, value in zip(output_names, values, strict=True):
            if self._output_types[name] == "tensor(bfloat16)":
                shape = tuple(value.shape())
                count = int(np.prod(shape, dtype=np.int64))
                raw = (ctypes.c_uint16 * count).from_address(value.data_ptr())
                bits = np.frombuffer(memoryview(raw), dtype=np.uint16).copy()
                bf16 = datatypes.BY_WIRE["BF16"].numpy
                assert bf16 is not None  # the model loaded, so ml_dtypes is present
                results.append(bits.view(bf16).reshape(shape))
            else:
                results.append(value.numpy())
        return results


def _verify_providers(
    session: ort.InferenceSession, requested: list[str], fallback: str, model: str
) -> str | None:
    """Onnxruntime silently drops a provider it cannot start; catch that here.
    Returns a degraded reason when falling back is allowed; raises otherwise."""
    active = session.get_providers()
    missing = [p for p in requested if p != CPU and p not in active]
    if not missing:
        return None
    reason = (
        f"requested execution provider(s) {', '.join(missing)} not active for model '{model}' "
        f"(active: {', '.join(active)}; installed onnxruntime offers: "
        f"{', '.join(ort.get_available_providers())})"
    )
    if fallback == FALLBACK_CPU:
        log.warning("%s; serving on %s as execution_provider_fallback=cpu allows", reason, active)
        return reason + "; running on the CPU (fallback policy 'cpu')"
    raise ModelLoadError(
        reason + ". Install onnxruntime-gpu with a working CUDA, or set the model parameter "
        "execution_provider_fallback to 'cpu' (or --execution-provider-fallback cpu) to "
        "serve on the CPU"
    )


def instance_count(config: mc.ModelConfig) -> int:
    """Instances the config asks for (instance_group counts; 1 by default)."""
    return sum(max(1, g.count) for g in config.instance_group) or 1


def load_runtime(
    path: Path,
    config: mc.ModelConfig,
    model_name: str,
    options: RuntimeOptions,
    sessions_here: int | None = None,
    model_dir: Path | None = None,
) -> tuple[ModelRuntime, list[str]]:
    """Creates one session per instance, completes and checks `config` against the
    graph (in place), and verifies the providers. Raises ModelLoadError.

    `sessions_here` creates only that many sessions (an executor process holds
    one instance) while the thread budget still counts every instance.
    `model_dir` is the model's folder, where provider path options (TensorRT's
    engine cache) must stay; by default the folder above the version folder
    (`<model>/<version>/model.onnx`)."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path.parent.name}/{path.name} not found")
    instances = instance_count(config)
    providers = _providers(config, model_dir if model_dir is not None else path.parent.parent)
    fallback = _param(config, "execution_provider_fallback") or options.provider_fallback
    if fallback not in (FALLBACK_FAIL, FALLBACK_CPU):
        raise ModelLoadError(
            f"execution_provider_fallback must be 'fail' or 'cpu', not {fallback!r}"
        )
    so = _session_options(config, instances, options)
    # Ask onnxruntime only for providers this build has (it would warn and drop
    # the others); the check after creation reports what is missing.
    installed = set(ort.get_available_providers())
    usable = [(p, o) for p, o in providers if p in installed]
    sessions: list[ort.InferenceSession] = []
    degraded: str | None = None
    try:
        for _ in range(instances if sessions_here is None else sessions_here):
            s = ort.InferenceSession(str(path), sess_options=so, providers=usable)
            degraded = _verify_providers(s, [p for p, _ in providers], fallback, model_name)
            sessions.append(s)
    except ModelLoadError:
        raise
    except Exception as exc:  # onnxruntime raises several exception types
        raise ModelLoadError(
            f"onnxruntime cannot load {path.parent.name}/{path.name}: {exc}"
        ) from exc
    signature = _signature(sessions[0])
    notes = cfg.complete_and_check(
        config, signature, model_name, default_max_batch_size=options.default_max_batch_size
    )
    runtime = ModelRuntime(sessions, signature, sessions[0].get_providers(), degraded)
    return runtime, notes
