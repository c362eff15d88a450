"""The asyncio bridge over the C++ dynamic batcher, and the instance workers."""

from sluice.scheduling.options import batcher_options
from sluice.scheduling.scheduler import ScheduledResult, Scheduler

__all__ = ["ScheduledResult", "Scheduler", "batcher_options"]
