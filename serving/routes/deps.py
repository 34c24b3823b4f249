"""Dependencies the route modules declare (FastAPI's `Depends`): the server state and the API key.

Design decisions:
- Handlers get the `ServerState` through `State` (an `Annotated` dependency, as the FastAPI
  template's `deps.py` does), never from a module global, so several apps live in one process
  (tests, benchmarks).
- The API key (if any) guards every `/v1` route and is compared in constant time; `/health`
  and `/metrics` stay open for probes and scrapers, as in vLLM.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from adapterhub.serving.errors import OpenAIError
from adapterhub.serving.state import ServerState


def _state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(_state)]


async def require_api_key(request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <the server's key>` (when it has one)."""
    expected = request.app.state.server.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise OpenAIError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`)", code="invalid_api_key")


__all__ = ["State", "require_api_key"]
