"""The `sluice models` commands (parsers: sluice.cli.models). The work is done by
sluice.repository.registry (publish, inspect, labels); this module parses
KEY=VALUE options, renders tables and text, and maps errors to exit codes (0 ok,
1 failed, 2 bad usage)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sluice.cli import common
from sluice.repository.registry import inspect, publish
from sluice.repository.registry.errors import RegistryError, UsageError
from sluice.repository.registry.labels import CANARY, SHADOW, STABLE, Labels, promote, rollback

_SHA_PREFIX = 12
_WRITES = ("publish", "promote", "rollback")


def run(args: argparse.Namespace) -> int:
    """Runs the `sluice models` subcommand in `args`; returns the exit code."""
    command: str = args.models_command
    try:
        if command in _WRITES and not args.model_repository:
            # Never write into the installed package's bundled examples by default.
            raise UsageError(f"{command} needs --model-repository DIR")
        repository = common.repository(args)
        if not repository.is_dir():
            raise UsageError(f"model repository {repository} is not a directory")
        return _COMMANDS[command](repository, args)
    except UsageError as exc:
        _error(command, exc.message)
        return 2
    except RegistryError as exc:
        _error(command, exc.message)
        return 1
    except OSError as exc:  # permissions, a full disk: operational, no traceback
        _error(command, str(exc))
        return 1


def _error(command: str, message: str) -> None:
    print(f"sluice models {command}: {message}", file=sys.stderr)


def _warn(command: str, problems: Sequence[str]) -> None:
    for problem in problems:
        print(f"sluice models {command}: warning: {problem}", file=sys.stderr)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# ---- publish -----------------------------------------------------------------


def _pairs(specs: Sequence[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} wants KEY=VALUE, got {spec!r}")
        out[key] = value  # a repeated key: the last one wins, as on most CLIs
    return out


def _numbers(specs: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in _pairs(specs, "--metric").items():
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise UsageError(f"--metric {key} wants a finite number, got {value!r}")
        out[key] = number
    return out


def _publish(repository: Path, args: argparse.Namespace) -> int:
    result = publish.publish(
        repository,
        args.model,
        Path(args.file),
        source=args.source,
        params=_pairs(args.param, "--param"),
        metrics=_numbers(args.metric),
        tags=_pairs(args.tag, "--tag"),
    )
    _warn("publish", result.warnings)
    if args.profile:
        # The version is already visible; a polling server that loaded it first
        # reloads it once the profile's manifest lands (it is in the fingerprint).
        from sluice.cli.drift import profile_version

        code = profile_version(repository, args.model, result.version, Path(args.profile))
        if code != 0:
            return code
    if args.json:
        _print_json(
            {
                "model": args.model,
                "version": result.version,
                "path": str(result.path),
                "metadata": result.metadata,
                "warnings": list(result.warnings),
            }
        )
    else:
        print(f"published {args.model} version {result.version}: {result.path}")
    return 0


# ---- list --------------------------------------------------------------------


def _list(repository: Path, args: argparse.Namespace) -> int:
    data = inspect.list_models(repository)
    for model in data["models"]:
        _warn("list", [f"model '{model['name']}': {p}" for p in model["problems"]])
    if args.json:
        _print_json(data)
        return 0
    rows = [
        [
            model["name"],
            str(v["version"]),
            (v["sha256"] or "-")[:_SHA_PREFIX],
            v["created"] or "-",
            v["source"] or "-",
            _version_labels(model["labels"], v["version"]),
        ]
        for model in data["models"]
        for v in model["versions"] or [_NO_VERSION]
    ]
    print(_table(["MODEL", "VERSION", "SHA256", "CREATED", "SOURCE", "LABELS"], rows))
    return 0


_NO_VERSION: dict[str, Any] = {"version": "-", "sha256": None, "created": None, "source": None}


def _version_labels(labels: dict[str, Any], version: object) -> str:
    """'stable', 'canary 10% sticky', 'shadow 20%', joined by commas."""
    names = []
    if labels.get(STABLE) == version:
        names.append("stable")
    canary = labels.get(CANARY)
    if canary is not None and canary["version"] == version:
        names.append(
            f"canary {_percent(canary['weight'])}" + (" sticky" if canary["sticky"] else "")
        )
    shadow = labels.get(SHADOW)
    if shadow is not None and shadow["version"] == version:
        names.append(f"shadow {_percent(shadow['sample'])}")
    return ", ".join(names)


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [headers, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


# ---- show --------------------------------------------------------------------


def _show(repository: Path, args: argparse.Namespace) -> int:
    data = inspect.show(repository, args.model, args.version)
    _warn("show", data["problems"])
    if args.json:
        _print_json(data)
    else:
        print(_show_text(data))
    return 0


def _show_text(data: dict[str, Any]) -> str:
    labels = f" ({', '.join(data['labels'])})" if data["labels"] else ""
    lines = [f"{data['model']} version {data['version']}{labels}", f"path: {data['path']}"]
    metadata = data["metadata"]
    lines.append(f"sha256: {data['sha256'] or '-'}")
    if metadata is None:
        lines.append("metadata: none (not published with sluice); signature read from the file")
    else:
        for key in ("created", "source", "parent", "sluice_version"):
            lines.append(f"{key}: {_scalar(metadata.get(key))}")
        for key in ("params", "metrics", "tags"):
            values = metadata.get(key) or {}
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            lines.append(f"{key}: {shown or '-'}")
    lines += _signature_lines(data["signature"])
    if data["config"] is not None:
        lines.append(f"config ({data['config_file']}):")
        lines += ["  " + line for line in data["config"].rstrip().splitlines()]
    return "\n".join(lines)


def _scalar(value: Any) -> str:
    return "-" if value is None else str(value)


def _signature_lines(signature: dict[str, Any] | None) -> list[str]:
    if signature is None:
        return ["signature: unknown (the file does not load)"]
    lines = []
    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        lines += [f"  {_tensor_text(t)}" for t in signature[kind]]
    return lines


def _tensor_text(tensor: dict[str, Any]) -> str:
    return f"{tensor['name']} {tensor['datatype']} {tensor['shape']}"


# ---- diff --------------------------------------------------------------------


def _diff(repository: Path, args: argparse.Namespace) -> int:
    data = inspect.diff(repository, args.model, args.old, args.new)
    _warn("diff", data["problems"])
    if args.json:
        _print_json(data)
    else:
        print(_diff_text(data))
    return 0  # a difference is an answer, not a failure


def _diff_text(data: dict[str, Any]) -> str:
    lines = [f"{data['model']}: version {data['from']} -> {data['to']}"]
    lines += _signature_diff_lines(data["signature"]) or ["  signature: unchanged"]
    meta = data["metadata"]
    for name, change in meta["fields"].items():
        lines.append(f"  {name}: {_scalar(change['from'])} -> {_scalar(change['to'])}")
    for kind, singular in (("params", "param"), ("metrics", "metric"), ("tags", "tag")):
        lines += _map_diff_lines(meta[kind], singular)
    return "\n".join(lines)


def _signature_diff_lines(signature: dict[str, Any]) -> list[str]:
    lines = []
    for kind, singular in (("inputs", "input"), ("outputs", "output")):
        d = signature[kind]
        lines += [f"  + {singular} {_tensor_text(t)}" for t in d["added"]]
        lines += [f"  - {singular} {_tensor_text(t)}" for t in d["removed"]]
        for c in d["changed"]:
            parts = [f"{k} {c[k]['from']} -> {c[k]['to']}" for k in ("datatype", "shape") if k in c]
            lines.append(f"  ~ {singular} {c['name']}: {'; '.join(parts)}")
    return lines


def _map_diff_lines(d: dict[str, Any], singular: str) -> list[str]:
    lines = [f"  + {singular} {k}={v}" for k, v in d["added"].items()]
    lines += [f"  - {singular} {k}={v}" for k, v in d["removed"].items()]
    for key, c in d["changed"].items():
        delta = f" ({c['delta']:+g})" if "delta" in c else ""
        lines.append(f"  ~ {singular} {key}: {c['from']} -> {c['to']}{delta}")
    return lines


# ---- promote, rollback ---------------------------------------------------------


def _promote(repository: Path, args: argparse.Namespace) -> int:
    labels = promote(
        repository,
        args.model,
        args.version,
        label=args.label,
        weight=args.weight,
        sticky=args.sticky,
        sample=args.sample,
    )
    print(f"{args.model}: {_labels_text(labels)}")
    return 0


def _rollback(repository: Path, args: argparse.Namespace) -> int:
    before, after = rollback(repository, args.model)
    cleared = f"; canary {before.canary.version} cleared" if before.canary is not None else ""
    print(f"{args.model}: stable {before.stable} -> {after.stable}{cleared}")
    return 0


def _labels_text(labels: Labels) -> str:
    parts = [f"stable {_scalar(labels.stable)}"]
    if labels.canary is not None:
        sticky = ", sticky" if labels.canary.sticky else ""
        parts.append(f"canary {labels.canary.version} ({_percent(labels.canary.weight)}{sticky})")
    if labels.shadow is not None:
        parts.append(f"shadow {labels.shadow.version} ({_percent(labels.shadow.sample)})")
    return ", ".join(parts)


_COMMANDS: dict[str, Callable[[Path, argparse.Namespace], int]] = {
    "publish": _publish,
    "list": _list,
    "show": _show,
    "diff": _diff,
    "promote": _promote,
    "rollback": _rollback,
}
