"""Routing: which loaded version answers a request (labels: stable, canary by
weight, shadow by sample), the lease that keeps that version from unloading
until the request is answered, and the canary guards that roll a misbehaving
canary back on their own.

Decisions are cheap and synchronous (the request path); the only I/O, writing
an automatic rollback into labels.json, runs off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sluice.repository.registry.labels import CANARY, Labels, update_labels
from sluice.repository.rollout import CanaryGuard, GuardLimits, pick_canary

if TYPE_CHECKING:
    from sluice.host.lifecycle import Model, ModelVersion

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Route:
    """Where one request goes: `primary` answers it; `compare_with` (the stable
    version, set when primary is a canary) and `shadow` get background mirrors.
    Holds a lease on `primary` until `release()`: a version that leaves routing
    drains until every lease on it is released."""

    primary: ModelVersion
    compare_with: ModelVersion | None = None
    shadow: ModelVersion | None = None
    # Set when a canary is live and this unversioned request went to stable:
    # its latency is the guard's reference for the canary's.
    stable_in_split: bool = False
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.primary.release()


class Router:
    def __init__(self, guard_limits: GuardLimits, rng: random.Random | None = None) -> None:
        self.guard_limits = guard_limits
        self._rng = rng or random.Random()
        self._writes: set[asyncio.Task[None]] = set()

    def route(
        self,
        model: Model,
        version: str,
        request_id: str,
        resolve: Callable[[str, str], ModelVersion],
    ) -> Route:
        """The version a request goes to, leased. An explicit version is served
        as asked; an unversioned request goes to the stable label (else the
        latest ready version), or to the canary with the canary's weight."""
        if version:
            mv = resolve(model.name, version)
            mv.acquire()
            return Route(mv)
        labels = model.labels
        stable = _labelled(model, labels.stable)
        base = stable or resolve(model.name, "")
        primary, compare = base, None
        in_split = False
        canary = labels.canary
        if canary is not None and canary.version != base.version:
            candidate = _labelled(model, canary.version)
            if candidate is not None:
                in_split = True
                if pick_canary(canary.weight, canary.sticky, request_id, self._rng):
                    primary, compare, in_split = candidate, base, False
        primary.stats.count_arm("canary" if compare is not None else "stable")
        shadow = None
        if labels.shadow is not None and self._rng.random() < labels.shadow.sample:
            shadow = _labelled(model, labels.shadow.version)
            if shadow is not None and shadow.version == primary.version:
                shadow = None
        primary.acquire()
        return Route(primary, compare, shadow, in_split)

    # ---- canary guards ---------------------------------------------------------

    @staticmethod
    def new_guard(model: Model, labels: Labels, limits: GuardLimits) -> None:
        """Starts a clean guard when the canary changes; drops it when none.
        The model's `canary_*` config parameters override the server's limits."""
        before = model.labels.canary
        model.labels = labels
        if labels.canary is None:
            model.guard = None
        elif before is None or before.version != labels.canary.version:
            model.guard = CanaryGuard(model_limits(model, limits))
            log.info(
                "model '%s': canary version %d at weight %.3f%s",
                model.name,
                labels.canary.version,
                labels.canary.weight,
                " (sticky)" if labels.canary.sticky else "",
            )

    def canary_outcome(
        self, model: Model, canary: ModelVersion, ok: bool, latency_s: float
    ) -> None:
        """Every canary request, success or error, on the same basis."""
        guard = _guard_for(model, canary)
        if guard is not None:
            guard.record_outcome(ok, latency_s)
            self._check(model, canary, guard)

    def stable_outcome(self, model: Model, latency_s: float) -> None:
        """A request the split sent to stable: the reference for the canary's p99."""
        if model.guard is not None:
            model.guard.record_stable(latency_s)

    def canary_comparison(self, model: Model, canary: ModelVersion, agrees: bool) -> None:
        """A mirrored request's comparison with stable (may be skipped under load)."""
        guard = _guard_for(model, canary)
        if guard is not None:
            guard.record_comparison(agrees)
            self._check(model, canary, guard)

    def _check(self, model: Model, canary: ModelVersion, guard: CanaryGuard) -> None:
        reason = guard.verdict()
        if reason is None:
            return
        log.warning(
            "model '%s': rolling canary version %d back automatically: %s",
            model.name,
            canary.version,
            reason,
        )
        kind = reason.split(" ", 1)[0]  # "error", "p99", "outputs"
        canary.stats.rollbacks[kind] = canary.stats.rollbacks.get(kind, 0) + 1
        # Routing changes now; the history entry matches what labels.json will say
        # (the status page shows it as the last guard decision).
        model.labels = dataclasses.replace(model.labels, canary=None).record(
            CANARY, canary.version, "auto-rollback", reason
        )
        model.guard = None
        version = canary.version

        def drop_canary(current: Labels) -> Labels:
            if current.canary is None or current.canary.version != version:
                return current  # someone moved the canary meanwhile: leave their edit
            cleared = dataclasses.replace(current, canary=None)
            return cleared.record(CANARY, version, "auto-rollback", reason)

        async def write() -> None:
            try:
                await asyncio.to_thread(update_labels, model.directory, drop_canary)
            except (OSError, ValueError) as exc:  # routing already changed; the file is the record
                log.error(
                    "model '%s': cannot record the rollback in labels.json: %s", model.name, exc
                )

        task = asyncio.get_running_loop().create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def flush(self) -> None:
        """Waits for pending labels writes (tests, shutdown)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)


def _labelled(model: Model, version: int | None) -> ModelVersion | None:
    if version is None:
        return None
    mv = model.versions.get(version)
    return mv if mv is not None and mv.ready else None


def _guard_for(model: Model, canary: ModelVersion) -> CanaryGuard | None:
    if model.guard is None or model.labels.canary is None:
        return None
    if model.labels.canary.version != canary.version:
        return None
    return model.guard


# Model config parameters that tune its canary's guard: the GuardLimits field
# each sets, the factor from the parameter's unit to the field's, and whether
# it counts requests (an integer).
GUARD_PARAMETERS: dict[str, tuple[str, float, bool]] = {
    "canary_window": ("window", 1, True),
    "canary_min_requests": ("min_requests", 1, True),
    "canary_max_error_rate": ("max_error_rate", 1, False),
    "canary_max_latency_ratio": ("max_p99_ratio", 1, False),
    "canary_min_latency_excess_ms": ("min_latency_excess_s", 1e-3, False),
    "canary_max_divergence": ("max_divergence", 1, False),
}


def model_limits(model: Model, defaults: GuardLimits) -> GuardLimits:
    """`defaults` with the model's canary_* parameters applied. A value that is
    not a finite non-negative number (a whole one for counts) is logged and
    ignored."""
    changes: dict[str, Any] = {}
    for key, (field, unit, whole) in GUARD_PARAMETERS.items():
        if key not in model.config.parameters:
            continue
        text = model.config.parameters[key].string_value
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf") or (whole and (value != int(value) or value < 1)):
            log.error("model '%s': ignoring parameter %s=%r", model.name, key, text)
            continue
        changes[field] = int(value) if whole else value * unit
    return dataclasses.replace(defaults, **changes) if changes else defaults
