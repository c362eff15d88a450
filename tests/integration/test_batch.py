"""`sluice batch`: equal to onnxruntime row by row, order and --keep columns kept,
every input and output format, memory bounded by the chunk size, resume after
a stop or a kill, a malformed row named with nothing written as final, scoring
through a running server, and the drift report `sluice drift` would print."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ServerProcess
from sluice import cli
from sluice.offline import batch

EXAMPLES = Path(cli.__file__).resolve().parent / "examples" / "models"
TABULAR = "tabular_classifier"
IMAGE = "image_classifier"
Array = np.ndarray[Any, Any]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["batch", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _ort(model: str, feeds: dict[str, Array]) -> list[Array]:
    session = ort.InferenceSession(
        str(EXAMPLES / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    outputs: list[Array] = session.run(None, feeds)
    return outputs


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch-repo")
    for name in (TABULAR, IMAGE):
        shutil.copytree(EXAMPLES / name, root / name)
    return root


def _features(rows: int, seed: int = 0) -> Array:
    return np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)


def _write_csv(path: Path, x: Array, ids: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", *[f"f{i}" for i in range(x.shape[1])]])
        for rid, row in zip(ids, x.tolist(), strict=True):
            w.writerow([rid, *[repr(v) for v in row]])


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def test_csv_equals_onnxruntime_row_by_row_in_order(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = _features(1000)
    ids = [f"row-{(i * 7919) % 1000:04d}" for i in range(1000)]  # not sorted: order must hold
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    _write_csv(src, x, ids)
    rc, out, err = _run(
        capsys,
        TABULAR, "--model-repository", str(repo), "--input", str(src), "--output", str(dst),
        "--keep", "id", "--chunk-rows", "128",
    )  # fmt: skip
    assert rc == 0, err
    assert "scored 1000 rows" in out
    header, rows = _read_csv(dst)
    assert header == ["id", "probabilities[0]", "probabilities[1]", "probabilities[2]", "label"]
    assert [r["id"] for r in rows] == ids
    probabilities, label = _ort(TABULAR, {"features": x})
    got = np.array([[float(r[f"probabilities[{i}]"]) for i in range(3)] for r in rows])
    for i in range(len(x)):  # row by row: the i-th output row is the i-th input row's
        np.testing.assert_allclose(got[i], probabilities[i], rtol=1e-5, atol=1e-7)
        assert int(rows[i]["label"]) == int(label[i, 0])


def test_npy_to_npy_equals_onnxruntime(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(1).standard_normal((130, 3, 32, 32)).astype(np.float32)
    src, dst = tmp_path / "images.npy", tmp_path / "scores.npy"
    np.save(src, x)
    rc, _, err = _run(
        capsys,
        IMAGE, "--model-repository", str(repo), "--input", str(src), "--output", str(dst),
        "--chunk-rows", "50",
    )  # fmt: skip
    assert rc == 0, err
    (want,) = _ort(IMAGE, {"image": x})
    np.testing.assert_allclose(np.load(dst), want, rtol=1e-5, atol=1e-7)
    assert not batch.workdir_of(dst).exists()


def test_npz_and_parquet_round_trip_with_kept_columns(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pa = pytest.importorskip("pyarrow", reason="Parquet needs the parquet extra (pyarrow)")
    import pyarrow.parquet as pq

    x = _features(300, seed=2)
    ids = np.arange(1000, 1300, dtype=np.int64)
    probabilities, label = _ort(TABULAR, {"features": x})
    npz_in, npz_out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(npz_in, features=x, customer=ids)
    rc, _, err = _run(
        capsys,
        TABULAR, "--model-repository", str(repo), "--input", str(npz_in),
        "--output", str(npz_out), "--keep", "customer", "--chunk-rows", "64",
    )  # fmt: skip
    assert rc == 0, err
    with np.load(npz_out) as z:
        assert sorted(z.files) == ["customer", "label", "probabilities"]
        np.testing.assert_array_equal(z["customer"], ids)
        np.testing.assert_allclose(z["probabilities"], probabilities, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(z["label"], label)

    table = pa.table({"customer": ids, **{f"f{i}": x[:, i] for i in range(8)}})
    pq_in, pq_out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, pq_in, row_group_size=70)
    rc, _, err = _run(
        capsys,
        TABULAR, "--model-repository", str(repo), "--input", str(pq_in),
        "--output", str(pq_out), "--keep", "customer", "--chunk-rows", "64",
    )  # fmt: skip
    assert rc == 0, err
    result = pq.read_table(pq_out)
    assert result.column_names == ["customer", "probabilities", "label"]
    np.testing.assert_array_equal(result.column("customer").to_numpy(), ids)
    got = np.stack(result.column("probabilities").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, probabilities, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.column("label").to_numpy(), label[:, 0])


def _traced_peak_bytes(options: batch.BatchOptions) -> int:
    tracemalloc.start()
    try:
        result = batch.run(options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.complete
    return peak


def test_file_three_times_the_memory_cap_streams_in_chunks(repo: Path, tmp_path: Path) -> None:
    # The chunk size is the memory cap: a file of 3 chunks and a bit must
    # complete with the memory a one-chunk file needs, not three times it.
    cap_rows = 2000
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    x = _features(3 * cap_rows + 17, seed=3)
    _write_csv(small, x[:cap_rows], [str(i) for i in range(cap_rows)])
    _write_csv(large, x, [str(i) for i in range(len(x))])

    def options(src: Path) -> batch.BatchOptions:
        return batch.BatchOptions(
            model=TABULAR,
            repository=repo,
            input=src,
            output=tmp_path / f"{src.stem}-out.npz",
            chunk_rows=cap_rows,
            batch_size=64,
            keep=("id",),
            progress=False,
        )

    peak_small = _traced_peak_bytes(options(small))
    peak_large = _traced_peak_bytes(options(large))
    assert peak_large < 1.5 * peak_small, (peak_small, peak_large)
    assert large.stat().st_size > 2.5 * small.stat().st_size
    with np.load(tmp_path / "large-out.npz") as z:
        assert len(z["label"]) == len(x)
        (probabilities, _) = _ort(TABULAR, {"features": x})
        np.testing.assert_allclose(z["probabilities"], probabilities, rtol=1e-5, atol=1e-7)


def test_stop_then_resume_equals_one_run(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.npy"
    np.save(src, _features(1000, seed=4))
    twice = tmp_path / "twice.npz"
    common = ["--model-repository", str(repo), "--input", str(src), "--chunk-rows", "100"]
    rc, _, err = _run(capsys, TABULAR, *common, "--output", str(tmp_path / "once.npz"))
    assert rc == 0, err
    rc, out, err = _run(
        capsys, TABULAR, *common, "--output", str(twice), "--stop-after-chunks", "4"
    )
    assert rc == 3, err
    assert not twice.exists()
    state = json.loads((batch.workdir_of(twice) / batch.STATE_FILENAME).read_text())
    assert state["done"] == [0, 1, 2, 3]
    rc, out, err = _run(capsys, TABULAR, *common, "--output", str(twice), "--resume")
    assert rc == 0, err
    assert "10 chunks done, 4 of them resumed" in out
    with np.load(tmp_path / "once.npz") as a, np.load(twice) as b:
        for name in ("probabilities", "label"):
            np.testing.assert_array_equal(a[name], b[name])


def test_kill_then_resume_equals_one_run(repo: Path, tmp_path: Path) -> None:
    # 200 chunks, each fsynced twice: seconds of work, so the kill lands mid-run.
    x = _features(4000, seed=5)
    src = tmp_path / "in.npy"
    np.save(src, x)
    out = tmp_path / "out.npz"
    cmd = [
        sys.executable, "-m", "sluice.cli", "batch", TABULAR,
        "--model-repository", str(repo), "--input", str(src), "--output", str(out),
        "--chunk-rows", "20", "--batch-size", "20", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state_file = batch.workdir_of(out) / batch.STATE_FILENAME
    deadline = time.monotonic() + 120
    done: list[int] = []
    try:
        # Wait for the state, not for time: kill once three chunks are recorded.
        while len(done) < 3 and proc.poll() is None and time.monotonic() < deadline:
            try:
                done = json.loads(state_file.read_text())["done"]
            except (OSError, ValueError, KeyError):
                done = []
            time.sleep(0.005)  # polling interval of the state file
        if proc.poll() is not None:
            assert proc.stderr is not None
            pytest.fail(f"the run ended before it could be interrupted: {proc.stderr.read()}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    result = batch.run(
        batch.BatchOptions(
            model=TABULAR,
            repository=repo,
            input=src,
            output=out,
            chunk_rows=20,
            batch_size=20,
            resume=True,
            progress=False,
        )
    )
    assert result.complete
    assert result.chunks_resumed >= 3
    assert result.chunks == 200
    probabilities, label = _ort(TABULAR, {"features": x})
    with np.load(out) as z:
        np.testing.assert_allclose(z["probabilities"], probabilities, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(z["label"], label)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("7,0.1,0.2,abc,0.4,0.5,0.6,0.7,0.8", "line 152 (data row 150): f2 is 'abc', not a number"),
        ("7,0.1,0.2", "line 152 (data row 150): 3 values, the file has 9 columns"),
    ],
)
def test_malformed_row_is_named_and_nothing_is_final(
    repo: Path, tmp_path: Path, bad_line: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    x = _features(300, seed=6)
    _write_csv(src, x, [str(i) for i in range(300)])
    lines = src.read_text().splitlines()
    lines[151] = bad_line  # line 152 of the file: the header is line 1
    src.write_text("\n".join(lines) + "\n")
    rc, _, err = _run(
        capsys,
        TABULAR, "--model-repository", str(repo), "--input", str(src), "--output", str(dst),
        "--keep", "id", "--chunk-rows", "64",
    )  # fmt: skip
    assert rc == 1
    assert expected in err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.csv")]


def test_url_scores_through_a_running_server(
    repo: Path,
    tmp_path: Path,
    start_server: Callable[..., ServerProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server_repo = tmp_path / "served"
    shutil.copytree(repo / TABULAR, server_repo / TABULAR)
    server = start_server(server_repo)
    x = _features(700, seed=7)
    src = tmp_path / "in.npy"
    np.save(src, x)
    remote, local = tmp_path / "remote.npz", tmp_path / "local.npz"
    rc, out, err = _run(
        capsys, TABULAR, "--url", server.url, "--input", str(src), "--output", str(remote),
        "--chunk-rows", "256",
    )  # fmt: skip
    assert rc == 0, err
    assert server.url in out
    rc, _, err = _run(
        capsys, TABULAR, "--model-repository", str(repo), "--input", str(src),
        "--output", str(local), "--chunk-rows", "256",
    )  # fmt: skip
    assert rc == 0, err
    with np.load(remote) as a, np.load(local) as b:
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(a["label"], b["label"])


def test_drift_report_is_the_one_sluice_drift_prints(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiled = tmp_path / "repo"
    shutil.copytree(repo / TABULAR, profiled / TABULAR)
    reference = tmp_path / "reference.npy"
    np.save(reference, _features(3000, seed=8))
    assert (
        cli.main(
            ["profile", TABULAR, "1", "--model-repository", str(profiled), "--data", str(reference)]
        )
        == 0
    )
    shifted = _features(2000, seed=9)
    shifted[:, 3] += 1.5
    src = tmp_path / "batch.npy"
    np.save(src, shifted)
    report_path = tmp_path / "drift.json"
    rc, _, err = _run(
        capsys, TABULAR, "--model-repository", str(profiled), "--input", str(src),
        "--output", str(tmp_path / "out.npz"), "--chunk-rows", "512",
        "--drift-report", str(report_path),
    )  # fmt: skip
    assert rc == 0, err
    ours = json.loads(report_path.read_text())
    capsys.readouterr()
    assert (
        cli.main(
            ["drift", TABULAR, "--model-repository", str(profiled), "--data", str(src), "--json"]
        )
        == 0
    )
    theirs = json.loads(capsys.readouterr().out)
    assert ours["inputs"]["dataset"] == theirs["inputs"]["dataset"]
    for key in ("inputs", "outputs"):
        mine = {f["name"]: f for f in ours[key]["features"]}
        for f in theirs[key]["features"]:
            assert mine[f["name"]]["verdict"] == f["verdict"]
            assert mine[f["name"]]["window_counts"] == f["window_counts"]
            if f["psi"] is not None:
                assert mine[f["name"]]["psi"] == pytest.approx(f["psi"], rel=1e-9)
    verdicts = {f["name"]: f["verdict"] for f in ours["inputs"]["features"]}
    assert verdicts["features[3]"] != "no_drift"
