"""What every command shares: the parser class (help with defaults), --url,
--timeout and the TLS options of a client, the repository rule, and --input
parsing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sluice import defaults

if TYPE_CHECKING:  # sluice.client imports grpc; commands import it when they run
    from sluice.client import ClientTls


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a meaningful
    default (not None, False or an empty list), unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


def add_url_arguments(parser: argparse.ArgumentParser) -> None:
    """--url, --timeout and the TLS options, the same for every command that
    talks to a server."""
    parser.add_argument(
        "--url",
        default=defaults.client_url(),
        metavar="HOST:PORT",
        help=f"the server's gRPC address (${defaults.URL_ENV} when set)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.CLIENT_TIMEOUT_S,
        metavar="SECONDS",
        help="deadline of each call",
    )
    add_tls_arguments(parser)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """How a client reaches a server started with --grpc-use-ssl (and
    --grpc-use-ssl-mutual): every command that opens a channel takes these."""
    group = parser.add_argument_group(
        "TLS", "for a server started with --grpc-use-ssl; plaintext without them"
    )
    group.add_argument(
        "--ssl",
        action="store_true",
        help="connect with TLS, trusting the system's CAs (implied by the options below)",
    )
    group.add_argument(
        "--root-cert",
        type=_readable_file,
        metavar="PEM",
        help="the CA that signed the server's certificate (default: the system's CAs)",
    )
    group.add_argument(
        "--client-cert",
        type=_readable_file,
        metavar="PEM",
        help="this client's certificate, for mutual TLS (with --client-key)",
    )
    group.add_argument(
        "--client-key",
        type=_readable_file,
        metavar="PEM",
        help="this client's private key, for mutual TLS (with --client-cert)",
    )


def _readable_file(value: str) -> Path:
    try:
        with open(value, "rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc.strerror}") from None
    return Path(value)


def check_tls_arguments(args: argparse.Namespace) -> None:
    """Raises ValueError when the TLS options cannot go together."""
    has_cert = getattr(args, "client_cert", None) is not None
    has_key = getattr(args, "client_key", None) is not None
    if has_cert != has_key:
        raise ValueError("--client-cert and --client-key go together (mutual TLS)")


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """The TLS settings given by add_tls_arguments' options; None: plaintext."""
    from sluice.client import ClientTls

    if not (args.ssl or args.root_cert or args.client_cert or args.client_key):
        return None
    return ClientTls(args.root_cert, args.client_cert, args.client_key)


REPOSITORY_READ_HELP = "repository folder (default: the bundled examples)"
# One rule for every command: those that write never default to the bundled
# examples, which live inside the installed package.
REPOSITORY_WRITE_HELP = "repository folder (required: commands that write have no default)"


def add_repository_argument(parser: argparse.ArgumentParser, *, writes: bool) -> None:
    """--model-repository by the one rule: required for commands that write."""
    parser.add_argument(
        "--model-repository",
        metavar="DIR",
        required=writes,
        help=REPOSITORY_WRITE_HELP if writes else REPOSITORY_READ_HELP,
    )


def repository(args: argparse.Namespace) -> Path:
    """The repository a command uses: --model-repository, else the bundled examples
    (only commands that read leave it out; see add_repository_argument)."""
    return Path(args.model_repository) if args.model_repository else defaults.EXAMPLES


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def print_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """A command group run without its subcommand prints its help (exit 2, bad usage)."""

    def show(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


class ArgumentParser(argparse.ArgumentParser):
    """Every sluice parser (subcommands included) shows defaults in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def parse_input(spec: str) -> tuple[str, np.ndarray[Any, Any]]:
    """NAME=<JSON array> or NAME=<file.npy>; ValueError says what is wrong."""
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--input wants NAME=<json or file.npy>, got {spec!r}")
    if value.endswith(".npy"):
        try:
            return name, np.load(value, allow_pickle=False)
        except OSError as exc:  # a missing file, or one that is not a .npy
            raise ValueError(f"--input {name}: cannot read {value}: {exc}") from None
    try:
        return name, np.asarray(json.loads(value))
    except json.JSONDecodeError as exc:
        raise ValueError(f"--input {name}: not a JSON array or a .npy file: {exc}") from None
