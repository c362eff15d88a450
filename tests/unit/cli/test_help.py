"""The command line explains itself: every option has help, defaults are shown,
and bad or incomplete usage gets a clean argparse message, never a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest
from sluice import cli

SUBCOMMANDS = {
    "serve",
    "infer",
    "bench",
    "models",
    "profile",
    "drift",
    "feedback",
    "package",
    "batch",
}
MODELS_SUBCOMMANDS = {"publish", "list", "show", "diff", "promote", "rollback"}


def parsers(
    parser: argparse.ArgumentParser, path: str = "sluice"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, f"{path} {name}")


def test_every_command_is_there() -> None:
    names = {path for path, _ in parsers(cli.build_parser())}
    assert {f"sluice {c}" for c in SUBCOMMANDS} <= names
    assert {f"sluice models {c}" for c in MODELS_SUBCOMMANDS} <= names


def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"{path}: {action.option_strings or action.dest}"
        for path, parser in parsers(cli.build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction)
        and not (action.help or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["serve"], ["(default: 8001)", "(default: 8002)", "(default: 127.0.0.1)"]),
        (["infer"], ["(default: 127.0.0.1:8001)", "(default: 30.0)"]),
        (["bench"], ["(default: 8)", "(default: 127.0.0.1:8001)", "(default: 30.0)"]),
        (["drift"], ["(default: 30.0)"]),
        (["models", "promote"], ["(default: stable)", "required"]),
        (["profile"], ["required", "(default: 10)"]),
    ],
)
def test_help_shows_defaults(
    argv: list[str],
    shown: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SLUICE_URL", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for expected in shown:
        assert expected in text


def test_url_default_follows_sluice_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_URL", "10.1.2.3:9001")
    args = cli.build_parser().parse_args(["infer", "m", "--random"])
    assert args.url == "10.1.2.3:9001"


def test_a_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--log-level", "nonsense", "models", "list"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'NONSENSE'" in err
    assert "Traceback" not in err
    assert cli.build_parser().parse_args(["--log-level", "debug", "models"]).log_level == "DEBUG"


@pytest.mark.parametrize(("argv", "listed"), [([], SUBCOMMANDS), (["models"], MODELS_SUBCOMMANDS)])
def test_a_command_group_alone_lists_its_subcommands(
    argv: list[str], listed: set[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    for name in listed:
        assert name in err
    assert "required" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["profile", "tabular_classifier", "1", "--data", "train.npy"],
        ["models", "publish", "m", "m.onnx"],
        ["models", "promote", "m", "1"],
        ["models", "rollback", "m"],
    ],
)
def test_commands_that_write_need_a_repository(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "--model-repository" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [("missing.npy", "missing.npy: [Errno 2]"), ("[1, 2", "not a JSON array or a .npy file")],
)
def test_infer_input_errors_are_messages_not_tracebacks(
    value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No server at that address: the inputs are read before any call.
    argv = ["infer", "m", "--input", f"x={tmp_path / value if value.endswith('.npy') else value}"]
    assert cli.main([*argv, "--url", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


TLS_OPTIONS = {"--ssl", "--root-cert", "--client-cert", "--client-key"}


def test_every_command_with_a_url_takes_the_tls_options() -> None:
    talks_to_a_server = {
        path: {o for action in parser._actions for o in action.option_strings}
        for path, parser in parsers(cli.build_parser())
        if "--url" in parser._option_string_actions and not path.endswith(" serve")
    }
    assert set(talks_to_a_server) >= {
        f"sluice {c}" for c in ("infer", "bench", "drift", "feedback", "batch")
    }
    lacking = {path: TLS_OPTIONS - options for path, options in talks_to_a_server.items()}
    assert {path: missing for path, missing in lacking.items() if missing} == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--client-cert", "{pem}"], "--client-cert and --client-key go together"),
        (["--client-key", "{pem}"], "--client-cert and --client-key go together"),
        (["--root-cert", "{missing}"], "argument --root-cert: cannot read"),
    ],
)
def test_tls_options_are_checked_before_any_connection(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pem = tmp_path / "some.pem"
    pem.write_text("not checked here\n")
    values = {"pem": str(pem), "missing": str(tmp_path / "missing.pem")}
    argv = ["drift", "m", "--url", "127.0.0.1:1", *[e.format(**values) for e in extra]]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
