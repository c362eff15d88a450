"""Unit tests of the offline pieces that need no model: bundle sums and their
trust boundary, the validation comparison, and the batch readers' errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sluice import cli
from sluice.offline import batch_io, bundle, packaging


def _bundle(root: Path) -> Path:
    (root / "1").mkdir(parents=True)
    (root / "1" / "model.onnx").write_bytes(b"model")
    (root / "manifest.json").write_text("{}")
    bundle.write_sums(root)
    return root


def test_sums_list_every_file_but_themselves(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    _, sums = bundle.read_sums(root)
    assert sorted(sums) == ["1/model.onnx", "manifest.json"]
    assert bundle.check_sums(root)[1] == []


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "1/../../x"])
def test_sums_naming_a_path_outside_the_bundle_are_refused(tmp_path: Path, name: str) -> None:
    root = _bundle(tmp_path / "b")
    with (root / bundle.SUMS_FILENAME).open("a") as f:
        f.write(f"{'0' * 64}  {name}\n")
    with pytest.raises(bundle.BundleError, match="outside the bundle"):
        bundle.read_sums(root)


def test_a_link_in_a_bundle_is_refused(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(bundle.BundleError, match="is a link"):
        bundle.bundle_files(root)


def test_compare_kinds_and_thresholds() -> None:
    ref = {
        "scores": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32),
        "label": np.array([[0], [1], [0]], dtype=np.int64),
        "value": np.array([[1.0], [2.0], [3.0]], dtype=np.float32),
    }
    got = {
        "scores": np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], dtype=np.float32),
        "label": np.array([[0], [1], [1]], dtype=np.int64),
        "value": np.array([[1.0], [2.0], [3.3]], dtype=np.float32),
    }
    results = packaging.compare(ref, got, 0.5, None)
    assert results["scores"]["kind"] == "classifier"
    assert results["scores"]["agreement"] == pytest.approx(2 / 3)
    assert results["scores"]["passed"]
    assert results["label"]["kind"] == "labels"
    assert results["label"]["agreement"] == pytest.approx(2 / 3)
    assert results["value"]["kind"] == "values"
    assert results["value"]["max_abs_error"] == pytest.approx(0.3, rel=1e-5)
    # Default limit: 5 % of the reference's standard deviation (0.816): 0.041 < 0.1 mean error.
    assert not results["value"]["passed"]
    assert packaging.compare(ref, got, 0.5, 0.2)["value"]["passed"]
    assert not packaging.compare(ref, got, 0.9, None)["scores"]["passed"]


def test_csv_reader_names_lines_past_empty_ones(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("id,a,b\n\n1,0.5,1.5\n\n2,0.25,oops\n")
    spec = batch_io.InputSpec("x", np.dtype(np.float32), (2,))
    reader = batch_io.open_reader(path, [spec], ["id"])
    with pytest.raises(batch_io.BatchInputError, match=r"line 5 \(data row 1\): b is 'oops'"):
        list(reader.chunks(10))


def test_integer_input_refuses_fractions(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("1,2\n3,4.5\n")
    spec = batch_io.InputSpec("x", np.dtype(np.int32), (2,))
    reader = batch_io.open_reader(path, [spec], [])
    with pytest.raises(batch_io.BatchInputError, match="row 1: input 'x' wants integers"):
        list(reader.chunks(10))


def test_npy_shape_is_checked_against_the_model(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 3), dtype=np.float32))
    spec = batch_io.InputSpec("x", np.dtype(np.float32), (8,))
    reader = batch_io.open_reader(path, [spec], [])
    with pytest.raises(batch_io.BatchInputError, match=r"shape \[3\], the model wants \[8\]"):
        list(reader.chunks(2))


def test_package_without_output_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["package", "some_model", "1"]) == 2
    assert "give --model-repository DIR and -o OUT" in capsys.readouterr().err
