"""ModelConfig (dynamic_batching and parameters) -> the core's BatcherOptions."""

from __future__ import annotations

from sluice import _core
from sluice.errors import ModelLoadError
from sluice.proto import model_config_pb2 as mc

US = 1_000
SLO_PARAMETER = "slo_target_ms"  # sluice extension: per-model latency target


def _queue_policy(p: mc.ModelQueuePolicy) -> _core.QueuePolicy:
    q = _core.QueuePolicy()
    q.timeout_action = (
        _core.TimeoutAction.DELAY
        if p.timeout_action == mc.ModelQueuePolicy.DELAY
        else _core.TimeoutAction.REJECT
    )
    q.default_timeout_ns = p.default_timeout_microseconds * US
    q.allow_timeout_override = p.allow_timeout_override
    q.max_queue_size = max(0, p.max_queue_size)
    return q


def batcher_options(config: mc.ModelConfig, instance_count: int) -> _core.BatcherOptions:
    """Triton semantics: with dynamic_batching, requests are combined up to
    max_batch_size; without it, each request runs alone (still queued, so
    instances, priorities and shutdown work the same way)."""
    o = _core.BatcherOptions()
    o.max_batch_size = max(1, config.max_batch_size)
    o.instance_count = max(1, instance_count)
    db = config.dynamic_batching
    o.batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
    if config.HasField("dynamic_batching"):
        for size in db.preferred_batch_size:
            if not 1 <= size <= o.max_batch_size:
                raise ModelLoadError(
                    f"model '{config.name}': preferred_batch_size {size} is outside "
                    f"1..max_batch_size ({o.max_batch_size})"
                )
        o.preferred_batch_sizes = list(db.preferred_batch_size)
        o.max_queue_delay_ns = db.max_queue_delay_microseconds * US
        o.preserve_ordering = db.preserve_ordering
        o.priority_levels = db.priority_levels
        if db.priority_levels and db.default_priority_level > db.priority_levels:
            raise ModelLoadError(
                f"model '{config.name}': default_priority_level {db.default_priority_level} "
                f"exceeds priority_levels {db.priority_levels}"
            )
        o.default_priority_level = db.default_priority_level
        o.default_queue_policy = _queue_policy(db.default_queue_policy)
        policies = {}
        for level, policy in db.priority_queue_policy.items():
            if db.priority_levels and not 1 <= level <= db.priority_levels:
                raise ModelLoadError(
                    f"model '{config.name}': priority_queue_policy for level {level} outside "
                    f"1..{db.priority_levels}"
                )
            policies[level] = _queue_policy(policy)
        o.priority_queue_policy = policies
    if SLO_PARAMETER in config.parameters:
        raw = config.parameters[SLO_PARAMETER].string_value
        try:
            target_ms = float(raw)
        except ValueError:
            raise ModelLoadError(
                f"model '{config.name}': parameter {SLO_PARAMETER} must be a number of "
                f"milliseconds, not {raw!r}"
            ) from None
        if target_ms <= 0:
            raise ModelLoadError(f"model '{config.name}': {SLO_PARAMETER} must be > 0")
        o.slo_target_ns = int(target_ms * 1_000_000)
    return o
