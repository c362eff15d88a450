"""Structural validation of KServe resources against the KServe Python SDK's
generated models (PyPI `kserve`, pinned in .ci/run), which carry the CRDs'
OpenAPI schema: each class lists its JSON fields (`attribute_map`) and their
types (`openapi_types`), and its constructor enforces required fields.

Only `kserve.models` and `kserve.configuration` are loaded, under a bare package
object: the SDK's `kserve/__init__.py` starts the model-server stack (FastAPI,
its own `inference` protobuf package, which would collide with tritonclient's).
Kubernetes core types inside KServe objects (V1Container, ...) are checked
against kubernetes-validate's schema for them, strictly.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from typing import Any

import kubernetes_validate

KSERVE_VERSION = "0.21.0"
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "object": (object,),
    "datetime": (str,),
}
# KServe resources by apiVersion/kind -> the SDK class that describes them.
KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


def load_models() -> types.ModuleType:
    """kserve.models without running kserve/__init__.py; raises ImportError when
    the kserve package is not installed."""
    spec = importlib.util.find_spec("kserve")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("kserve is not installed")
    saved = {k: v for k, v in sys.modules.items() if k == "kserve" or k.startswith("kserve.")}
    package = types.ModuleType("kserve")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = package
    try:
        return importlib.import_module("kserve.models")
    finally:
        for k in [k for k in sys.modules if k == "kserve" or k.startswith("kserve.")]:
            del sys.modules[k]
        sys.modules.update(saved)


class KServeValidator:
    def __init__(self, kubernetes_version: str) -> None:
        self.models = load_models()
        self.kubernetes_version = kubernetes_version

    def validate(self, doc: dict[str, Any]) -> list[str]:
        """Every problem found in doc (empty: valid)."""
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in KINDS:
            return [f"not a KServe resource this validator knows: {key}"]
        errors: list[str] = []
        self._check(doc, KINDS[key], doc["kind"], errors)  # type: ignore[index]
        return errors

    def _check(self, value: Any, type_name: str, path: str, errors: list[str]) -> None:
        if m := re.fullmatch(r"list\[(.+)\]", type_name):
            if not isinstance(value, list):
                errors.append(f"{path}: expected a list")
                return
            for i, item in enumerate(value):
                self._check(item, m.group(1), f"{path}[{i}]", errors)
        elif m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
            if not isinstance(value, dict):
                errors.append(f"{path}: expected a map")
                return
            for k, item in value.items():
                self._check(item, m.group(1), f"{path}.{k}", errors)
        elif type_name in _PRIMITIVES:
            ok = isinstance(value, _PRIMITIVES[type_name])
            if type_name in ("int", "float") and isinstance(value, bool):
                ok = False
            if not ok:
                errors.append(f"{path}: {value!r} is not {type_name}")
        elif hasattr(self.models, type_name):
            self._check_model(value, getattr(self.models, type_name), path, errors)
        elif type_name.startswith("V1") and type_name[2:3].isupper():
            self._check_core(value, type_name[2:], path, errors)
        else:
            errors.append(f"{path}: no schema for type {type_name}")

    def _check_model(self, value: Any, cls: type, path: str, errors: list[str]) -> None:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object")
            return
        by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}  # type: ignore[attr-defined]
        for key, item in value.items():
            if key not in by_json:
                errors.append(f"{path}: unknown field {key!r}")
                continue
            attr = by_json[key]
            self._check(item, cls.openapi_types[attr], f"{path}.{key}", errors)  # type: ignore[attr-defined]
        try:  # the generated constructor checks required fields and enums
            cls(**{by_json[k]: v for k, v in value.items() if k in by_json})
        except (ValueError, TypeError) as exc:
            errors.append(f"{path}: {exc}")

    def _check_core(self, value: Any, kind: str, path: str, errors: list[str]) -> None:
        """A Kubernetes core/v1 object embedded in a KServe one (Container, ...)."""
        pod_spec = {"containers": [value]}
        port_spec = {"containers": [{"name": "check", "ports": [value]}]}
        wrappers: dict[str, dict[str, Any]] = {
            "Container": {"kind": "Pod", "metadata": {"name": "check"}, "spec": pod_spec},
            "ContainerPort": {"kind": "Pod", "metadata": {"name": "check"}, "spec": port_spec},
            "ObjectMeta": {"kind": "ConfigMap", "metadata": value},
        }
        if kind not in wrappers:
            errors.append(f"{path}: core type {kind} is not checked by this validator")
            return
        wrapper = {"apiVersion": "v1", **wrappers[kind]}
        try:
            kubernetes_validate.validate(wrapper, self.kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{path}: {exc.message}")
