"""A window over cumulative counters: the last minute of a version's traffic as
the difference between its InferStats counters now and a sample about a minute
old (the status page's numbers). Sampling copies a few ints per version, so a
timer can take samples every few seconds at no noticeable cost.

Contract: samples are taken and compared on the event loop, which owns InferStats.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Sequence

from sluice.monitoring.stats import LATENCY_BUCKETS_S, InferStats

WINDOW_S = 60.0
SAMPLE_PERIOD_S = 5.0


@dataclasses.dataclass(frozen=True)
class Counts:
    """Cumulative counters of one version (or their difference over a window)."""

    success: int = 0
    failed: int = 0
    executions: int = 0
    inferences: int = 0
    core_ns: int = 0
    latency: tuple[int, ...] = ()  # request-phase histogram buckets, +Inf last

    @classmethod
    def of(cls, s: InferStats) -> Counts:
        return cls(
            s.success.count,
            s.fail.count,
            s.execution_count,
            s.inference_count,
            s.core_ns,
            tuple(s.phases["request"].counts),
        )

    def minus(self, base: Counts) -> Counts:
        latency = self.latency
        if base.latency:
            latency = tuple(a - b for a, b in zip(self.latency, base.latency, strict=True))
        return Counts(
            self.success - base.success,
            self.failed - base.failed,
            self.executions - base.executions,
            self.inferences - base.inferences,
            self.core_ns - base.core_ns,
            latency,
        )

    def plus(self, other: Counts) -> Counts:
        if not self.latency:
            latency = other.latency
        elif not other.latency:
            latency = self.latency
        else:
            latency = tuple(a + b for a, b in zip(self.latency, other.latency, strict=True))
        return Counts(
            self.success + other.success,
            self.failed + other.failed,
            self.executions + other.executions,
            self.inferences + other.inferences,
            self.core_ns + other.core_ns,
            latency,
        )


Key = tuple[str, int]  # (model, version)


@dataclasses.dataclass(frozen=True)
class Sample:
    t_ns: int
    # The InferStats object is kept to tell a reloaded version (new, zeroed
    # statistics) from the one sampled before.
    counts: dict[Key, tuple[InferStats, Counts]]


class Window:
    """A ring of samples covering a little more than `window_s`. Event loop only."""

    def __init__(self, window_s: float = WINDOW_S, period_s: float = SAMPLE_PERIOD_S) -> None:
        self.window_ns = int(window_s * 1e9)
        self.period_s = period_s
        self._ring: collections.deque[Sample] = collections.deque(
            maxlen=math.ceil(window_s / period_s) + 2
        )

    @staticmethod
    def sample(now_ns: int, versions: Iterable[tuple[Key, InferStats]]) -> Sample:
        return Sample(now_ns, {key: (s, Counts.of(s)) for key, s in versions})

    def add(self, sample: Sample) -> None:
        self._ring.append(sample)

    def base(self, now_ns: int) -> Sample | None:
        """The newest sample at least a window old, else the oldest there is."""
        chosen = None
        for s in self._ring:
            if now_ns - s.t_ns >= self.window_ns or chosen is None:
                chosen = s
            else:
                break
        return chosen

    @staticmethod
    def since(base: Sample | None, key: Key, stats: InferStats) -> Counts:
        """The counters of `stats` (the version `key`) now, less those in `base`."""
        current = Counts.of(stats)
        before = base.counts.get(key) if base is not None else None
        if before is None or before[0] is not stats:
            return current  # loaded (or reloaded) since the base sample: all of it is new
        return current.minus(before[1])


def quantile_s(buckets: Sequence[int], q: float) -> float | None:
    """The q-quantile of a latency histogram (LATENCY_BUCKETS_S bounds, +Inf
    last), interpolated within its bucket as Prometheus' histogram_quantile does;
    +inf when it falls in the last bucket; None without observations."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n > 0 and seen + n >= rank:
            if i >= len(LATENCY_BUCKETS_S):
                return math.inf
            lower = LATENCY_BUCKETS_S[i - 1] if i > 0 else 0.0
            upper = LATENCY_BUCKETS_S[i]
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
    return math.inf
