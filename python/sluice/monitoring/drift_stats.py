"""Thin helpers over the C++ drift kernel (sluice._core, csrc/include/sluice/drift.h).

The profile of a model version is stored beside it as ``drift_profile.bin``: the
kernel's own versioned little-endian byte string (magic ``SLDP``, checksummed), so
it round-trips bit for bit and needs no numpy/pickle to read. Reports become plain
JSON-ready dicts (NaN -> None).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice import _core

PROFILE_FILENAME = "drift_profile.bin"

_KINDS = {"numeric": _core.FeatureKind.NUMERIC, "categorical": _core.FeatureKind.CATEGORICAL}
_VERDICTS = {
    _core.Verdict.NO_DRIFT: "no_drift",
    _core.Verdict.DRIFT: "drift",
    _core.Verdict.INSUFFICIENT_DATA: "insufficient_data",
}
_FIELDS = (
    "n", "m", "nonfinite", "nonfinite_rate_ref", "nonfinite_rate", "nonfinite_rate_change",
    "mean", "stddev", "min", "max", "psi", "kl", "js", "hellinger", "tvd", "ks_d",
    "ks_d_bound", "ks_p", "wasserstein", "wasserstein_normed", "wasserstein_bound", "chi2",
    "chi2_p", "chi2_dof", "out_of_range_share", "unseen_share", "bins", "p_value", "p_adjusted",
)  # fmt: skip


def build_profile(
    reference: np.ndarray[Any, Any],
    kinds: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    bins: int = 10,
    sketch_points: int = 1000,
) -> _core.DriftProfile:
    """Profile a rows x features reference; kinds are "numeric" or "categorical"."""
    core_kinds = None if kinds is None else [_KINDS[k] for k in kinds]
    data = np.ascontiguousarray(reference)
    return _core.DriftProfile.build(data, core_kinds, names, bins, sketch_points)


def save_profile(profile: _core.DriftProfile, version_dir: str | Path) -> Path:
    """Write PROFILE_FILENAME into a model version directory (atomic replace)."""
    path = Path(version_dir) / PROFILE_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(profile.to_bytes())
    os.replace(tmp, path)
    return path


def load_profile(version_dir: str | Path) -> _core.DriftProfile | None:
    """The profile stored in a model version directory, or None if there is none."""
    path = Path(version_dir) / PROFILE_FILENAME
    if not path.is_file():
        return None
    return _core.DriftProfile.from_bytes(path.read_bytes())


def _clean(value: float | int) -> float | int | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_to_dict(report: _core.DriftReport, names: Sequence[str] | None = None) -> dict[str, Any]:
    """A JSON-ready view of a window's report; feature names default to f0, f1, ..."""
    features = []
    for i, f in enumerate(report.features):
        name = names[i] if names is not None and i < len(names) and names[i] else f"f{i}"
        entry: dict[str, Any] = {
            "name": name,
            "kind": "numeric" if f.kind == _core.FeatureKind.NUMERIC else "categorical",
            "verdict": _VERDICTS[f.verdict],
        }
        entry.update({key: _clean(getattr(f, key)) for key in _FIELDS})
        features.append(entry)
    return {
        "rows": report.rows,
        "oldest_pane_ns": report.oldest_pane_ns,
        "latest_ns": report.latest_ns,
        "evaluated": report.evaluated,
        "drifted": report.drifted,
        "drift_share": _clean(report.drift_share),
        "dataset": _VERDICTS[report.dataset],
        "features": features,
    }
