"""Cost attribution: what each model's inferences cost on this machine.

Model: the machine costs `usd_per_hour` (plus `usd_per_gpu_hour` per GPU) whether
busy or idle. Its capacity is `cores` CPU-seconds per second. A model execution
that ran for t seconds on k intra-op threads used t*k CPU-seconds, and is charged
that share of the machine's price: t * k * usd_per_hour / (3600 * cores).
Assumptions, stated in the README: idle capacity is not charged to any model
(cost per 1000 inferences falls as utilisation rises, and the unattributed rest
is the price of headroom); the frontend's own CPU (gRPC, decoding) is not
attributed; on a GPU, the GPU price is charged by the same compute time.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CostModel:
    usd_per_hour: float = 0.0
    usd_per_gpu_hour: float = 0.0
    gpus: int = 0
    cores: int = 1

    def usd(self, core_ns: int) -> float:
        """The attributed cost of `core_ns` CPU-nanoseconds of model compute."""
        cpu_share = core_ns * 1e-9 / max(1, self.cores)
        machine = self.usd_per_hour + self.usd_per_gpu_hour * self.gpus
        return cpu_share * machine / 3600.0
