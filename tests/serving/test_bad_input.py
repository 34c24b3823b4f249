"""Bad input to the server, from clients and from operators: each case here once broke it
(issue 11). A real uvicorn server or a real engine, tiny real models, outputs compared with a
solo run or with offline PEFT."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest
import torch

from adapterhub.serving.backends.base import AdapterSpec, SamplingParams
from adapterhub.serving.backends.sampling import candidates, draw
from adapterhub.serving.backends.torch_engine import EngineConfig, TorchEngine
from adapterhub.serving.errors import from_exception
from tests.serving.conftest import BASE_NAME, AdapterFleet, ReferenceGenerator, RunningServer

PROMPT = "the quick brown fox"


def _spec(fleet: AdapterFleet, name: str) -> AdapterSpec:
    return AdapterSpec(key=name, locate=lambda: fleet.dirs[name])


async def _text(engine: TorchEngine, prompt_ids: list[int], sampling: SamplingParams, spec: AdapterSpec | None) -> str:
    return "".join([chunk.text async for chunk in engine.generate(prompt_ids, sampling, spec)])


# ----------------------------------------------------------------------------- one row's settings


def test_top_p_that_rounds_to_zero_keeps_the_top_token(server: RunningServer, reference: ReferenceGenerator) -> None:
    """`top_p` 1e-46 is legal (above 0) but 0 in fp32: it once emptied the candidate set and the
    engine thread died (every later request and /health 503). As in transformers and vLLM, the
    most likely token always stays, so it samples what greedy decoding chooses."""
    client = server.client()
    greedy = client.completions.create(model="task-1", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    for top_p in (1e-46, 5e-324, 1e-30):
        tiny = client.completions.create(model="task-1", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=top_p, seed=7)
        assert tiny.choices[0].text == greedy, top_p
        streamed = client.chat.completions.create(
            model=BASE_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4, top_p=top_p, stream=True
        )
        assert [chunk for chunk in streamed]
    assert httpx.get(f"{server.base_url}/health", timeout=10).json()["status"] == "ok"
    after = client.completions.create(model="task-1", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert after == greedy


def test_candidates_of_a_top_p_below_fp32s_range_are_the_top_token() -> None:
    probs = torch.softmax(torch.randn(500, generator=torch.Generator().manual_seed(3)), dim=0)  # fp32, as served
    for top_p in (1e-46, 5e-324, 1e-300):
        values, ids = candidates(probs, SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p))
        assert ids.tolist() == [int(probs.argmax())] and torch.equal(values, probs[ids])
        assert draw(probs, SamplingParams(max_tokens=1, top_p=top_p), torch.Generator().manual_seed(0)) == int(probs.argmax())


def test_an_exception_in_one_row_fails_that_request_alone(adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    """Token ids beyond the model's vocabulary, given to the engine itself (the HTTP edge refuses
    them first), raise inside the engine: in the batched prefill's embedding lookup, and in one
    row's logit bias and `min_tokens` masking. Each fails its own request with an error the API
    turns into a 500 in OpenAI's shape; the batch-mates (other adapters, greedy and seeded
    sampling) give exactly what they give alone, and the engine keeps serving."""
    vocab = len(reference.tokenizer)
    prompt = reference.prompt_ids(PROMPT)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    seeded = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=11)
    good_jobs = [(prompt, greedy, None), (prompt, seeded, "task-2"), (prompt, greedy, "task-3"), (prompt, seeded, None)]
    in_prefill = [([*prompt[:-1], vocab + 3], greedy, "task-0")]
    in_sampling = [
        (prompt, SamplingParams(max_tokens=6, temperature=0, logit_bias=((vocab + 5, 1.0),)), "task-1"),
        (prompt, SamplingParams(max_tokens=6, temperature=0.8, min_tokens=2, stop_token_ids=(vocab + 9,)), None),
    ]

    async def scenario() -> tuple[list[str], list[list[object]], list[str], bool]:
        engine = TorchEngine(adapter_fleet.base_dir, base_name=BASE_NAME, config=EngineConfig(device="cpu", max_resident=4))
        await engine.start()

        def run(job: tuple[list[int], SamplingParams, str | None]) -> object:
            ids, sampling, name = job
            return _text(engine, ids, sampling, _spec(adapter_fleet, name) if name else None)

        async def in_one_batch(jobs: list[tuple[list[int], SamplingParams, str | None]]) -> list[object]:
            # Hold the engine thread between two steps until every request waits, so that all
            # of them are admitted and prefilled together.
            hold = threading.Event()
            holding = asyncio.ensure_future(engine._run_on_engine(lambda: hold.wait(60)))
            await asyncio.sleep(0)
            tasks = [asyncio.ensure_future(run(job)) for job in jobs]
            while (await engine.health()).waiting_requests < len(jobs):
                await asyncio.sleep(0.01)
            hold.set()
            await holding
            return list(await asyncio.gather(*tasks, return_exceptions=True))

        try:
            for name in ("task-0", "task-1", "task-2", "task-3"):
                await engine.load_adapter(_spec(adapter_fleet, name))  # no disk reads inside the batches
            alone = [await run(job) for job in good_jobs]
            batches = [await in_one_batch([*bad, *good_jobs]) for bad in (in_prefill, in_sampling)]
            later = [await run(job) for job in good_jobs]
            return alone, batches, later, (await engine.health()).ok
        finally:
            await engine.shutdown()

    alone, batches, later, healthy = asyncio.run(scenario())
    for bad, results in zip((in_prefill, in_sampling), batches):
        for failed in results[: len(bad)]:
            assert isinstance(failed, Exception), failed
            answer = from_exception(failed)
            assert answer.status_code == 500 and answer.body()["error"]["type"] == "server_error", failed
        assert results[len(bad):] == alone
    assert later == alone and healthy
    assert alone[0] == reference.greedy(None, tuple(prompt), 6)
    assert alone[2] == reference.greedy(adapter_fleet.dirs["task-3"], tuple(prompt), 6)


# ----------------------------------------------------------------------------- adapter tiers


@pytest.mark.parametrize("max_resident,max_cpu_adapters", [(1, 1), (2, 2), (3, 3), (1, 2), (2, 3), (1, 4)])
def test_every_accepted_pair_of_tiers_serves_more_adapters_than_both(
    adapter_fleet: AdapterFleet, reference: ReferenceGenerator, max_resident: int, max_cpu_adapters: int
) -> None:
    """`--max-resident 2 --max-cpu-adapters 2` (any equal pair) once read the adapter beyond
    them from disk forever, at 100% CPU, and never answered: the adapter just read was the only
    idle one, so trimming the CPU tier dropped it at once. Six adapters, one after the other
    twice and then all at once, give offline PEFT's outputs with at most one disk read per
    request, and the tiers are back within their sizes when the requests are done."""
    names = [f"task-{i}" for i in range(6)]
    prompt = reference.prompt_ids(PROMPT)
    reads: list[str] = []

    def counting(name: str) -> AdapterSpec:
        def locate() -> Path:
            reads.append(name)
            return adapter_fleet.dirs[name]

        return AdapterSpec(key=name, locate=locate)

    async def scenario() -> tuple[list[str], list[str], list[tuple[str, str]]]:
        config = EngineConfig(device="cpu", max_resident=max_resident, max_cpu_adapters=max_cpu_adapters)
        engine = TorchEngine(adapter_fleet.base_dir, base_name=BASE_NAME, config=config)
        await engine.start()
        try:
            sampling = SamplingParams(max_tokens=5, temperature=0)

            async def one_after_another() -> list[str]:
                return [await _text(engine, prompt, sampling, counting(name)) for name in names * 2]

            # Hang guards only: the bug never answered at all.
            one_by_one = await asyncio.wait_for(one_after_another(), 120)
            together = await asyncio.wait_for(asyncio.gather(*(_text(engine, prompt, sampling, counting(n)) for n in names)), 120)
            return one_by_one, list(together), [(a.key, a.tier) for a in engine.resident_adapters()]
        finally:
            await engine.shutdown()

    one_by_one, together, held = asyncio.run(scenario())
    expected = [reference.greedy(adapter_fleet.dirs[name], tuple(prompt), 5) for name in names]
    assert one_by_one == expected * 2 and together == expected
    assert len(reads) <= 3 * len(names)  # at most one read per request
    assert sum(1 for _, tier in held if tier == "device") <= max_resident
    assert len(held) <= max_cpu_adapters
