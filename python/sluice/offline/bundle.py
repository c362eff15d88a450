"""A bundle's files: checksums, the ed25519 signature, durable writes.

A bundle is a model folder (a one-model repository when its parent is served)
with ``manifest.json``, ``SHA256SUMS`` (one ``<sha256>  <relative path>`` line
per file, sorted, every file but itself and the signature) and, when signed,
``SHA256SUMS.sig`` (the raw 64-byte ed25519 signature of ``SHA256SUMS``).
Signing the sums file covers the manifest and every model file at once; a file
added after packaging is refused by verify because it is not listed.

Keys are PEM files as `openssl genpkey -algorithm ed25519` writes them (PKCS#8
private key; `openssl pkey -pubout` gives the SubjectPublicKeyInfo public key).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from sluice.errors import SluiceError

SUMS_FILENAME = "SHA256SUMS"
SIGNATURE_FILENAME = "SHA256SUMS.sig"
MANIFEST_FILENAME = "manifest.json"
_CHUNK_BYTES = 1 << 20


class BundleError(SluiceError):
    """A bundle that cannot be built or does not verify."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every regular file under root as a relative POSIX path, sorted, except the
    sums file and its signature. Links are refused: a bundle travels as plain files."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*filenames, *dirnames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise BundleError(f"{path.relative_to(root)} is a link; a bundle holds plain files")
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in (SUMS_FILENAME, SIGNATURE_FILENAME):
                found.append(rel)
    return sorted(found)


def write_sums(root: Path) -> bytes:
    """Writes SHA256SUMS for every file of the bundle; returns its bytes."""
    lines = [f"{sha256_file(root / rel)}  {rel}\n" for rel in bundle_files(root)]
    data = "".join(lines).encode("utf-8")
    write_durably(root / SUMS_FILENAME, data)
    return data


def read_sums(root: Path) -> tuple[bytes, dict[str, str]]:
    path = root / SUMS_FILENAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{SUMS_FILENAME} cannot be read: {exc.strerror}") from None
    sums: dict[str, str] = {}
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel:
            raise BundleError(f"{SUMS_FILENAME} line {number} is malformed")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise BundleError(f"{SUMS_FILENAME} line {number} names a path outside the bundle")
        sums[rel] = digest
    return data, sums


def check_sums(root: Path) -> tuple[bytes, list[str]]:
    """Problems with the bundle's files against SHA256SUMS (changed, missing or
    unlisted files); an empty list when every file matches."""
    data, sums = read_sums(root)
    problems: list[str] = []
    present = set(bundle_files(root))
    for rel, digest in sums.items():
        if rel not in present:
            problems.append(f"{rel}: listed in {SUMS_FILENAME} but missing")
        elif sha256_file(root / rel) != digest:
            problems.append(f"{rel}: sha256 differs from {SUMS_FILENAME} (the file was changed)")
    problems += [f"{rel}: not listed in {SUMS_FILENAME}" for rel in sorted(present - set(sums))]
    return data, problems


def _load_private_key(path: Path) -> object:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"signing key {path.name}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"signing key {path.name} is not an ed25519 private key")
    return key


def public_key_id(private_key_path: Path) -> str:
    """sha256 of the raw public key: which key signed, written in the manifest."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _load_private_key(private_key_path)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(root: Path, sums: bytes, private_key_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _load_private_key(private_key_path)
    assert isinstance(key, Ed25519PrivateKey)
    write_durably(root / SIGNATURE_FILENAME, key.sign(sums))


def check_signature(root: Path, sums: bytes, public_key_path: Path) -> None:
    """Raises BundleError unless SHA256SUMS.sig is the key's signature of `sums`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(public_key_path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"public key {public_key_path.name}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"public key {public_key_path.name} is not an ed25519 key")
    try:
        signature = (root / SIGNATURE_FILENAME).read_bytes()
    except OSError:
        raise BundleError(f"the bundle is not signed (no {SIGNATURE_FILENAME})") from None
    try:
        key.verify(signature, sums)
    except InvalidSignature:
        raise BundleError(
            f"{SIGNATURE_FILENAME} is not a signature of {SUMS_FILENAME} by this key "
            "(wrong key, or the sums were changed)"
        ) from None


# ---- durable files -------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Writes through a temporary file, fsynced, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_tarball(root: Path, target: Path) -> None:
    """`target` (.tar.gz) holding the bundle folder under its own name, written
    to a temporary file and renamed into place."""
    tmp = target.with_name(f".{target.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(root, arcname=root.name, recursive=True)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
