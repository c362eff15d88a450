"""In which order a model's version changes happen (TF Serving's
AvailabilityPreservingPolicy / ResourcePreservingPolicy, in a few lines)."""

from __future__ import annotations

import enum


class SwapPolicy(enum.Enum):
    # New versions load before old ones unload: no gap in service, briefly
    # twice the memory. The default.
    AVAILABILITY = "availability"
    # Old versions unload first: never two copies in memory, a gap in between.
    RESOURCE = "resource"


def order(policy: SwapPolicy, to_load: list[int], to_unload: list[int]) -> list[tuple[str, int]]:
    """The steps ("load" | "unload", version) in the order to take them."""
    loads = [("load", v) for v in sorted(to_load)]
    unloads = [("unload", v) for v in sorted(to_unload)]
    return loads + unloads if policy is SwapPolicy.AVAILABILITY else unloads + loads
