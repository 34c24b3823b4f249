"""The OpenAI-compatible HTTP server: `create_app(backend, resolver)` -> FastAPI.

Design decisions:
- Thin edge: this module only wires things together. The routes live in `serving/routes/`, one
  module per API surface (completions, chat, models, adapters, health and metrics), as vLLM's
  `entrypoints/openai/` splits them; what they share is `serving/state.py::ServerState`.
  Engines live behind the `Backend` ABC and adapters behind the `AdapterResolver`, both
  injected, so the vLLM backend and other resolvers slot in without touching the routes.
- Checks of a request's content are made at the edge (`routes/checks.py`), never again in a
  backend; a backend checks only what only it knows (its queue, slots, adapters).
- Every failure answers in OpenAI's error shape (`errors.py`).
- The lifespan starts the backend, loads and pins `preload` adapters, and shuts the backend
  down when the server stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI

from adapterhub.serving.backends.base import Backend
from adapterhub.serving.errors import install_error_handlers
from adapterhub.serving.metrics import ServingMetrics
from adapterhub.serving.resolver import AdapterResolver
from adapterhub.serving.routes import probe_router, v1_router
from adapterhub.serving.state import DEFAULT_MAX_PATH_ADAPTERS, LoraPathPolicy, ServerState


def create_app(
    backend: Backend,
    resolver: AdapterResolver | None = None,
    *,
    api_key: str | None = None,
    preload: Sequence[str] = (),
    metrics: ServingMetrics | None = None,
    lora_paths: LoraPathPolicy | None = None,
    max_path_adapters: int = DEFAULT_MAX_PATH_ADAPTERS,
) -> FastAPI:
    """The server for `backend`; adapters come from `resolver`; `preload` refs are pinned.

    `api_key` (the CLI also reads `ADAPTERHUB_API_KEY`) guards every `/v1` route. `lora_paths`
    says which directories `/v1/load_lora_adapter` may load by path (default: none), and
    `max_path_adapters` how many may be loaded that way at once.
    """
    metrics = metrics or ServingMetrics(backend)
    backend.listener = metrics
    state = ServerState(
        backend=backend, resolver=resolver, metrics=metrics, api_key=api_key or None, preload=tuple(preload),
        lora_paths=lora_paths or LoraPathPolicy(), max_path_adapters=max_path_adapters,
    )
    metrics.label_allowed = state.may_label

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            for ref in state.preload:
                spec = await state.resolve_model(ref)
                if spec is None:
                    continue
                await backend.load_adapter(spec, pin=True)
            yield
        finally:
            await backend.shutdown()

    app = FastAPI(title="adapterhub", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(v1_router())
    app.include_router(probe_router())
    return app


__all__ = ["LoraPathPolicy", "ServerState", "create_app"]
