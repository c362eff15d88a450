"""Publishing: `publish` (`sluice models publish`) adds version N+1 (N = the highest
version folder, 0 if none) atomically. The file must load in onnxruntime. It is
copied, together with its metadata.json, into a hidden staging folder; the files
and the folder are fsynced, the folder is renamed to its version number, and the
parent folder is fsynced. A polling server therefore sees either no new version
or a complete one, never a half-written file. An existing model is staged in
`<model>/.staging-*`. A new model is staged as a whole model folder,
`<repo>/.staging-*/1/`, so the model appears together with its first version.
The server ignores dot-names, both as models and as versions.

The metadata written with the version is described in registry.metadata.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice import __version__
from sluice import config as cfg
from sluice.errors import ModelLoadError
from sluice.proto import model_config_pb2 as mc
from sluice.repository import layout
from sluice.repository.policy import version_dirs
from sluice.repository.registry import files, folders
from sluice.repository.registry.errors import RegistryError, UsageError
from sluice.repository.registry.metadata import signature_json
from sluice.runtime.probe import probe_signature

if TYPE_CHECKING:  # onnx costs ~170 ms and ~30 MB to import; only publish needs it
    import onnx

STAGING_PREFIX = ".staging-"


@dataclasses.dataclass(frozen=True)
class Published:
    version: int
    path: Path
    metadata: dict[str, Any]
    warnings: tuple[str, ...]


def publish(
    repository: Path,
    model: str,
    model_path: Path,
    *,
    source: str | None = None,
    params: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Published:
    """Adds the model's next version from `model_path` (see the module docstring
    for the guarantees). Raises RegistryError, and leaves no version, when the
    file does not load in onnxruntime."""
    folders.check_model_name(model)
    _check_string_map(params or {}, "params")
    _check_string_map(tags or {}, "tags")
    _check_metrics(metrics or {})
    folders.require_dir(repository, "model repository")
    if not model_path.is_file():
        raise RegistryError(f"{model_path} is not a file")
    signature = _loadable_signature(model_path)
    model_dir = repository / model
    config, warnings = _config_warnings(model_dir, model, signature)
    lineage = {
        "source": source if source is not None else model_path.name,
        "params": dict(params or {}),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "tags": dict(tags or {}),
        "signature": signature_json(signature),
    }
    filename = config.default_model_filename or cfg.DEFAULT_MODEL_FILENAME
    if model_dir.exists():
        folders.require_dir(model_dir, f"model '{model}'")
        version, metadata = _publish_version(model_dir, model_path, filename, lineage)
    else:
        version, metadata = _publish_model(model_dir, model_path, filename, lineage)
    return Published(version, model_dir / str(version), metadata, tuple(warnings))


def _publish_version(
    model_dir: Path, model_path: Path, filename: str, lineage: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    staging = _new_staging_dir(model_dir)
    try:
        sha256 = files.copy_durably(model_path, staging / filename)
        # Locked from numbering to rename so two publishers never pick the same number.
        with files.locked(model_dir):
            versions = version_dirs(model_dir)
            version = versions[-1] + 1 if versions else 1
            parent = versions[-1] if versions else None
            metadata = _write_metadata(staging, version, parent, sha256, lineage)
            _rename_into_place(staging, model_dir / str(version))
            files.fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return version, metadata


def _publish_model(
    model_dir: Path, model_path: Path, filename: str, lineage: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    # A new model: stage the whole model folder, so that a polling server never
    # sees the model without a version (it would report it unavailable).
    repository = model_dir.parent
    staging = _new_staging_dir(repository)
    try:
        version_dir = staging / "1"
        version_dir.mkdir()
        sha256 = files.copy_durably(model_path, version_dir / filename)
        metadata = _write_metadata(version_dir, 1, None, sha256, lineage)
        files.fsync_dir(staging)
        _rename_into_place(staging, model_dir)
        files.fsync_dir(repository)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return 1, metadata


def _write_metadata(
    version_dir: Path, version: int, parent: int | None, sha256: str, lineage: dict[str, Any]
) -> dict[str, Any]:
    metadata = {
        "version": version,
        "sha256": sha256,
        "created": files.now(),
        "source": lineage["source"],
        "parent": parent,
        "params": lineage["params"],
        "metrics": lineage["metrics"],
        "tags": lineage["tags"],
        "signature": lineage["signature"],
        "sluice_version": __version__,
    }
    text = json.dumps(metadata, indent=2, allow_nan=False) + "\n"
    files.write_durably(version_dir / layout.METADATA_FILENAME, text.encode("utf-8"))
    files.fsync_dir(version_dir)  # the entries of the model file and metadata.json
    return metadata


def _loadable_signature(model_path: Path) -> cfg.Signature:
    """The file's signature, if the served copy will load: onnxruntime loads it,
    and it keeps no weights in external files (publish copies one file)."""
    try:
        signature = probe_signature(model_path)
    except ModelLoadError as exc:
        raise RegistryError(f"refusing to publish: {exc.message}") from None
    external = _external_data_files(model_path)
    if external:
        raise RegistryError(
            f"refusing to publish {model_path}: its weights are in external data file(s) "
            f"{', '.join(sorted(external))}, and publish copies one file; re-save it without "
            "external data (onnx.save_model(..., save_as_external_data=False)) if it is under 2 GiB"
        )
    return signature


def _external_data_files(model_path: Path) -> set[str]:
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_model(str(model_path), load_external_data=False)
    except Exception:  # e.g. an ORT-format file: onnxruntime loads it, onnx cannot parse it
        return set()
    return {
        entry.value
        for tensor in _all_tensors(model)
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


def _config_warnings(
    model_dir: Path, model: str, signature: cfg.Signature
) -> tuple[mc.ModelConfig, list[str]]:
    """The model's config (empty if none) and what in it contradicts the new
    graph. Only a warning: fixing the config may be the publisher's next step."""
    if not model_dir.is_dir():
        return mc.ModelConfig(), []
    try:
        config, path = cfg.read_config_file(model_dir)
    except ModelLoadError as exc:
        return mc.ModelConfig(), [f"cannot check the new version against the config: {exc}"]
    if path is None:
        return config, []
    trial = mc.ModelConfig()
    trial.CopyFrom(config)  # complete_and_check fills in what it infers
    try:
        cfg.complete_and_check(trial, signature, model)
    except ModelLoadError as exc:
        return config, [
            f"{path.name} contradicts the new graph, so the server will not load this "
            f"version until the config is fixed: {exc.message}"
        ]
    return config, []


def _check_string_map(values: Mapping[str, str], what: str) -> None:
    for key, value in values.items():
        if not key or not isinstance(value, str):
            raise UsageError(f"{what}: want non-empty string keys and string values")


def _check_metrics(metrics: Mapping[str, float]) -> None:
    for key, value in metrics.items():
        if not key or not math.isfinite(value):
            raise UsageError(f"metric {key!r}: want a finite number, not {value}")


def _new_staging_dir(parent: Path) -> Path:
    # Not tempfile.mkdtemp: its 0700 mode would become the version folder's mode.
    while True:
        path = parent / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def _rename_into_place(staging: Path, target: Path) -> None:
    # rename() would silently replace an empty folder; only sluice's lock guards
    # the number, so check for a folder made meanwhile by anything else.
    if target.exists():
        raise RegistryError(f"{target} appeared while publishing; nothing was published")
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise RegistryError(
                f"{target} appeared while publishing; nothing was published"
            ) from None
        raise
