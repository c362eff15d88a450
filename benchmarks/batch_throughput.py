"""`sluice batch` rows/s against onnxruntime in process at its best batch size on
the same file, and against scoring the same rows through a running server.

Usage: ``python benchmarks/batch_throughput.py [--rows 16384] [--rounds 3]
[--models image_classifier,tabular_classifier] [--skip-server] [--out FILE]``

For each model (the bundled examples: image_classifier without a config, so
sluice batch measures its batch size; tabular_classifier with its config's
max_batch_size raised from 64 to 4096, as one would for offline use; the
server's copies say max_batch_size 1024 with the dynamic batcher):

* ``onnxruntime``: a plain session (default threads: every core), the .npy
  loaded with np.load, scored at each batch size of 64..4096, outputs saved
  with np.save; the best batch size's end-to-end rows/s (load + score + save).
* ``sluice batch``: ``batch.run`` in process on the same .npy to an .npz,
  default options (batch size measured on the first chunk, 64k-row chunks,
  checkpoints fsynced, output written atomically); rows/s over its own run
  time, which includes the batch-size measurement and every write.
* ``sluice batch --url``: the same command against ``sluice serve`` on the
  same machine (one ModelStreamInfer stream per chunk, 1024-row requests).

Rows: --rows for the image model, 64x that for the tabular one (a file that
takes onnxruntime a few seconds, not milliseconds).

Rounds alternate (ort, sluice, url, ort, sluice, url, ...) and the table
reports medians, so a slow minute on the shared machine hits every contender.
Writes JSON (default benchmarks/results/batch_throughput.json).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
import onnxruntime as ort  # noqa: E402
from sluice.offline import batch  # noqa: E402

EXAMPLES = BENCH_DIR.parent / "python" / "sluice" / "examples" / "models"
BATCHES = (64, 256, 1024, 4096)
SERVER_MAX_BATCH = 1024
CONFIG = """max_batch_size: {max_batch}
dynamic_batching {{ }}
"""


def _data(model: str, rows: int) -> tuple[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(5)
    if model == "image_classifier":
        return "image", rng.standard_normal((rows, 3, 32, 32)).astype(np.float32)
    return "features", rng.standard_normal((rows, 8)).astype(np.float32)


def ort_best(model_path: Path, name: str, src: Path, out: Path) -> dict[str, Any]:
    """End-to-end rows/s of a plain session at each batch size; the best."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    per_size: dict[int, float] = {}
    for size in BATCHES:
        start_ns = time.monotonic_ns()
        x = np.load(src)
        parts = [session.run(outputs, {name: x[i : i + size]}) for i in range(0, len(x), size)]
        results = {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(outputs)}
        np.savez(out, **results)  # type: ignore[arg-type]
        per_size[size] = len(x) / ((time.monotonic_ns() - start_ns) / 1e9)
    best = max(per_size, key=lambda s: per_size[s])
    return {"rows_per_s": per_size[best], "batch_size": best, "per_batch_size": per_size}


def sluice_batch(
    model: str, repo: Path | None, url: str | None, src: Path, out: Path
) -> dict[str, Any]:
    result = batch.run(
        batch.BatchOptions(
            model=model,
            repository=repo,
            url=url,
            input=src,
            output=out,
            progress=False,
        )
    )
    return {
        "rows_per_s": result.rows_per_s,
        "batch_size": result.batch_size,
        "instances": result.instances,
        "threads": result.threads_per_instance,
        "seconds": result.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="image_classifier,tabular_classifier")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--sluice", default="sluice", help="the sluice command for the server")
    parser.add_argument("--out", type=Path, default=harness.RESULTS_DIR / "batch_throughput.json")
    args = parser.parse_args(argv)
    harness.install_cleanup()
    models = args.models.split(",")
    report: dict[str, Any] = {
        "command": "python benchmarks/batch_throughput.py " + " ".join(argv or sys.argv[1:]),
        "machine": harness.machine_info(),
        "rows_image": args.rows,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo, served = root / "repo", root / "served"
        for model in models:
            shutil.copytree(EXAMPLES / model, repo / model)
            shutil.copytree(EXAMPLES / model, served / model)
            (served / model / "config.pbtxt").write_text(CONFIG.format(max_batch=SERVER_MAX_BATCH))
            if (repo / model / "config.pbtxt").is_file():
                text = (repo / model / "config.pbtxt").read_text()
                (repo / model / "config.pbtxt").write_text(
                    text.replace("max_batch_size: 64", "max_batch_size: 4096")
                )
        server = None if args.skip_server else harness.sluice_server(served, sluice=args.sluice)
        try:
            if server is not None:
                server.start()
            for model in models:
                name, x = _data(model, args.rows * (64 if model != "image_classifier" else 1))
                src = root / f"{model}.npy"
                np.save(src, x)
                runs: dict[str, list[dict[str, Any]]] = {"ort": [], "sluice": [], "url": []}
                for _ in range(args.rounds):
                    runs["ort"].append(
                        ort_best(repo / model / "1" / "model.onnx", name, src, root / "ort.npz")
                    )
                    runs["sluice"].append(sluice_batch(model, repo, None, src, root / "s.npz"))
                    if server is not None:
                        runs["url"].append(
                            sluice_batch(model, None, server.url, src, root / "u.npz")
                        )
                summary = {
                    k: statistics.median(r["rows_per_s"] for r in v) for k, v in runs.items() if v
                }
                report["models"][model] = {"runs": runs, "median_rows_per_s": summary}
                print(f"{model}: {summary}", file=sys.stderr)
        finally:
            if server is not None:
                server.stop()
    rows = []
    for model, entry in report["models"].items():
        med = entry["median_rows_per_s"]
        runs = entry["runs"]
        rows.append(
            [
                model,
                f"{med['ort']:.0f} (batch {runs['ort'][-1]['batch_size']})",
                f"{med['sluice']:.0f} (batch {runs['sluice'][-1]['batch_size']})",
                f"{med['sluice'] / med['ort']:.2f}x",
                f"{med['url']:.0f}" if "url" in med else "n/a",
                f"{med['url'] / med['ort']:.2f}x" if "url" in med else "n/a",
            ]
        )
    print(
        harness.markdown_table(
            [
                "model",
                "onnxruntime rows/s",
                "sluice batch rows/s",
                "sluice/ort",
                "--url rows/s",
                "--url/ort",
            ],
            rows,
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(harness.to_json(report))
    print(f"wrote {harness.rel(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
