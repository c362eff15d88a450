"""labels.json: the versions the server routes to, and their audit trail.

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

Writers (the CLI's promote and rollback, the server's auto-rollback) change the
file under the model folder's lock (files.locked), so none loses another's edit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

from sluice import config as cfg
from sluice.errors import ModelLoadError
from sluice.repository import layout
from sluice.repository.registry import files, folders
from sluice.repository.registry.errors import RegistryError, UsageError, reason
from sluice.runtime.probe import probe_signature

STABLE, CANARY, SHADOW = "stable", "canary", "shadow"
LABEL_NAMES = (STABLE, CANARY, SHADOW)
PROMOTE, ROLLBACK = "promote", "rollback"


class LabelsError(RegistryError, ValueError):
    """A malformed labels.json, or labels that would be malformed. It is also a
    ValueError because the server's scan treats every bad repository value the same way."""


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
        entry = HistoryEntry(label, version, files.now(), action, detail)
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
    path = model_dir / layout.LABELS_FILENAME
    try:
        inside = layout.inside(model_dir, layout.LABELS_FILENAME, "file")
        text = layout.read_text_file(inside, f"{model_dir.name}/{layout.LABELS_FILENAME}")
    except FileNotFoundError:
        return Labels()
    except (ModelLoadError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{path}: {reason(exc)}") from None
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
    with files.locked(model_dir):
        _write_labels_file(model_dir, labels)
    return labels


def update_labels(model_dir: Path, change: Callable[[Labels], Labels]) -> Labels:
    """Read, change, write under the model folder's lock, so concurrent sluice
    writers (two CLIs, or a CLI and the server) never lose each other's edits."""
    with files.locked(model_dir):
        current = read_labels(model_dir)
        updated = change(current)
        if updated != current:
            _write_labels_file(model_dir, updated)
        return updated


def _write_labels_file(model_dir: Path, labels: Labels) -> None:
    text = json.dumps(labels.to_json(), indent=2, allow_nan=False) + "\n"
    files.replace_atomically(model_dir / layout.LABELS_FILENAME, text.encode("utf-8"))


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


# ---- promote and rollback on a repository ----------------------------------------


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
    model_dir = folders.existing_model(repository, model)
    folders.require_version(model_dir, model, version)
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
    model_dir = folders.existing_model(repository, model)
    before: list[Labels] = []

    def change(labels: Labels) -> Labels:
        before.append(labels)
        after = rolled_back(labels)
        assert after.stable is not None
        folders.require_version(model_dir, model, after.stable)
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
