"""Wire-compatibility check of sluice's protos against Triton's.

Our .proto files are compiled to a FileDescriptorSet with grpc_tools.protoc and
compared, descriptor by descriptor, with the descriptors shipped in
tritonclient. Our generated modules are deliberately NOT imported: they share
the ``inference`` package with tritonclient's and would clash in the default
descriptor pool.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("grpc_tools.protoc")
triton_service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
triton_model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
OUR_MODEL_CONFIG = "sluice/proto/model_config.proto"
OUR_SERVICE = "sluice/proto/grpc_service.proto"
SERVICE_NAME = "GRPCInferenceService"

FieldProto = descriptor_pb2.FieldDescriptorProto
MessageProto = descriptor_pb2.DescriptorProto
EnumProto = descriptor_pb2.EnumDescriptorProto
FileProto = descriptor_pb2.FileDescriptorProto

# Messages whose every Triton field (nested types included) must exist in ours.
CORE_MESSAGES: tuple[str, ...] = (
    "ModelInferRequest",
    "ModelInferResponse",
    "InferParameter",
    "InferTensorContents",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelStreamInferResponse",
    "ModelConfigRequest",
    "ModelConfigResponse",
    "ModelStatisticsRequest",
    "ModelStatisticsResponse",
    "ModelStatistics",
    "StatisticDuration",
    "InferStatistics",
    "InferResponseStatistics",
    "InferBatchStatistics",
    "MemoryUsage",
    "RepositoryIndexRequest",
    "RepositoryIndexResponse",
    "RepositoryModelLoadRequest",
    "RepositoryModelLoadResponse",
    "RepositoryModelUnloadRequest",
    "RepositoryModelUnloadResponse",
    "ModelRepositoryParameter",
)

# Model-config fields sluice relies on; model_config.proto may be a subset of
# Triton's, but never smaller than this.
REQUIRED_MODEL_CONFIG_FIELDS: Mapping[str, tuple[str, ...]] = {
    "ModelInstanceGroup": ("name", "kind", "count", "gpus"),
    "ModelTensorReshape": ("shape",),
    "ModelInput": (
        "name",
        "data_type",
        "format",
        "dims",
        "reshape",
        "is_shape_tensor",
        "allow_ragged_batch",
        "optional",
    ),
    "ModelOutput": (
        "name",
        "data_type",
        "dims",
        "reshape",
        "label_filename",
        "is_shape_tensor",
    ),
    "ModelVersionPolicy": ("latest", "all", "specific"),
    "ModelVersionPolicy.Latest": ("num_versions",),
    "ModelVersionPolicy.Specific": ("versions",),
    "ModelOptimizationPolicy": (
        "graph",
        "priority",
        "cuda",
        "execution_accelerators",
        "input_pinned_memory",
        "output_pinned_memory",
        "gather_kernel_buffer_threshold",
        "eager_batching",
    ),
    "ModelOptimizationPolicy.Graph": ("level",),
    "ModelOptimizationPolicy.Cuda": (
        "graphs",
        "busy_wait_events",
        "output_copy_stream",
    ),
    "ModelOptimizationPolicy.ExecutionAccelerators": (
        "gpu_execution_accelerator",
        "cpu_execution_accelerator",
    ),
    "ModelOptimizationPolicy.ExecutionAccelerators.Accelerator": (
        "name",
        "parameters",
    ),
    "ModelOptimizationPolicy.PinnedMemoryBuffer": ("enable",),
    "ModelQueuePolicy": (
        "timeout_action",
        "default_timeout_microseconds",
        "allow_timeout_override",
        "max_queue_size",
    ),
    "ModelDynamicBatching": (
        "preferred_batch_size",
        "max_queue_delay_microseconds",
        "preserve_ordering",
        "priority_levels",
        "default_priority_level",
        "default_queue_policy",
        "priority_queue_policy",
    ),
    "ModelParameter": ("string_value",),
    "ModelWarmup": ("name", "batch_size", "inputs", "count"),
    "ModelWarmup.Input": (
        "data_type",
        "dims",
        "zero_data",
        "random_data",
        "input_data_file",
    ),
    "ModelTransactionPolicy": ("decoupled",),
    "ModelResponseCache": ("enable",),
    "ModelConfig": (
        "name",
        "platform",
        "backend",
        "runtime",
        "version_policy",
        "max_batch_size",
        "input",
        "output",
        "optimization",
        "dynamic_batching",
        "sequence_batching",
        "ensemble_scheduling",
        "instance_group",
        "default_model_filename",
        "cc_model_filenames",
        "metric_tags",
        "parameters",
        "model_warmup",
        "model_operations",
        "model_transaction_policy",
        "model_repository_agents",
        "response_cache",
    ),
}

# Oneofs that must exist in ours, as (message, oneof name).
REQUIRED_ONEOFS: tuple[tuple[str, str], ...] = (
    ("ModelConfig", "scheduling_choice"),
    ("ModelVersionPolicy", "policy_choice"),
    ("ModelWarmup.Input", "input_data_type"),
    ("InferParameter", "parameter_choice"),
    ("ModelRepositoryParameter", "parameter_choice"),
)


@dataclass(frozen=True)
class ProtoIndex:
    """Messages and enums of a set of files, keyed by name relative to the package."""

    package: str
    messages: Mapping[str, MessageProto]
    enums: Mapping[str, EnumProto]
    # Name of the file each message came from.
    message_files: Mapping[str, str]
    services: Mapping[str, descriptor_pb2.ServiceDescriptorProto]


def _walk_messages(
    prefix: str, messages: Iterable[MessageProto]
) -> Iterator[tuple[str, MessageProto]]:
    for message in messages:
        name = f"{prefix}{message.name}"
        yield name, message
        yield from _walk_messages(f"{name}.", message.nested_type)


def _walk_enums(file: FileProto) -> Iterator[tuple[str, EnumProto]]:
    for enum in file.enum_type:
        yield enum.name, enum
    for name, message in _walk_messages("", file.message_type):
        for enum in message.enum_type:
            yield f"{name}.{enum.name}", enum


def _index(files: list[FileProto]) -> ProtoIndex:
    packages = {f.package for f in files}
    assert len(packages) == 1, f"expected one proto package, got {sorted(packages)}"
    messages: dict[str, MessageProto] = {}
    message_files: dict[str, str] = {}
    enums: dict[str, EnumProto] = {}
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
    for file in files:
        for name, message in _walk_messages("", file.message_type):
            assert name not in messages, f"message {name} defined twice"
            messages[name] = message
            message_files[name] = file.name
        for name, enum in _walk_enums(file):
            assert name not in enums, f"enum {name} defined twice"
            enums[name] = enum
        for service in file.service:
            services[service.name] = service
    return ProtoIndex(packages.pop(), messages, enums, message_files, services)


def _triton_file(module: ModuleType) -> FileProto:
    proto = FileProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> ProtoIndex:
    out = tmp_path_factory.mktemp("protos") / "sluice.pb"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--descriptor_set_out={out}",
            "--include_imports",
            OUR_MODEL_CONFIG,
            OUR_SERVICE,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"
    assert result.stderr.strip() == "", f"protoc warnings:\n{result.stderr}"
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    descriptor_set.ParseFromString(out.read_bytes())
    files = {f.name: f for f in descriptor_set.file}
    assert set(files) == {OUR_MODEL_CONFIG, OUR_SERVICE}, sorted(files)
    assert files[OUR_MODEL_CONFIG].syntax == "proto3"
    assert files[OUR_SERVICE].syntax == "proto3"
    assert list(files[OUR_SERVICE].dependency) == [OUR_MODEL_CONFIG]
    return _index([files[OUR_MODEL_CONFIG], files[OUR_SERVICE]])


@pytest.fixture(scope="module")
def triton() -> ProtoIndex:
    return _index(
        [
            _triton_file(triton_model_config_pb2),
            _triton_file(triton_service_pb2),
        ]
    )


def _type_name(field: FieldProto) -> str:
    return FieldProto.Type.Name(field.type)


def _label_name(field: FieldProto) -> str:
    return FieldProto.Label.Name(field.label)


def _oneof_name(message: MessageProto, field: FieldProto) -> str | None:
    if not field.HasField("oneof_index"):
        return None
    return message.oneof_decl[field.oneof_index].name


def _field_mismatches(
    msg_name: str,
    ours_msg: MessageProto,
    theirs_msg: MessageProto,
) -> list[str]:
    theirs_fields = {f.name: f for f in theirs_msg.field}
    problems: list[str] = []
    for field in ours_msg.field:
        where = f"{msg_name}.{field.name}"
        other = theirs_fields.get(field.name)
        if other is None:
            problems.append(f"{where}: field does not exist in Triton's {msg_name}")
            continue
        checks: list[tuple[str, object, object]] = [
            ("number", field.number, other.number),
            ("type", _type_name(field), _type_name(other)),
            ("label", _label_name(field), _label_name(other)),
            ("type_name", field.type_name, other.type_name),
            ("oneof", _oneof_name(ours_msg, field), _oneof_name(theirs_msg, other)),
            ("proto3_optional", field.proto3_optional, other.proto3_optional),
        ]
        for what, mine, want in checks:
            if mine != want:
                problems.append(f"{where}: {what} is {mine!r}, Triton has {want!r}")
    return problems


def test_package_matches(ours: ProtoIndex, triton: ProtoIndex) -> None:
    assert ours.package == triton.package == "inference"


def test_messages_and_fields_match_triton(ours: ProtoIndex, triton: ProtoIndex) -> None:
    problems: list[str] = []
    for name, message in ours.messages.items():
        other = triton.messages.get(name)
        if other is None:
            problems.append(f"message {name}: does not exist in Triton's protocol")
            continue
        if message.options.map_entry != other.options.map_entry:
            problems.append(f"message {name}: map_entry differs from Triton's")
        problems.extend(_field_mismatches(name, message, other))
    assert not problems, "wire mismatches:\n  " + "\n  ".join(problems)


def test_enums_match_triton(ours: ProtoIndex, triton: ProtoIndex) -> None:
    problems: list[str] = []
    for name, enum in ours.enums.items():
        other = triton.enums.get(name)
        if other is None:
            problems.append(f"enum {name}: does not exist in Triton's protocol")
            continue
        mine = {v.name: v.number for v in enum.value}
        want = {v.name: v.number for v in other.value}
        for value, number in mine.items():
            if value not in want:
                problems.append(f"enum {name}.{value}: not in Triton's enum")
            elif want[value] != number:
                problems.append(
                    f"enum {name}.{value}: number is {number}, Triton has {want[value]}"
                )
        for value in want.keys() - mine.keys():
            problems.append(f"enum {name}.{value}: Triton value missing from ours")
    assert not problems, "enum mismatches:\n  " + "\n  ".join(problems)


def test_service_matches_triton(ours: ProtoIndex, triton: ProtoIndex) -> None:
    assert SERVICE_NAME in ours.services, f"service {SERVICE_NAME} missing"
    mine = {m.name: m for m in ours.services[SERVICE_NAME].method}
    want = {m.name: m for m in triton.services[SERVICE_NAME].method}
    problems: list[str] = []
    for name in sorted(want.keys() - mine.keys()):
        problems.append(f"rpc {name}: Triton RPC missing from ours")
    for name, method in mine.items():
        other = want.get(name)
        if other is None:
            problems.append(f"rpc {name}: not an RPC of Triton's service")
            continue
        for what in ("input_type", "output_type", "client_streaming", "server_streaming"):
            a, b = getattr(method, what), getattr(other, what)
            if a != b:
                problems.append(f"rpc {name}: {what} is {a!r}, Triton has {b!r}")
    assert not problems, "service mismatches:\n  " + "\n  ".join(problems)


def _missing_fields(name: str, ours: ProtoIndex, triton: ProtoIndex) -> list[str]:
    """Triton fields of `name` and its nested messages that ours lacks."""
    problems: list[str] = []
    for full_name, message in triton.messages.items():
        if full_name != name and not full_name.startswith(f"{name}."):
            continue
        mine = ours.messages.get(full_name)
        if mine is None:
            problems.append(f"message {full_name}: missing from ours")
            continue
        have = {f.name for f in mine.field}
        problems.extend(
            f"{full_name}.{f.name}: Triton field (number {f.number}) missing from ours"
            for f in message.field
            if f.name not in have
        )
    return problems


@pytest.mark.parametrize("name", CORE_MESSAGES)
def test_core_message_is_complete(name: str, ours: ProtoIndex, triton: ProtoIndex) -> None:
    assert name in triton.messages, f"{name} is not a Triton message (test list is stale)"
    problems = _missing_fields(name, ours, triton)
    assert not problems, "\n  ".join(["incomplete core message:", *problems])


def test_service_file_is_complete(ours: ProtoIndex, triton: ProtoIndex) -> None:
    """Every message of Triton's grpc_service.proto exists in ours, all fields."""
    problems: list[str] = []
    for name, file_name in triton.message_files.items():
        if file_name == "grpc_service.proto" and "." not in name:
            problems.extend(_missing_fields(name, ours, triton))
    assert not problems, "\n  ".join(["incomplete grpc_service.proto:", *problems])


def test_required_model_config_fields(ours: ProtoIndex) -> None:
    problems: list[str] = []
    for name, fields in REQUIRED_MODEL_CONFIG_FIELDS.items():
        message = ours.messages.get(name)
        if message is None:
            problems.append(f"message {name}: missing from ours")
            continue
        have = {f.name for f in message.field}
        problems.extend(f"{name}.{f}: required field missing" for f in fields if f not in have)
    for name, oneof in REQUIRED_ONEOFS:
        message = ours.messages.get(name)
        if message is None or oneof not in {o.name for o in message.oneof_decl}:
            problems.append(f"{name}: oneof {oneof} missing")
    assert not problems, "\n  ".join(["model_config.proto too small:", *problems])
