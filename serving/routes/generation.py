"""Running one (chat) completion against the backend, streamed or whole: what completions and
chat share. Each surface says how its responses look through a `ResponseShaper`.

Design decisions:
- A surface module builds the prompts and `SamplingParams`, then hands `respond` a
  `GenerationJob` and its `ResponseShaper` (vLLM's `serving_completion.py` and `serving_chat.py`
  likewise share one engine client and each shape their own output). The shaper is an object
  with one method per kind of payload, so a surface's per-request state (a completion's text
  offsets per choice) lives on it rather than in closures.
- Streaming responses are only started once the first chunk of every choice exists, so an
  adapter that fails to load, a full queue or an engine that stopped still get a proper JSON
  error with the right status; a failure after that arrives as an SSE `error` event, then
  `[DONE]`. A client that disconnects cancels its rows in the engine (the generator closes).
- A streamed token whose text is held back (a possible stop string, a partial UTF-8
  character) keeps its logprob for the next chunk that is sent, so the streamed logprobs are the
  same as the whole response's.
- Metrics are measured here, at the edge: time to first token, latency, tokens, status (499
  when the client went away or the server stops: not an error to answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapterhub.serving.backends.base import AdapterSpec, Backend, GenerationChunk, SamplingParams, TokenLogprob
from adapterhub.serving.errors import from_exception
from adapterhub.serving.metrics import ServingMetrics
from adapterhub.serving.protocol import Usage
from adapterhub.serving.routes.checks import check_request_rows
from adapterhub.serving.state import ServerState

# vLLM's floor for logprobs, so -inf never reaches JSON (which cannot spell it).
LOGPROB_FLOOR = -9999.0


def floor_logprob(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


@dataclass
class Choice:
    """One generation of a request: its stream, with the first chunk already in hand."""

    index: int
    stream: AsyncIterator[GenerationChunk]
    first: GenerationChunk
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationJob:
    """What a surface asks the backend for: every prompt `n` times, with one adapter."""

    adapter: AdapterSpec | None
    prompts: list[list[int]]
    n: int
    sampling: SamplingParams
    stream: bool
    include_usage: bool


class ResponseShaper(Protocol):
    """How one surface (completions, chat) shapes its payloads; one instance per request."""

    #: Response ids are `<id_prefix>-<hex>` (`cmpl`, `chatcmpl`).
    id_prefix: str

    def final(self, response_id: str, created: int, choices: list[Choice], last: dict[int, GenerationChunk]) -> dict[str, Any]:
        """The whole (non-streamed) response; `last` maps a choice's index to its last chunk."""
        ...

    def chunk(
        self, response_id: str, created: int, index: int, chunk: GenerationChunk, first: bool, logprobs: list[TokenLogprob]
    ) -> dict[str, Any]:
        """One SSE payload of choice `index`; `logprobs`: every token since its last payload."""
        ...

    def usage_chunk(self, response_id: str, created: int, usage: Usage) -> dict[str, Any]:
        """The last SSE payload, without choices, when the client asked for usage."""
        ...


def usage_of(choices: Sequence[Choice], last: dict[int, GenerationChunk], n: int) -> Usage:
    """Token counts of a whole request: each prompt counted once, however many choices it has."""
    prompt_tokens = sum(last[c.index].prompt_tokens for c in choices if c.index % n == 0)
    completion_tokens = sum(last[c.index].completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


class _RequestTimer:
    """Measures one HTTP request for the metrics (TTFT, latency, tokens)."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics
        self.started = time.perf_counter()
        self.first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.started

    def finish(self, model: str, status: int, completion_tokens: int = 0) -> None:
        self.metrics.request_finished(
            model,
            status=status,
            ttft=self.first_token,
            latency=time.perf_counter() - self.started,
            completion_tokens=completion_tokens,
        )


async def _start_choices(backend: Backend, job: GenerationJob) -> list[Choice]:
    """Submit every prompt x n and wait for each first chunk; on any error close them all.

    With a seed, the i-th choice of a prompt draws with `seed + i` (as vLLM does), so `n` seeded
    choices differ from each other and the request still repeats exactly.
    """
    sampling = job.sampling

    def child(i: int) -> SamplingParams:
        return sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + i)

    streams = [backend.generate(prompt, child(i), job.adapter) for prompt in job.prompts for i in range(job.n)]
    firsts = await asyncio.gather(*(anext(stream) for stream in streams), return_exceptions=True)
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
        raise errors[0]
    return [Choice(index=i, stream=s, first=f) for i, (s, f) in enumerate(zip(streams, firsts))]  # type: ignore[arg-type]


async def _drain(choice: Choice) -> GenerationChunk:
    """Read a choice to its end; returns the last chunk (finish reason and counts)."""
    last = choice.first
    choice.text.append(last.text)
    choice.logprobs.extend(last.logprobs)
    async with contextlib.aclosing(choice.stream):  # type: ignore[type-var]
        if last.finish_reason is None:
            async for chunk in choice.stream:
                choice.text.append(chunk.text)
                choice.logprobs.extend(chunk.logprobs)
                last = chunk
    return last


async def complete_job(backend: Backend, job: GenerationJob) -> list[str]:
    """The whole text of every choice of `job` (prompts x n, in order), as a non-streamed
    response holds them: the route's own path, for callers in this process without HTTP
    (`serving/chat_clients.py::EngineChat`)."""
    choices = await _start_choices(backend, job)
    await asyncio.gather(*(_drain(c) for c in choices))
    return ["".join(c.text) for c in choices]


async def _interleave(choices: list[Choice]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Chunks of all choices as they come, each tagged with its choice index."""
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            await queue.put((choice.index, choice.first))
            if choice.first.finish_reason is None:
                async for chunk in choice.stream:
                    await queue.put((choice.index, chunk))
            await queue.put((choice.index, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((choice.index, exc))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            with contextlib.suppress(Exception):
                await choice.stream.aclose()  # type: ignore[attr-defined]


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def respond(state: ServerState, job: GenerationJob, shaper: ResponseShaper) -> Response:
    """Run `job` on the backend, streaming or not, with metrics; payloads come from `shaper`."""
    check_request_rows(state.backend, len(job.prompts) * job.n)
    timer = _RequestTimer(state.metrics)
    label = job.adapter.key if job.adapter is not None else state.backend.base_name
    response_id = f"{shaper.id_prefix}-{uuid.uuid4().hex}"
    created = int(time.time())
    try:
        choices = await _start_choices(state.backend, job)
    except asyncio.CancelledError:  # the client went away, or the server stops: not an error to answer
        timer.finish(label, 499)
        raise
    except Exception as exc:
        error = from_exception(exc)
        timer.finish(label, error.status_code)
        raise error from exc
    timer.token()

    if not job.stream:
        try:
            lasts = await asyncio.gather(*(_drain(c) for c in choices))
        except asyncio.CancelledError:
            timer.finish(label, 499)
            raise
        except Exception as exc:
            error = from_exception(exc)
            timer.finish(label, error.status_code)
            raise error from exc
        last_by_index = {c.index: last for c, last in zip(choices, lasts)}
        timer.finish(label, 200, sum(last.completion_tokens for last in lasts))
        return JSONResponse(shaper.final(response_id, created, choices, last_by_index))

    async def events() -> AsyncIterator[str]:
        last_by_index: dict[int, GenerationChunk] = {}
        status = 200
        first_sent: set[int] = set()
        held_logprobs: dict[int, list[TokenLogprob]] = {}
        try:
            async for index, chunk in _interleave(choices):
                last_by_index[index] = chunk
                finished = chunk.finish_reason is not None
                logprobs = held_logprobs.setdefault(index, [])
                logprobs.extend(chunk.logprobs)
                if not chunk.text and not finished and index in first_sent:
                    continue  # a token whose text is held back (stop-string prefix, partial UTF-8)
                payload = shaper.chunk(response_id, created, index, chunk, index not in first_sent, logprobs)
                held_logprobs[index] = []
                first_sent.add(index)
                yield _sse(payload)
            if job.include_usage:  # OpenAI: usage only on one last chunk with no choices, if asked for
                yield _sse(shaper.usage_chunk(response_id, created, usage_of(choices, last_by_index, job.n)))
        except BaseException as exc:  # noqa: BLE001 - reported in-band, the status line is gone
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                status = 499  # the client went away
                raise
            error = from_exception(exc)
            status = error.status_code
            yield _sse(error.body())
        finally:
            timer.finish(label, status, sum(last.completion_tokens for last in last_by_index.values()))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


__all__ = ["Choice", "GenerationJob", "LOGPROB_FLOOR", "ResponseShaper", "complete_job", "floor_logprob", "respond", "usage_of"]
