"""Progressive delivery for one model: which version an unversioned request goes
to (stable, or the canary by weight), which requests are mirrored to a shadow,
and the guards that roll a misbehaving canary back on their own.

Decisions are pure functions of the labels (labels.json, see
registry/labels.py), the request id and a random draw, so they are cheap on the
request path. Guards
keep a rolling window of the canary's outcomes and compare it with the stable
version's on the same mirrored requests.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import random
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GuardLimits:
    """When a canary is rolled back: over the last `window` canary requests
    (once at least `min_requests` are in), error rate above `max_error_rate`,
    p99 latency above `max_p99_ratio` x the stable version's p99 over its last
    `window` requests in the same split, with its p50 above the same ratio of
    stable's p50 too, both by more than `min_latency_excess_s`; or a share of
    outputs that disagree with stable's above `max_divergence` (outputs agree
    when allclose(rtol, atol))."""

    window: int = 200
    min_requests: int = 50
    max_error_rate: float = 0.05
    max_p99_ratio: float = 2.0
    # Latency gaps below this are scheduling noise on a busy host, not a slow
    # canary (sub-millisecond models double their latency with one preemption).
    min_latency_excess_s: float = 0.005
    max_divergence: float = 0.01
    rtol: float = 1e-4
    atol: float = 1e-5


@dataclasses.dataclass
class Outcome:
    ok: bool
    latency_s: float


# The latency comparison (two percentiles over each window) runs on every this
# many canary outcomes rather than on each: it is the guard's only cost that
# grows with the window, and a slow canary is slow for many requests in a row.
LATENCY_CHECK_EVERY = 8


class CanaryGuard:
    """Rolling windows of the canary's outcomes and of stable's, both from the
    live traffic the router splits between them at the same time (so both see
    the same load), plus the agreement of mirrored comparisons (which may be
    skipped under load without biasing either); `verdict()` says why to roll
    back, or None."""

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self.canary: collections.deque[Outcome] = collections.deque(maxlen=limits.window)
        self.agreement: collections.deque[bool] = collections.deque(maxlen=limits.window)
        self.stable_latency_s: collections.deque[float] = collections.deque(maxlen=limits.window)
        # Running counts over the windows, so a verdict costs O(1) per request.
        self._errors = 0
        self._disagreements = 0
        self._outcomes_since_latency_check = LATENCY_CHECK_EVERY

    def record_outcome(self, ok: bool, latency_s: float) -> None:
        """A canary request, success or error alike."""
        window = self.canary
        if window and len(window) == window.maxlen and not window[0].ok:
            self._errors -= 1  # the oldest leaves the window with this append
        window.append(Outcome(ok, latency_s))
        self._errors += not ok
        self._outcomes_since_latency_check += 1

    def record_stable(self, latency_s: float) -> None:
        """A request the router sent to stable while the canary is live."""
        self.stable_latency_s.append(latency_s)

    def record_comparison(self, agrees: bool) -> None:
        window = self.agreement
        if window and len(window) == window.maxlen and not window[0]:
            self._disagreements -= 1
        window.append(agrees)
        self._disagreements += not agrees

    def verdict(self) -> str | None:
        lim = self.limits
        n = len(self.canary)
        if n < lim.min_requests:
            return None
        errors = self._errors
        if errors / n > lim.max_error_rate:
            return f"error rate {errors / n:.1%} over {n} requests exceeds {lim.max_error_rate:.1%}"
        due = self._outcomes_since_latency_check >= LATENCY_CHECK_EVERY
        latencies: list[float] = []
        if due and len(self.stable_latency_s) >= lim.min_requests:
            self._outcomes_since_latency_check = 0
            latencies = [o.latency_s for o in self.canary if o.ok]
        if latencies:
            canary_p50, canary_p99 = np.percentile(latencies, [50, 99]).tolist()
            stable_p50, stable_p99 = np.percentile(self.stable_latency_s, [50, 99]).tolist()
            # A slow canary is slow in its median too; a tail alone that
            # doubles is what one burst of queueing does to either arm.
            if (
                stable_p99 > 0
                and canary_p99 > lim.max_p99_ratio * stable_p99
                and canary_p50 > lim.max_p99_ratio * stable_p50
                and canary_p99 - stable_p99 > lim.min_latency_excess_s
                and canary_p50 - stable_p50 > lim.min_latency_excess_s
            ):
                return (
                    f"p99 latency {canary_p99 * 1e3:.2f} ms exceeds {lim.max_p99_ratio:g}x "
                    f"stable's {stable_p99 * 1e3:.2f} ms (p50 {canary_p50 * 1e3:.2f} ms "
                    f"against {stable_p50 * 1e3:.2f} ms)"
                )
        compared = len(self.agreement)
        if compared >= lim.min_requests:
            diverged = self._disagreements / compared
            if diverged > lim.max_divergence:
                return (
                    f"outputs disagree with stable on {diverged:.1%} of {compared} "
                    f"compared requests (limit {lim.max_divergence:.1%})"
                )
        return None


def pick_canary(weight: float, sticky: bool, request_id: str, rng: random.Random) -> bool:
    """Whether this request goes to the canary. Sticky: the same request id
    always lands on the same arm (a hash of it, uniform in [0,1))."""
    if weight <= 0:
        return False
    if sticky and request_id:
        digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < weight
    return rng.random() < weight


def outputs_agree(a: dict[str, Any], b: dict[str, Any], limits: GuardLimits) -> bool:
    """Same output names, shapes and values (numbers within tolerance)."""
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape:
            return False
        if x.dtype.kind in "fc":
            if not np.allclose(x, y, rtol=limits.rtol, atol=limits.atol, equal_nan=True):
                return False
        elif not np.array_equal(x, y):
            return False
    return True
