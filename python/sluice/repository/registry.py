"""Model registry: versions published with their lineage, and labels that route
traffic between versions. Both live inside an ordinary Triton-style repository,
so a plain Triton repository is a registry without metadata or labels, and
Triton ignores the extra files.

Publishing (`publish`, `sluice models publish`) adds version N+1 (N = the highest
version folder, 0 if none) atomically. The file must load in onnxruntime. It is
copied, together with its metadata.json, into a hidden staging folder; the files
and the folder are fsynced, the folder is renamed to its version number, and the
parent folder is fsynced. A polling server therefore sees either no new version
or a complete one, never a half-written file. An existing model is staged in
`<model>/.staging-*`. A new model is staged as a whole model folder,
`<repo>/.staging-*/1/`, so the model appears together with its first version.
The server ignores dot-names, both as models and as versions.

`<model>/<version>/metadata.json`, written once by publish::

    {
      "version": 2,
      "sha256": "<hex digest of the model file>",
      "created": "2026-11-26T21:20:31+00:00",   (UTC, ISO 8601)
      "source": "train.py run 42",              (--source; default: the file's name)
      "parent": 1,                              (the latest version before; null if none)
      "params": {"lr": "0.01"},                 (string values)
      "metrics": {"accuracy": 0.93},            (number values)
      "tags": {"team": "risk"},                 (string values)
      "signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                    "outputs": [...]},          (KServe datatypes; -1 = dynamic dim)
      "sluice_version": "0.1.0"
    }

A non-tensor output (ZipMap's sequence of maps, for example) has onnxruntime's
type string as its datatype and shape [].

`<model>/labels.json` is read by the server on every repository scan. It is
always written atomically (temp file, fsync, rename)::

    {
      "stable": 3,
      "canary": {"version": 4, "weight": 0.1, "sticky": false},
      "shadow": {"version": 5, "sample": 0.2},
      "history": [{"label": "stable", "version": 2, "at": "...", "action": "promote"}]
    }

Every key is optional. A missing file means no labels. `stable` is the version
that unversioned requests go to. `canary` is a version that gets `weight`
(in [0, 1]) of those requests; with `sticky`, a request id always lands on the
same arm. `shadow` is a version that gets a copy of `sample` (in [0, 1]) of
them, and its answers are discarded. Versions are positive integers. Unknown
keys are errors, so a typo never changes routing silently.

`history` is the audit trail, oldest first. Each entry records a version
*leaving* a label: `label`, `version`, `at` (UTC, ISO 8601), the `action` that
moved it ("promote", "rollback", or the server's "auto-rollback"), and an
optional `detail` string. `rollback` uses it to find the target: the stable
version displaced by the latest promote that has not been rolled back yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from sluice import __version__, datatypes
from sluice import config as cfg
from sluice.errors import ModelLoadError, SluiceError
from sluice.proto import model_config_pb2 as mc
from sluice.repository import layout
from sluice.repository.policy import version_dirs
from sluice.runtime.probe import probe_signature

if TYPE_CHECKING:  # onnx costs ~170 ms and ~30 MB to import; only publish needs it
    import onnx

if sys.platform != "win32":
    import fcntl

METADATA_FILENAME = "metadata.json"
LABELS_FILENAME = "labels.json"
STAGING_PREFIX = ".staging-"
STABLE, CANARY, SHADOW = "stable", "canary", "shadow"
LABEL_NAMES = (STABLE, CANARY, SHADOW)
PROMOTE, ROLLBACK = "promote", "rollback"
_CHUNK = 1 << 20


class RegistryError(SluiceError):
    """An operation that cannot be done (missing model or version, a file that
    does not load, an I/O failure). The CLI exits 1."""


class UsageError(RegistryError):
    """A malformed request (bad model name, weight outside [0, 1]). The CLI exits 2."""


class LabelsError(RegistryError, ValueError):
    """A malformed labels.json, or labels that would be malformed. It is also a
    ValueError because the server's scan treats every bad repository value the same way."""


# ---- labels ------------------------------------------------------------------


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _check_version(value: object, where: str) -> None:
    if not _is_int(value) or value < 1:
        raise LabelsError(f"{where} must be a positive integer version, not {value!r}")


def _check_fraction(value: object, where: str) -> None:
    # NaN fails the range test too; JSON true is not a number here.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise LabelsError(f"{where} must be a number in [0, 1], not {value!r}")


def _check_str(value: object, where: str) -> None:
    if not isinstance(value, str) or not value:
        raise LabelsError(f"{where} must be a non-empty string, not {value!r}")


@dataclasses.dataclass(frozen=True)
class Canary:
    version: int
    weight: float
    sticky: bool = False

    def __post_init__(self) -> None:
        _check_version(self.version, "canary.version")
        _check_fraction(self.weight, "canary.weight")


@dataclasses.dataclass(frozen=True)
class Shadow:
    version: int
    sample: float

    def __post_init__(self) -> None:
        _check_version(self.version, "shadow.version")
        _check_fraction(self.sample, "shadow.sample")


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    """A version leaving a label."""

    label: str
    version: int
    at: str
    action: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.label not in LABEL_NAMES:
            raise LabelsError(f"history label must be one of {LABEL_NAMES}, not {self.label!r}")
        _check_version(self.version, "history version")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label,
            "version": self.version,
            "at": self.at,
            "action": self.action,
        }
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclasses.dataclass(frozen=True)
class Labels:
    """The parsed labels.json. Constructing one validates it."""

    stable: int | None = None
    canary: Canary | None = None
    shadow: Shadow | None = None
    history: tuple[HistoryEntry, ...] = ()

    def __post_init__(self) -> None:
        if self.stable is not None:
            _check_version(self.stable, "stable")

    def versions(self) -> set[int]:
        """The versions that carry a label (the server keeps them loaded)."""
        found = {self.stable} if self.stable is not None else set()
        found |= {x.version for x in (self.canary, self.shadow) if x is not None}
        return found

    def labels_of(self, version: int) -> list[str]:
        names = [STABLE] if self.stable == version else []
        if self.canary is not None and self.canary.version == version:
            names.append(CANARY)
        if self.shadow is not None and self.shadow.version == version:
            names.append(SHADOW)
        return names

    def record(self, label: str, version: int, action: str, detail: str = "") -> Labels:
        """A copy with one more history entry, stamped now."""
        entry = HistoryEntry(label, version, _now(), action, detail)
        return dataclasses.replace(self, history=(*self.history, entry))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.stable is not None:
            out[STABLE] = self.stable
        if self.canary is not None:
            out[CANARY] = dataclasses.asdict(self.canary)
        if self.shadow is not None:
            out[SHADOW] = dataclasses.asdict(self.shadow)
        out["history"] = [e.to_json() for e in self.history]
        return out

    @classmethod
    def from_json(cls, data: object) -> Labels:
        """Parses labels.json's content. Raises LabelsError naming the bad key."""
        fields = _object(data, "labels.json", required=(), optional=(*LABEL_NAMES, "history"))
        history = fields.get("history", [])
        if not isinstance(history, list):
            raise LabelsError(f"history must be a list, not {history!r}")
        return cls(
            stable=fields.get(STABLE),
            canary=None if fields.get(CANARY) is None else _canary(fields[CANARY]),
            shadow=None if fields.get(SHADOW) is None else _shadow(fields[SHADOW]),
            history=tuple(_entry(e, f"history[{i}]") for i, e in enumerate(history)),
        )


def _object(
    data: object, where: str, *, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise LabelsError(f"{where} must be a JSON object, not {data!r}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join((*required, *optional))
        raise LabelsError(f"{where} has unknown key(s) {unknown} (allowed: {allowed})")
    missing = [k for k in required if k not in data]
    if missing:
        raise LabelsError(f"{where} lacks {missing}")
    return data


def _canary(data: object) -> Canary:
    f = _object(data, CANARY, required=("version", "weight"), optional=("sticky",))
    sticky = f.get("sticky", False)
    if not isinstance(sticky, bool):
        raise LabelsError(f"canary.sticky must be true or false, not {sticky!r}")
    return Canary(f["version"], f["weight"], sticky)


def _shadow(data: object) -> Shadow:
    f = _object(data, SHADOW, required=("version", "sample"), optional=())
    return Shadow(f["version"], f["sample"])


def _entry(data: object, where: str) -> HistoryEntry:
    f = _object(data, where, required=("label", "version", "at", "action"), optional=("detail",))
    _check_str(f["at"], f"{where}.at")
    _check_str(f["action"], f"{where}.action")
    detail = f.get("detail", "")
    if not isinstance(detail, str):
        raise LabelsError(f"{where}.detail must be a string, not {detail!r}")
    try:
        return HistoryEntry(f["label"], f["version"], f["at"], f["action"], detail)
    except LabelsError as exc:
        raise LabelsError(f"{where}: {exc.message}") from None


def read_labels(model_dir: Path) -> Labels:
    """The model's labels; no labels.json means none. Raises LabelsError (a
    ValueError) that names the file when it is malformed."""
    path = model_dir / LABELS_FILENAME
    try:
        inside = layout.inside(model_dir, LABELS_FILENAME, "file")
        text = layout.read_text_file(inside, f"{model_dir.name}/{LABELS_FILENAME}")
    except FileNotFoundError:
        return Labels()
    except (ModelLoadError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{path}: {_reason(exc)}") from None
    try:
        return Labels.from_json(json.loads(text))
    except ValueError as exc:  # LabelsError, or JSON syntax
        raise LabelsError(f"{path}: {exc}") from None


def write_labels(
    model_dir: Path,
    labels: Labels,
    *,
    action: str | None = None,
    version: int | None = None,
    label: str = CANARY,
    detail: str = "",
) -> Labels:
    """Writes labels.json atomically and returns what was written. With `action`,
    first records `version` leaving `label` in the history. The label defaults to
    canary because the server changes only the canary on its own (auto-rollback).

    This replaces the file with `labels` as given. To change what is on disk now,
    without losing a concurrent edit, use `update_labels`."""
    if action is not None:
        if version is None:
            raise TypeError("write_labels: an action needs the version that left the label")
        labels = labels.record(label, version, action, detail)
    with _locked(model_dir):
        _write_labels_file(model_dir, labels)
    return labels


def update_labels(model_dir: Path, change: Callable[[Labels], Labels]) -> Labels:
    """Read, change, write under the model folder's lock, so concurrent sluice
    writers (two CLIs, or a CLI and the server) never lose each other's edits."""
    with _locked(model_dir):
        current = read_labels(model_dir)
        updated = change(current)
        if updated != current:
            _write_labels_file(model_dir, updated)
        return updated


def _write_labels_file(model_dir: Path, labels: Labels) -> None:
    text = json.dumps(labels.to_json(), indent=2, allow_nan=False) + "\n"
    _replace_atomically(model_dir / LABELS_FILENAME, text.encode("utf-8"))


# ---- label transitions (pure) ------------------------------------------------


def promoted(
    labels: Labels,
    label: str,
    version: int,
    *,
    weight: float | None = None,
    sticky: bool = False,
    sample: float | None = None,
) -> Labels:
    """`labels` with `version` given `label`. Stable: the old stable goes into
    the history, and a canary on `version` is removed (it graduated). Canary and
    shadow: the one they replace, if any, goes into the history."""
    _check_promote_args(version, label, weight, sticky, sample)
    if label == STABLE:
        return _promoted_stable(labels, version)
    if version == labels.stable:
        raise RegistryError(
            f"version {version} is the stable version; a {label} must be another version"
        )
    if label == CANARY:
        assert weight is not None  # checked above
        after = dataclasses.replace(labels, canary=Canary(version, weight, sticky))
        return _displaced(after, CANARY, labels.canary, version, PROMOTE)
    assert sample is not None
    after = dataclasses.replace(labels, shadow=Shadow(version, sample))
    return _displaced(after, SHADOW, labels.shadow, version, PROMOTE)


def _displaced(
    labels: Labels, label: str, old: Canary | Shadow | None, new_version: int, action: str
) -> Labels:
    if old is None or old.version == new_version:
        return labels  # nothing left the label (a weight or sample change)
    return labels.record(label, old.version, action)


def _promoted_stable(labels: Labels, version: int) -> Labels:
    after = labels
    if labels.stable != version:
        after = dataclasses.replace(after, stable=version)
        if labels.stable is not None:
            after = after.record(STABLE, labels.stable, PROMOTE)
    if labels.canary is not None and labels.canary.version == version:
        after = dataclasses.replace(after, canary=None)
        after = after.record(CANARY, version, PROMOTE, "promoted to stable")
    return after


def rollback_target(labels: Labels) -> int | None:
    """The stable version before the latest promote not yet rolled back: each
    rollback entry cancels one earlier promote, so rollbacks walk further back."""
    pending_rollbacks = 0
    for entry in reversed(labels.history):
        if entry.label != STABLE:
            continue
        if entry.action == ROLLBACK:
            pending_rollbacks += 1
        elif entry.action == PROMOTE:
            if pending_rollbacks == 0:
                return entry.version
            pending_rollbacks -= 1
    return None


def rolled_back(labels: Labels) -> Labels:
    """`labels` with stable set back to `rollback_target` and the canary cleared.
    Raises RegistryError when there is nothing to roll back to."""
    target = rollback_target(labels)
    if target is None:
        raise RegistryError("no earlier stable version in the history to roll back to")
    after = dataclasses.replace(labels, stable=target, canary=None)
    if labels.stable is not None:
        after = after.record(STABLE, labels.stable, ROLLBACK)
    if labels.canary is not None:
        after = after.record(CANARY, labels.canary.version, ROLLBACK)
    return after


def promote(
    repository: Path,
    model: str,
    version: int,
    *,
    label: str = STABLE,
    weight: float | None = None,
    sticky: bool = False,
    sample: float | None = None,
) -> Labels:
    """Gives an existing version a label in labels.json; returns the new labels."""
    _check_promote_args(version, label, weight, sticky, sample)
    model_dir = _model_dir(repository, model)
    _require_version(model_dir, model, version)
    _check_servable(model_dir, model, version, label)
    return update_labels(
        model_dir,
        lambda labels: promoted(
            labels, label, version, weight=weight, sticky=sticky, sample=sample
        ),
    )


def rollback(repository: Path, model: str) -> tuple[Labels, Labels]:
    """Sets stable back to the previous stable version and clears the canary.
    Returns the labels before and after."""
    model_dir = _model_dir(repository, model)
    before: list[Labels] = []

    def change(labels: Labels) -> Labels:
        before.append(labels)
        after = rolled_back(labels)
        assert after.stable is not None
        _require_version(model_dir, model, after.stable)
        return after

    after = update_labels(model_dir, change)
    return before[0], after


def _check_servable(model_dir: Path, model: str, version: int, label: str) -> None:
    """Refuses to route traffic to a version the server would not load: its file
    must load in onnxruntime and agree with the model's config, as at serve time."""
    try:
        config, _ = cfg.read_config_file(model_dir)
        cfg.validate_static(config, model)
        signature = probe_signature(cfg.model_file(model_dir, version, config))
        cfg.complete_and_check(config, signature, model)
    except ModelLoadError as exc:
        raise RegistryError(
            f"refusing to label version {version} {label}: the server would not load it: "
            f"{exc.message}"
        ) from None


def _check_promote_args(
    version: int, label: str, weight: float | None, sticky: bool, sample: float | None
) -> None:
    if version < 1:
        raise UsageError(f"versions are positive integers, not {version}")
    if label not in LABEL_NAMES:
        raise UsageError(f"label must be one of {', '.join(LABEL_NAMES)}, not {label!r}")
    needs = {
        STABLE: "takes no --weight, --sticky or --sample",
        CANARY: "needs --weight (and may be --sticky), no --sample",
        SHADOW: "needs --sample, no --weight or --sticky",
    }
    wrong = {
        STABLE: weight is not None or sample is not None or sticky,
        CANARY: weight is None or sample is not None,
        SHADOW: sample is None or weight is not None or sticky,
    }
    if wrong[label]:
        raise UsageError(f"--label {label} {needs[label]}")
    for name, value in (("weight", weight), ("sample", sample)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UsageError(f"--{name} must be in [0, 1], not {value}")


# ---- publish -----------------------------------------------------------------


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
    check_model_name(model)
    _check_string_map(params or {}, "params")
    _check_string_map(tags or {}, "tags")
    _check_metrics(metrics or {})
    _require_dir(repository, "model repository")
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
        _require_dir(model_dir, f"model '{model}'")
        version, metadata = _publish_version(model_dir, model_path, filename, lineage)
    else:
        version, metadata = _publish_model(model_dir, model_path, filename, lineage)
    return Published(version, model_dir / str(version), metadata, tuple(warnings))


def _publish_version(
    model_dir: Path, model_path: Path, filename: str, lineage: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    staging = _new_staging_dir(model_dir)
    try:
        sha256 = _copy_durably(model_path, staging / filename)
        # Locked from numbering to rename so two publishers never pick the same number.
        with _locked(model_dir):
            versions = version_dirs(model_dir)
            version = versions[-1] + 1 if versions else 1
            parent = versions[-1] if versions else None
            metadata = _write_metadata(staging, version, parent, sha256, lineage)
            _rename_into_place(staging, model_dir / str(version))
            _fsync_dir(model_dir)
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
        sha256 = _copy_durably(model_path, version_dir / filename)
        metadata = _write_metadata(version_dir, 1, None, sha256, lineage)
        _fsync_dir(staging)
        _rename_into_place(staging, model_dir)
        _fsync_dir(repository)
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
        "created": _now(),
        "source": lineage["source"],
        "parent": parent,
        "params": lineage["params"],
        "metrics": lineage["metrics"],
        "tags": lineage["tags"],
        "signature": lineage["signature"],
        "sluice_version": __version__,
    }
    text = json.dumps(metadata, indent=2, allow_nan=False) + "\n"
    _write_durably(version_dir / METADATA_FILENAME, text.encode("utf-8"))
    _fsync_dir(version_dir)  # the entries of the model file and metadata.json
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


def signature_json(signature: cfg.Signature) -> dict[str, list[dict[str, Any]]]:
    return {
        "inputs": [_tensor_json(t) for t in signature.inputs],
        "outputs": [_tensor_json(t) for t in signature.outputs],
    }


def _tensor_json(spec: cfg.TensorSpec) -> dict[str, Any]:
    dt = datatypes.BY_ONNX.get(spec.onnx_type)
    return {
        "name": spec.name,
        "datatype": dt.wire if dt is not None else spec.onnx_type,
        "shape": list(spec.shape),
    }


def check_model_name(name: str) -> None:
    """A model name is one folder name that the server does not skip (layout's rule)."""
    problem = layout.name_problem(name)
    if problem is not None:
        raise UsageError(f"{name!r} is not a model name: {problem}")


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, SluiceError) else str(exc)


def _check_string_map(values: Mapping[str, str], what: str) -> None:
    for key, value in values.items():
        if not key or not isinstance(value, str):
            raise UsageError(f"{what}: want non-empty string keys and string values")


def _check_metrics(metrics: Mapping[str, float]) -> None:
    for key, value in metrics.items():
        if not key or not math.isfinite(value):
            raise UsageError(f"metric {key!r}: want a finite number, not {value}")


# ---- list, show, diff --------------------------------------------------------


def list_models(repository: Path) -> dict[str, Any]:
    """Every model folder with its versions, their lineage and their labels.
    Problems (unreadable metadata or labels) are reported, not raised."""
    _require_dir(repository, "model repository")
    models = [_model_summary(repository / name) for name in _model_names(repository)]
    return {"repository": str(repository), "models": models}


def _model_names(repository: Path) -> list[str]:
    # The server's rule (repository.aspired.model_names), repeated here because
    # aspired imports this module.
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


def _model_summary(model_dir: Path) -> dict[str, Any]:
    problems: list[str] = []
    labels = _labels_or_problem(model_dir, problems)
    versions = version_dirs(model_dir)
    rows = [_version_summary(model_dir, v, labels, problems) for v in versions]
    for label_version in sorted(labels.versions() - set(versions)):
        names = ", ".join(labels.labels_of(label_version))
        problems.append(f"{names} points at version {label_version}, which has no folder")
    return {
        "name": model_dir.name,
        "labels": labels.to_json(),
        "versions": rows,
        "problems": problems,
    }


def _version_summary(
    model_dir: Path, version: int, labels: Labels, problems: list[str]
) -> dict[str, Any]:
    metadata = _metadata_or_problem(model_dir / str(version), problems) or {}
    return {
        "version": version,
        "sha256": metadata.get("sha256"),
        "created": metadata.get("created"),
        "source": metadata.get("source"),
        "labels": labels.labels_of(version),
    }


def show(repository: Path, model: str, version: int | None = None) -> dict[str, Any]:
    """One version (default: the latest): its metadata, or the signature and
    sha256 computed from the file when it has no metadata.json, and the config."""
    model_dir = _model_dir(repository, model)
    version = _resolve_version(model_dir, model, version)
    problems: list[str] = []
    config, config_path = _config_or_problem(model_dir, problems)
    view = _version_view(model_dir, version, config, problems)
    labels = _labels_or_problem(model_dir, problems)
    return {
        "model": model,
        "version": version,
        "path": str(model_dir / str(version)),
        "labels": labels.labels_of(version),
        **view,
        "config_file": config_path.name if config_path is not None else None,
        "config": cfg.to_text(config) if config_path is not None else None,
        "problems": problems,
    }


def diff(repository: Path, model: str, old: int, new: int) -> dict[str, Any]:
    """What changed from version `old` to `new`: signature and lineage."""
    model_dir = _model_dir(repository, model)
    for v in (old, new):
        _require_version(model_dir, model, v)
    problems: list[str] = []
    config, _ = _config_or_problem(model_dir, problems)
    a = _version_view(model_dir, old, config, problems)
    b = _version_view(model_dir, new, config, problems)
    ma, mb = a["metadata"] or {}, b["metadata"] or {}
    fields = {
        name: {"from": x, "to": y}
        for name, x, y in (
            ("sha256", a["sha256"], b["sha256"]),
            ("source", ma.get("source"), mb.get("source")),
            ("parent", ma.get("parent"), mb.get("parent")),
        )
        if x != y
    }
    return {
        "model": model,
        "from": old,
        "to": new,
        "signature": {
            kind: _tensors_diff(
                (a["signature"] or {}).get(kind, []), (b["signature"] or {}).get(kind, [])
            )
            for kind in ("inputs", "outputs")
        },
        "metadata": {
            "fields": fields,
            "params": _map_diff(ma.get("params") or {}, mb.get("params") or {}),
            "metrics": _metrics_diff(ma.get("metrics") or {}, mb.get("metrics") or {}),
            "tags": _map_diff(ma.get("tags") or {}, mb.get("tags") or {}),
        },
        "problems": problems,
    }


def _version_view(
    model_dir: Path, version: int, config: mc.ModelConfig, problems: list[str]
) -> dict[str, Any]:
    """metadata (or None), sha256 and signature of one version. Without
    metadata.json (a plain Triton repository) both are computed from the file."""
    metadata = _metadata_or_problem(model_dir / str(version), problems)
    path = cfg.model_file(model_dir, version, config)
    sha256: str | None = None
    signature: dict[str, Any] | None = None
    if not path.is_file():
        problems.append(f"version {version}: model file {path.name} is missing")
    else:
        sha256 = _sha256_file(path)
        signature = (metadata or {}).get("signature") or _signature_or_problem(
            path, version, problems
        )
    recorded = (metadata or {}).get("sha256")
    if recorded is not None and sha256 is not None and recorded != sha256:
        problems.append(
            f"version {version}: the model file's sha256 {sha256[:12]} differs from "
            f"metadata.json's {recorded[:12]}; the file changed after publish"
        )
    return {"metadata": metadata, "sha256": sha256, "signature": signature}


def _signature_or_problem(
    path: Path, version: int, problems: list[str]
) -> dict[str, list[dict[str, Any]]] | None:
    try:
        return signature_json(probe_signature(path))
    except ModelLoadError as exc:
        problems.append(f"version {version}: {exc.message}")
        return None


def _tensors_diff(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, Any]:
    before = {t["name"]: t for t in old}
    after = {t["name"]: t for t in new}
    changed = []
    for name in [n for n in before if n in after]:
        change = {
            key: {"from": before[name][key], "to": after[name][key]}
            for key in ("datatype", "shape")
            if before[name][key] != after[name][key]
        }
        if change:
            changed.append({"name": name, **change})
    return {
        "added": [t for n, t in after.items() if n not in before],
        "removed": [t for n, t in before.items() if n not in after],
        "changed": changed,
    }


def _map_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "added": {k: v for k, v in new.items() if k not in old},
        "removed": {k: v for k, v in old.items() if k not in new},
        "changed": {
            k: {"from": old[k], "to": new[k]} for k in old if k in new and old[k] != new[k]
        },
    }


def _metrics_diff(old: Mapping[str, float], new: Mapping[str, float]) -> dict[str, Any]:
    out = _map_diff(old, new)
    for change in out["changed"].values():
        change["delta"] = change["to"] - change["from"]
    return out


# ---- reading, tolerant where a listing should go on ----------------------------


def read_metadata(version_dir: Path) -> dict[str, Any] | None:
    """The version's metadata.json, or None in a plain Triton repository."""
    path = version_dir / METADATA_FILENAME
    try:
        inside = layout.inside(
            version_dir.parent, Path(version_dir.name) / METADATA_FILENAME, "file"
        )
        data = json.loads(layout.read_text_file(inside, METADATA_FILENAME))
    except FileNotFoundError:
        return None
    except (ValueError, ModelLoadError) as exc:  # JSON syntax, UTF-8, a layout rule
        raise RegistryError(f"{path}: {_reason(exc)}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: want a JSON object")
    return data


def _metadata_or_problem(version_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        return read_metadata(version_dir)
    except RegistryError as exc:
        problems.append(exc.message)
        return None


def _labels_or_problem(model_dir: Path, problems: list[str]) -> Labels:
    try:
        return read_labels(model_dir)
    except LabelsError as exc:
        problems.append(exc.message)
        return Labels()


def _config_or_problem(model_dir: Path, problems: list[str]) -> tuple[mc.ModelConfig, Path | None]:
    try:
        return cfg.read_config_file(model_dir)
    except ModelLoadError as exc:
        problems.append(exc.message)
        return mc.ModelConfig(), None


def _model_dir(repository: Path, model: str) -> Path:
    check_model_name(model)
    _require_dir(repository, "model repository")
    model_dir = repository / model
    if not model_dir.is_dir():
        raise RegistryError(f"no model '{model}' in {repository}")
    return model_dir


def _resolve_version(model_dir: Path, model: str, version: int | None) -> int:
    versions = version_dirs(model_dir)
    if not versions:
        raise RegistryError(f"model '{model}' has no version folders")
    if version is None:
        return versions[-1]
    _require_version(model_dir, model, version, versions)
    return version


def _require_version(
    model_dir: Path, model: str, version: int, versions: list[int] | None = None
) -> None:
    versions = version_dirs(model_dir) if versions is None else versions
    if version not in versions:
        shown = ", ".join(map(str, versions)) or "none"
        raise RegistryError(f"model '{model}' has no version {version} (versions: {shown})")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise RegistryError(f"{what} {path} is not a directory")


# ---- durable files -----------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_durably(src: Path, dst: Path) -> str:
    """Copies and fsyncs `src`; returns the sha256 of the bytes written, so the
    recorded digest is that of the stored file even if `src` changes meanwhile."""
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomically(path: Path, data: bytes) -> None:
    # Not tempfile.mkstemp: its 0600 mode would hide the file from a server
    # running as another user. O_EXCL with 0666 honours the umask instead.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


def _fsync_dir(path: Path) -> None:
    """Makes the folder's entries (a rename, a new file) durable."""
    if sys.platform == "win32":
        return  # folders cannot be opened there; NTFS journals renames anyway
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serializes sluice's writers of one folder: version numbering in publish,
    read-modify-write of labels.json. It is an advisory flock on the folder
    itself, so it leaves no lock file behind. Closing the descriptor releases it."""
    if sys.platform == "win32":
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
