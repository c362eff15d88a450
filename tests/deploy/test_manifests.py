"""deploy/kubernetes and deploy/kserve: schema validation, and what a schema check
cannot see.

- Every manifest, and the kustomize renderings of the base and the GPU overlay,
  pass `kubernetes-validate --strict` against two Kubernetes versions; the KServe
  resources pass the KServe SDK's models of their CRDs (tests/deploy/kserve_schema.py).
- Container args parse with sluice's own CLI parser (a misspelt flag fails here),
  and the ports, volume paths and probes they imply match the manifests.
- Selectors match the pod labels; the Service and ServiceMonitor name real ports.
- The drain budget adds up: terminationGracePeriodSeconds covers preStop +
  --drain-delay-secs + --grace-seconds.
- Each probe is run against a real `sluice serve` started with the manifest's
  flags, and the HPA's custom metric is scraped from its /metrics; the KServe
  runtime's readiness path and its v2 REST and gRPC endpoints answer.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import kserve_schema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sluice.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KSERVE = ROOT / "deploy" / "kserve"
# Native gRPC probes are GA from 1.27; two supported releases, a year apart.
VERSIONS = ("1.31", "1.34")
CRD_KINDS = {"ServiceMonitor", "ClusterServingRuntime", "ServingRuntime", "InferenceService"}
KUBECTL = shutil.which("kubectl")

Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    files = sorted(KUBERNETES.rglob("*.yaml")) + sorted(KSERVE.rglob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml"]


def render(overlay: str) -> list[Doc]:
    if KUBECTL is None:
        pytest.skip("kubectl not installed: kustomize renderings not checked")
    out = subprocess.run(
        [KUBECTL, "kustomize", str(KUBERNETES / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=["base", "overlays/gpu"])
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return render(request.param)


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: Doc = containers[0]
    return c


def serve_args(c: Doc) -> argparse.Namespace:
    """The container's args as sluice parses them: an unknown flag fails here."""
    args = [*c.get("command", [])[1:], *c["args"]]
    assert args[0] == "serve", args
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"sluice cannot parse the container args {args}")


def ports(c: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c["ports"]}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def prestop_seconds(c: Doc) -> float:
    command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if not command:
        return 0.0
    assert command[0] == "sleep", command
    assert len(command) == 2, command
    return float(command[1])


# ---- schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_files_pass_kubernetes_validate_strict(path: Path, version: str) -> None:
    for doc in load(path):
        if doc["kind"] in CRD_KINDS:
            continue  # custom resources: their own schemas, below
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_renderings_pass_kubernetes_validate_strict(rendered: list[Doc], version: str) -> None:
    kinds = {d["kind"] for d in rendered}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    for doc in rendered:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_a_schema_error_is_caught() -> None:
    """The validation above can fail: a misplaced field is refused."""
    deployment = one(load(KUBERNETES / "base" / "deployment.yaml"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcPort"] = 8001
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


@pytest.fixture(scope="module")
def kserve_validator() -> Any:
    try:
        return kserve_schema.KServeValidator(VERSIONS[-1])
    except ImportError:
        pytest.skip(
            f"kserve=={kserve_schema.KSERVE_VERSION} not installed (.ci/run installs it "
            "with --no-deps): KServe resources not schema-checked"
        )


@pytest.mark.parametrize("path", sorted(KSERVE.glob("*.yaml")), ids=lambda p: p.name)
def test_kserve_resources_match_kserve_crd_models(kserve_validator: Any, path: Path) -> None:
    for doc in load(path):
        assert kserve_validator.validate(doc) == []


def test_kserve_validator_catches_errors(kserve_validator: Any) -> None:
    runtime = one(load(KSERVE / "servingruntime.yaml"), "ClusterServingRuntime")
    runtime["spec"]["supportedModelFormat"] = runtime["spec"].pop("supportedModelFormats")
    runtime["spec"]["containers"][0]["port"] = 9000
    errors = kserve_validator.validate(runtime)
    assert any("unknown field 'supportedModelFormat'" in e for e in errors), errors
    assert any("port" in e and "containers[0]" in e for e in errors), errors
    del runtime["spec"]["containers"]  # required
    assert any("containers" in e for e in kserve_validator.validate(runtime))
    isvc = one(load(KSERVE / "inferenceservice.yaml"), "InferenceService")
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    isvc["spec"]["predictor"]["model"]["ports"][0]["containerPort"] = "h2c"
    errors = kserve_validator.validate(isvc)
    assert errors[0] == "InferenceService.spec.predictor.minReplicas: 'one' is not int"
    assert errors[1].startswith("InferenceService.spec.predictor.model.ports[0]: "), errors
    assert len(errors) == 2, errors


# ---- what a schema cannot see ----------------------------------------------------


def test_selectors_match_pod_labels(rendered: list[Doc]) -> None:
    deployment = one(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    pdb = one(rendered, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    services = [d for d in rendered if d["kind"] == "Service"]
    assert services
    for service in services:
        assert matches(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
    hpa = one(rendered, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    monitor = one(rendered, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    monitored = [s for s in services if matches(wanted, s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in monitored] == ["sluice"]
    service_ports = {p["name"] for p in monitored[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"


def test_ports_volumes_and_probes_match_the_server_flags(rendered: list[Doc]) -> None:
    deployment = one(rendered, "Deployment")
    c = container(deployment)
    args = serve_args(c)
    named = ports(c)
    assert args.host == "0.0.0.0"  # reachable from the kubelet and the Service
    assert named == {"grpc": args.grpc_port, "http-metrics": args.http_port}
    for service in (d for d in rendered if d["kind"] == "Service"):
        for p in service["spec"]["ports"]:
            assert p["targetPort"] in named, p
        appproto = {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]}
        assert appproto["grpc"] == "kubernetes.io/h2c"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert args.model_repository in mounts
    assert mounts[args.model_repository]["readOnly"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    models = volumes[mounts[args.model_repository]["name"]]
    assert models["persistentVolumeClaim"]["readOnly"] is True
    assert args.model_control_mode == "poll"  # replicas pick up published versions
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        assert probe["grpc"]["port"] == args.grpc_port, kind
        assert probe["grpc"].get("service", "") == ""  # the server-wide status
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "covers model loading"


def test_drain_budget_adds_up(rendered: list[Doc]) -> None:
    spec = one(rendered, "Deployment")["spec"]["template"]["spec"]
    c = spec["containers"][0]
    args = serve_args(c)
    needed_s = prestop_seconds(c) + args.drain_delay_secs + args.grace_seconds
    assert needed_s > 0
    assert spec["terminationGracePeriodSeconds"] >= needed_s + 1, needed_s


def test_resources_follow_the_thread_budget(rendered: list[Doc]) -> None:
    resources = container(one(rendered, "Deployment"))["resources"]
    cpu = resources["limits"]["cpu"]
    # sluice floors the CFS quota to whole cores for onnxruntime's threads.
    assert re.fullmatch(r"[1-9]\d*", str(cpu)), f"cpu limit {cpu} is not whole cores"
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS


def test_gpu_overlay() -> None:
    c = container(one(render("overlays/gpu"), "Deployment"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert serve_args(c).execution_provider_fallback == "fail"
    assert c["image"].startswith("sluice-gpu:")
    cpu = container(one(render("base"), "Deployment"))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


def kserve_services() -> list[Doc]:
    return [d for f in sorted(KSERVE.glob("inferenceservice*.yaml")) for d in load(f)]


def test_kserve_runtime_maps_storage_onto_the_repository_layout() -> None:
    runtime = one(load(KSERVE / "servingruntime.yaml"), "ClusterServingRuntime")
    spec = runtime["spec"]
    c = spec["containers"][0]
    args = serve_args(c)
    # KServe's storage initializer downloads storageUri into /mnt/models.
    assert args.model_repository == "/mnt/models"
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == args.http_port
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    assert formats == {"onnx"}
    for isvc in kserve_services():
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in spec["protocolVersions"]


# KServe and Knative route an InferenceService to this port when none is named.
KSERVE_DEFAULT_PORT = 8080


def test_kserve_runtime_serves_v2_over_http_and_grpc() -> None:
    runtime = one(load(KSERVE / "servingruntime.yaml"), "ClusterServingRuntime")
    spec = runtime["spec"]
    c = spec["containers"][0]
    args = serve_args(c)
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    # No port here: KServe merges an InferenceService's ports into the runtime's
    # (by containerPort) and Knative serves one port, so each service names its own.
    assert "ports" not in c
    assert args.http_port == KSERVE_DEFAULT_PORT  # no port named: v2 REST
    probe = c["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"]) == (args.http_port, "/v2/health/ready")
    # One InferenceService per protocol, each naming the port Knative routes to.
    wanted = {"v2": ("http1", args.http_port), "grpc-v2": ("h2c", args.grpc_port)}
    seen = set()
    for isvc in kserve_services():
        model = isvc["spec"]["predictor"]["model"]
        protocol = model["protocolVersion"]
        assert ports(model) == dict([wanted[protocol]]), isvc["metadata"]["name"]
        seen.add(protocol)
    assert seen == set(wanted)


def test_adapter_rules_query_real_metric_names() -> None:
    rules = yaml.safe_load(
        one(load(KUBERNETES / "prometheus-adapter" / "adapter-rules.yaml"), "ConfigMap")["data"][
            "config.yaml"
        ]
    )["rules"]
    exposed = {r["name"]["as"] for r in rules}
    hpa = one(load(KUBERNETES / "base" / "hpa.yaml"), "HorizontalPodAutoscaler")
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in exposed


# ---- against a real server -------------------------------------------------------


def grpc_health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        status: int = response.status
        return status


def local_args(c: Doc) -> list[str]:
    """The container's flags minus those the test sets (host, ports, repository)."""
    own = ("--host", "--grpc-port", "--http-port", "--model-repository")
    return [a for a in c["args"][1:] if not a.startswith(own)]


def test_probes_and_metrics_answer_on_a_real_server(start_server: Any) -> None:
    c = container(one(load(KUBERNETES / "base" / "deployment.yaml"), "Deployment"))
    server = start_server(None, *local_args(c))
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        assert "grpc" in probe, kind
        status = grpc_health(server.grpc_port, probe["grpc"].get("service", ""))
        assert status == health_pb2.HealthCheckResponse.SERVING, kind
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    rules = yaml.safe_load(
        one(load(KUBERNETES / "prometheus-adapter" / "adapter-rules.yaml"), "ConfigMap")["data"][
            "config.yaml"
        ]
    )["rules"]
    for rule in rules:
        name = re.match(r"[a-z_:]+", rule["seriesQuery"].strip("'"))
        assert name is not None
        assert re.search(rf"^{name.group(0)}\{{", metrics, re.M), name.group(0)


def test_kserve_runtime_paths_answer_on_a_real_server(start_server: Any) -> None:
    """The runtime's readiness probe, and the v2 REST and gRPC paths its two
    InferenceServices route to, on a server started with the runtime's flags."""
    runtime = one(load(KSERVE / "servingruntime.yaml"), "ClusterServingRuntime")
    kc = runtime["spec"]["containers"][0]
    server = start_server(None, *local_args(kc))
    http = f"http://127.0.0.1:{server.http_port}"
    with urllib.request.urlopen(http + kc["readinessProbe"]["httpGet"]["path"], timeout=10) as r:
        assert r.status == 200
    body = json.dumps(
        {"inputs": [{"name": "features", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]}
    ).encode()
    request = urllib.request.Request(
        http + "/v2/models/tabular_classifier/infer", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200
        assert json.loads(r.read())["model_name"] == "tabular_classifier"
    assert grpc_health(server.grpc_port, "") == health_pb2.HealthCheckResponse.SERVING
