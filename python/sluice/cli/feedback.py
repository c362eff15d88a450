"""`sluice feedback MODEL --labels FILE`: ground truth for earlier requests, sent
over the Feedback RPC (concept drift; see sluice.monitoring.drift).

FILE is .csv (one line per request: `request_id,value[,value...]`, one value per
row of that request; a first line whose second field is not a number is a
header) or .json (an object: {"request id": [value, ...]})."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from sluice.cli.common import add_url_arguments, client_tls

CHUNK_LABELS = 1000  # labels per Feedback call: bounds one message
MAX_VALUES_PER_ID = 1 << 16


class FeedbackError(Exception):
    pass


def _number(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or isinstance(value, bool):
        raise FeedbackError(f"{where}: {value!r} is not a finite number")
    return number


def read_labels(path: Path) -> list[tuple[str, list[float]]]:
    """(request id, values) pairs, in file order."""
    if not path.is_file():
        raise FeedbackError(f"labels file {path} not found")
    suffix = path.suffix.lower()
    out: list[tuple[str, list[float]]] = []
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise FeedbackError(f"{path}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise FeedbackError(f'{path}: want an object {{"request id": [value, ...]}}')
        for rid, values in data.items():
            values = values if isinstance(values, list) else [values]
            out.append((rid, [_number(v, f"{path}: id {rid!r}") for v in values]))
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
        for i, row in enumerate(rows):
            if len(row) < 2:
                raise FeedbackError(f"{path}:{i + 1}: want request_id,value[,value...]")
            if i == 0:
                try:
                    float(row[1])
                except ValueError:
                    continue  # a header
            where = f"{path}:{i + 1}"
            out.append((row[0], [_number(v, where) for v in row[1:]]))
    else:
        raise FeedbackError(f"labels file {path}: want .csv or .json")
    for rid, values in out:
        if not rid:
            raise FeedbackError(f"{path}: an empty request id")
        if not values or len(values) > MAX_VALUES_PER_ID:
            raise FeedbackError(f"{path}: id {rid!r} has {len(values)} values")
    if not out:
        raise FeedbackError(f"{path}: no labels")
    return out


def feedback_command(args: argparse.Namespace) -> int:
    import grpc

    from sluice import client
    from sluice.cli.drift import quality_dict
    from sluice.proto import sluice_service_pb2 as spb
    from sluice.proto import sluice_service_pb2_grpc as spb_grpc

    try:
        labels = read_labels(Path(args.labels))
    except (FeedbackError, OSError) as exc:
        print(f"sluice feedback: {exc}", file=sys.stderr)
        return 2
    matched = unknown = 0
    quality: dict[str, Any] | None = None
    tls = client_tls(args)
    with client.channel(args.url, tls=tls) as channel:
        stub = spb_grpc.SluiceServiceStub(channel)
        for start in range(0, len(labels), CHUNK_LABELS):
            chunk = labels[start : start + CHUNK_LABELS]
            request = spb.FeedbackRequest(model_name=args.model, version=args.version)
            for rid, values in chunk:
                request.labels.add(request_id=rid, values=values)
            try:
                reply = stub.Feedback(request, timeout=args.timeout)
            except grpc.RpcError as exc:
                sent = f"; the server counted the {matched} label(s) before" if matched else ""
                details = exc.details() or ""
                hint = client.connection_hint(details, tls)
                print(
                    f"sluice feedback: {exc.code().name}: {details}{hint}{sent}",
                    file=sys.stderr,
                )
                return 1
            matched += reply.matched
            unknown += reply.unknown
            if reply.HasField("quality"):
                quality = quality_dict(reply.quality)
    result = {"model": args.model, "matched": matched, "unknown": unknown, "quality": quality}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"sluice feedback: {args.model}: {matched} matched, {unknown} unknown "
        "(ids never seen, forgotten, or of versions without a drift profile)"
    )
    if quality is not None and quality["available"]:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in quality["metrics"].items())
        state = "DEGRADED: " + quality["reason"] if quality["degraded"] else "ok"
        print(
            f"quality ({quality['task']}, {quality['labelled']} labelled rows): "
            f"{metrics or 'no labels yet'}; {state}"
        )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "feedback",
        help="send ground truth for earlier requests (concept drift)",
        description="Sends the labels in FILE over the Feedback RPC. Each label names the "
        "id of an earlier inference request and gives one value per row of it: the class "
        "index (classifiers) or the target (regressors). Only versions with a drift "
        "profile remember request ids.",
    )
    p.add_argument("model", help="model name")
    p.add_argument(
        "--labels",
        required=True,
        metavar="FILE",
        help='.csv (request_id,value[,value...] per line) or .json ({"request id": [value, ...]})',
    )
    p.add_argument(
        "--version",
        type=int,
        default=0,
        help="0: every loaded version that remembers the id",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_url_arguments(p)
    p.set_defaults(func=feedback_command)
