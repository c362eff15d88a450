"""The registry's errors; `sluice models` maps them to exit codes."""

from __future__ import annotations

from sluice.errors import SluiceError


class RegistryError(SluiceError):
    """An operation that cannot be done (missing model or version, a file that
    does not load, an I/O failure). The CLI exits 1."""


class UsageError(RegistryError):
    """A malformed request (bad model name, weight outside [0, 1]). The CLI exits 2."""


def reason(exc: Exception) -> str:
    """An exception's message without the class name."""
    return exc.message if isinstance(exc, SluiceError) else str(exc)
