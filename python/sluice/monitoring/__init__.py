"""Counters and durations that metrics and the statistics RPC report."""

from sluice.monitoring.stats import InferStats

__all__ = ["InferStats"]
