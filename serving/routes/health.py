"""`GET /health` and `GET /metrics`: open to probes and scrapers (no API key), as in vLLM.

Design decisions:
- `/health` is the backend's `HealthStatus`: 200 while the engine runs, 503 with the reason
  when it does not, with its running and waiting requests either way.
- `/metrics` renders in a worker thread: the backend collector reads resident adapters and
  memory at scrape time, which takes the engine's lock.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from adapterhub.serving.routes.deps import State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> JSONResponse:
    status = await state.backend.health()
    body = {"status": "ok" if status.ok else "unavailable", "detail": status.detail,
            "running": status.running_requests, "waiting": status.waiting_requests}
    return JSONResponse(body, status_code=200 if status.ok else 503)


@router.get("/metrics")
async def prometheus_metrics(state: State) -> Response:
    payload = await asyncio.to_thread(state.metrics.render)
    return Response(payload, media_type="text/plain; version=0.0.4; charset=utf-8")


__all__ = ["router"]
