"""Reading a registry (`sluice models list | show | diff`): models, versions,
their lineage and labels. A listing goes on past a broken file: problems are
reported beside the answer, not raised."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sluice import config as cfg
from sluice.errors import ModelLoadError
from sluice.proto import model_config_pb2 as mc
from sluice.repository.aspired import model_names
from sluice.repository.policy import version_dirs
from sluice.repository.registry import files, folders
from sluice.repository.registry.errors import RegistryError
from sluice.repository.registry.labels import Labels, LabelsError, read_labels
from sluice.repository.registry.metadata import read_metadata, signature_json
from sluice.runtime.probe import probe_signature


def list_models(repository: Path) -> dict[str, Any]:
    """Every model folder with its versions, their lineage and their labels.
    Problems (unreadable metadata or labels) are reported, not raised."""
    folders.require_dir(repository, "model repository")
    models = [_model_summary(repository / name) for name in model_names(repository)]
    return {"repository": str(repository), "models": models}


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
    model_dir = folders.existing_model(repository, model)
    version = folders.resolve_version(model_dir, model, version)
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
    model_dir = folders.existing_model(repository, model)
    for v in (old, new):
        folders.require_version(model_dir, model, v)
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
        sha256 = files.sha256_file(path)
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
