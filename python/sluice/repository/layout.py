"""The repository's trust boundary: which model names exist and which files a
model may use. Every path the server opens for a model goes through here.

Rules (Triton's):

* A model name is one path component: 1 to MAX_NAME_BYTES bytes of UTF-8, with
  no '/', '\\', NUL or other control character, and not starting with '.' (so
  never '.' or '..'; dot folders are also what the repository scan skips).
* Every file a model uses (its ONNX file, external data, warm-up data,
  labels.json, metadata.json, drift profiles) names a path *relative* to the
  model folder that, with symlinks resolved, stays inside that folder. The model
  folder itself may be a symlink: the operator put it there.
* Files read whole (warm-up data, labels, metadata, profiles) are regular files
  read with a size bound, opened non-blocking so a FIFO or device can never
  stall the loader.

Errors never say whether an outside path exists or how large it is: the same
message answers "absent" and "not allowed".
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sluice.errors import InvalidArgumentError, ModelLoadError

MAX_NAME_BYTES = 255  # one folder name on every common filesystem

# Whole-file reads: far above any real file of the kind, far below a memory risk.
MAX_SMALL_FILE_BYTES = 16 * 1024 * 1024  # labels.json, metadata.json, manifests
MAX_PROFILE_BYTES = 256 * 1024 * 1024  # a drift profile (histograms per feature)

# The registry's files in a model folder (sluice.repository.registry).
LABELS_FILENAME = "labels.json"  # <model>/labels.json
METADATA_FILENAME = "metadata.json"  # <model>/<version>/metadata.json


def name_problem(name: str) -> str | None:
    """Why `name` is not a model name, or None when it is one."""
    if not name:
        return "a model name cannot be empty"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "a model name must be valid UTF-8"
    if size > MAX_NAME_BYTES:
        return f"a model name is at most {MAX_NAME_BYTES} bytes, not {size}"
    if name.startswith("."):
        return "a model name cannot start with '.'"
    if "/" in name or "\\" in name:
        return "a model name is one folder name: no '/' or '\\'"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "a model name cannot hold NUL or other control characters"
    return None


def check_name(name: str) -> None:
    """Raises InvalidArgumentError (naming the model, escaped) for a bad name."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidArgumentError(f"invalid model name {_shown(name)}: {problem}")


def _shown(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def model_dir(repository: Path, name: str) -> Path:
    """The folder of model `name`; raises InvalidArgumentError for a bad name.
    The folder may not exist: callers say NOT_FOUND in their own words."""
    check_name(name)
    return repository / name


def inside(model_folder: Path, relative: str | Path, what: str) -> Path:
    """`relative` resolved under `model_folder`, symlinks followed. Raises
    ModelLoadError when it is absolute or resolves outside the model folder."""
    rel = Path(relative)
    text = str(relative)
    if not text or "\x00" in text or rel.is_absolute() or rel.drive:
        raise ModelLoadError(f"{what} {text!r} must be a path relative to the model folder")
    root = model_folder.resolve()
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root):
        raise ModelLoadError(f"{what} {text!r} is outside the model folder")
    return resolved


def model_file(model_folder: Path, version: int, filename: str, default: str) -> Path:
    """The ONNX file of `version`: `filename` (config default_model_filename, or
    `default`) inside `<model>/<version>/`. `filename` may be a folder holding
    `default` next to its external-data files, as Triton allows."""
    rel = Path(str(version)) / (filename or default)
    path = inside(model_folder, rel, "model file")
    if path.is_dir():
        path = inside(model_folder, rel / default, "model file")
    return path


def read_bounded(
    path: Path,
    max_bytes: int,
    what: str,
    *,
    expected_bytes: int | None = None,
) -> bytes:
    """The whole content of regular file `path`, at most `max_bytes` (exactly
    `expected_bytes` when given). Opened non-blocking and checked with fstat on
    the open descriptor, so a FIFO, a device or a swap after the check cannot
    block or flood the reader. Raises FileNotFoundError when it is absent and
    ModelLoadError when it breaks a rule."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"{what} is not a regular file")
        if expected_bytes is not None and st.st_size != expected_bytes:
            raise ModelLoadError(
                f"{what} holds {st.st_size} bytes; the declared tensor needs {expected_bytes}"
            )
        if st.st_size > max_bytes:
            raise ModelLoadError(f"{what} is {st.st_size} bytes; the limit is {max_bytes}")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        left = max_bytes + 1  # one more byte tells a file that grew past the bound
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes or (expected_bytes is not None and len(data) != expected_bytes):
        raise ModelLoadError(f"{what} changed size while it was read")
    return data


def read_text_file(path: Path, what: str, max_bytes: int = MAX_SMALL_FILE_BYTES) -> str:
    """A small UTF-8 file under a model folder (labels, metadata, manifest)."""
    return read_bounded(path, max_bytes, what).decode("utf-8")
