"""sluice: high-performance inference serving for ONNX models.

The compiled core (`sluice._core`) is required: the server's tensor codecs and
clock run through it. Importing sluice without it fails with how to build it.
"""

from __future__ import annotations

__version__ = "0.1.0"

try:
    from sluice import _core
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sluice's compiled core (sluice._core) is missing or failed to load "
        f"({exc}). Build and install the package with `pip install .` from the "
        "source checkout (needs a C++17 compiler and CMake >= 3.18); importing "
        "from the source tree without building does not work."
    ) from exc

from sluice.errors import (
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SluiceError,
    UnavailableError,
)

__all__ = [
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "SluiceError",
    "UnavailableError",
    "__version__",
    "_core",
]
