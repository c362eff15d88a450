"""Finding a model and its versions in a repository, for the registry's
commands: names follow layout's rule, and what is missing is an error that
says what exists."""

from __future__ import annotations

from pathlib import Path

from sluice.repository import layout
from sluice.repository.policy import version_dirs
from sluice.repository.registry.errors import RegistryError, UsageError


def check_model_name(name: str) -> None:
    """A model name is one folder name that the server does not skip (layout's rule)."""
    problem = layout.name_problem(name)
    if problem is not None:
        raise UsageError(f"{name!r} is not a model name: {problem}")


def existing_model(repository: Path, model: str) -> Path:
    """The folder of `model`, which must exist in `repository`."""
    check_model_name(model)
    require_dir(repository, "model repository")
    model_dir = repository / model
    if not model_dir.is_dir():
        raise RegistryError(f"no model '{model}' in {repository}")
    return model_dir


def resolve_version(model_dir: Path, model: str, version: int | None) -> int:
    """`version` if the model has it; None means the latest."""
    versions = version_dirs(model_dir)
    if not versions:
        raise RegistryError(f"model '{model}' has no version folders")
    if version is None:
        return versions[-1]
    require_version(model_dir, model, version, versions)
    return version


def require_version(
    model_dir: Path, model: str, version: int, versions: list[int] | None = None
) -> None:
    """Raises RegistryError listing the versions there are when `version` is not one."""
    versions = version_dirs(model_dir) if versions is None else versions
    if version not in versions:
        shown = ", ".join(map(str, versions)) or "none"
        raise RegistryError(f"model '{model}' has no version {version} (versions: {shown})")


def require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise RegistryError(f"{what} {path} is not a directory")
