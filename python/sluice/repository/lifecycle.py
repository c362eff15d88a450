"""The lifecycle of one model version: one enum, its legal transitions beside it."""

from __future__ import annotations

import enum


class VersionState(enum.Enum):
    LOADING = "LOADING"  # sessions being created and warmed up; takes no traffic
    READY = "READY"  # routable
    FAILED = "UNAVAILABLE"  # load failed; `reason` says why (Triton's name for it)
    DRAINING = "UNLOADING"  # out of routing, finishing in-flight requests
    UNLOADED = "UNLOADED"  # sessions released


_LEGAL: dict[VersionState, frozenset[VersionState]] = {
    VersionState.LOADING: frozenset({VersionState.READY, VersionState.FAILED}),
    VersionState.READY: frozenset({VersionState.DRAINING}),
    VersionState.FAILED: frozenset({VersionState.UNLOADED}),
    VersionState.DRAINING: frozenset({VersionState.UNLOADED}),
    VersionState.UNLOADED: frozenset(),
}


def check_transition(old: VersionState, new: VersionState) -> None:
    """Raises RuntimeError on an illegal transition: a bug, never a user error."""
    if new not in _LEGAL[old]:
        raise RuntimeError(f"illegal model version transition {old.name} -> {new.name}")
