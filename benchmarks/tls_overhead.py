"""What TLS costs in throughput: tiny_mlp at concurrency 32, plaintext and TLS
side by side in one run, on one server process each (same flags otherwise).

Two loads per server, each a closed loop of `--concurrency` workers for
`--seconds`:
* one channel (HTTP/2 multiplexes the 32 workers on one connection: the
  handshake happens once, so this is the cost of record encryption);
* a new channel per request (each request pays a full TCP + TLS handshake:
  the worst case, a client that does not keep connections);
and, where perf_analyzer is installed (benchmarks/install_perf_analyzer.sh, or
PERF_ANALYZER_VENV), its throughput at the same concurrency: a C++ client, so
the server, not this Python loader, is what limits it. Rounds are interleaved
and the median is reported. On a small shared machine the Python one-channel
loader is bound by its own CPU and swings from round to round; perf_analyzer's
ratio is the one-channel figure to quote.

    python benchmarks/tls_overhead.py [--seconds 5] [--rounds 3] [--concurrency 32] [--json]

Certificates are generated for the run (cryptography) in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import build_models
import grpc
import harness
import numpy as np

MODEL = "tiny_mlp"


def make_certs(root: Path) -> tuple[Path, Path, Path]:
    """(ca, server cert, server key) PEM files for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def builder(subject: x509.Name, issuer: x509.Name, key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench server")])
    cert = (
        builder(name, ca_name, key.public_key())
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (root / "ca.pem", root / "server.pem", root / "server-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _request() -> Any:
    from sluice.proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return request


async def _load(
    url: str, creds: grpc.ChannelCredentials | None, concurrency: int, seconds: float, reuse: bool
) -> float:
    """Requests per second of a closed loop; `reuse` False opens a channel per request."""
    from sluice.proto import grpc_service_pb2_grpc as pb_grpc

    request = _request()

    def channel() -> grpc.aio.Channel:
        if creds is None:
            return grpc.aio.insecure_channel(url)
        return grpc.aio.secure_channel(url, creds)

    shared = channel() if reuse else None
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            ch = shared if shared is not None else channel()
            try:
                await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=30)
            finally:
                if shared is None:
                    await ch.close()
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    if shared is not None:
        await shared.close()
    return done / elapsed


async def _measure(
    urls: dict[str, str],
    creds: dict[str, grpc.ChannelCredentials | None],
    samples: dict[str, dict[str, list[float]]],
    concurrency: int,
    seconds: float,
    rounds: int,
) -> None:
    """All loads on one event loop (grpc.aio binds to the loop it first runs on)."""
    for label, url in urls.items():  # warm both
        await _load(url, creds[label], concurrency, 1.0, True)
    # Interleaved rounds, medians: the machine's load drifts, both see it alike.
    for _ in range(rounds):
        for label, url in urls.items():
            for key, reuse in (("one_channel_rps", True), ("channel_per_request_rps", False)):
                rps = await _load(url, creds[label], concurrency, seconds, reuse)
                samples[label][key].append(rps)


def _perf_analyzer_rps(url: str, ca: Path | None, concurrency: int, seconds: float) -> float | None:
    """perf_analyzer's throughput (a C++ client: the server is the bottleneck,
    not this process), or None when it is not installed or does not stabilise."""
    pa = harness.perf_analyzer_path()
    if not pa.exists():
        return None
    argv = [str(pa), "-i", "grpc", "-u", url, "-m", MODEL]
    argv += ["--concurrency-range", f"{concurrency}:{concurrency}"]
    argv += ["--measurement-interval", str(int(seconds * 1000)), "-s", "25", "-r", "6"]
    if ca is not None:
        argv += ["--ssl-grpc-use-ssl", f"--ssl-grpc-root-certifications-file={ca}"]
    rc, out = harness.run_bounded(argv, seconds * 12 + 60)
    m = re.search(r"Throughput: ([\d.]+) infer/sec", out)
    if rc != 0 or m is None:
        print(f"perf_analyzer gave no throughput (rc {rc}): {out[-400:]}", file=sys.stderr)
        return None
    return float(m.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # sluice's generated protos in their own pool: build_models checks configs
    # with tritonclient's, which share the `inference` package name.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import sluice_proto_pool  # noqa: F401

    harness.install_cleanup()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models.build(root / "repo")
        ca, cert, key = make_certs(root)
        tls_flags = ["--grpc-use-ssl", "true", "--grpc-server-cert", str(cert)]
        tls_flags += ["--grpc-server-key", str(key)]
        creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        servers = {
            label: harness.sluice_server(
                root / "repo",
                extra=["--model-control-mode", "explicit", "--load-model", MODEL, *flags],
            )
            for label, flags in (("plaintext", []), ("tls", tls_flags))
        }
        channel_creds = {"plaintext": None, "tls": creds}
        samples: dict[str, dict[str, list[float]]] = {
            label: {"one_channel_rps": [], "channel_per_request_rps": []} for label in servers
        }
        try:
            urls = {label: server.start() for label, server in servers.items()}
            asyncio.run(
                _measure(urls, channel_creds, samples, args.concurrency, args.seconds, args.rounds)
            )
            for _ in range(args.rounds):
                for label, url in urls.items():
                    rps = _perf_analyzer_rps(
                        url, ca if label == "tls" else None, args.concurrency, args.seconds
                    )
                    if rps is not None:
                        samples[label].setdefault("perf_analyzer_rps", []).append(rps)
        finally:
            for server in servers.values():
                server.stop()
        results = {
            label: {key: statistics.median(v) for key, v in by_key.items() if v}
            for label, by_key in samples.items()
        }
    ratios = {
        k: results["tls"][k] / results["plaintext"][k]
        for k in results["plaintext"]
        if k in results["tls"]
    }
    report = {
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": args.rounds,
        **results,
        "tls_over_plaintext": ratios,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{MODEL}, concurrency {args.concurrency}, {args.seconds:g} s per load")
    for k in ratios:
        print(
            f"  {k:<24} plaintext {results['plaintext'][k]:8.0f}/s  tls {results['tls'][k]:8.0f}/s"
            f"  ratio {ratios[k]:.3f}"
        )


if __name__ == "__main__":
    main()
