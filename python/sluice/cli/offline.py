"""`sluice package` (and `sluice package verify`) and `sluice batch`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from sluice.cli import common
from sluice.errors import SluiceError

PACKAGE_USAGE = (
    "sluice package MODEL VERSION --model-repository DIR -o OUT [options]\n"
    "       sluice package verify BUNDLE [--key PUB]"
)


def _package(args: argparse.Namespace) -> int:
    from sluice.offline import packaging

    if args.model == "verify" and args.output is None:
        return _verify(args)
    if args.output is None or args.model_repository is None:
        print(
            "sluice package: give --model-repository DIR and -o OUT "
            "(or: sluice package verify BUNDLE)",
            file=sys.stderr,
        )
        return 2
    try:
        version = int(args.version)
    except ValueError:
        print(f"sluice package: VERSION must be an integer, not {args.version!r}", file=sys.stderr)
        return 2
    base = packaging.PROFILES[args.profile]
    overrides: dict[str, Any] = {}
    for field in ("optimize", "quantize", "fp16", "format", "fixed_batch"):
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    profile = dataclasses.replace(base, **overrides)
    options = packaging.PackageOptions(
        repository=Path(args.model_repository),
        model=args.model,
        version=version,
        output=Path(args.output),
        profile=profile,
        calibration=Path(args.calibration) if args.calibration else None,
        validation=Path(args.validation) if args.validation else None,
        min_agreement=args.min_agreement,
        max_mean_abs_error=args.max_mean_abs_error,
        validation_rows=args.validation_rows,
        per_channel=args.per_channel,
        calibration_method=args.calibration_method,
        sign_key=Path(args.sign) if args.sign else None,
        force=args.force,
        tarball=not args.no_tarball,
        latency_budget_s=args.latency_seconds,
    )
    try:
        result = packaging.package(options)
    except (SluiceError, OSError, ValueError) as exc:
        print(f"sluice package: {exc}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"sluice package: {note}", file=sys.stderr)
    m = result.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"{result.path}: {m['model']} version {m['version']}, profile {profile.name}")
    for step in m["steps"]:
        state = "applied" if step["applied"] else "skipped"
        params = ", ".join(f"{k}={v}" for k, v in step["params"].items())
        print(f"  {step['name']:<11} {state:<8} {params or step['reason']}")
    sizes, lat = m["sizes"], m["latency"]
    print(
        f"  size {sizes['source_bytes']} -> {sizes['packaged_bytes']} bytes; batch-1 latency "
        f"p50 {lat['source']['p50_us']} -> {lat['packaged']['p50_us']} us"
    )
    from sluice.offline.packaging import describe_comparison

    v = m["validation"]
    print(f"  validation ({v['rows']} rows, {v['data']}): {describe_comparison(v['outputs'])}")
    if result.tarball is not None:
        print(f"{result.tarball}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sluice.offline import packaging

    result = packaging.verify(Path(args.version), Path(args.key) if args.key else None)
    for line in result.lines:
        print(line)
    return 0 if result.ok else 1


def _add_package(sub: Any) -> None:
    from sluice.offline import packaging

    p = sub.add_parser(
        "package",
        help="package a registry version as a validated, signed bundle for a device",
        usage=PACKAGE_USAGE,
        description="Builds OUT (a model folder: serve its parent) and OUT.tar.gz from "
        "MODEL/VERSION of the repository: optional steps (portable graph optimisation, "
        "int8 or fp16, ORT format with the reduced-build operator list), a manifest, "
        "sha256 sums and an ed25519 signature. The packaged model must agree with the "
        "original on validation data, or nothing is written. `sluice package verify "
        "BUNDLE [--key PUB]` checks a bundle. Profiles: "
        + "; ".join(f"{p.name}: {p.description}" for p in packaging.PROFILES.values()),
    )
    p.add_argument("model", metavar="MODEL", help="the model's folder name (verify: 'verify')")
    p.add_argument("version", metavar="VERSION", help="a version number (verify: the BUNDLE)")
    p.add_argument("--model-repository", help="repository folder holding MODEL")
    p.add_argument("-o", "--output", metavar="OUT", help="the bundle folder to create")
    p.add_argument(
        "--profile",
        choices=sorted(packaging.PROFILES),
        default="server-cpu",
        help="the target: which steps run unless an option below overrides one",
    )
    p.add_argument(
        "--optimize",
        choices=("none", "basic", "extended"),
        help="graph optimisation stored in the bundle (basic is the portable level)",
    )
    p.add_argument(
        "--quantize",
        choices=("auto", "none", "dynamic", "static"),
        help="int8: static QDQ (needs --calibration), dynamic (weights), auto (the "
        "profile's choice)",
    )
    p.add_argument(
        "--fp16", action=argparse.BooleanOptionalAction, default=None, help="float16 weights"
    )
    p.add_argument("--format", choices=("onnx", "ort"), help="model file format")
    p.add_argument(
        "--fixed-batch", type=int, metavar="N", help="fix the batch dim to N (0: keep dynamic)"
    )
    p.add_argument(
        "--calibration",
        metavar="DATA",
        help="calibration data for static int8 (.npy, .npz, .csv as `sluice profile` reads)",
    )
    p.add_argument(
        "--validation",
        metavar="DATA",
        help="held-out data for the gate (default: the calibration data, else random inputs)",
    )
    p.add_argument(
        "--validation-rows",
        type=int,
        default=packaging.DEFAULT_VALIDATION_ROWS,
        help="rows of the validation data used",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=packaging.DEFAULT_MIN_AGREEMENT,
        help="least top-1 agreement with the original (class scores and labels)",
    )
    p.add_argument(
        "--max-mean-abs-error",
        type=float,
        help="other outputs: largest mean absolute error (default: "
        f"{packaging.DEFAULT_RELATIVE_ERROR} x the original's standard deviation)",
    )
    p.add_argument("--per-channel", action="store_true", help="int8 weights per channel")
    p.add_argument(
        "--calibration-method",
        choices=("minmax", "percentile"),
        default="minmax",
        help="how static int8 picks each tensor's range from the calibration set",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=packaging.LATENCY_BUDGET_S,
        help="time spent measuring batch-1 latency, per model (source and packaged)",
    )
    p.add_argument("--sign", metavar="KEY", help="ed25519 private key (PEM) to sign with")
    p.add_argument("--key", metavar="PUB", help="verify: the ed25519 public key (PEM)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-tarball", action="store_true", help="do not write OUT.tar.gz")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=_package)


def _batch(args: argparse.Namespace) -> int:
    from sluice.offline import batch

    options = batch.BatchOptions(
        model=args.model,
        input=Path(args.input),
        output=Path(args.output),
        repository=Path(args.model_repository) if args.model_repository else None,
        version=args.model_version,
        url=args.url,
        tls=common.client_tls(args),
        chunk_rows=args.chunk_rows,
        batch_size=args.batch_size,
        instances=args.instances,
        keep=tuple(args.keep),
        resume=args.resume,
        stop_after_chunks=args.stop_after_chunks,
        drift_report=Path(args.drift_report) if args.drift_report else None,
        progress=not args.no_progress,
    )
    try:
        result = batch.run(options)
    except (SluiceError, OSError, ValueError) as exc:
        print(f"sluice batch: {exc}", file=sys.stderr)
        if batch.workdir_of(options.output).exists():
            print(
                f"sluice batch: nothing written to {options.output}; finished chunks are kept "
                f"in {batch.workdir_of(options.output)} for --resume",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        print("sluice batch: interrupted; rerun with --resume to go on", file=sys.stderr)
        return 130
    print(batch.describe(result, options))
    if result.drift is not None and args.drift_report:
        print(f"sluice batch: drift report written to {args.drift_report}")
    return 0 if result.complete else 3


def _add_batch(sub: Any) -> None:
    from sluice.offline import batch

    b = sub.add_parser(
        "batch",
        help="score a data file offline with the serving runtime (or a running server)",
        description="Scores every row of --input (.npy, .npz, .csv, .parquet) with MODEL "
        "and writes the outputs, in input order, to --output (same formats; written "
        "atomically when every chunk is done). Files larger than memory stream through "
        "in chunks; --resume continues an interrupted run without rescoring finished chunks.",
    )
    b.add_argument("model", metavar="MODEL", help="the model to score with")
    b.add_argument("--model-repository", help="repository folder (in-process scoring)")
    b.add_argument("--model-version", type=int, help="default: the latest version")
    b.add_argument("--url", metavar="HOST:PORT", help="score on a running sluice server instead")
    b.add_argument(
        "--input", required=True, metavar="FILE", help="rows to score: .npy, .npz, .csv, .parquet"
    )
    b.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help="where the outputs go (same formats), written atomically when complete",
    )
    b.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="COLUMN",
        help="copy this ID/passthrough column (CSV header name, npz array, Parquet "
        "column) to the output; repeatable",
    )
    b.add_argument(
        "--chunk-rows",
        type=int,
        default=batch.DEFAULT_CHUNK_ROWS,
        help="rows read, scored and checkpointed at a time (bounds memory)",
    )
    b.add_argument(
        "--batch-size",
        type=int,
        help="rows per model run (default: measured on the first chunk, capped by a "
        "max_batch_size the config states; --url: the server's max_batch_size)",
    )
    b.add_argument(
        "--instances", type=int, help="sessions in parallel (default: the config's instance_group)"
    )
    b.add_argument("--resume", action="store_true", help="go on from an interrupted run")
    b.add_argument(
        "--stop-after-chunks",
        type=int,
        metavar="N",
        help="score at most N chunks this run, then stop (exit 3); finish with --resume",
    )
    b.add_argument(
        "--drift-report",
        metavar="FILE",
        help="compare the batch with the version's drift profile (FILE.json: JSON, "
        "else the text `sluice drift` prints)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    common.add_tls_arguments(b)
    b.set_defaults(func=_batch)


def register(sub: Any) -> None:
    """Adds the `package` and `batch` commands to the `sluice` parser."""
    _add_package(sub)
    _add_batch(sub)
