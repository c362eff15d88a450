"""What `sluice serve` pays at start-up for importing onnx, which it does not need.

Usage::

    python benchmarks/import_cost.py [--rounds 15]

Each round starts two fresh interpreters, in alternating order: one imports what
`sluice serve` imports (sluice.cli and sluice.server.app), the other the same plus
onnx as the repository scan used to pull it in (onnx and
onnx.external_data_helper). Prints the median wall time of the imports and the
median peak RSS of each, and their differences. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SERVE = "import sluice.cli, sluice.server.app"
WITH_ONNX = SERVE + "; import onnx, onnx.external_data_helper"
PROBE = """
import json, resource, sys, time
t0 = time.perf_counter_ns()
{imports}
elapsed_ns = time.perf_counter_ns() - t0
print(json.dumps({{"ms": elapsed_ns / 1e6, "rss_mib": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "onnx": "onnx" in sys.modules}}))
"""


def sample(imports: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {SERVE: [], WITH_ONNX: []}
    for r in range(args.rounds):
        order = (SERVE, WITH_ONNX) if r % 2 == 0 else (WITH_ONNX, SERVE)
        for imports in order:
            runs[imports].append(sample(imports))
    assert not any(s["onnx"] for s in runs[SERVE]), "sluice serve's imports pull in onnx"
    med = {
        k: (statistics.median(s["ms"] for s in v), statistics.median(s["rss_mib"] for s in v))
        for k, v in runs.items()
    }
    for name, imports in (("serve imports", SERVE), ("serve + onnx", WITH_ONNX)):
        ms, rss = med[imports]
        print(f"{name:<14} median {ms:7.1f} ms, peak RSS {rss:6.1f} MiB  ({imports})")
    d_ms = med[WITH_ONNX][0] - med[SERVE][0]
    d_rss = med[WITH_ONNX][1] - med[SERVE][1]
    print(f"onnx costs     {d_ms:7.1f} ms, {d_rss:6.1f} MiB ({args.rounds} rounds, medians)")


if __name__ == "__main__":
    main()
