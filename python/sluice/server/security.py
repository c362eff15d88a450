"""Transport security: TLS/mTLS for the gRPC and HTTP ports (certificates
reloaded when their files change), restricted APIs (a header token per protocol
group, Triton's --grpc-restricted-protocol), and the start-up warning when a
non-loopback address is served in the clear.

Triton's flags: --grpc-use-ssl, --grpc-server-cert, --grpc-server-key,
--grpc-root-cert, --grpc-use-ssl-mutual (and --http-* equivalents);
--grpc-restricted-protocol=<group>[,<group>...]:<header>=<value>.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from sluice import defaults
from sluice.limits import RequestLimits

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """Certificate files of one port. `root_cert` is the CA that client
    certificates must chain to (mutual TLS) and is required with `mutual`."""

    server_cert: Path
    server_key: Path
    root_cert: Path | None = None
    mutual: bool = False

    def __post_init__(self) -> None:
        if self.mutual and self.root_cert is None:
            raise ValueError("mutual TLS needs a root certificate (--*-root-cert)")

    def files(self) -> tuple[Path, ...]:
        return (self.server_cert, self.server_key) + ((self.root_cert,) if self.root_cert else ())


class _Watched:
    """The files' (mtime_ns, size) identity; `changed()` says whether any moved
    since the last call. Cheap enough to ask on every new connection."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self._paths = tuple(paths)
        self._lock = threading.Lock()
        self._seen = self._identity()

    def _identity(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in self._paths:
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def changed(self) -> bool:
        now = self._identity()
        with self._lock:
            if now == self._seen:
                return False
            self._seen = now
            return True


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _grpc_certificate_configuration(tls: TlsOptions) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(_read(tls.server_key), _read(tls.server_cert))],
        root_certificates=_read(tls.root_cert) if tls.root_cert else None,
    )


def grpc_server_credentials(tls: TlsOptions) -> grpc.ServerCredentials:
    """Dynamic credentials: gRPC asks the fetcher at each new handshake, and the
    fetcher answers a new configuration only when a file changed. A file caught
    half-written keeps the old certificates (and logs why) until the next try."""
    watched = _Watched(tls.files())

    def fetch() -> Any:
        if not watched.changed():
            return None
        try:
            config = _grpc_certificate_configuration(tls)
        except OSError as exc:
            log.error("gRPC TLS: cannot reload the certificates, keeping the old ones: %s", exc)
            return None
        log.info("gRPC TLS: certificates reloaded from %s", tls.server_cert)
        return config

    return grpc.dynamic_ssl_server_credentials(
        _grpc_certificate_configuration(tls),
        fetch,
        require_client_authentication=tls.mutual,
    )


class ReloadingSslContext:
    """An ssl.SSLContext for the HTTP port whose certificate chain is reloaded
    (into the same context: later handshakes use it) when the files change.
    `maybe_reload()` is called before each accept."""

    def __init__(self, tls: TlsOptions) -> None:
        self.tls = tls
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._watched = _Watched(tls.files())
        self._load()

    def _load(self) -> None:
        self.context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        if self.tls.root_cert is not None:
            self.context.load_verify_locations(cafile=str(self.tls.root_cert))
        self.context.verify_mode = ssl.CERT_REQUIRED if self.tls.mutual else ssl.CERT_NONE

    def maybe_reload(self) -> None:
        if not self._watched.changed():
            return
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.error("HTTP TLS: cannot reload the certificates, keeping the old ones: %s", exc)
            return
        log.info("HTTP TLS: certificates reloaded from %s", self.tls.server_cert)


# ---- restricted APIs ------------------------------------------------------------------

# Triton's protocol groups, and the RPCs (by method name) each covers. sluice's
# own writes (SetRollout, Feedback) are model-repository management.
GRPC_GROUPS: dict[str, frozenset[str]] = {
    "health": frozenset({"ServerLive", "ServerReady", "ModelReady", "Check", "Watch"}),
    "metadata": frozenset({"ServerMetadata", "ModelMetadata"}),
    "inference": frozenset({"ModelInfer", "ModelStreamInfer"}),
    "shared-memory": frozenset(
        {
            "SystemSharedMemoryStatus",
            "SystemSharedMemoryRegister",
            "SystemSharedMemoryUnregister",
            "CudaSharedMemoryStatus",
            "CudaSharedMemoryRegister",
            "CudaSharedMemoryUnregister",
        }
    ),
    "model-config": frozenset({"ModelConfig"}),
    "model-repository": frozenset(
        {
            "RepositoryIndex",
            "RepositoryModelLoad",
            "RepositoryModelUnload",
            "SetRollout",
            "GetRollout",
            "Feedback",
        }
    ),
    "statistics": frozenset({"ModelStatistics", "DriftReport"}),
    "trace": frozenset({"TraceSetting"}),
    "logging": frozenset({"LogSettings"}),
}
HTTP_GROUPS: dict[str, frozenset[str]] = {
    "health": frozenset({"/v2/health/live", "/v2/health/ready"}),
    # The status page (server/status_page.py) shows what /metrics exports (states,
    # rates, latency, rollouts, drift, cost) plus load failure reasons: whoever may
    # not scrape may not read it either.
    "metrics": frozenset({"/metrics", "/", "/status", "/status/grafana-dashboard.json"}),
}


@dataclasses.dataclass(frozen=True)
class Restriction:
    groups: frozenset[str]
    header: str  # lower case: gRPC metadata keys and our HTTP lookup are lower case
    value: str


def parse_restriction(spec: str, known: Mapping[str, frozenset[str]]) -> Restriction:
    """`<group>[,<group>...]:<header>=<value>` (Triton's syntax)."""
    groups_text, sep, token = spec.partition(":")
    header, eq, value = token.partition("=")
    if not sep or not eq or not groups_text or not header or not value:
        raise ValueError(f"restricted API {spec!r}: want <group>[,<group>...]:<header>=<value>")
    groups = frozenset(g.strip() for g in groups_text.split(","))
    unknown = sorted(groups - known.keys())
    if unknown:
        raise ValueError(
            f"restricted API {spec!r}: unknown group(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return Restriction(groups, header.strip().lower(), value)


def check_restrictions(restrictions: Iterable[Restriction]) -> None:
    """Each group may be restricted once (as in Triton)."""
    seen: set[str] = set()
    for r in restrictions:
        twice = seen & r.groups
        if twice:
            raise ValueError(f"API group(s) {', '.join(sorted(twice))} restricted twice")
        seen |= r.groups


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


class RestrictedApiInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses an RPC of a restricted group whose metadata lacks the header
    value, with UNAVAILABLE as Triton does; other RPCs pass untouched (and pay
    one dict lookup)."""

    def __init__(self, restrictions: Iterable[Restriction]) -> None:
        self._by_method: dict[str, Restriction] = {}
        for r in restrictions:
            for group in r.groups:
                for method in GRPC_GROUPS[group]:
                    self._by_method[method] = r

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        rule = self._by_method.get(_method_name(handler_call_details.method))
        if rule is None:
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        if any(k == rule.header and v == rule.value for k, v in metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _refusing(handler, rule.header)


def _refusing(handler: grpc.RpcMethodHandler | None, header: str) -> grpc.RpcMethodHandler:
    message = f"This API is restricted, expecting header '{header}'"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)
        yield  # pragma: no cover - makes this an async generator

    deserializer = handler.request_deserializer if handler is not None else None
    serializer = handler.response_serializer if handler is not None else None
    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, deserializer, serializer)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, deserializer, serializer)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(unary, deserializer, serializer)


def http_refusal(
    restrictions: Iterable[Restriction], path: str, headers: Mapping[str, str]
) -> str | None:
    """The refusal message for an HTTP path, or None when it may pass.
    `headers` are keyed lower case."""
    for r in restrictions:
        if any(path in HTTP_GROUPS[g] for g in r.groups) and headers.get(r.header) != r.value:
            return f"This API is restricted, expecting header '{r.header}'"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(
    host: str,
    grpc_tls: TlsOptions | None,
    http_tls: TlsOptions | None,
    grpc_restricted: Iterable[Restriction],
) -> list[str]:
    """What an operator must hear at start: a non-loopback address served in the
    clear, or with management open to anyone who can connect."""
    if is_loopback(host):
        return []
    out = []
    if grpc_tls is None:
        out.append(
            f"gRPC listens on {host} WITHOUT TLS: anyone on the network can read and "
            "inject traffic (--grpc-use-ssl)"
        )
    groups = set().union(*(r.groups for r in grpc_restricted))
    if "model-repository" not in groups:
        out.append(
            f"model management (load/unload, SetRollout, Feedback) is open to anyone who "
            f"reaches {host} (--grpc-restricted-protocol=model-repository:<header>=<value>)"
        )
    if http_tls is None:
        out.append(f"HTTP listens on {host} WITHOUT TLS (--http-use-ssl)")
    return out


# ---- command line (sluice serve) --------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Triton's security flags and sluice's request bounds, for `sluice serve`."""
    g = parser.add_argument_group("security and limits")
    for proto in ("grpc", "http"):
        port = "gRPC" if proto == "grpc" else "HTTP"
        g.add_argument(
            f"--{proto}-use-ssl",
            choices=("true", "false"),
            default="false",
            help=f"serve the {port} port over TLS",
        )
        g.add_argument(
            f"--{proto}-server-cert",
            type=Path,
            metavar="PEM",
            help=f"the {port} port's certificate chain (reloaded when the file changes)",
        )
        g.add_argument(f"--{proto}-server-key", type=Path, metavar="PEM", help="its private key")
        g.add_argument(
            f"--{proto}-root-cert",
            type=Path,
            metavar="PEM",
            help="the CA that client certificates must chain to (mutual TLS)",
        )
        g.add_argument(
            f"--{proto}-use-ssl-mutual",
            choices=("true", "false"),
            default="false",
            help="require a client certificate (mutual TLS)",
        )
    g.add_argument(
        "--grpc-restricted-protocol",
        action="append",
        default=[],
        metavar="GROUPS:HEADER=VALUE",
        help=f"require a header for these API groups ({', '.join(GRPC_GROUPS)}); repeatable",
    )
    g.add_argument(
        "--http-restricted-api",
        action="append",
        default=[],
        metavar="GROUPS:HEADER=VALUE",
        help=f"as --grpc-restricted-protocol for the HTTP port ({', '.join(HTTP_GROUPS)})",
    )
    g.add_argument(
        "--reflection",
        choices=("true", "false"),
        default="true",
        help="serve gRPC server reflection (grpcurl list/describe)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=RequestLimits.max_request_bytes,
        help="largest request message; larger ones get RESOURCE_EXHAUSTED",
    )
    g.add_argument(
        "--max-tensor-elements",
        type=int,
        default=RequestLimits.max_tensor_elements,
        help="most elements one input tensor may declare (RESOURCE_EXHAUSTED beyond)",
    )
    g.add_argument(
        "--max-inflight-per-model",
        type=int,
        default=RequestLimits.max_inflight_per_model,
        help="requests of one model (all its versions together) in flight before "
        "RESOURCE_EXHAUSTED; 0 = no limit",
    )
    g.add_argument(
        "--model-load-timeout-secs",
        type=float,
        default=defaults.MODEL_LOAD_TIMEOUT_S,
        help="a model version whose load (session creation, warm-up) takes longer is "
        "UNAVAILABLE with the reason and the server goes on; 0 = no limit",
    )
    g.add_argument("--http-timeout-secs", type=float, default=30.0, help="idle HTTP connection")
    g.add_argument(
        "--http-max-connections",
        type=int,
        default=1024,  # server/rest.py MAX_CONNECTIONS: a connection is a socket, no thread
        help="HTTP connections served at once; more are answered 503",
    )


def _tls_from_args(args: argparse.Namespace, proto: str) -> TlsOptions | None:
    def arg(name: str) -> Any:
        return getattr(args, f"{proto}_{name}")

    if arg("use_ssl") != "true":
        if arg("use_ssl_mutual") == "true":
            raise ValueError(f"--{proto}-use-ssl-mutual needs --{proto}-use-ssl true")
        return None
    if arg("server_cert") is None or arg("server_key") is None:
        raise ValueError(f"--{proto}-use-ssl needs --{proto}-server-cert and --{proto}-server-key")
    return TlsOptions(
        arg("server_cert"), arg("server_key"), arg("root_cert"), arg("use_ssl_mutual") == "true"
    )


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """ServerOptions fields from the flags above. Raises ValueError with a reason."""
    grpc_restricted = tuple(
        parse_restriction(s, GRPC_GROUPS) for s in args.grpc_restricted_protocol
    )
    http_restricted = tuple(parse_restriction(s, HTTP_GROUPS) for s in args.http_restricted_api)
    check_restrictions(grpc_restricted)
    check_restrictions(http_restricted)
    if args.http_timeout_secs <= 0 or args.http_max_connections < 1:
        raise ValueError("--http-timeout-secs must be > 0 and --http-max-connections >= 1")
    if not 0 <= args.model_load_timeout_secs < 1e9:
        raise ValueError("--model-load-timeout-secs must be >= 0 (0: no limit)")
    return {
        "grpc_tls": _tls_from_args(args, "grpc"),
        "http_tls": _tls_from_args(args, "http"),
        "grpc_restricted": grpc_restricted,
        "http_restricted": http_restricted,
        "reflection": args.reflection == "true",
        "http_idle_timeout_s": args.http_timeout_secs,
        "http_max_connections": args.http_max_connections,
        "model_load_timeout_s": args.model_load_timeout_secs,
        "limits": RequestLimits(
            max_request_bytes=args.max_request_bytes,
            max_tensor_elements=args.max_tensor_elements,
            max_inflight_per_model=args.max_inflight_per_model,
        ),
    }
