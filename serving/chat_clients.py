"""Chat completions for work outside the server (`data augment`): in-process, or from a server.

Both implement `adapterhub.data.augment.ChatModel` (`complete(requests) -> replies`) and send
every request of a batch at once, so the engine batches them.

Design decisions:
- `EngineChat` runs the embedded torch engine in this process and makes each completion the way
  `POST /v1/chat/completions` does, without HTTP: the same chat template rendering
  (`routes/chat.py::chat_prompt_ids`), the same checks (`routes/checks.py`) and the same job
  (`routes/generation.py::complete_job`, where choice i of a seeded request draws with
  seed + i). So a seeded request gives the same text here as from `adapterhub serve` on the
  same model and precision.
- `EngineChat.from_registry` takes what `serve --base` and a request's `model` take: a base
  model name, an adapter ref (served on its base, resolved by `RegistryResolver` as the server
  resolves it) or a full model ref. It resolves the ref at once (an unknown one is an error
  before any file is read) and loads the model only on the first request, so a bad input file
  found first costs no model load.
- `OpenAIChat` talks to a running server with the official `openai` client. It lists the
  server's models at construction (an unreachable URL, a wrong key or an unknown model is an
  error before any file is read); without a model name it uses the first one listed, which is
  the served base. A request the server refuses with 400 (a prompt beyond the context window)
  is a `ChatRequestError` naming the request; anything else ends the work with one message.
- Each holds one event loop (`asyncio.Runner`) for its life; `close()` stops the engine.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapterhub.data.augment import ChatRequest, ChatRequestError
from adapterhub.errors import AdapterhubError, NotFoundError
from adapterhub.serving.backends.base import AdapterSpec, Backend, SamplingParams
from adapterhub.serving.backends.config import EngineConfig


class EngineChat:
    """Chat completions from the embedded torch engine, in this process."""

    def __init__(
        self, model_dir: Path, *, base_name: str, adapter: AdapterSpec | None = None, config: EngineConfig | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.base_name = base_name
        self.adapter = adapter
        self.config = config or EngineConfig()
        self._runner: asyncio.Runner | None = None
        self._backend: Backend | None = None

    @property
    def model(self) -> str:
        """What requests name: the adapter's canonical ref, else the base's name."""
        return self.adapter.key if self.adapter is not None else self.base_name

    @classmethod
    def from_registry(cls, registry: Any, ref: str, *, config: EngineConfig | None = None) -> EngineChat:
        """The model `ref` names in `registry` (an `adapterhub.registry.Registry`): a base model,
        an adapter of one (served on it) or a full model; `NotFoundError` listing close names."""
        from adapterhub.serving.resolver import RegistryResolver

        try:
            base = registry.get_base_model(ref)
        except NotFoundError:
            pass
        else:
            return cls(Path(base.path), base_name=base.name, config=config)
        record = registry.resolve(ref)
        if record is None:
            known = [b.name for b in registry.list_base_models()] + sorted({r.name for r in registry.list()})
            close = difflib.get_close_matches(ref, known, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else " (see `adapterhub models list` and `adapterhub list`)"
            raise NotFoundError(f"no base model, adapter or full model {ref!r} in the registry{hint}")
        if record.is_full_model:
            return cls(Path(registry.materialize(record)), base_name=record.ref, config=config)
        base = registry.get_base_model(record.base_name)
        spec = RegistryResolver(registry, base.name, watch_changes=False).resolve(base.name, ref)
        assert spec is not None  # the registry just resolved it
        return cls(Path(base.path), base_name=base.name, adapter=spec, config=config)

    def _started(self) -> tuple[asyncio.Runner, Backend]:
        if self._runner is None or self._backend is None:
            from adapterhub.serving.backends.torch_engine import TorchEngine

            backend = TorchEngine(self.model_dir, base_name=self.base_name, config=self.config)
            if self.adapter is not None:
                reason = backend.unservable_reason(self.adapter.peft_type, self.adapter.task_type, self.adapter.config)
                if reason is not None:
                    raise AdapterhubError(f"adapter {self.adapter.display_name} cannot generate text here: {reason}")
            runner = asyncio.Runner()
            runner.run(backend.start())
            self._runner, self._backend = runner, backend
        return self._runner, self._backend

    def complete(self, requests: Sequence[ChatRequest]) -> list[list[str]]:
        runner, backend = self._started()
        return runner.run(self._complete_all(backend, requests))

    async def _complete_all(self, backend: Backend, requests: Sequence[ChatRequest]) -> list[list[str]]:
        results = await asyncio.gather(*(self._complete_one(backend, i, r) for i, r in enumerate(requests)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def _complete_one(self, backend: Backend, index: int, request: ChatRequest) -> list[str]:
        from adapterhub.serving.errors import OpenAIError
        from adapterhub.serving.routes.chat import chat_prompt_ids
        from adapterhub.serving.routes.checks import check_context, check_prompt_ids, check_request_rows
        from adapterhub.serving.routes.generation import GenerationJob, complete_job

        try:
            prompt_ids = chat_prompt_ids(backend.tokenizer, request.messages)
            check_prompt_ids(backend, [prompt_ids])
            check_context(backend, prompt_ids, request.max_tokens, "messages")
            check_request_rows(backend, request.n)
        except OpenAIError as exc:
            raise ChatRequestError(index, exc.message) from None
        sampling = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, seed=request.seed)
        job = GenerationJob(adapter=self.adapter, prompts=[prompt_ids], n=request.n, sampling=sampling, stream=False, include_usage=False)
        return await complete_job(backend, job)

    def close(self) -> None:
        """Stop the engine (if it was started) and the event loop."""
        if self._runner is not None:
            try:
                if self._backend is not None:
                    self._runner.run(self._backend.shutdown())
            finally:
                self._runner.close()
                self._runner, self._backend = None, None

    def __enter__(self) -> EngineChat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenAIChat:
    """Chat completions from a running OpenAI-compatible server (`adapterhub serve`)."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, timeout: float = 600.0) -> None:
        import openai

        if not url.startswith(("http://", "https://")):
            raise AdapterhubError(f"--url {url!r} is not an http:// or https:// URL")
        base_url = url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else f"{base_url}/v1"
        self._runner = asyncio.Runner()
        # Retries (429s, dropped connections) belong to the requests, not to the first contact.
        self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key or "unused", timeout=timeout, max_retries=2)
        try:
            listed = self._runner.run(self._models())
        except BaseException:
            self.close()
            raise
        if not listed:
            self.close()
            raise AdapterhubError(f"the server at {self.base_url} lists no models")
        self.model = model if model is not None else listed[0]

    async def _models(self) -> list[str]:
        import openai

        try:
            page = await self._client.with_options(max_retries=0, timeout=30).models.list()
        except openai.AuthenticationError:
            raise AdapterhubError(f"the server at {self.base_url} refused the API key (give --api-key or set ADAPTERHUB_API_KEY)") from None
        except openai.APIConnectionError as exc:
            raise AdapterhubError(f"cannot reach a server at {self.base_url}: {exc.__cause__ or exc}") from None
        except openai.APIStatusError as exc:
            raise AdapterhubError(f"the server at {self.base_url} answered {exc.status_code} to GET /models: {exc.message}") from None
        return [card.id for card in page.data]

    def complete(self, requests: Sequence[ChatRequest]) -> list[list[str]]:
        return self._runner.run(self._complete_all(requests))

    async def _complete_all(self, requests: Sequence[ChatRequest]) -> list[list[str]]:
        results = await asyncio.gather(*(self._complete_one(i, r) for i, r in enumerate(requests)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def _complete_one(self, index: int, request: ChatRequest) -> list[str]:
        import openai

        try:
            response = await self._client.chat.completions.create(
                model=self.model, messages=list(request.messages), n=request.n, seed=request.seed,  # type: ignore[arg-type]
                temperature=request.temperature, max_tokens=request.max_tokens,
            )
        except openai.NotFoundError as exc:
            raise AdapterhubError(f"the server at {self.base_url} has no model {self.model!r}: {exc.message}") from None
        except openai.BadRequestError as exc:
            raise ChatRequestError(index, exc.message) from None
        except openai.APIConnectionError as exc:
            raise AdapterhubError(f"lost the server at {self.base_url}: {exc.__cause__ or exc}") from None
        except openai.APIStatusError as exc:
            raise AdapterhubError(f"the server at {self.base_url} answered {exc.status_code}: {exc.message}") from None
        choices = sorted(response.choices, key=lambda choice: choice.index)
        return [choice.message.content or "" for choice in choices]

    def close(self) -> None:
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def __enter__(self) -> OpenAIChat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["EngineChat", "OpenAIChat"]
