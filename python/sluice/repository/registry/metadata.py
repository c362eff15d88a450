"""metadata.json: a version's lineage, written once by publish and read by
inspect, the server (model metadata) and packaging.

`<model>/<version>/metadata.json`::

    {
      "version": 2,
      "sha256": "<hex digest of the model file>",
      "created": "2026-11-26T21:20:31+00:00",   (UTC, ISO 8601)
      "source": "train.py run 42",              (--source; default: the file's name)
      "parent": 1,                              (the latest version before; null if none)
      "params": {"lr": "0.01"},                 (string values)
      "metrics": {"accuracy": 0.93},            (number values)
      "tags": {"team": "risk"},                 (string values)
      "signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                    "outputs": [...]},          (KServe datatypes; -1 = dynamic dim)
      "sluice_version": "0.1.0"
    }

A non-tensor output (ZipMap's sequence of maps, for example) has onnxruntime's
type string as its datatype and shape [].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sluice import config as cfg
from sluice import datatypes
from sluice.errors import ModelLoadError
from sluice.repository import layout
from sluice.repository.registry.errors import RegistryError, reason


def read_metadata(version_dir: Path) -> dict[str, Any] | None:
    """The version's metadata.json, or None in a plain Triton repository."""
    path = version_dir / layout.METADATA_FILENAME
    try:
        inside = layout.inside(
            version_dir.parent, Path(version_dir.name) / layout.METADATA_FILENAME, "file"
        )
        data = json.loads(layout.read_text_file(inside, layout.METADATA_FILENAME))
    except FileNotFoundError:
        return None
    except (ValueError, ModelLoadError) as exc:  # JSON syntax, UTF-8, a layout rule
        raise RegistryError(f"{path}: {reason(exc)}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: want a JSON object")
    return data


def signature_json(signature: cfg.Signature) -> dict[str, list[dict[str, Any]]]:
    return {
        "inputs": [_tensor_json(t) for t in signature.inputs],
        "outputs": [_tensor_json(t) for t in signature.outputs],
    }


def _tensor_json(spec: cfg.TensorSpec) -> dict[str, Any]:
    dt = datatypes.BY_ONNX.get(spec.onnx_type)
    return {
        "name": spec.name,
        "datatype": dt.wire if dt is not None else spec.onnx_type,
        "shape": list(spec.shape),
    }
