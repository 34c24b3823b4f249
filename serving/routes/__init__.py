"""The server's routes, one module per API surface, as vLLM's `entrypoints/openai/` splits them.

Design decisions:
- `completions`, `chat`, `models`, `adapters` (vLLM's runtime LoRA loading) and `health`
  (health and metrics) each own their handlers and their response shapes; what completions and
  chat share (running a job on the backend, streaming, metrics) is `generation`, every check of
  a request's content is `checks`, and the dependencies handlers declare are `deps`.
- `v1_router()` mounts the `/v1` surfaces behind the API key; `probe_router()` the open ones.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from adapterhub.serving.routes import adapters, chat, completions, health, models
from adapterhub.serving.routes.deps import require_api_key


def v1_router() -> APIRouter:
    """Every `/v1` route, each behind the API key (when the server has one)."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    for surface in (models, completions, chat, adapters):
        router.include_router(surface.router)
    return router


def probe_router() -> APIRouter:
    """`/health` and `/metrics`, open to probes and scrapers."""
    return health.router


__all__ = ["probe_router", "v1_router"]
