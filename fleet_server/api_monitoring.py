"""The operator API's monitoring routes: the overview, metrics, alerts, the Prometheus
exposition and the web dashboard, over :mod:`fleet_server.monitoring.api_routes`.
Described in :mod:`fleet_server.api_spec`; wired into :data:`fleet_server.api.ROUTES`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api_routing import HttpError, RawBody, Request, Route
from .monitoring import api_routes, dashboard

if TYPE_CHECKING:
    from .service import FleetService

__all__ = ["MONITORING_ROUTES"]


def _overview(service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, api_routes.overview(service.monitor, service.ingest)


def _metrics(service: FleetService, request: Request) -> tuple[int, Any]:
    return 200, api_routes.totals(service.monitor, _query(request))


def _metric_series(service: FleetService, request: Request) -> tuple[int, Any]:
    return 200, api_routes.series(service.monitor, _query(request))


def _alerts(service: FleetService, request: Request) -> tuple[int, Any]:
    return 200, api_routes.alerts(service.monitor, _query(request))


def _prometheus(service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, RawBody(*api_routes.prometheus(service.monitor, service.ingest))


def _dashboard(_service: FleetService, request: Request) -> tuple[int, Any]:
    found = dashboard.asset(request.params.get("file", "index.html"))
    if found is None:
        raise HttpError(404, f"no dashboard file {request.path!r}; open /dashboard")
    return 200, RawBody(*found, headers=dashboard.HEADERS)


def _query(request: Request) -> dict[str, str]:
    return {name: values[-1] for name, values in request.query.items() if values}



#: The routes of this module.
MONITORING_ROUTES = (
    Route("GET", "/api/overview", _overview),
    Route("GET", "/api/metrics", _metrics),
    Route("GET", "/api/metrics/series", _metric_series),
    Route("GET", "/api/alerts", _alerts),
    Route("GET", "/metrics", _prometheus, scrape=True),
    # The page and its files hold no data; what they show comes from the routes above.
    Route("GET", "/dashboard", _dashboard, admin=False),
    Route("GET", "/dashboard/", _dashboard, admin=False),
    Route("GET", "/dashboard/{file}", _dashboard, admin=False),
)
