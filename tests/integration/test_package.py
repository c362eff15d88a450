"""`sluice package` and `sluice package verify` on the bundled image classifier and
tabular model and on two real published models fetched from PyPI wheels (see
tests/published_models.py): every profile builds and verifies, tampering and a
wrong key are refused, the validation gate refuses over-aggressive int8, the
ORT-format bundle runs in plain onnxruntime within the recorded error, and a
bundle's parent serves it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import published_models as pm
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sluice import cli
from sluice.offline import bundle

EXAMPLES = Path(cli.__file__).resolve().parent / "examples" / "models"
PROFILES = ("server-cpu", "mobile", "gpu-fp16")
FAST = ["--latency-seconds", "0.05"]
SOURCES = {
    "magika": "magika 1.0.3 wheel (Apache-2.0)",
    "text_direction": "rapidocr-onnxruntime 1.4.4 wheel (Apache-2.0)",
}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _keys(folder: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private = folder / "key.pem"
    public = folder / "key.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the two examples, and their data files."""
    root = tmp_path_factory.mktemp("package")
    repo = root / "repo"
    repo.mkdir()
    for name in ("image_classifier", "tabular_classifier"):
        shutil.copytree(EXAMPLES / name, repo / name)
    rng = np.random.default_rng(3)
    np.save(root / "img_cal.npy", rng.standard_normal((48, 3, 32, 32)).astype(np.float32))
    np.save(root / "img_val.npy", rng.standard_normal((96, 3, 32, 32)).astype(np.float32))
    # Calibration on near-constant images: every activation range collapses, so
    # int8 maps real inputs to a handful of values. The gate must refuse it.
    np.save(root / "img_bad.npy", np.full((8, 3, 32, 32), 1e-3, dtype=np.float32))
    np.save(root / "tab.npy", rng.standard_normal((400, 8)).astype(np.float32))
    return root


def _source(model: str) -> Path:
    return EXAMPLES / model / "1" / "model.onnx"


def _manifest(bundle_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundle_dir / "manifest.json").read_text())
    return data


@pytest.mark.parametrize("profile", PROFILES)
def test_image_classifier_every_profile_builds_and_verifies(
    work: Path, profile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "bundles" / f"img-{profile}"
    args = ["--calibration", str(work / "img_cal.npy")] if profile != "gpu-fp16" else []
    rc, stdout, err = _run(
        capsys,
        "package", "image_classifier", "1",
        "--model-repository", str(work / "repo"),
        "-o", str(out),
        "--profile", profile,
        "--validation", str(work / "img_val.npy"),
        *args, *FAST,
    )  # fmt: skip
    assert rc == 0, err
    m = _manifest(out)
    steps = {s["name"]: s for s in m["steps"]}
    if profile == "gpu-fp16":
        assert steps["fp16"]["applied"]
        assert not steps["quantize"]["applied"]
    else:
        assert steps["quantize"]["params"]["mode"] == "static"
        assert steps["quantize"]["params"]["format"] == "QDQ"
    assert steps["ort_format"]["applied"] == (profile == "mobile")
    assert m["validation"]["outputs"]["probabilities"]["agreement"] >= 0.99
    assert m["validation"]["data"] == "validation file"
    assert m["source"]["sha256"] == bundle.sha256_file(
        work / "repo" / "image_classifier" / "1" / "model.onnx"
    )
    assert m["latency"]["packaged"]["p50_us"] > 0
    assert m["machine"]["cores_available"] >= 1
    assert m["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert (out.parent / f"{out.name}.tar.gz").is_file()
    rc, stdout, err = _run(capsys, "package", "verify", str(out))
    assert rc == 0, stdout + err
    assert "ok   validation sample" in stdout


def test_mobile_bundle_is_ort_format_with_its_operator_list(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "bundles" / "img-mobile-plain"
    rc, _, err = _run(
        capsys,
        "package", "image_classifier", "1",
        "--model-repository", str(work / "repo"),
        "-o", str(out), "--profile", "mobile",
        "--validation", str(work / "img_val.npy"), *FAST,
    )  # fmt: skip
    assert rc == 0, err
    m = _manifest(out)
    model = out / m["files"]["model"]
    assert model.name == "model.ort"
    assert model.read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer identifier
    ops = (out / "required_operators.config").read_text()
    listed = {
        op
        for line in ops.splitlines()
        if line and not line.startswith("#")
        for op in line.split(";")[2].split(",")
    }
    assert listed == {n.op_type for n in onnx.load(str(_source("image_classifier"))).graph.node}
    assert "/" not in ops.splitlines()[0]  # no path of the packaging machine
    # The ORT-format model runs in plain onnxruntime (batch fixed to 1) and
    # answers within the error the manifest records.
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]
    x = np.load(work / "img_val.npy")[:20]
    original = ort.InferenceSession(
        str(work / "repo" / "image_classifier" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    want = original.run(None, {"image": x})[0]
    got = np.concatenate([session.run(None, {"image": x[i : i + 1]})[0] for i in range(20)])
    recorded = m["validation"]["outputs"]["probabilities"]
    assert np.abs(got - want).max() <= recorded["max_abs_error"] + 1e-6
    assert (got.argmax(1) == want.argmax(1)).mean() >= recorded["min_agreement"]


@pytest.mark.parametrize("profile", PROFILES)
def test_tabular_every_profile_signed_and_verified(
    work: Path, profile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = work / f"keys-{profile}"
    keys.mkdir()
    private, public = _keys(keys)
    out = work / "bundles" / f"tab-{profile}"
    rc, _, err = _run(
        capsys,
        "package", "tabular_classifier", "1",
        "--model-repository", str(work / "repo"),
        "-o", str(out), "--profile", profile,
        "--validation", str(work / "tab.npy"),
        "--sign", str(private), *FAST,
    )  # fmt: skip
    assert rc == 0, err
    m = _manifest(out)
    assert m["signature"]["algorithm"] == "ed25519"
    assert set(m["validation"]["outputs"]) == {"probabilities", "label"}
    rc, stdout, _ = _run(capsys, "package", "verify", str(out), "--key", str(public))
    assert rc == 0, stdout
    assert "ok   signature" in stdout
    tarball = out.parent / f"{out.name}.tar.gz"
    rc, stdout, _ = _run(capsys, "package", "verify", str(tarball), "--key", str(public))
    assert rc == 0, stdout


@pytest.fixture
def signed_bundle(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, Path]:
    private, public = _keys(tmp_path)
    out = tmp_path / "tab"
    rc, _, err = _run(
        capsys,
        "package", "tabular_classifier", "1",
        "--model-repository", str(work / "repo"), "-o", str(out),
        "--validation", str(work / "tab.npy"), "--sign", str(private), "--no-tarball", *FAST,
    )  # fmt: skip
    assert rc == 0, err
    return out, public


def test_wrong_key_is_refused(
    signed_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = signed_bundle
    other = tmp_path / "other"
    other.mkdir()
    _, wrong = _keys(other)
    rc, stdout, _ = _run(capsys, "package", "verify", str(out), "--key", str(wrong))
    assert rc == 1
    assert "FAIL signature" in stdout


@pytest.mark.parametrize(
    "tamper",
    ["model byte", "manifest", "extra file", "missing file", "resummed"],
)
def test_tampered_bundle_is_refused(
    signed_bundle: tuple[Path, Path], tamper: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out, public = signed_bundle
    model = out / "1" / "model.onnx"
    if tamper == "model byte":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01
        model.write_bytes(bytes(data))
    elif tamper == "manifest":
        m = _manifest(out)
        m["validation"]["outputs"]["probabilities"]["min_agreement"] = 0.0
        (out / "manifest.json").write_text(json.dumps(m))
    elif tamper == "extra file":
        (out / "1" / "extra.onnx").write_bytes(b"not listed")
    elif tamper == "missing file":
        (out / "validation_sample.npz").unlink()
    else:  # change a file and rewrite the sums: only the signature catches it
        (out / "config.pbtxt").write_text(
            'max_batch_size: 1\ndefault_model_filename: "model.onnx"\n'
        )
        bundle.write_sums(out)
    rc, stdout, _ = _run(capsys, "package", "verify", str(out), "--key", str(public))
    assert rc == 1, stdout
    expected = "FAIL signature" if tamper == "resummed" else "FAIL checksums"
    assert expected in stdout


def test_gate_refuses_over_aggressive_quantisation(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "bundles" / "img-bad"
    rc, _, err = _run(
        capsys,
        "package", "image_classifier", "1",
        "--model-repository", str(work / "repo"), "-o", str(out),
        "--quantize", "static", "--calibration", str(work / "img_bad.npy"),
        "--validation", str(work / "img_val.npy"), *FAST,
    )  # fmt: skip
    assert rc == 1
    assert "validation gate refused the package" in err
    assert "'probabilities': agreement" in err
    assert not out.exists()
    assert not (out.parent / "img-bad.tar.gz").exists()
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


def test_generated_validation_is_said_loudly(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "bundles" / "tab-generated"
    rc, _, err = _run(
        capsys,
        "package", "tabular_classifier", "1",
        "--model-repository", str(work / "repo"), "-o", str(out), "--no-tarball", *FAST,
    )  # fmt: skip
    assert rc == 0, err
    assert "WARNING" in err
    assert "RANDOM inputs" in err
    assert _manifest(out)["validation"]["data"] == "generated (random inputs)"


def test_drift_profile_travels_with_the_bundle(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(work / "repo" / "tabular_classifier", repo / "tabular_classifier")
    rc, _, err = _run(
        capsys,
        "profile", "tabular_classifier", "1",
        "--model-repository", str(repo), "--data", str(work / "tab.npy"),
    )  # fmt: skip
    assert rc == 0, err
    out = tmp_path / "bundles" / "tabular_classifier"
    rc, _, err = _run(
        capsys,
        "package", "tabular_classifier", "1", "--model-repository", str(repo),
        "-o", str(out), "--validation", str(work / "tab.npy"), "--no-tarball", *FAST,
    )  # fmt: skip
    assert rc == 0, err
    files = _manifest(out)["files"]["drift_profile"]
    assert "1/drift_profile.json" in files
    assert "1/drift_profile.bin" in files
    # A device checks its own inputs against it: the offline drift report works
    # on the bundle's parent as a repository.
    rc, stdout, err = _run(
        capsys,
        "drift", "tabular_classifier", "--model-repository", str(out.parent),
        "--data", str(work / "tab.npy"), "--json",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(stdout)["inputs"]["dataset"] == "no_drift"


def test_bundle_parent_is_a_servable_repository(
    work: Path,
    tmp_path: Path,
    start_server: Callable[..., ServerProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    parent = tmp_path / "device"
    for name, profile in (("img_mobile", "mobile"), ("tab_server", "server-cpu")):
        source = "image_classifier" if name.startswith("img") else "tabular_classifier"
        data = "img_val.npy" if name.startswith("img") else "tab.npy"
        rc, _, err = _run(
            capsys,
            "package", source, "1", "--model-repository", str(work / "repo"),
            "-o", str(parent / name), "--profile", profile,
            "--validation", str(work / data), "--no-tarball", *FAST,
        )  # fmt: skip
        assert rc == 0, err
    server = start_server(parent)
    client = tc.InferenceServerClient(server.url)
    try:
        x = np.load(work / "img_val.npy")[:1]
        inp = tc.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = client.infer("img_mobile", [inp]).as_numpy("probabilities")
        want = ort.InferenceSession(str(parent / "img_mobile" / "1" / "model.ort")).run(
            None, {"image": x}
        )[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        rows = np.load(work / "tab.npy")[:5]
        inp = tc.InferInput("features", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        labels = client.infer("tab_server", [inp]).as_numpy("label")
        assert labels.shape == (5, 1)
    finally:
        client.close()


# ---- real published models -------------------------------------------------------


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with both published models (via `sluice models publish`, so
    they carry lineage) and realistic validation and calibration data."""
    try:
        magika = pm.fetch(pm.MAGIKA)
        direction = pm.fetch(pm.TEXT_DIRECTION)
    except pm.Unavailable as exc:
        pytest.skip(f"the package index is unreachable, published models not fetched: {exc}")
    root = tmp_path_factory.mktemp("published")
    repo = root / "repo"
    repo.mkdir()
    for name, path in (("magika", magika), ("text_direction", direction)):
        source = SOURCES[name]
        rc = cli.main(
            ["models", "publish", name, str(path), "--model-repository", str(repo),
             "--source", source]
        )  # fmt: skip
        assert rc == 0
    # Magika runs ~10-40 ms per row on a shared CI core: 32 rows each keep it quick.
    features = pm.magika_features(pm.sample_files(64))
    np.save(root / "magika_val.npy", features[:32])
    np.save(root / "magika_cal.npy", features[32:])
    np.save(root / "text_direction_val.npy", pm.text_line_images(48, seed=1))
    np.save(root / "text_direction_cal.npy", pm.text_line_images(24, seed=2))
    return root


@pytest.mark.parametrize("model", ["magika", "text_direction"])
@pytest.mark.parametrize("profile", PROFILES)
def test_published_models_every_profile(
    published: Path, model: str, profile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = published / "bundles" / f"{model}-{profile}"
    rc, _, err = _run(
        capsys,
        "package", model, "1", "--model-repository", str(published / "repo"),
        "-o", str(out), "--profile", profile,
        "--validation", str(published / f"{model}_val.npy"), "--no-tarball", *FAST,
    )  # fmt: skip
    assert rc == 0, err
    m = _manifest(out)
    assert m["source"]["lineage"]["source"] == SOURCES[model]
    assert m["source"]["lineage"]["version"] == 1
    (result,) = m["validation"]["outputs"].values()
    assert result["kind"] == "classifier"
    assert result["agreement"] >= 0.99
    rc, stdout, _ = _run(capsys, "package", "verify", str(out))
    assert rc == 0, stdout


def test_published_classifier_static_int8_is_smaller_and_agrees(
    published: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = published / "bundles" / "magika-int8"
    rc, _, err = _run(
        capsys,
        "package", "magika", "1", "--model-repository", str(published / "repo"),
        "-o", str(out), "--calibration", str(published / "magika_cal.npy"),
        "--validation", str(published / "magika_val.npy"), "--no-tarball", *FAST,
    )  # fmt: skip
    assert rc == 0, err
    m = _manifest(out)
    assert m["sizes"]["ratio"] < 0.5
    assert m["validation"]["outputs"]["target_label"]["agreement"] >= 0.99
    rc, stdout, _ = _run(capsys, "package", "verify", str(out))
    assert rc == 0, stdout


def test_published_model_gate_refuses_lossy_int8(
    published: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Static int8 costs the text-direction classifier about a tenth of its
    # answers on these inputs: the gate keeps it from shipping.
    out = published / "bundles" / "text_direction-int8"
    rc, _, err = _run(
        capsys,
        "package", "text_direction", "1", "--model-repository", str(published / "repo"),
        "-o", str(out), "--calibration", str(published / "text_direction_cal.npy"),
        "--validation", str(published / "text_direction_val.npy"), *FAST,
    )  # fmt: skip
    assert rc == 1
    assert "validation gate refused" in err
    assert not out.exists()
