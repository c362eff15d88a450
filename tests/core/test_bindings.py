"""The compiled core through its bindings: BYTES codec, clock, status errors."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import sluice
from hypothesis import given
from hypothesis import strategies as st
from sluice import _core
from sluice.errors import InvalidArgumentError
from sluice.server.errors import as_sluice_error


def test_core_is_a_compiled_extension() -> None:
    assert Path(_core.__file__).suffix in (".so", ".pyd")
    assert _core.__version__ == sluice.__version__


def test_bytes_round_trip_text_and_binary() -> None:
    elements = ["", "plain", "héllo wörld", "日本語"]
    buf = _core.encode_bytes_tensor(elements)
    assert buf[:4] == b"\x00\x00\x00\x00"
    assert _core.decode_bytes_tensor(buf, len(elements), True) == elements
    binary = [b"\x00\xff\x10", b""]
    assert _core.decode_bytes_tensor(_core.encode_bytes_tensor(binary), 2, False) == binary


@given(st.lists(st.binary(max_size=64), max_size=50))
def test_bytes_round_trip_property(elements: list[bytes]) -> None:
    buf = _core.encode_bytes_tensor(elements)
    assert len(buf) == sum(4 + len(e) for e in elements)
    assert _core.decode_bytes_tensor(buf, len(elements), False) == elements


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=20))
def test_decode_never_crashes_on_garbage(data: bytes, count: int) -> None:
    try:
        out = _core.decode_bytes_tensor(data, count, False)
    except _core.StatusError as exc:
        code = exc.args[0]
    else:
        code = "ok"
        assert len(out) == count
    assert code in ("ok", "invalid_argument")


def test_decode_accepts_memoryview_and_numpy_buffers() -> None:
    buf = _core.encode_bytes_tensor([b"ab", b"c"])
    assert _core.decode_bytes_tensor(memoryview(buf), 2, False) == [b"ab", b"c"]
    assert _core.decode_bytes_tensor(np.frombuffer(buf, np.uint8), 2, False) == [b"ab", b"c"]


def test_errors_carry_neutral_codes_that_map_to_sluice_errors() -> None:
    with pytest.raises(_core.StatusError) as info:
        _core.decode_bytes_tensor(b"\x64\x00\x00\x00xyz", 1, False)
    assert info.value.args == (
        "invalid_argument",
        "BYTES element 0 declares 100 bytes but only 3 remain",
    )
    mapped = as_sluice_error(info.value)
    assert isinstance(mapped, InvalidArgumentError)


def test_invalid_utf8_is_rejected_as_text_but_kept_as_bytes() -> None:
    buf = _core.encode_bytes_tensor([b"ok", b"\xff\xfe"])
    with pytest.raises(_core.StatusError, match="element 1 is not valid UTF-8"):
        _core.decode_bytes_tensor(buf, 2, True)
    assert _core.decode_bytes_tensor(buf, 2, False) == [b"ok", b"\xff\xfe"]


def test_encode_rejects_non_string_elements() -> None:
    with pytest.raises(_core.StatusError, match="must be str or bytes"):
        _core.encode_bytes_tensor(["a", 3])  # type: ignore[list-item]


def test_monotonic_clock_is_monotonic_across_threads() -> None:
    seen: list[list[int]] = [[] for _ in range(4)]

    def sample(out: list[int]) -> None:
        out.extend(_core.monotonic_ns() for _ in range(2000))

    threads = [threading.Thread(target=sample, args=(s,)) for s in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in seen:
        assert all(b >= a for a, b in itertools.pairwise(s))


def test_import_without_core_says_how_to_build(tmp_path: Path) -> None:
    package = Path(sluice.__file__).parent
    copy = tmp_path / "sluice"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_core*.so", "_core*.pyd"))
    result = subprocess.run(
        [sys.executable, "-c", "import sluice"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path)},
        check=False,
    )
    assert result.returncode != 0
    assert "sluice._core" in result.stderr
    assert "pip install ." in result.stderr
