"""Which versions of a model to serve: Triton's version_policy."""

from __future__ import annotations

from pathlib import Path

from sluice.proto import model_config_pb2 as mc


def version_dirs(model_dir: Path) -> list[int]:
    """Integer version folders, ascending. As in Triton, names that are not
    positive integers, or that start with '0', are not versions."""
    versions = []
    for child in model_dir.iterdir():
        name = child.name
        if child.is_dir() and name.isascii() and name.isdigit() and not name.startswith("0"):
            versions.append(int(name))
    return sorted(versions)


def select_versions(available: list[int], policy: mc.ModelVersionPolicy) -> list[int]:
    """The versions the policy asks for among `available` (ascending). Default:
    the latest one. A `specific` version that does not exist is skipped (the
    caller reports it)."""
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(available)
    if which == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available if v in wanted]
    n = policy.latest.num_versions if which == "latest" else 1
    return available[-max(1, n) :] if available else []
