"""Stubs for the compiled core (csrc/bindings)."""

from collections.abc import Iterable

from typing_extensions import Buffer

__version__: str

class StatusError(Exception):
    """args == (code_name, message); code names match sluice.errors.ErrorCode."""

def monotonic_ns() -> int: ...
def decode_bytes_tensor(data: Buffer, count: int, as_text: bool) -> list[str] | list[bytes]: ...
def encode_bytes_tensor(elements: Iterable[str | bytes]) -> bytes: ...
