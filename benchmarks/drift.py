"""Drift statistics: sluice's C++ kernel vs numpy/scipy (and Evidently's stattests).

Usage::

    python benchmarks/drift.py                  # 20 float32 features, 100k reference, 1M window
    python benchmarks/drift.py --rows 200000 --no-evidently     # quicker

One run measures everything side by side, in this process, on the same data:

(a) profile building: sluice ``DriftProfile.build`` vs numpy computing the same
    profile per feature (deciles + de-duplication, counts, 1000 sketch quantiles
    and their counts, mean/std/min/max);
(b) streaming update of the whole window: sluice ``DriftWindow.update`` (one call
    with all rows, and again in 1000-row batches) vs numpy doing the same work per
    feature (finite mask, ``searchsorted`` + ``bincount`` on the coarse and the fine
    edges, mean/var/min/max); reported in ns per value;
(c) every statistic: sluice ``statistics()`` (PSI, KL, JS, Hellinger, TVD, KS D and
    p, W1 raw and normed, out-of-range, BH-corrected verdicts) vs numpy/scipy
    computing them exactly (binned distances from counts, ``scipy.stats.ks_2samp``,
    ``wasserstein_distance``, ``false_discovery_control``);
plus a categorical block (5 features x 1000 codes: update + chi-square).

Times are CPU seconds of this thread (``time.thread_time``; every timed call runs
single-threaded in this thread, sluice with the GIL released), which shared,
noisy machines inflate much less than wall time; wall seconds are printed too.
With ``benchmarks/.venv-evidently`` present::

    python -m venv benchmarks/.venv-evidently
    benchmarks/.venv-evidently/bin/pip install 'evidently>=0.7,<0.8' 'pandas<3'

(Evidently 0.7.23 does not import with pandas 3), Evidently's psi, ks, wasserstein
and jensenshannon stattests run on the same arrays in that interpreter (a child
process, bounded by --evidently-timeout).
Writes results/drift-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import numpy as np
from scipy import stats
from sluice import _core

Array = np.ndarray[Any, Any]
BINS = 10
SKETCH = 1000
EPS = 1e-4
EVIDENTLY_TESTS = ("psi", "ks", "wasserstein", "jensenshannon")

EVIDENTLY_SCRIPT = r"""
import json, sys, time
import numpy as np
import pandas as pd
from evidently.legacy.calculations.stattests import get_stattest
ref = np.load(sys.argv[1]); cur = np.load(sys.argv[2])
out = {"version": __import__("evidently").__version__}
for name in ("psi", "ks", "wasserstein", "jensenshannon"):
    test = get_stattest(pd.Series(ref[:, 0]), pd.Series(cur[:, 0]), "num", name)
    t0, w0 = time.thread_time(), time.perf_counter()
    for j in range(ref.shape[1]):
        test(pd.Series(ref[:, j]), pd.Series(cur[:, j]), "num", None)
    out[name] = {"cpu_s": time.thread_time() - t0, "wall_s": time.perf_counter() - w0}
print(json.dumps(out))
"""


class Timer:
    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def __enter__(self) -> Timer:
        self._c, self._w = time.thread_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_s = time.thread_time() - self._c
        self.wall_s = time.perf_counter() - self._w


def best(fn: Callable[[], object], repeat: int) -> Timer:
    """Fastest of `repeat` runs (by CPU time)."""
    runs = []
    for _ in range(repeat):
        with Timer() as t:
            fn()
        runs.append(t)
    return min(runs, key=lambda t: t.cpu_s)


# ---- numpy/scipy doing the same work ------------------------------------------------


def np_profile(ref: Array) -> list[dict[str, Array | float]]:
    out: list[dict[str, Array | float]] = []
    probs = np.arange(SKETCH) / SKETCH
    for j in range(ref.shape[1]):
        col = ref[:, j].astype(np.float64)
        r = col[np.isfinite(col)]
        edges = np.unique(np.quantile(r, np.arange(1, BINS) / BINS))
        sketch = np.append(np.unique(np.quantile(r, probs)), np.nextafter(r.max(), np.inf))
        out.append(
            {
                "edges": edges,
                "counts": np.bincount(np.searchsorted(edges, r, "right"), minlength=len(edges) + 1),
                "sketch": sketch,
                "sketch_counts": np.bincount(np.searchsorted(sketch, r, "right")),
                "mean": float(r.mean()),
                "std": float(r.std()),
                "min": float(r.min()),
                "max": float(r.max()),
            }
        )
    return out


def np_update(cur: Array, prof: list[dict[str, Array | float]]) -> list[dict[str, Any]]:
    out = []
    for j, p in enumerate(prof):
        col = cur[:, j].astype(np.float64)
        finite = np.isfinite(col)
        x = col[finite]
        edges, sketch = p["edges"], p["sketch"]
        assert isinstance(edges, np.ndarray)
        assert isinstance(sketch, np.ndarray)
        out.append(
            {
                "coarse": np.bincount(np.searchsorted(edges, x, "right"), minlength=len(edges) + 1),
                "fine": np.bincount(np.searchsorted(sketch, x, "right"), minlength=len(sketch) + 1),
                "nonfinite": int(len(col) - len(x)),
                "mean": float(x.mean()),
                "var": float(x.var()),
                "min": float(x.min()),
                "max": float(x.max()),
            }
        )
    return out


def np_statistics(
    ref: Array, cur: Array, prof: list[dict[str, Array | float]], upd: list[dict[str, Any]]
) -> list[dict[str, float]]:
    out = []
    for j, (p, u) in enumerate(zip(prof, upd, strict=True)):
        rcol, ccol = ref[:, j].astype(np.float64), cur[:, j].astype(np.float64)
        rf, cf = rcol[np.isfinite(rcol)], ccol[np.isfinite(ccol)]
        counts = p["counts"]
        assert isinstance(counts, np.ndarray)
        r = counts / counts.sum()
        c = u["coarse"] / u["coarse"].sum()
        re, ce = np.where(r > 0, r, EPS), np.where(c > 0, c, EPS)
        mid = 0.5 * (r + c)
        with np.errstate(divide="ignore", invalid="ignore"):
            js = 0.5 * np.nansum(r * np.log2(r / mid)) + 0.5 * np.nansum(c * np.log2(c / mid))
        ks = stats.ks_2samp(rf, cf)
        w1 = stats.wasserstein_distance(rf, cf)
        std = p["std"]
        assert isinstance(std, float)
        out.append(
            {
                "psi": float(np.sum((ce - re) * np.log(ce / re))),
                "kl": float(np.sum(re * np.log(re / ce))),
                "js": float(np.sqrt(max(js, 0.0))),
                "hellinger": float(np.sqrt(0.5 * np.sum((np.sqrt(r) - np.sqrt(c)) ** 2))),
                "tvd": float(0.5 * np.abs(r - c).sum()),
                "ks_d": float(ks.statistic),
                "ks_p": float(ks.pvalue),
                "wasserstein": float(w1),
                "wasserstein_normed": float(w1 / max(std, 1e-3)),
                "out_of_range": float(np.mean((cf < rf.min()) | (cf > rf.max()))),
            }
        )
    stats.false_discovery_control([o["ks_p"] for o in out])
    return out


# ---- Evidently (optional, its own venv) ------------------------------------------------


def run_evidently(ref: Array, cur: Array, timeout_s: float) -> dict[str, Any]:
    python = harness.BENCH_DIR / ".venv-evidently" / "bin" / "python"
    if not python.exists():
        return {"skipped": f"{python} not found (see this script's docstring)"}
    with tempfile.TemporaryDirectory() as tmp:
        rp, cp, sp = Path(tmp, "ref.npy"), Path(tmp, "cur.npy"), Path(tmp, "ev.py")
        np.save(rp, ref)
        np.save(cp, cur)
        sp.write_text(EVIDENTLY_SCRIPT)
        rc, out = harness.run_bounded([str(python), str(sp), str(rp), str(cp)], timeout_s)
    if rc != 0:
        return {"failed": f"exit {rc}", "output_tail": out[-2000:]}
    line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
    result: dict[str, Any] = json.loads(line)
    return result


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--ref-rows", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="sluice runs per measurement (best)")
    ap.add_argument("--no-evidently", action="store_true")
    ap.add_argument("--evidently-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    harness.install_cleanup()

    rng = np.random.default_rng(0)
    f, n, m = args.features, args.ref_rows, args.rows
    ref = rng.normal(size=(n, f)).astype(np.float32)
    cur = (rng.normal(size=(m, f)) * 1.1 + 0.1).astype(np.float32)
    values = m * f
    print(f"{f} float32 features, reference {n} rows, window {m} rows ({values:,} values)")
    print(f"machine: {harness.machine_info()}")

    results: dict[str, Any] = {
        "features": f,
        "ref_rows": n,
        "rows": m,
        "machine": harness.machine_info(),
    }
    timings: dict[str, dict[str, Timer]] = {}

    # (a) profile
    prof_box: list[_core.DriftProfile] = []
    timings["profile"] = {
        "sluice": best(lambda: prof_box.append(_core.DriftProfile.build(ref)), args.repeat),
        "numpy": best(lambda: np_profile(ref), 1),
    }
    profile = prof_box[-1]
    np_prof = np_profile(ref)

    # (b) update
    def sluice_update(batch_rows: int) -> _core.DriftWindow:
        w = _core.DriftWindow(profile)
        for r0 in range(0, m, batch_rows):
            w.update(cur[r0 : r0 + batch_rows])
        return w

    windows: list[_core.DriftWindow] = []
    timings["update"] = {
        "sluice": best(lambda: windows.append(sluice_update(m)), args.repeat),
        "sluice_1000_row_batches": best(lambda: sluice_update(1000), args.repeat),
        "numpy": best(lambda: np_update(cur, np_prof), 1),
    }
    window = windows[-1]
    np_upd = np_update(cur, np_prof)

    # (c) statistics
    report_box: list[_core.DriftReport] = []
    np_box: list[list[dict[str, float]]] = []
    timings["statistics"] = {
        "sluice": best(lambda: report_box.append(window.statistics()), args.repeat),
        "numpy_scipy": best(lambda: np_box.append(np_statistics(ref, cur, np_prof, np_upd)), 1),
    }

    # Categorical: 5 features x 1000 codes, update + chi-square.
    codes_ref = rng.integers(0, 1000, size=(n, 5)).astype(np.int64)
    codes_cur = rng.integers(0, 1010, size=(m, 5)).astype(np.int64)
    kinds = [_core.FeatureKind.CATEGORICAL] * 5
    cat_profile = _core.DriftProfile.build(codes_ref, kinds)

    def cat_sluice() -> None:
        w = _core.DriftWindow(cat_profile)
        w.update(codes_cur)
        w.statistics()

    def cat_numpy() -> None:
        for j in range(5):
            known, ref_counts = np.unique(codes_ref[:, j], return_counts=True)
            slot = np.searchsorted(known, codes_cur[:, j])
            ok = (slot < len(known)) & (known[np.minimum(slot, len(known) - 1)] == codes_cur[:, j])
            cur_counts = np.bincount(np.where(ok, slot, len(known)), minlength=len(known) + 1)
            table = np.vstack([np.append(ref_counts, 0), cur_counts])
            stats.chi2_contingency(table[:, table.sum(axis=0) > 0], correction=False)

    timings["categorical_update_and_chi2"] = {
        "sluice": best(cat_sluice, args.repeat),
        "numpy_scipy": best(cat_numpy, 1),
    }

    # Agreement (a sanity check that both sides computed the same thing).
    report = report_box[-1]
    agree = {
        "max_abs_psi_diff": max(
            abs(a.psi - b["psi"]) for a, b in zip(report.features, np_box[-1], strict=True)
        ),
        "max_ks_d_diff": max(
            abs(a.ks_d - b["ks_d"]) for a, b in zip(report.features, np_box[-1], strict=True)
        ),
        "max_rel_w1_diff": max(
            abs(a.wasserstein - b["wasserstein"]) / b["wasserstein"]
            for a, b in zip(report.features, np_box[-1], strict=True)
        ),
    }

    rows = []
    for phase, entries in timings.items():
        base = next(t for k, t in entries.items() if k.startswith("numpy"))
        for name, t in entries.items():
            ratio = base.cpu_s / t.cpu_s if not name.startswith("numpy") else 1.0
            per_value = (
                f"{t.cpu_s / values * 1e9:.2f}"
                if phase == "update"
                else (f"{t.cpu_s / (m * 5) * 1e9:.2f}" if phase.startswith("categorical") else "")
            )
            rows.append(
                [phase, name, f"{t.cpu_s:.4f}", f"{t.wall_s:.4f}", per_value, f"{ratio:.1f}x"]
            )
    s_pass = timings["update"]["sluice"].cpu_s + timings["statistics"]["sluice"].cpu_s
    n_pass = timings["update"]["numpy"].cpu_s + timings["statistics"]["numpy_scipy"].cpu_s
    s_all = s_pass + timings["profile"]["sluice"].cpu_s
    n_all = n_pass + timings["profile"]["numpy"].cpu_s
    rows.append(["window pass (b+c)", "sluice", f"{s_pass:.4f}", "", "", f"{n_pass / s_pass:.1f}x"])
    rows.append(["window pass (b+c)", "numpy_scipy", f"{n_pass:.4f}", "", "", "1.0x"])
    rows.append(["everything (a+b+c)", "sluice", f"{s_all:.4f}", "", "", f"{n_all / s_all:.1f}x"])
    rows.append(["everything (a+b+c)", "numpy_scipy", f"{n_all:.4f}", "", "", "1.0x"])
    print()
    print(
        harness.markdown_table(
            ["phase", "implementation", "cpu s", "wall s", "ns/value", "speed-up vs numpy"], rows
        )
    )
    print(f"\nagreement (sluice vs exact numpy/scipy): {agree}")

    evidently: dict[str, Any] = {"skipped": "--no-evidently"}
    if not args.no_evidently:
        evidently = run_evidently(ref, cur, args.evidently_timeout)
        if all(k in evidently for k in EVIDENTLY_TESTS):
            ev_total = sum(
                evidently[k]["cpu_s"] for k in ("psi", "ks", "wasserstein", "jensenshannon")
            )
            evidently["total_cpu_s"] = ev_total
            evidently["speedup_of_sluice_pass"] = ev_total / s_pass
            parts = ", ".join(f"{k} {evidently[k]['cpu_s']:.2f}" for k in EVIDENTLY_TESTS)
            print(
                f"\nEvidently {evidently['version']} stattests {'+'.join(EVIDENTLY_TESTS)} on the "
                f"same window: {ev_total:.2f} cpu s ({parts}); "
                f"the sluice window pass is {ev_total / s_pass:.0f}x faster"
            )
        else:
            print(f"\nEvidently: {evidently}")

    results["timings"] = {
        phase: {k: {"cpu_s": t.cpu_s, "wall_s": t.wall_s} for k, t in entries.items()}
        for phase, entries in timings.items()
    }
    results["update_ns_per_value"] = timings["update"]["sluice"].cpu_s / values * 1e9
    results["window_pass_speedup"] = n_pass / s_pass
    results["everything_speedup"] = n_all / s_all
    results["agreement"] = agree
    results["evidently"] = evidently
    with_load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["loadavg_at_end"] = with_load
    out = args.out or harness.RESULTS_DIR / f"drift-{harness.timestamp()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
