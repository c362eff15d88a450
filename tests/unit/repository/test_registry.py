"""The model registry (`sluice models ...`): atomic publish with lineage, list,
show and diff, and the labels.json the server routes by.

The CLI runs in-process through sluice.cli.main. No tritonclient in this module:
sluice's generated protobuf modules would clash with its descriptors (see
sluice_proto_pool).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_models as om
import pytest
import sluice_proto_pool  # noqa: F401  (before any sluice import: see its docstring)
from onnx import TensorProto, helper, numpy_helper
from sluice import __version__, cli
from sluice.repository.layout import LABELS_FILENAME
from sluice.repository.policy import version_dirs
from sluice.repository.registry.labels import (
    STABLE,
    Canary,
    HistoryEntry,
    Labels,
    LabelsError,
    Shadow,
    promoted,
    read_labels,
    rollback_target,
    rolled_back,
    write_labels,
)
from sluice.repository.registry.publish import STAGING_PREFIX

Tensor = tuple[str, str, int, Sequence[str | int]]  # (input, output, element type, shape)

A_TENSORS: list[Tensor] = [
    ("x", "y", TensorProto.FLOAT, ["N", 4]),
    ("s", "t", TensorProto.FLOAT, ["N", 4]),
]
# From A: x and y change type and shape, s/t are gone, u/v are new.
B_TENSORS: list[Tensor] = [
    ("x", "y", TensorProto.DOUBLE, ["N", 8]),
    ("u", "v", TensorProto.INT64, ["N", 2]),
]


def build_identity(path: pathlib.Path, tensors: Sequence[Tensor]) -> pathlib.Path:
    """One Identity node per (input, output) pair."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [i], [o]) for i, o, _, _ in tensors],
        "identity",
        [helper.make_tensor_value_info(i, t, list(s)) for i, _, t, s in tensors],
        [helper.make_tensor_value_info(o, t, list(s)) for _, o, t, s in tensors],
    )
    model = helper.make_model(
        graph, ir_version=om.IR_VERSION, opset_imports=[helper.make_opsetid("", om.OPSET)]
    )
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "repo"
    path.mkdir()
    return path


@pytest.fixture
def model_a(tmp_path: pathlib.Path) -> pathlib.Path:
    return build_identity(tmp_path / "a.onnx", A_TENSORS)


@pytest.fixture
def model_b(tmp_path: pathlib.Path) -> pathlib.Path:
    return build_identity(tmp_path / "b.onnx", B_TENSORS)


def run(capsys: pytest.CaptureFixture[str], repo: pathlib.Path, *args: str) -> tuple[int, str, str]:
    """`sluice models ARGS --model-repository REPO`: (exit code, stdout, stderr)."""
    code = cli.main(["models", *args, "--model-repository", str(repo)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], repo: pathlib.Path, *args: str) -> Any:
    code, out, err = run(capsys, repo, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def staging_dirs(repo: pathlib.Path) -> list[pathlib.Path]:
    return list(repo.rglob(f"{STAGING_PREFIX}*"))


def metadata(repo: pathlib.Path, model: str, version: int) -> dict[str, object]:
    data = json.loads((repo / model / str(version) / "metadata.json").read_text())
    assert isinstance(data, dict)
    return data


def publish_two(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    model_b: pathlib.Path,
) -> None:
    code, _, err = run(
        capsys,
        repo,
        "publish",
        "demo",
        str(model_a),
        "--source",
        "train.py run 41",
        "--param",
        "lr=0.1",
        "--metric",
        "acc=0.91",
        "--metric",
        "loss=0.3",
        "--tag",
        "team=risk",
    )
    assert code == 0, err
    code, _, err = run(
        capsys, repo, "publish", "demo", str(model_b), "--param", "lr=0.01",
        "--param", "epochs=5", "--metric", "acc=0.935",
    )  # fmt: skip
    assert code == 0, err


# ---- publish -------------------------------------------------------------------


def test_publish_twice_records_lineage(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    model_b: pathlib.Path,
) -> None:
    code, out, _ = run(capsys, repo, "publish", "demo", str(model_a), "--source", "run 41")
    assert code == 0
    assert out.strip() == f"published demo version 1: {repo / 'demo' / '1'}"
    code, out, _ = run(capsys, repo, "publish", "demo", str(model_b), "--metric", "acc=0.9")
    assert code == 0
    assert out.strip() == f"published demo version 2: {repo / 'demo' / '2'}"

    assert version_dirs(repo / "demo") == [1, 2]
    assert staging_dirs(repo) == []
    first, second = metadata(repo, "demo", 1), metadata(repo, "demo", 2)
    assert first["sha256"] == hashlib.sha256(model_a.read_bytes()).hexdigest()
    assert second["sha256"] == hashlib.sha256(model_b.read_bytes()).hexdigest()
    assert (repo / "demo" / "2" / "model.onnx").read_bytes() == model_b.read_bytes()
    assert (first["version"], first["parent"], first["source"]) == (1, None, "run 41")
    assert (second["version"], second["parent"], second["source"]) == (2, 1, "b.onnx")
    assert second["metrics"] == {"acc": 0.9}
    assert first["sluice_version"] == __version__
    created = datetime.datetime.fromisoformat(str(first["created"]))
    assert created.utcoffset() == datetime.timedelta(0)
    assert first["signature"] == {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "s", "datatype": "FP32", "shape": [-1, 4]},
        ],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "t", "datatype": "FP32", "shape": [-1, 4]},
        ],
    }


def test_publish_records_params_metrics_tags(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    model_b: pathlib.Path,
) -> None:
    publish_two(capsys, repo, model_a, model_b)
    first = metadata(repo, "demo", 1)
    assert first["params"] == {"lr": "0.1"}
    assert first["metrics"] == {"acc": 0.91, "loss": 0.3}
    assert first["tags"] == {"team": "risk"}


def test_publish_next_version_follows_the_highest_folder(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, model_a: pathlib.Path
) -> None:
    (repo / "demo" / "7").mkdir(parents=True)
    shutil.copy(model_a, repo / "demo" / "7" / "model.onnx")
    (repo / "demo" / "010").mkdir()  # not a version, as in Triton
    code, out, _ = run(capsys, repo, "publish", "demo", str(model_a), "--json")
    assert code == 0
    result = json.loads(out)
    assert (result["version"], result["metadata"]["parent"]) == (8, 7)
    assert version_dirs(repo / "demo") == [7, 8]


def test_publish_refuses_a_file_that_is_not_onnx(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    tmp_path: pathlib.Path,
    model_a: pathlib.Path,
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    code, out, err = run(capsys, repo, "publish", "fresh", str(bad))
    assert (code, out) == (1, "")
    assert "refusing to publish" in err
    assert "bad.onnx" in err
    assert not (repo / "fresh").exists()  # a new model's folder is not created either

    assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 0
    assert run(capsys, repo, "publish", "demo", str(bad))[0] == 1
    assert version_dirs(repo / "demo") == [1]
    assert staging_dirs(repo) == []


def test_publish_refuses_weights_in_external_files(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    weights = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [weights],
    )
    model = helper.make_model(
        graph, ir_version=om.IR_VERSION, opset_imports=[helper.make_opsetid("", om.OPSET)]
    )
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(
        model, str(path), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    code, _, err = run(capsys, repo, "publish", "demo", str(path))
    assert code == 1
    assert "external data" in err
    assert "w.bin" in err
    assert list(repo.iterdir()) == []


def test_only_publish_imports_onnx() -> None:
    # onnx costs tens of ms and MB at start-up; the server, the labels and the
    # read-only commands never need it. A fresh interpreter: this one has onnx.
    check = (
        "import sys\n"
        "import sluice.server.app, sluice.cli.registry_commands\n"
        "from sluice.repository.registry import inspect, labels, publish\n"
        "assert 'onnx' not in sys.modules, 'imported onnx'\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_crash_before_rename_leaves_no_visible_version(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 0

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    with monkeypatch.context() as m:
        m.setattr(os, "rename", crash)
        code, _, err = run(capsys, repo, "publish", "demo", str(model_a))
        assert code == 1
        assert "simulated crash" in err
        assert version_dirs(repo / "demo") == [1]
        assert staging_dirs(repo) == []  # cleaned up on the way out
        code, _, _ = run(capsys, repo, "publish", "fresh", str(model_a))
        assert code == 1
        assert not (repo / "fresh").exists()

        # A hard crash runs no cleanup: the staging folder stays, still invisible.
        m.setattr(shutil, "rmtree", lambda *a, **k: None)
        assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 1
    [leftover] = staging_dirs(repo)
    assert (leftover / "model.onnx").is_file()
    assert (leftover / "metadata.json").is_file()
    assert version_dirs(repo / "demo") == [1]
    assert [model["name"] for model in run_json(capsys, repo, "list")["models"]] == ["demo"]
    # The next publish is unaffected by the leftover.
    assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 0
    assert version_dirs(repo / "demo") == [1, 2]


def test_publish_warns_when_the_config_contradicts_the_graph(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, model_a: pathlib.Path
) -> None:
    (repo / "demo").mkdir()
    (repo / "demo" / "config.pbtxt").write_text(
        'max_batch_size: 4\ninput [{ name: "features" data_type: TYPE_FP32 dims: [8] }]\n'
    )
    code, _, err = run(capsys, repo, "publish", "demo", str(model_a))
    assert code == 0  # warned, not refused
    assert "warning: config.pbtxt contradicts the new graph" in err
    assert "'features'" in err
    assert version_dirs(repo / "demo") == [1]


def test_publish_honours_default_model_filename(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, model_a: pathlib.Path
) -> None:
    (repo / "demo").mkdir()
    (repo / "demo" / "config.pbtxt").write_text('default_model_filename: "net.onnx"\n')
    code, _, err = run(capsys, repo, "publish", "demo", str(model_a))
    assert (code, err) == (0, "")
    assert (repo / "demo" / "1" / "net.onnx").read_bytes() == model_a.read_bytes()
    assert run_json(capsys, repo, "show", "demo")["problems"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["publish", ".hidden", "A"], "not a model name"),
        (["publish", "demo", "A", "--param", "lr"], "--param wants KEY=VALUE"),
        (["publish", "demo", "A", "--metric", "acc=high"], "--metric acc wants a finite number"),
        (["publish", "demo", "A", "--metric", "acc=nan"], "--metric acc wants a finite number"),
        (["promote", "demo", "1", "--weight", "0.5"], "--label stable takes no"),
        (["promote", "demo", "1", "--label", "canary"], "--label canary needs --weight"),
        (["promote", "demo", "1", "--label", "canary", "--weight", "1.5"], "--weight must be"),
        (["promote", "demo", "1", "--label", "shadow", "--sample", "-0.1"], "--sample must be"),
        (["promote", "demo", "0"], "positive integers"),
    ],
)
def test_bad_usage_exits_2(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    args: list[str],
    message: str,
) -> None:
    assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 0
    code, _, err = run(capsys, repo, *[str(model_a) if a == "A" else a for a in args])
    assert code == 2
    assert message in err
    assert version_dirs(repo / "demo") == [1]
    assert not (repo / "demo" / LABELS_FILENAME).exists()


def test_missing_repository_is_bad_usage(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    code, _, err = run(capsys, tmp_path / "nowhere", "list")
    assert code == 2
    assert "is not a directory" in err


def test_unknown_subcommand_is_argparse_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "frobnicate"])
    assert exit_info.value.code == 2
    capsys.readouterr()


# ---- list, show, diff ----------------------------------------------------------


def test_list_json_and_table(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    model_b: pathlib.Path,
) -> None:
    publish_two(capsys, repo, model_a, model_b)
    (repo / "plain" / "1").mkdir(parents=True)  # a plain Triton model: no metadata
    shutil.copy(model_a, repo / "plain" / "1" / "model.onnx")
    assert run(capsys, repo, "promote", "demo", "1")[0] == 0
    assert (
        run(capsys, repo, "promote", "demo", "2", "--label", "canary", "--weight", "0.25")[0] == 0
    )

    data = run_json(capsys, repo, "list")
    assert isinstance(data, dict)
    assert data["repository"] == str(repo)
    demo, plain = data["models"]
    sha_a = hashlib.sha256(model_a.read_bytes()).hexdigest()
    assert demo["name"] == "demo"
    assert demo["problems"] == []
    assert demo["labels"] == {
        "stable": 1,
        "canary": {"version": 2, "weight": 0.25, "sticky": False},
        "history": [],
    }
    v1, v2 = demo["versions"]
    assert v1["version"] == 1
    assert v1["sha256"] == sha_a
    assert v1["source"] == "train.py run 41"
    assert v1["created"] == metadata(repo, "demo", 1)["created"]
    assert (v1["labels"], v2["labels"], v2["source"]) == (["stable"], ["canary"], "b.onnx")
    assert plain["versions"] == [
        {"version": 1, "sha256": None, "created": None, "source": None, "labels": []}
    ]

    code, out, _ = run(capsys, repo, "list")
    assert code == 0
    header, row1, row2, row3 = out.splitlines()
    assert header.split() == ["MODEL", "VERSION", "SHA256", "CREATED", "SOURCE", "LABELS"]
    assert row1.split()[:3] == ["demo", "1", sha_a[:12]]
    assert row1.endswith("stable")
    assert row2.endswith("canary 25%")
    assert row3.split() == ["plain", "1", "-", "-", "-"]


def test_list_reports_bad_labels_without_failing(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, model_a: pathlib.Path
) -> None:
    assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 0
    (repo / "demo" / "labels.json").write_text('{"stable": 9, "canary": {"version": 1}}')
    code, _, err = run(capsys, repo, "list")
    assert code == 0
    assert "warning: model 'demo'" in err
    assert "canary lacks ['weight']" in err
    (repo / "demo" / "labels.json").write_text('{"stable": 9}')
    data = run_json(capsys, repo, "list")
    assert data["models"][0]["problems"] == ["stable points at version 9, which has no folder"]


def test_show_published_version(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    model_b: pathlib.Path,
) -> None:
    publish_two(capsys, repo, model_a, model_b)
    latest = run_json(capsys, repo, "show", "demo")
    assert isinstance(latest, dict)
    assert (latest["model"], latest["version"], latest["path"]) == ("demo", 2, str(repo / "demo/2"))
    assert latest["metadata"] == metadata(repo, "demo", 2)
    assert latest["sha256"] == latest["metadata"]["sha256"]
    assert latest["signature"] == latest["metadata"]["signature"]
    assert (latest["config"], latest["config_file"], latest["problems"]) == (None, None, [])
    first = run_json(capsys, repo, "show", "demo", "1")
    assert first["metadata"]["source"] == "train.py run 41"

    code, out, _ = run(capsys, repo, "show", "demo", "1")
    assert code == 0
    assert "source: train.py run 41" in out
    assert "x FP32 [-1, 4]" in out

    code, _, err = run(capsys, repo, "show", "demo", "3")
    assert code == 1
    assert "no version 3 (versions: 1, 2)" in err
    code, _, err = run(capsys, repo, "show", "nope")
    assert code == 1
    assert "no model 'nope'" in err


def test_show_plain_triton_version_computes_signature(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, model_a: pathlib.Path
) -> None:
    (repo / "plain" / "3").mkdir(parents=True)
    shutil.copy(model_a, repo / "plain" / "3" / "model.onnx")
    (repo / "plain" / "config.pbtxt").write_text('name: "plain"\nmax_batch_size: 8\n')
    data = run_json(capsys, repo, "show", "plain")
    assert isinstance(data, dict)
    assert data["metadata"] is None
    assert data["sha256"] == hashlib.sha256(model_a.read_bytes()).hexdigest()
    assert data["signature"]["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    assert data["config_file"] == "config.pbtxt"
    assert data["config"] == 'name: "plain"\nmax_batch_size: 8\n'


def test_show_notices_a_file_changed_after_publish(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    model_b: pathlib.Path,
) -> None:
    assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 0
    shutil.copy(model_b, repo / "demo" / "1" / "model.onnx")
    code, _, err = run(capsys, repo, "show", "demo")
    assert code == 0
    assert "the file changed after publish" in err


def test_diff_json(
    capsys: pytest.CaptureFixture[str],
    repo: pathlib.Path,
    model_a: pathlib.Path,
    model_b: pathlib.Path,
) -> None:
    publish_two(capsys, repo, model_a, model_b)
    data = run_json(capsys, repo, "diff", "demo", "1", "2")
    assert isinstance(data, dict)
    assert (data["model"], data["from"], data["to"], data["problems"]) == ("demo", 1, 2, [])
    assert data["signature"] == {
        "inputs": {
            "added": [{"name": "u", "datatype": "INT64", "shape": [-1, 2]}],
            "removed": [{"name": "s", "datatype": "FP32", "shape": [-1, 4]}],
            "changed": [
                {
                    "name": "x",
                    "datatype": {"from": "FP32", "to": "FP64"},
                    "shape": {"from": [-1, 4], "to": [-1, 8]},
                }
            ],
        },
        "outputs": {
            "added": [{"name": "v", "datatype": "INT64", "shape": [-1, 2]}],
            "removed": [{"name": "t", "datatype": "FP32", "shape": [-1, 4]}],
            "changed": [
                {
                    "name": "y",
                    "datatype": {"from": "FP32", "to": "FP64"},
                    "shape": {"from": [-1, 4], "to": [-1, 8]},
                }
            ],
        },
    }
    meta = data["metadata"]
    assert meta["fields"] == {
        "sha256": {
            "from": hashlib.sha256(model_a.read_bytes()).hexdigest(),
            "to": hashlib.sha256(model_b.read_bytes()).hexdigest(),
        },
        "source": {"from": "train.py run 41", "to": "b.onnx"},
        "parent": {"from": None, "to": 1},
    }
    assert meta["params"] == {
        "added": {"epochs": "5"},
        "removed": {},
        "changed": {"lr": {"from": "0.1", "to": "0.01"}},
    }
    assert meta["metrics"]["removed"] == {"loss": 0.3}
    acc = meta["metrics"]["changed"]["acc"]
    assert (acc["from"], acc["to"]) == (0.91, 0.935)
    assert acc["delta"] == pytest.approx(0.025)
    assert meta["tags"] == {"added": {}, "removed": {"team": "risk"}, "changed": {}}

    code, out, _ = run(capsys, repo, "diff", "demo", "1", "2")
    assert code == 0
    assert "~ input x: datatype FP32 -> FP64; shape [-1, 4] -> [-1, 8]" in out
    assert "~ metric acc: 0.91 -> 0.935 (+0.025)" in out


def test_diff_of_a_version_with_itself_is_empty(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, model_a: pathlib.Path
) -> None:
    assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 0
    data = run_json(capsys, repo, "diff", "demo", "1", "1")
    empty = {"added": [], "removed": [], "changed": []}
    assert data["signature"] == {"inputs": empty, "outputs": empty}
    assert data["metadata"]["fields"] == {}
    code, out, _ = run(capsys, repo, "diff", "demo", "1", "1")
    assert code == 0
    assert "signature: unchanged" in out


# ---- labels --------------------------------------------------------------------


def labels_file(repo: pathlib.Path) -> dict[str, object]:
    data = json.loads((repo / "demo" / "labels.json").read_text())
    assert isinstance(data, dict)
    for entry in data["history"]:
        datetime.datetime.fromisoformat(entry.pop("at"))  # present and ISO 8601
    return data


@pytest.fixture
def three_versions(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, model_a: pathlib.Path
) -> pathlib.Path:
    for _ in range(3):
        assert run(capsys, repo, "publish", "demo", str(model_a))[0] == 0
    return repo


def test_promote_and_rollback_keep_history(
    capsys: pytest.CaptureFixture[str], three_versions: pathlib.Path
) -> None:
    repo = three_versions

    def ok(*args: str) -> str:
        code, out, err = run(capsys, repo, *args)
        assert code == 0, err
        return out.strip()

    assert ok("promote", "demo", "1") == "demo: stable 1"
    assert ok("promote", "demo", "2") == "demo: stable 2"
    ok("promote", "demo", "3", "--label", "canary", "--weight", "0.1", "--sticky")
    out = ok("promote", "demo", "1", "--label", "shadow", "--sample", "0.2")
    assert out == "demo: stable 2, canary 3 (10%, sticky), shadow 1 (20%)"
    assert labels_file(repo) == {
        "stable": 2,
        "canary": {"version": 3, "weight": 0.1, "sticky": True},
        "shadow": {"version": 1, "sample": 0.2},
        "history": [{"label": "stable", "version": 1, "action": "promote"}],
    }

    # Promoting the canary's version to stable retires the canary.
    ok("promote", "demo", "3")
    assert labels_file(repo) == {
        "stable": 3,
        "shadow": {"version": 1, "sample": 0.2},
        "history": [
            {"label": "stable", "version": 1, "action": "promote"},
            {"label": "stable", "version": 2, "action": "promote"},
            {"label": "canary", "version": 3, "action": "promote", "detail": "promoted to stable"},
        ],
    }

    ok("promote", "demo", "1", "--label", "canary", "--weight", "0.5")
    assert ok("rollback", "demo") == "demo: stable 3 -> 2; canary 1 cleared"
    labels = read_labels(repo / "demo")
    assert (labels.stable, labels.canary) == (2, None)
    assert labels.history[-2:] == (
        HistoryEntry("stable", 3, labels.history[-2].at, "rollback"),
        HistoryEntry("canary", 1, labels.history[-1].at, "rollback"),
    )
    # Each rollback walks one promote further back, then there is nothing left.
    assert ok("rollback", "demo") == "demo: stable 2 -> 1"
    code, _, err = run(capsys, repo, "rollback", "demo")
    assert code == 1
    assert "no earlier stable version" in err
    assert read_labels(repo / "demo").stable == 1


def test_promote_refusals(capsys: pytest.CaptureFixture[str], three_versions: pathlib.Path) -> None:
    repo = three_versions
    code, _, err = run(capsys, repo, "promote", "demo", "4")
    assert code == 1
    assert "no version 4 (versions: 1, 2, 3)" in err
    code, _, err = run(capsys, repo, "promote", "nope", "1")
    assert code == 1
    assert "no model 'nope'" in err
    assert run(capsys, repo, "promote", "demo", "2")[0] == 0
    code, _, err = run(capsys, repo, "promote", "demo", "2", "--label", "canary", "--weight", "1")
    assert code == 1
    assert "is the stable version" in err
    code, _, err = run(capsys, repo, "rollback", "demo")
    assert code == 1
    assert "no earlier stable version" in err
    (repo / "demo" / "labels.json").write_text("{not json")
    code, _, err = run(capsys, repo, "promote", "demo", "1")
    assert code == 1
    assert "labels.json" in err


def test_promote_refuses_a_version_the_server_would_not_load(
    capsys: pytest.CaptureFixture[str], three_versions: pathlib.Path, model_b: pathlib.Path
) -> None:
    repo = three_versions
    (repo / "demo" / "4").mkdir()
    (repo / "demo" / "4" / "model.onnx").write_bytes(b"not an onnx file")
    canary = ("--label", "canary", "--weight", "0.1")
    code, _, err = run(capsys, repo, "promote", "demo", "4", *canary)
    assert code == 1
    assert "refusing to label version 4 canary: the server would not load it" in err
    assert not (repo / "demo" / "labels.json").exists()
    # A file that loads but contradicts the model's config does not serve either.
    (repo / "demo" / "config.pbtxt").write_text(
        'name: "demo"\nmax_batch_size: 4\ninput [\n'
        '  { name: "x" data_type: TYPE_FP32 dims: [ 4 ] },\n'
        '  { name: "s" data_type: TYPE_FP32 dims: [ 4 ] }\n]\n'
    )
    (repo / "demo" / "5").mkdir()
    shutil.copy(model_b, repo / "demo" / "5" / "model.onnx")
    code, _, err = run(capsys, repo, "promote", "demo", "5", "--label", "shadow", "--sample", "1")
    assert code == 1
    assert "refusing to label version 5 shadow" in err
    assert not (repo / "demo" / "labels.json").exists()
    code, out, err = run(capsys, repo, "promote", "demo", "2", *canary)
    assert code == 0, err
    assert "canary 2 (10%)" in out


def test_rollback_to_a_deleted_version_is_refused(
    capsys: pytest.CaptureFixture[str], three_versions: pathlib.Path
) -> None:
    repo = three_versions
    assert run(capsys, repo, "promote", "demo", "1")[0] == 0
    assert run(capsys, repo, "promote", "demo", "2")[0] == 0
    shutil.rmtree(repo / "demo" / "1")
    code, _, err = run(capsys, repo, "rollback", "demo")
    assert code == 1
    assert "no version 1" in err
    assert read_labels(repo / "demo").stable == 2  # unchanged


def test_rollback_target_walks_back_one_promote_per_rollback() -> None:
    labels = Labels(stable=1)
    for version in (2, 3, 4):
        labels = promoted(labels, STABLE, version)
    targets = []
    while (target := rollback_target(labels)) is not None:
        targets.append(target)
        labels = rolled_back(labels)
    assert targets == [3, 2, 1]
    labels = promoted(labels, STABLE, 4)
    assert rollback_target(labels) == 1


def test_labels_round_trip_and_server_write(tmp_path: pathlib.Path) -> None:
    labels = Labels(
        stable=3,
        canary=Canary(4, 0.1),
        shadow=Shadow(5, 0.2),
        history=(HistoryEntry("stable", 2, "2026-01-01T00:00:00+00:00", "promote"),),
    )
    write_labels(tmp_path, labels)
    assert read_labels(tmp_path) == labels
    assert labels.versions() == {3, 4, 5}
    assert json.loads((tmp_path / "labels.json").read_text()) == {
        "stable": 3,
        "canary": {"version": 4, "weight": 0.1, "sticky": False},
        "shadow": {"version": 5, "sample": 0.2},
        "history": [
            {
                "label": "stable",
                "version": 2,
                "at": "2026-01-01T00:00:00+00:00",
                "action": "promote",
            }
        ],
    }
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "labels.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["labels.json"]  # no temp file left

    # The server's auto-rollback writes with an action: one more history entry.
    written = write_labels(
        tmp_path, Labels(stable=3), action="auto-rollback", detail="p99", version=4
    )
    entry = read_labels(tmp_path).history[-1]
    assert written.history == (entry,)
    assert (entry.label, entry.version, entry.action, entry.detail) == (
        "canary",
        4,
        "auto-rollback",
        "p99",
    )
    assert read_labels(tmp_path / "missing") == Labels()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "Expecting property name"),
        ("[1]", "must be a JSON object"),
        ('{"stabel": 3}', "unknown key(s) ['stabel']"),
        ('{"stable": 0}', "stable must be a positive integer"),
        ('{"stable": true}', "stable must be a positive integer"),
        ('{"stable": "3"}', "stable must be a positive integer"),
        ('{"canary": {"version": 4}}', "canary lacks ['weight']"),
        ('{"canary": {"version": 4, "weight": 1.5}}', "canary.weight must be a number in [0, 1]"),
        ('{"canary": {"version": 4, "weight": "0.1"}}', "canary.weight must be a number"),
        ('{"canary": {"version": 4, "weight": 0.1, "sticky": 1}}', "canary.sticky must be"),
        ('{"canary": {"version": 4, "weight": 0.1, "pin": true}}', "unknown key(s) ['pin']"),
        ('{"shadow": {"version": 5, "sample": -0.1}}', "shadow.sample must be a number"),
        ('{"shadow": {"version": 0, "sample": 0.5}}', "shadow.version must be a positive"),
        ('{"history": {}}', "history must be a list"),
        (
            '{"history": [{"label": "beta", "version": 1, "at": "t", "action": "promote"}]}',
            "history[0]: history label must be one of",
        ),
        ('{"history": [{"label": "stable", "version": 1, "at": "t"}]}', "lacks ['action']"),
        (
            '{"history": [{"label": "stable", "version": 1, "at": "", "action": "promote"}]}',
            "history[0].at must be a non-empty string",
        ),
    ],
)
def test_labels_validation_errors(tmp_path: pathlib.Path, content: str, message: str) -> None:
    (tmp_path / "labels.json").write_text(content)
    with pytest.raises(LabelsError) as exc_info:
        read_labels(tmp_path)
    assert isinstance(exc_info.value, ValueError)  # what the server's scan catches
    assert str(tmp_path / "labels.json") in str(exc_info.value)
    assert message in str(exc_info.value)


def test_labels_constructed_in_code_are_validated() -> None:
    with pytest.raises(LabelsError, match=r"canary\.weight"):
        Canary(2, 1.01)
    with pytest.raises(LabelsError, match="stable"):
        Labels(stable=-1)


def test_null_labels_mean_unset(tmp_path: pathlib.Path) -> None:
    (tmp_path / "labels.json").write_text('{"stable": null, "canary": null, "shadow": null}')
    assert read_labels(tmp_path) == Labels()


def test_publish_with_profile_stores_the_drift_reference(
    capsys: pytest.CaptureFixture[str], repo: pathlib.Path, model_a: pathlib.Path
) -> None:
    rng = np.random.default_rng(3)
    data = repo.parent / "train.npz"
    np.savez(data, x=rng.standard_normal((500, 4), np.float32), s=rng.random((500, 4), np.float32))
    code, out, err = run(capsys, repo, "publish", "m", str(model_a), "--profile", str(data))
    assert code == 0, err
    version_dir = repo / "m" / "1"
    manifest = json.loads((version_dir / "drift_profile.json").read_text())
    assert manifest  # the profile of the new version, written beside it
    assert any(
        p.name.startswith("drift_profile") and p.suffix == ".bin" for p in version_dir.iterdir()
    )
    assert "published m version 1" in out
