"""`sluice infer`: send one inference request and print the outputs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from sluice import datatypes
from sluice.cli.common import add_url_arguments, client_tls, parse_input


def _random_inputs(meta: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Generated data for every input (dynamic dims 1)."""
    rng = np.random.default_rng()
    return {
        t.name: datatypes.generated(
            datatypes.BY_WIRE[t.datatype], [d if d >= 0 else 1 for d in t.shape], rng
        )
        for t in meta.inputs
    }


def infer_command(args: argparse.Namespace) -> int:
    from sluice.client import ClientError, InferenceClient

    try:  # the inputs first: a typo in a file name needs no server to report
        given = [parse_input(spec) for spec in args.input]
    except ValueError as exc:
        print(f"sluice infer: {exc}", file=sys.stderr)
        return 2
    client = InferenceClient(args.url, timeout_s=args.timeout, tls=client_tls(args))
    try:
        meta = client.metadata(args.model, args.model_version)
        types = {t.name: t.datatype for t in meta.inputs}
        feeds = _random_inputs(meta) if args.random else {}
        for name, arr in given:
            if name in types and datatypes.BY_WIRE[types[name]].numpy is not None:
                dt = datatypes.BY_WIRE[types[name]]
                arr = arr.astype(object if dt.is_bytes else dt.numpy)
            feeds[name] = arr
        if not feeds:
            print(
                "sluice infer: give --input NAME=VALUE for each input, or --random", file=sys.stderr
            )
            return 2
        response, outputs = client.infer(args.model, feeds, args.model_version, args.output)
    except ClientError as exc:
        print(f"sluice infer: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"sluice infer: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    result = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": {
            name: {
                "datatype": t.datatype,
                "shape": list(t.shape),
                "data": [
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                    for v in arr.reshape(-1).tolist()
                ],
            }
            for (name, arr), t in zip(outputs.items(), response.outputs, strict=True)
        },
    }
    print(json.dumps(result, indent=2))
    return 0


def register(sub: Any) -> None:
    infer = sub.add_parser("infer", help="send one inference request and print the outputs")
    infer.add_argument("model", help="model name as served")
    infer.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a JSON array, or a .npy file with the full shape (batch dimension first for "
        "batching models); repeat per input",
    )
    infer.add_argument(
        "--random", action="store_true", help="random data for inputs not given (dynamic dims = 1)"
    )
    infer.add_argument(
        "--output",
        action="append",
        metavar="NAME",
        help="request only this output; repeatable (default: every output)",
    )
    infer.add_argument(
        "--model-version", default="", help="a version number (default: the server's choice)"
    )
    add_url_arguments(infer)
    infer.set_defaults(func=infer_command)
