"""Durable files for the registry's writers: atomic replacement, fsynced copies
and folders, and the per-folder lock that serializes sluice's writers."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

if sys.platform != "win32":
    import fcntl

_CHUNK = 1 << 20


def now() -> str:
    """The wall-clock time for a record (UTC, ISO 8601, seconds); never for durations."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_durably(src: Path, dst: Path) -> str:
    """Copies and fsyncs `src`; returns the sha256 of the bytes written, so the
    recorded digest is that of the stored file even if `src` changes meanwhile."""
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def write_durably(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: Path, data: bytes) -> None:
    # Not tempfile.mkstemp: its 0600 mode would hide the file from a server
    # running as another user. O_EXCL with 0666 honours the umask instead.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Makes the folder's entries (a rename, a new file) durable."""
    if sys.platform == "win32":
        return  # folders cannot be opened there; NTFS journals renames anyway
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Serializes sluice's writers of one folder: version numbering in publish,
    read-modify-write of labels.json. It is an advisory flock on the folder
    itself, so it leaves no lock file behind. Closing the descriptor releases it."""
    if sys.platform == "win32":
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
