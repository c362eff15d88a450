"""The README's commands run as written: every ```bash block line, every `$ `
line of a ```console block and the ```python block run, in README order,
against real servers.

A `sluice serve ...` line starts that server (its arguments, on free ports) and
points $SLUICE_URL / $SLUICE_METRICS_URL at it, as a user's shell would reach
the default ports; the commands after it run unchanged. The Python block runs
with its one address replaced. `pip install` lines are how this environment was
made (.ci/run runs them), and `pytest` is this run; they are checked to be
exactly those, so a new kind of line cannot slip through unrun."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ServerProcess

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Lines this test does not execute, and why (see the module docstring).
NOT_RUN = {'pip install ".[test]"', "pip install .", "pytest"}
DEFAULT_ADDRESS = "127.0.0.1:8001"


def readme_steps() -> list[tuple[str, str]]:
    """(kind, text) in README order: kind "sh" (one shell command) or "python"."""
    steps: list[tuple[str, str]] = []
    for m in FENCE.finditer(README.read_text()):
        lang, body = m.group(1), m.group(2)
        if lang == "bash":
            lines = [ln.strip() for ln in body.splitlines()]
            steps += [("sh", ln) for ln in lines if ln and not ln.startswith("#")]
        elif lang == "console":
            steps += [("sh", ln[2:].strip()) for ln in body.splitlines() if ln.startswith("$ ")]
        elif lang == "python":
            steps.append(("python", body))
    return steps


def test_readme_has_the_commands_a_new_user_runs() -> None:
    commands = [text for kind, text in readme_steps() if kind == "sh"]
    assert any(c.startswith("sluice serve") or "&& sluice serve" in c for c in commands)
    assert any("sluice infer image_classifier --input image=batch.npy" in c for c in commands)
    assert any(c.startswith("sluice bench") for c in commands)


def test_readme_commands_run_as_written(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    bin_dir = str(Path(sys.executable).parent)  # `sluice` and `python` of this environment
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    server: ServerProcess | None = None
    ran = 0
    for kind, text in readme_steps():
        if kind == "python":
            assert server is not None, "the README's Python example comes after a server"
            code = text.replace(DEFAULT_ADDRESS, server.url)
            done = subprocess.run(
                [sys.executable, "-c", code],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, f"README python block failed:\n{done.stderr}"
            ran += 1
            continue
        for part in (p.strip() for p in text.split("&&")):
            words = shlex.split(part.removesuffix("&").strip())
            if words[:2] == ["sluice", "serve"]:
                server = start_server(None, *words[2:])
                env["SLUICE_URL"] = server.url
                env["SLUICE_METRICS_URL"] = f"http://127.0.0.1:{server.http_port}/metrics"
                ran += 1
                continue
            if part in NOT_RUN:
                continue
            assert server is not None, f"{part!r} comes before any `sluice serve`"
            done = subprocess.run(
                ["bash", "-c", part],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, f"README command {part!r} failed:\n{done.stderr}"
            assert "Traceback" not in done.stderr, done.stderr
            ran += 1
    assert ran >= 6
