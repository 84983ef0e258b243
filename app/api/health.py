"""Probes and metrics, outside /v1 and open without an API key (load
balancers, orchestrators and Prometheus call them): GET /healthz, /readyz,
/metrics. See docs/operations.md."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.observability import metrics, probes

router = APIRouter(tags=["operations"])

PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@router.get("/healthz", summary="Liveness: the process answers (no database call)")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database reachable, worker claiming, sandbox available (503 when not ready)",
    response_model=probes.Readiness,
    responses={503: {"model": probes.Readiness}},
)
async def readyz(request: Request) -> JSONResponse:
    readiness = await probes.readiness(request.app.state.runtime)
    return JSONResponse(readiness.model_dump(), status_code=200 if readiness.status == "ready" else 503)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    runtime = request.app.state.runtime
    return Response(await runtime.metrics.render(runtime), media_type=metrics.CONTENT_TYPE)
