"""`sluice profile` (reference profiles of a version's inputs and predictions)
and `sluice drift` (a drift report: from a running server, or offline from a
data file). Layout, files and rules: sluice.monitoring.drift."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice import config as cfg
from sluice import datatypes, defaults
from sluice.cli import common
from sluice.errors import SluiceError
from sluice.monitoring import drift, drift_stats
from sluice.proto import model_config_pb2 as mc

Array = np.ndarray[Any, Any]
RUN_CHUNK_ROWS = 4096
PLOT_MISSING = '--plot needs matplotlib: pip install "sluice-serve[plot]"'


class DriftCliError(Exception):
    pass


def _numpy_type(t: Any) -> np.dtype[Any]:
    dt = datatypes.by_config_enum(t.data_type).numpy
    assert dt is not None
    return dt


def read_data(path: Path, config: mc.ModelConfig) -> dict[str, Array]:
    """Arrays by input name from .npy / .csv (a model with one input: rows x
    features) or .npz (one array per input name; a single array feeds a
    single-input model whatever its key)."""
    names = [t.name for t in config.input]
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DriftCliError(f"data file {path} not found")
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if len(arrays) == 1 and len(names) == 1 and names[0] not in arrays:
            arrays = {names[0]: next(iter(arrays.values()))}
    elif suffix in (".npy", ".csv"):
        if len(names) != 1:
            raise DriftCliError(
                f"{suffix} data feeds a model with one input; this one has {len(names)} "
                "(use .npz with one array per input)"
            )
        arrays = {names[0]: _read_csv(path) if suffix == ".csv" else np.load(path)}
    else:
        raise DriftCliError(f"data file {path}: want .npy, .npz or .csv")
    by_name = {t.name: t for t in config.input}
    out: dict[str, Array] = {}
    for name, arr in arrays.items():
        if name not in by_name:
            raise DriftCliError(f"data has '{name}', which is not an input of the model")
        t = by_name[name]
        if t.data_type != mc.TYPE_STRING:
            arr = arr.astype(_numpy_type(t), copy=False)
        out[name] = np.ascontiguousarray(arr)
    return out


def _read_csv(path: Path) -> Array:
    """Numbers, one row per line; a first line that is not numeric is a header."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows:
        try:
            [float(v) for v in rows[0]]
        except ValueError:
            rows = rows[1:]
    try:
        return np.array([[float(v) if v.strip() else math.nan for v in r] for r in rows])
    except ValueError as exc:
        raise DriftCliError(f"{path}: {exc}") from None


def _load_model(repository: Path, model: str, version: int) -> tuple[mc.ModelConfig, Any, Path]:
    from sluice.runtime import RuntimeOptions, load_runtime

    directory = repository / model
    if not directory.is_dir():
        raise DriftCliError(f"no model folder {directory}")
    config, _ = cfg.read_config_file(directory)
    if not config.name:
        config.name = model
    cfg.validate_static(config, model)
    version_dir = directory / str(version)
    if not version_dir.is_dir():
        raise DriftCliError(f"model '{model}' has no version folder {version}")
    path = cfg.model_file(directory, version, config)
    runtime, _notes = load_runtime(path, config, model, RuntimeOptions())
    return config, runtime, version_dir


def run_model(runtime: Any, config: mc.ModelConfig, feeds: Mapping[str, Array]) -> dict[str, Array]:
    """The model's outputs on the whole data set (in chunks when it batches)."""
    names = [o.name for o in config.output]
    rows = next(iter(feeds.values())).shape[0] if feeds else 0
    step = RUN_CHUNK_ROWS if config.max_batch_size > 0 else max(rows, 1)
    parts: list[list[Array]] = []
    for start in range(0, rows, step):
        chunk = {k: v[start : start + step] for k, v in feeds.items()}
        shaped = {}
        for t in config.input:
            if t.name in chunk and t.HasField("reshape") and config.max_batch_size > 0:
                shaped[t.name] = chunk[t.name].reshape((-1, *t.reshape.shape))
            elif t.name in chunk:
                shaped[t.name] = chunk[t.name]
        parts.append(runtime.run(shaped, names))
    return {n: np.concatenate([p[i] for p in parts]) for i, n in enumerate(names)}


def _model_tensors(
    repository: Path, model: str, version: int, data_path: Path, categorical: list[str]
) -> tuple[list[drift.TensorProfile], dict[str, Array], Path, int]:
    config, runtime, version_dir = _load_model(repository, model, version)
    data = read_data(data_path, config)
    inputs, outputs = drift.layout(config, categorical)
    if not inputs and not outputs:
        raise DriftCliError(f"model '{model}' has no input or output of shape [batch, d]")
    rows = {a.shape[0] for a in data.values()}
    if len(rows) != 1:
        raise DriftCliError("the data's arrays disagree on the number of rows")
    n = rows.pop()
    arrays = dict(data)
    if all(t.name in data for t in config.input) and outputs:
        for name, arr in run_model(runtime, config, data).items():
            arrays["output:" + name] = arr
    else:
        outputs = []
    missing = [t.name for t in inputs if t.name not in data]
    if missing:
        raise DriftCliError(f"the data has no array for input(s) {', '.join(missing)}")
    return [*inputs, *outputs], arrays, version_dir, n


def _key(tp: drift.TensorProfile) -> str:
    return ("output:" if tp.output else "") + tp.name


DEFAULT_BINS = 10
DEFAULT_SKETCH_POINTS = 1000


def profile_version(
    repository: Path,
    model: str,
    version: int,
    data: Path,
    categorical: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    sketch_points: int = DEFAULT_SKETCH_POINTS,
) -> int:
    """Writes the drift profile of one version and prints what it wrote; returns
    the exit code (1 with the reason on stderr). Used by `sluice profile` and
    `sluice models publish --profile`."""
    try:
        tensors, arrays, version_dir, n = _model_tensors(
            repository, model, version, data, list(categorical)
        )
        for tp in tensors:
            matrix = drift.as_matrix(arrays[_key(tp)])
            tp.profile = drift_stats.build_profile(
                matrix, tp.kinds, tp.features, bins, sketch_points
            )
        drift.save(version_dir, tensors, n)
    except (DriftCliError, drift.ProfileError, SluiceError, OSError, ValueError) as exc:
        print(f"sluice profile: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the core's StatusError (e.g. non-integral categorical values)
        print(f"sluice profile: {exc}", file=sys.stderr)
        return 1
    for tp in tensors:
        cats = sum(k == "categorical" for k in tp.kinds)
        print(
            f"{version_dir / tp.file}: {'output' if tp.output else 'input'} '{tp.name}', "
            f"{len(tp.features)} feature(s) ({cats} categorical), {n} rows"
        )
    print(f"{version_dir / drift.MANIFEST_FILENAME}")
    return 0


def profile_command(args: argparse.Namespace) -> int:
    return profile_version(
        Path(args.model_repository),
        args.model,
        args.version,
        Path(args.data),
        args.categorical,
        args.bins,
        args.sketch_points,
    )


# ---- sluice drift ----------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_report(report: Mapping[str, Any]) -> str:
    head = f"sluice drift: {report.get('model', '')} version {report.get('version', '')}"
    if not report.get("available"):
        return f"{head}: drift unavailable ({report.get('reason', '')})"
    lines = [head]
    for key in ("inputs", "outputs"):
        part = report.get(key)
        if not part:
            continue
        share = part.get("drift_share")
        lines += [
            "",
            f"{key}: {part['rows']} rows in the window; {part['dataset']} "
            f"({part['drifted']}/{part['evaluated']} features drifted"
            + (f", share {share:.2f}" if share is not None else "")
            + ")",
            f"  {'feature':<26} {'verdict':<18} {'psi':>8} {'js':>8} {'ks_d':>8} "
            f"{'w1/sd':>8} {'p_adj':>8} {'mean':>9} {'mean_ref':>9}  skew",
        ]
        for f in part["features"]:
            lines.append(
                f"  {f['name']:<26} {f['verdict']:<18} {_fmt(f['psi']):>8} {_fmt(f['js']):>8} "
                f"{_fmt(f['ks_d']):>8} {_fmt(f['wasserstein_normed']):>8} "
                f"{_fmt(f['p_adjusted']):>8} {_fmt(f['mean']):>9} "
                f"{_fmt(f.get('mean_ref')):>9}  {','.join(f.get('skew') or []) or '-'}"
            )
    q = report.get("quality")
    if q and q.get("available"):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in q["metrics"].items()) or "no labels yet"
        base = ", ".join(f"{k} {v:.4g}" for k, v in q["baseline"].items()) or "none"
        lines += [
            "",
            f"quality ({q['task']}, {q['labelled']} labelled rows): {metrics}; baseline {base}; "
            + ("DEGRADED: " + q["reason"] if q["degraded"] else "ok"),
        ]
    skew = report.get("schema_skew") or []
    if skew:
        lines += ["", "schema skew (rejected requests): "]
        lines += [f"  {s['input']:<22} {s['kind']:<10} {s['count']}" for s in skew]
    return "\n".join(lines)


def _bin_labels(f: Mapping[str, Any]) -> list[str]:
    """Short, whole tick labels: the value range of each numeric bin (3 significant
    digits), or the category codes."""
    if f["kind"] != "numeric":
        return [str(c) for c in f.get("codes") or []] + ["unseen"]
    edges = [f"{e:.3g}" for e in f.get("edges") or []]
    if not edges:
        return ["all"]
    inner = [f"{a}..{b}" for a, b in itertools.pairwise(edges)]
    return [f"<{edges[0]}", *inner, f"≥{edges[-1]}"]


def plot_report(report: Mapping[str, Any], path: Path, top: int = 6) -> None:
    """Reference vs live histograms (proportions per coarse bin) of the most
    drifted features (largest PSI)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DriftCliError(PLOT_MISSING) from None
    features = [
        f
        for key in ("inputs", "outputs")
        for f in ((report.get(key) or {}).get("features") or [])
        if f.get("window_counts")
    ]
    features.sort(key=lambda f: -(f["psi"] if f["psi"] is not None else -1))
    features = features[:top]
    if not features:
        raise DriftCliError("nothing to plot: the window is empty")
    cols = min(3, len(features))
    rows = (len(features) + cols - 1) // cols
    fig = Figure(figsize=(5 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, f in enumerate(features):
        ax = fig.add_subplot(rows, cols, i + 1)
        ref = np.asarray(f["reference_counts"], dtype=float)
        cur = np.asarray(f["window_counts"], dtype=float)
        k = min(len(ref), len(cur))
        ref, cur = ref[:k] / max(ref.sum(), 1), cur[:k] / max(cur.sum(), 1)
        labels = (_bin_labels(f) + [""] * k)[:k]
        x = np.arange(k)
        ax.bar(x - 0.2, ref, width=0.4, label="reference")
        ax.bar(x + 0.2, cur, width=0.4, label="live")
        ax.set_xticks(x, labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_ylabel("share of rows", fontsize=8)
        ax.set_xlabel("bin" if f["kind"] == "numeric" else "category", fontsize=8)
        ax.set_title(f"{f['name']}  psi {_fmt(f['psi'])}  {f['verdict']}", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    version = report.get("version") or "(server's choice)"
    fig.suptitle(f"sluice drift: {report.get('model', '')} version {version}, reference vs live")
    fig.tight_layout()
    fig.savefig(str(path))


def drift_command(args: argparse.Namespace) -> int:
    try:
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise DriftCliError(PLOT_MISSING) from None
        report = _remote_report(args) if args.url else _offline_report(args)
        if args.plot:
            plot_report(report, Path(args.plot))
    except (DriftCliError, drift.ProfileError, SluiceError, OSError, ValueError) as exc:
        print(f"sluice drift: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    if args.plot:
        print(f"sluice drift: plot written to {args.plot}", file=sys.stderr)
    return 0


def _remote_report(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from sluice import client
    from sluice.proto import sluice_service_pb2 as spb
    from sluice.proto import sluice_service_pb2_grpc as spb_grpc

    tls = common.client_tls(args)
    with client.channel(args.url, tls=tls) as channel:
        stub = spb_grpc.SluiceServiceStub(channel)
        try:
            reply = stub.DriftReport(
                spb.DriftReportRequest(model_name=args.model, version=args.version or 0),
                timeout=args.timeout,
            )
        except grpc.RpcError as exc:
            details = exc.details() or ""
            hint = client.connection_hint(details, tls)
            raise DriftCliError(f"{exc.code().name}: {details}{hint}") from None
    return report_dict(reply)


def report_dict(reply: Any) -> dict[str, Any]:
    """A DriftReportResponse as the same dict the offline report is."""
    return {
        "model": reply.model_name,
        "version": reply.version,
        "available": reply.available,
        "reason": reply.reason,
        "window_seconds": reply.window_seconds,
        "inputs": _tensor_dict(reply.inputs) if reply.HasField("inputs") else None,
        "outputs": _tensor_dict(reply.outputs) if reply.HasField("outputs") else None,
        "quality": quality_dict(reply.quality) if reply.HasField("quality") else None,
        "schema_skew": [
            {"input": s.input, "kind": s.kind, "count": s.count} for s in reply.schema_skew
        ],
    }


def _tensor_dict(t: Any) -> dict[str, Any]:
    features = []
    for f in t.features:
        entry: dict[str, Any] = dict.fromkeys(drift_stats._FIELDS)
        entry.update(
            name=f.name,
            kind=f.kind,
            verdict=f.verdict,
            skew=list(f.skew),
            edges=list(f.edges),
            codes=list(f.codes),
            reference_counts=list(f.reference_counts),
            window_counts=list(f.window_counts),
        )
        entry.update(dict(f.statistics))
        features.append(entry)
    return {
        "rows": t.rows,
        "evaluated": t.evaluated,
        "drifted": t.drifted,
        "drift_share": t.drift_share if t.evaluated else None,
        "dataset": t.dataset,
        "features": features,
    }


def quality_dict(q: Any) -> dict[str, Any]:
    return {
        "available": q.available,
        "task": q.task,
        "labelled": q.labelled,
        "metrics": dict(q.metrics),
        "baseline": dict(q.baseline),
        "degraded": q.degraded,
        "reason": q.reason,
    }


def _offline_report(args: argparse.Namespace) -> dict[str, Any]:
    if not args.data:
        raise DriftCliError("without --url, give --data FILE to compare with the stored profile")
    repository = common.repository(args)
    version = args.version
    if not version:
        from sluice.repository.policy import version_dirs

        found = version_dirs(repository / args.model) if (repository / args.model).is_dir() else []
        if not found:
            raise DriftCliError(f"model '{args.model}' has no version folder in {repository}")
        version = max(found)
    tensors = drift.load(repository / args.model / str(version))
    if tensors is None:
        return {
            "model": args.model,
            "version": version,
            "available": False,
            "reason": "the version has no drift profile (run sluice profile)",
        }
    _, arrays, _, _ = _model_tensors(repository, args.model, version, Path(args.data), [])
    data = {_key(tp): arrays[_key(tp)] for tp in tensors if _key(tp) in arrays}
    keyed = [
        drift.TensorProfile(_key(tp), tp.output, tp.file, tp.features, tp.kinds, tp.profile)
        for tp in tensors
    ]
    report = drift.offline_report(keyed, data)
    report.update(model=args.model, version=version)
    return report


def register(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="store the reference (training) profile of a version's inputs and predictions",
        description="Profiles the model's inputs of shape [batch, d] (each column a "
        "feature) on FILE and runs the model on it to profile its outputs (the "
        "prediction profile). Inputs and outputs of rank > 2 and BYTES tensors are "
        "skipped. Writes drift_profile.bin, drift_profile_outputs.bin and "
        "drift_profile.json into <repository>/MODEL/VERSION; a serving version with "
        "them gets drift monitoring at its next load.",
    )
    p.add_argument("model", help="model name (its folder in the repository)")
    p.add_argument("version", type=int, help="the version to profile")
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help=".npy or .csv (rows x features, one-input models; a non-numeric first CSV "
        "line is a header) or .npz (one array per input name)",
    )
    common.add_repository_argument(p, writes=True)
    p.add_argument(
        "--categorical",
        action="append",
        default=[],
        metavar="NAME",
        help="a categorical input feature: INPUT[i], or f<i> for column i of the first "
        'input (also: config parameter drift_categorical="f3,f7"); repeatable',
    )
    p.add_argument("--bins", type=int, default=DEFAULT_BINS, help="coarse bins per numeric feature")
    p.add_argument(
        "--sketch-points",
        type=int,
        default=DEFAULT_SKETCH_POINTS,
        help="fine grid for KS/Wasserstein",
    )
    p.set_defaults(func=profile_command)

    d = sub.add_parser(
        "drift",
        help="drift report of a model: live from a server, or a data file offline",
        description="With --url, asks the running server (DriftReport RPC) for the "
        "current window. Otherwise compares --data FILE with the version's stored "
        "profile (no server).",
    )
    d.add_argument("model", help="model name")
    d.add_argument(
        "--version",
        type=int,
        default=0,
        help="0: the latest version (offline) or the server's choice (--url)",
    )
    d.add_argument("--url", metavar="HOST:PORT", help="ask the running server at this gRPC address")
    d.add_argument(
        "--model-repository", metavar="DIR", help="offline: " + common.REPOSITORY_READ_HELP
    )
    d.add_argument("--data", help="offline: the data to compare (.npy, .npz, .csv)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument(
        "--plot", metavar="FILE.png", help="reference vs live histograms (needs matplotlib)"
    )
    d.add_argument(
        "--timeout",
        type=float,
        default=defaults.CLIENT_TIMEOUT_S,
        metavar="SECONDS",
        help="--url: deadline of the DriftReport call",
    )
    common.add_tls_arguments(d)
    d.set_defaults(func=drift_command)
