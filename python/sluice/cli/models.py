"""`sluice models ...`: publish versions into a repository, inspect them, and
label the versions the server routes to. The parsers are here; the commands
(sluice.cli.registry_commands) load only when one runs, since the registry
imports onnxruntime."""

from __future__ import annotations

import argparse
from typing import Any

from sluice.cli import common


def run_command(args: argparse.Namespace) -> int:
    from sluice.cli import registry_commands

    result: int = registry_commands.run(args)
    return result


def register(sub: Any) -> None:
    models = sub.add_parser("models", help="model registry: publish versions, inspect, label")
    models_sub = models.add_subparsers(dest="models_command", metavar="COMMAND")
    models.set_defaults(func=common.print_help(models))
    models_read = common.ArgumentParser(add_help=False)
    common.add_repository_argument(models_read, writes=False)
    models_write = common.ArgumentParser(add_help=False)
    common.add_repository_argument(models_write, writes=True)
    models_publish = models_sub.add_parser(
        "publish",
        parents=[models_write],
        help="add the next version atomically, with lineage in metadata.json",
    )
    models_publish.add_argument("model", help="model name (a new one is created)")
    models_publish.add_argument(
        "--profile",
        metavar="DATA",
        help="also store the drift reference profile of the new version from DATA "
        "(.npy, .npz, .csv; see `sluice profile`)",
    )
    models_publish.add_argument("file", metavar="FILE.onnx", help="the model file to publish")
    models_publish.add_argument("--source", help="where the file came from (default: its name)")
    for option, meta, text in (
        ("--param", "KEY=VALUE", "a training parameter"),
        ("--metric", "KEY=NUMBER", "an evaluation metric"),
        ("--tag", "KEY=VALUE", "a tag"),
    ):
        models_publish.add_argument(
            option, action="append", default=[], metavar=meta, help=f"{text}; repeatable"
        )
    models_list = models_sub.add_parser(
        "list", parents=[models_read], help="models, versions, lineage and labels"
    )
    models_show = models_sub.add_parser(
        "show", parents=[models_read], help="one version's metadata, signature and config"
    )
    models_show.add_argument("model", help="model name")
    models_show.add_argument("version", type=int, nargs="?", help="default: the latest")
    models_diff = models_sub.add_parser(
        "diff", parents=[models_read], help="signature and lineage changes between versions"
    )
    models_diff.add_argument("model", help="model name")
    models_diff.add_argument("old", type=int, metavar="V1", help="the version to compare from")
    models_diff.add_argument("new", type=int, metavar="V2", help="the version to compare to")
    models_promote = models_sub.add_parser(
        "promote", parents=[models_write], help="label a version stable, canary or shadow"
    )
    models_promote.add_argument("model", help="model name")
    models_promote.add_argument("version", type=int, help="the version to label")
    models_promote.add_argument(
        "--label",
        choices=("stable", "canary", "shadow"),
        default="stable",
        help="stable: serves unversioned requests; canary: gets --weight of them; "
        "shadow: gets a mirrored --sample of them, answers discarded",
    )
    models_promote.add_argument(
        "--weight", type=float, help="canary: share of unversioned requests, in [0, 1]"
    )
    models_promote.add_argument(
        "--sticky", action="store_true", help="canary: a request id always gets the same arm"
    )
    models_promote.add_argument(
        "--sample", type=float, help="shadow: share of requests mirrored to it, in [0, 1]"
    )
    models_rollback = models_sub.add_parser(
        "rollback",
        parents=[models_write],
        help="set stable back to the previous stable version and clear the canary",
    )
    models_rollback.add_argument("model", help="model name")
    for json_parser in (models_publish, models_list, models_show, models_diff):
        json_parser.add_argument("--json", action="store_true", help="print JSON")
    for command in models_sub.choices.values():
        command.set_defaults(func=run_command)
