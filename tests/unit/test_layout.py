"""The trust-boundary rules (repository/layout.py), request parameter ranges
(limits.py) and config bounds (config.py), on real files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import sluice_proto_pool  # noqa: F401
from google.protobuf import text_format
from sluice import config as cfg
from sluice import limits
from sluice.errors import InvalidArgumentError, ModelLoadError, ResourceExhaustedError
from sluice.proto import model_config_pb2 as mc
from sluice.repository import layout


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "/abs", "a/b", "a\\b", "a\x00b", "line\nbreak", ".hidden", "x" * 256],
)
def test_bad_model_names(name: str) -> None:
    assert layout.name_problem(name) is not None
    with pytest.raises(InvalidArgumentError, match="invalid model name"):
        layout.check_name(name)


@pytest.mark.parametrize("name", ["resnet50", "my-model_v2.onnx", "模型", "a" * 255, "a b"])
def test_good_model_names(name: str) -> None:
    assert layout.name_problem(name) is None


def test_inside_resolves_symlinks_and_refuses_escapes(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (tmp_path / "secret").write_text("s")
    (model / "1" / "link").symlink_to(tmp_path / "secret")
    (model / "1" / "ok").write_text("x")
    assert layout.inside(model, "1/ok", "f") == (model / "1" / "ok").resolve()
    for bad, reason in [
        ("1/link", "outside"),
        ("../secret", "outside"),
        (str(tmp_path / "secret"), "relative"),
        ("", "relative"),
        ("a\x00b", "relative"),
    ]:
        with pytest.raises(ModelLoadError, match=reason):
            layout.inside(model, bad, "f")


def test_a_symlinked_model_folder_is_the_operators_choice(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere" / "m"
    (real / "1").mkdir(parents=True)
    (real / "1" / "model.onnx").write_bytes(b"x")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m").symlink_to(real)
    path = layout.model_file(tmp_path / "repo" / "m", 1, "", "model.onnx")
    assert path == (real / "1" / "model.onnx").resolve()


def test_read_bounded_refuses_fifos_devices_and_oversize(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    finished = threading.Event()

    def read_fifo() -> None:
        with pytest.raises(ModelLoadError, match="not a regular file"):
            layout.read_bounded(fifo, 100, "fifo")
        finished.set()

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    assert finished.wait(10), "reading a FIFO blocked"
    with pytest.raises(ModelLoadError, match="not a regular file"):
        layout.read_bounded(Path("/dev/zero"), 100, "zero")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 200)
    with pytest.raises(ModelLoadError, match="limit is 100"):
        layout.read_bounded(big, 100, "big")
    with pytest.raises(ModelLoadError, match="holds 200 bytes; the declared tensor needs 16"):
        layout.read_bounded(big, 1000, "big", expected_bytes=16)
    assert layout.read_bounded(big, 200, "big") == b"x" * 200


@pytest.mark.parametrize(
    ("key", "value"),
    [("priority", 1 << 32), ("priority", -1), ("timeout", 1 << 62), ("timeout", True),
     ("priority", "1"), ("timeout", 1.5)],
)  # fmt: skip
def test_request_parameters_out_of_range(key: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=f"parameter '{key}'"):
        limits.int_parameter({key: value}, key, "m")


def test_request_parameters_in_range() -> None:
    assert limits.int_parameter({}, "priority", "m") == 0
    assert limits.int_parameter({"priority": (1 << 32) - 1}, "priority", "m") == (1 << 32) - 1
    assert limits.int_parameter({"timeout": limits.MAX_TIMEOUT_US}, "timeout", "m") > 0


def test_request_limits() -> None:
    bounded = limits.RequestLimits(max_tensor_elements=10, max_inflight_per_model=2)
    bounded.check_elements(10, "x")
    with pytest.raises(ResourceExhaustedError, match="--max-tensor-elements"):
        bounded.check_elements(11, "x")
    bounded.check_inflight(1, "m")
    with pytest.raises(ResourceExhaustedError, match="--max-inflight-per-model"):
        bounded.check_inflight(2, "m")
    limits.RequestLimits().check_inflight(10**9, "m")  # 0: unbounded
    with pytest.raises(ValueError, match="max_request_bytes"):
        limits.RequestLimits(max_request_bytes=1 << 40)


def _config(text: str) -> mc.ModelConfig:
    config = mc.ModelConfig()
    text_format.Parse(text, config)
    return config


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("max_batch_size: 200000000", "max_batch_size is 200000000"),
        ("dynamic_batching { priority_levels: 200000 }", "priority_levels is 200000"),
        ("instance_group [ { count: 100000 } ]", "instance_group count is 100000"),
        ("instance_group [ { count: 40 }, { count: 40 } ]", "instance_group count is 80"),
        ("dynamic_batching { max_queue_delay_microseconds: 999999999999 }", "max_queue_delay"),
        ("dynamic_batching { default_queue_policy { max_queue_size: 2000000000 } }",
         "max_queue_size"),
        ("dynamic_batching { default_queue_policy { default_timeout_microseconds: "
         "18446744073709551615 } }", "default_timeout_microseconds"),
        ('parameters { key: "intra_op_thread_count" value { string_value: "100000" } }',
         "intra_op_thread_count is 100000"),
        ('parameters { key: "inter_op_thread_count" value { string_value: "-1" } }',
         "whole number"),
        ("input [ { name: 'x' data_type: TYPE_FP32 dims: [ 9999999999 ] } ]", "a dim of tensor"),
        ("max_batch_size: 4 model_warmup [ { name: 'w' batch_size: 4 count: 1000000 } ]",
         "count is 1000000"),
    ],
)  # fmt: skip
def test_config_values_out_of_bounds_fail_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ModelLoadError, match=reason):
        cfg.validate_static(_config(text), "m")


def test_sane_config_passes_bounds() -> None:
    cfg.validate_static(
        _config(
            "max_batch_size: 64 instance_group [ { count: 4 } ] dynamic_batching { "
            "preferred_batch_size: [ 8, 16 ] max_queue_delay_microseconds: 500 priority_levels: 3 "
            "default_queue_policy { max_queue_size: 1000 default_timeout_microseconds: 100000 } }"
        ),
        "m",
    )


def test_configured_warmup_has_a_time_budget(tmp_path: Path) -> None:
    from sluice.runtime import RuntimeOptions, load_runtime
    from sluice.runtime.warmup import warm_up

    _identity_model(tmp_path)
    config = _config(
        "max_batch_size: 4 model_warmup [ { name: 'w' batch_size: 1 count: 3 inputs { key: 'x' "
        "value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]"
    )
    runtime, _ = load_runtime(tmp_path / "m" / "1" / "model.onnx", config, "m", RuntimeOptions())
    warm_up(runtime, config, tmp_path / "m")  # within the default budget
    with pytest.raises(ModelLoadError, match="ran past its 0 s budget"):
        warm_up(runtime, config, tmp_path / "m", budget_s=0.0)


def _identity_model(root: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "m" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "m" / "1" / "model.onnx"))
    return root / "m" / "1" / "model.onnx"


_TRT_CACHE = (
    "max_batch_size: 4 parameters { key: 'execution_provider_fallback' value { string_value: "
    "'cpu' } } optimization { execution_accelerators { gpu_execution_accelerator [ { name: "
    "'tensorrt' parameters { key: 'trt_engine_cache_enable' value: 'true' } parameters { key: "
    "'trt_engine_cache_path' value: '%s' } } ] } }"
)


@pytest.mark.parametrize(
    ("cache_path", "reason"),
    [
        ("/tmp/engines", "must be a path relative to the model folder"),
        ("../../outside", "is outside the model folder"),
        ("1/../../..", "is outside the model folder"),
    ],
)
def test_trt_engine_cache_path_stays_in_the_model_folder(
    tmp_path: Path, cache_path: str, reason: str
) -> None:
    from sluice.runtime import RuntimeOptions, load_runtime

    path = _identity_model(tmp_path)
    config = _config(_TRT_CACHE % cache_path)
    with pytest.raises(ModelLoadError, match=f"tensorrt option trt_engine_cache_path.*{reason}"):
        load_runtime(path, config, "m", RuntimeOptions(), model_dir=tmp_path / "m")


def test_trt_engine_cache_path_inside_resolves_under_the_model_folder(tmp_path: Path) -> None:
    from sluice.runtime import RuntimeOptions, load_runtime, session

    path = _identity_model(tmp_path)
    config = _config(_TRT_CACHE % "engines")
    wanted = dict(session._providers(config, tmp_path / "m"))
    assert wanted[session.TENSORRT]["trt_engine_cache_path"] == str(
        (tmp_path / "m").resolve() / "engines"
    )
    # Loads (on the CPU where TensorRT is absent: the config allows the fallback).
    runtime, _ = load_runtime(path, config, "m", RuntimeOptions(), model_dir=tmp_path / "m")
    assert runtime.providers[-1] == session.CPU
