"""TLS, mutual TLS, certificate reload, restricted APIs, reflection switch and
the bounded HTTP port, on a real `sluice serve` with real gRPC clients.

Certificates are generated per test (cryptography); no key is ever committed."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tc
from conftest import ServerProcess
from tritonclient.utils import InferenceServerException

x509 = pytest.importorskip("cryptography.x509", reason="the test extra installs cryptography")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


class Pki:
    """A CA and the certificates it signs, written as PEM files under `root`."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        self.cert = (
            self._builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = root / f"{name}-ca.pem"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(
        subject: x509.Name, issuer: x509.Name, public_key: object
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, cn: str, *, server: bool) -> tuple[Path, Path]:
        """(certificate, key) files for a server on 127.0.0.1 or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = self._builder(subject, self.cert.subject, key.public_key())
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = self.root / f"{self.name}-{cn}.pem"
        key_path = self.root / f"{self.name}-{cn}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


def _live(url: str, **tls: object) -> bool:
    client = tc.InferenceServerClient(url, **tls)  # type: ignore[arg-type]
    try:
        return bool(client.is_server_live())
    except InferenceServerException:
        return False
    finally:
        client.close()


def test_grpc_tls_mutual_tls_and_reload(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    ca = Pki(tmp_path, "one")
    cert, key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live-key.pem"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    server = start_server(
        None,
        "--grpc-use-ssl", "true",
        "--grpc-server-cert", str(live_cert),
        "--grpc-server-key", str(live_key),
        "--grpc-root-cert", str(ca.ca_path),
        "--grpc-use-ssl-mutual", "true",
    )  # fmt: skip
    mtls = {
        "ssl": True,
        "root_certificates": str(ca.ca_path),
        "private_key": str(client_key),
        "certificate_chain": str(client_cert),
    }
    assert _live(server.url, **mtls)
    assert not _live(server.url)  # plaintext
    assert not _live(server.url, ssl=True, root_certificates=str(ca.ca_path))  # no client cert

    # Reload: a certificate from another CA replaces the files; new handshakes use it.
    other = Pki(tmp_path, "two")
    new_cert, new_key = other.issue("server", server=True)
    live_key.write_bytes(new_key.read_bytes())
    live_cert.write_bytes(new_cert.read_bytes())
    with_other_ca = dict(mtls, root_certificates=str(other.ca_path))
    assert _live(server.url, **with_other_ca)
    assert not _live(server.url, **mtls)
    assert "certificates reloaded" in server.log


def test_sluice_infer_connects_with_tls(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    import subprocess
    import sys

    ca = Pki(tmp_path, "ca")
    cert, key = ca.issue("server", server=True)
    server = start_server(
        None,
        "--grpc-use-ssl",
        "true",
        "--grpc-server-cert",
        str(cert),
        "--grpc-server-key",
        str(key),
    )
    cmd = [sys.executable, "-m", "sluice.cli", "infer", "tabular_classifier", "--random"]
    cmd += ["--url", server.url]
    done = subprocess.run([*cmd, "--root-cert", str(ca.ca_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    plain = subprocess.run([*cmd, "--timeout", "5"], capture_output=True, text=True)
    assert plain.returncode != 0


def test_restricted_protocol_guards_management_not_inference(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(
        None,
        "--model-control-mode", "explicit",
        "--load-model", "*",
        "--grpc-restricted-protocol", "model-repository:admin-key=s3cret",
    )  # fmt: skip
    client = tc.InferenceServerClient(server.url)
    for headers in (None, {"admin-key": "wrong"}):
        with pytest.raises(InferenceServerException) as err:
            client.unload_model("tabular_classifier", headers=headers)
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        assert "expecting header 'admin-key'" in str(err.value.message())
    assert client.is_model_ready("tabular_classifier")  # health and inference stay open
    from sluice.proto import sluice_service_pb2 as spb
    from sluice.proto import sluice_service_pb2_grpc as spb_grpc

    with grpc.insecure_channel(server.url) as channel:
        stub = spb_grpc.SluiceServiceStub(channel)
        request = spb.SetRolloutRequest(model_name="tabular_classifier", stable_version=1)
        with pytest.raises(grpc.RpcError) as rpc_err:
            stub.SetRollout(request)
        assert rpc_err.value.code() is grpc.StatusCode.UNAVAILABLE
    client.unload_model("tabular_classifier", headers={"admin-key": "s3cret"})
    assert not client.is_model_ready("tabular_classifier")


def test_reflection_can_be_switched_off(start_server: Callable[..., ServerProcess]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def services(url: str) -> list[str] | grpc.StatusCode:
        with grpc.insecure_channel(url) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            try:
                reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
            except grpc.RpcError as exc:
                return exc.code()
            return [s.name for s in reply.list_services_response.service]

    on = start_server(None)
    assert "inference.GRPCInferenceService" in services(on.url)  # type: ignore[operator]
    off = start_server(None, "--reflection", "false")
    assert services(off.url) is grpc.StatusCode.UNIMPLEMENTED


def _get(url: str, context: ssl.SSLContext | None = None, **headers: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_http_tls_and_restricted_metrics(
    tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    ca = Pki(tmp_path, "ca")
    cert, key = ca.issue("server", server=True)
    server = start_server(
        None,
        "--http-use-ssl", "true",
        "--http-server-cert", str(cert),
        "--http-server-key", str(key),
        "--http-restricted-api", "metrics:scrape-token=abc",
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(ca.ca_path))
    base = f"https://127.0.0.1:{server.http_port}"
    assert _get(f"{base}/v2/health/ready", context)[0] == 200
    status, body = _get(f"{base}/metrics", context)
    assert status == 403
    assert b"expecting header 'scrape-token'" in body
    status, body = _get(f"{base}/metrics", context, **{"Scrape-Token": "abc"})
    assert status == 200
    assert b"nv_inference_request_success" in body
    with pytest.raises(urllib.error.URLError):
        _get(f"{base}/v2/health/ready")  # a client that does not trust the CA


def test_half_sent_http_connections_are_bounded_and_time_out(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(None, "--http-timeout-secs", "5", "--http-max-connections", "8")
    proc = psutil.Process(server.proc.pid)
    threads_before = proc.num_threads()
    sockets = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
        s.sendall(b"GET /metr")  # never finished
        sockets.append(s)
    # The first 8 hold a thread each; the rest are refused at once with 503.
    refused = 0
    for s in sockets[8:]:
        reply = s.recv(4096)
        refused += reply.startswith(b"HTTP/1.1 503")
    assert refused >= 90
    assert proc.num_threads() <= threads_before + 8 + 4  # 4: room for gRPC's own pool
    for s in sockets[:8]:  # closed by the server after the idle timeout
        assert s.recv(4096) == b""
        s.close()
    for s in sockets[8:]:
        s.close()
    assert _get(f"http://127.0.0.1:{server.http_port}/v2/health/live")[0] == 200


def test_exposure_warning_on_non_loopback_address() -> None:
    from sluice.server import security

    assert security.exposure_warnings("127.0.0.1", None, None, ()) == []
    assert security.exposure_warnings("::1", None, None, ()) == []
    warnings = security.exposure_warnings("0.0.0.0", None, None, ())
    assert any("WITHOUT TLS" in w for w in warnings)
    assert any("model management" in w for w in warnings)


def _sluice(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command line in its own process (one grpc runtime per command)."""
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_client_commands_take_the_tls_options(
    tmp_path: Path, start_server: Callable[..., ServerProcess], executor: str
) -> None:
    if executor != "thread":
        pytest.skip("the client's TLS options do not depend on the executor (run with thread)")
    ca = Pki(tmp_path, "ca")
    cert, key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    server = start_server(
        None,
        "--grpc-use-ssl", "true",
        "--grpc-server-cert", str(cert),
        "--grpc-server-key", str(key),
        "--grpc-root-cert", str(ca.ca_path),
        "--grpc-use-ssl-mutual", "true",
        "--http-use-ssl", "true",
        "--http-server-cert", str(cert),
        "--http-server-key", str(key),
    )  # fmt: skip
    server_tls = ["--root-cert", str(ca.ca_path)]
    mutual = [*server_tls, "--client-cert", str(client_cert), "--client-key", str(client_key)]
    rows = tmp_path / "rows.npy"
    np.save(rows, np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32))
    labels = tmp_path / "labels.csv"
    labels.write_text("never-seen-id,1\n")
    model, url = "tabular_classifier", ["--url", server.url]
    metrics = f"https://127.0.0.1:{server.http_port}/metrics"
    commands = {
        "bench": ["bench", model, *url, "--requests", "20", "--json", "--metrics-url", metrics],
        "drift": ["drift", model, *url, "--json", "--timeout", "10"],
        "feedback": ["feedback", model, *url, "--labels", str(labels), "--timeout", "10"],
        "batch": ["batch", model, *url, "--input", str(rows), "--output", str(tmp_path / "o.npz")],
    }

    out = {}
    for name, argv in commands.items():
        done = _sluice(*argv, *mutual)
        assert done.returncode == 0, (name, done.stderr)
        out[name] = done.stdout
    bench = json.loads(out["bench"])
    assert bench["successes"] == 20
    assert "cannot read" not in str(bench["cost"])  # the https /metrics page, with --root-cert
    assert json.loads(out["drift"])["model"] == model
    assert "0 matched, 1 unknown" in out["feedback"]
    with np.load(tmp_path / "o.npz") as scored:
        assert len(scored["label"]) == 5

    # Without the options, or without the client certificate mutual TLS wants:
    # a refusal that says which options to give, not a traceback.
    for name, argv in commands.items():
        plain = _sluice(*argv)
        assert plain.returncode == 1, (name, plain.stderr)
        assert "UNAVAILABLE" in plain.stderr, (name, plain.stderr)
        assert "if the server runs with --grpc-use-ssl, add --root-cert" in plain.stderr, name
        assert "Traceback" not in plain.stderr
    half = _sluice(*commands["drift"], *server_tls)
    assert half.returncode == 1
    assert "--grpc-use-ssl-mutual, add --client-cert and --client-key" in half.stderr
