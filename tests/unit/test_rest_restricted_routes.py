"""Every REST route belongs to exactly one restricted-API group, so no route can
escape `--http-restricted-api`; the groups are the gRPC side's (Triton's) plus
sluice's `metrics`; the header check is Triton's."""

from __future__ import annotations

from pathlib import Path

import pytest
import uvloop
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from sluice.host import DataPlane, ExecutorLoader, ModelManager
from sluice.monitoring.cost import CostModel
from sluice.runtime import RuntimeOptions
from sluice.server.rest import RestLimits, RestServer
from sluice.server.security import (
    GRPC_GROUPS,
    HTTP_GROUPS,
    HttpRestrictions,
    Restriction,
    parse_restriction,
)
from sluice.server.status_page import ServerFacts, StatusPage


def _routes(tmp_path: Path) -> set[str]:
    """The canonical paths of the routes a real RestServer registers (with
    /metrics and the status page, as sluice serve builds it)."""

    async def main() -> set[str]:
        models = ModelManager(tmp_path, ExecutorLoader(RuntimeOptions()))
        dataplane = DataPlane(models, server_name="t", server_version="0", is_ready=lambda: True)
        facts = ServerFacts("0", "127.0.0.1", 0, 0, metrics=True, cost=CostModel())
        server = RestServer(
            dataplane,
            "127.0.0.1",
            0,
            CollectorRegistry(),
            RestLimits(),
            status=StatusPage(dataplane, lambda: facts),
        )
        await server.start()
        try:
            return {r.resource.canonical for r in server._app.router.routes() if r.resource}
        finally:
            await server.stop(1.0)

    return uvloop.run(main())  # the server's own loop, as in test_rest_limits


def test_every_route_is_in_exactly_one_group(tmp_path: Path) -> None:
    routes = _routes(tmp_path)
    grouped = [route for group in HTTP_GROUPS.values() for route in group]
    assert len(grouped) == len(set(grouped)), "a route is in two groups"
    assert routes - set(grouped) == set(), "routes outside every group"
    assert set(grouped) - routes == set(), "groups name routes the server does not have"


def test_groups_are_the_grpc_groups_plus_metrics() -> None:
    assert set(HTTP_GROUPS) == set(GRPC_GROUPS) | {"metrics"}
    # The same operation sits in the same group on both ports.
    same = {
        "/v2/models/{model}/infer": "ModelInfer",
        "/v2/models/{model}/ready": "ModelReady",
        "/v2/models/{model}": "ModelMetadata",
        "/v2/models/{model}/config": "ModelConfig",
        "/v2/models/{model}/stats": "ModelStatistics",
        "/v2/models/{model}/drift": "DriftReport",
        "/v2/models/{model}/feedback": "Feedback",
        "/v2/models/{model}/rollout": "SetRollout",
        "/v2/repository/models/{model}/load": "RepositoryModelLoad",
        "/v2/repository/index": "RepositoryIndex",
    }
    for route, rpc in same.items():
        http_group = next(g for g, routes in HTTP_GROUPS.items() if route in routes)
        grpc_group = next(g for g, rpcs in GRPC_GROUPS.items() if rpc in rpcs)
        assert http_group == grpc_group, route


def test_refusal_follows_the_header_value() -> None:
    rules = HttpRestrictions([parse_restriction("inference:Admin-Key=s3cret", HTTP_GROUPS)])
    route = "/v2/models/{model}/infer"
    refusal = "This API is restricted, expecting header 'admin-key'"
    assert rules.refusal(route, CIMultiDict()) == refusal
    assert rules.refusal(route, CIMultiDict({"admin-key": "wrong"})) == refusal
    assert rules.refusal(route, CIMultiDict({"ADMIN-KEY": "s3cret"})) is None
    # Sent twice: the first value counts, as in Triton.
    twice = CIMultiDict([("admin-key", "wrong"), ("admin-key", "s3cret")])
    assert rules.refusal(route, twice) == refusal
    assert rules.refusal("/v2/health/ready", CIMultiDict()) is None  # not restricted
    assert rules.refusal("", CIMultiDict()) is None  # no route matched: 404 as usual
    assert not HttpRestrictions([Restriction(frozenset({"trace"}), "k", "v")])  # no REST route


def test_unknown_group_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown group") as info:
        parse_restriction("inferences:k=v", HTTP_GROUPS)
    assert "model-repository" in str(info.value)


def test_start_up_warning_names_rest_management_left_open() -> None:
    from sluice.server.security import exposure_warnings

    def rest_warning(*restricted: str) -> bool:
        rules = [parse_restriction(r, HTTP_GROUPS) for r in restricted]
        return any("over REST" in w for w in exposure_warnings("0.0.0.0", None, None, (), rules))

    assert rest_warning()
    assert rest_warning("inference:k=v")
    assert not rest_warning("model-repository,inference:k=v")
    assert exposure_warnings("127.0.0.1", None, None, (), ()) == []
