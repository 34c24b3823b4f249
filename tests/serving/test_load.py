"""Load held: 32 concurrent clients, 300 requests over 12 adapters and the base, 4 device slots.

Bounded: 8 new tokens per request on the tiny model, and the whole burst must end within
120 s (it takes about 10-25 s on 2 CPU cores). Checks: no 5xx (no error at all, in fact), every
output equal to its single-request greedy reference from offline transformers+PEFT, and process
RSS back within 10% of its level before the burst. The server runs in this process, so the RSS
figure covers server and clients together.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time

import openai
import psutil

from tests.serving.conftest import BASE_NAME, AdapterFleet, ReferenceGenerator, start_server

CLIENTS = 32
REQUESTS = 300
MAX_TOKENS = 8
BURST_TIMEOUT_S = 120
PROMPTS = [
    "the quick brown fox",
    "reverse the words: apple banana cherry",
    "question: what is two plus two? answer:",
    "adapters are small",
    "translate to french:",
]
CHATS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "positive or negative: yes"}],
]


def test_load_32_clients_300_requests_12_adapters(adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    models = [BASE_NAME, *adapter_fleet.names]
    assert len(models) == 13
    completion_ids = {p: tuple(reference.prompt_ids(p)) for p in PROMPTS}
    chat_ids = [tuple(reference.chat_ids(messages)) for messages in CHATS]
    adapter_dirs = {name: (None if name == BASE_NAME else adapter_fleet.dirs[name]) for name in models}
    expected = reference.greedy_table(adapter_dirs, [*completion_ids.values(), *chat_ids], MAX_TOKENS)

    rng = random.Random(1234)
    plan = []
    for index in range(REQUESTS):
        model = models[index % len(models)] if index < len(models) else rng.choice(models)
        kind = rng.choice(["completion", "completion-stream", "chat"])
        if kind == "chat":
            which = rng.randrange(len(CHATS))
            plan.append((model, kind, which, expected[model, chat_ids[which]]))
        else:
            prompt = rng.choice(PROMPTS)
            plan.append((model, kind, prompt, expected[model, completion_ids[prompt]]))

    with start_server(adapter_fleet, max_resident=4, max_cpu_adapters=16, max_batch_size=32) as running:
        client = running.async_client()
        process = psutil.Process()

        async def one(model: str, kind: str, what: object) -> str:
            if kind == "chat":
                response = await client.chat.completions.create(
                    model=model, messages=CHATS[what], max_tokens=MAX_TOKENS, temperature=0  # type: ignore[index]
                )
                return response.choices[0].message.content or ""
            if kind == "completion-stream":
                stream = await client.completions.create(
                    model=model, prompt=what, max_tokens=MAX_TOKENS, temperature=0, stream=True  # type: ignore[arg-type]
                )
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
            response = await client.completions.create(model=model, prompt=what, max_tokens=MAX_TOKENS, temperature=0)  # type: ignore[arg-type]
            return response.choices[0].text

        async def warm_up() -> None:
            # Touch every code path once (and two adapters) so allocator pools exist before the baseline.
            for model in (BASE_NAME, "task-0", "task-1"):
                await one(model, "completion", PROMPTS[0])
                await one(model, "chat", 0)

        async def burst() -> tuple[list[str], list[tuple[int, str]], list[tuple[int, str, str]]]:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for index in range(REQUESTS):
                queue.put_nowait(index)
            server_errors: list[tuple[int, str]] = []
            wrong: list[tuple[int, str, str]] = []
            other_errors: list[str] = []

            async def client_loop() -> None:
                while not queue.empty():
                    index = queue.get_nowait()
                    model, kind, what, want = plan[index]
                    try:
                        got = await one(model, kind, what)
                    except openai.APIStatusError as exc:
                        (server_errors if exc.status_code >= 500 else other_errors).append((exc.status_code, str(exc)))  # type: ignore[arg-type]
                        continue
                    except Exception as exc:  # connection errors count as failures too
                        other_errors.append(repr(exc))
                        continue
                    if got != want:
                        wrong.append((index, got, want))

            await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(CLIENTS))), BURST_TIMEOUT_S)
            return other_errors, server_errors, wrong

        async def scenario() -> tuple[float, float, float, object]:
            await warm_up()
            gc.collect()
            rss_before = process.memory_info().rss
            started = time.perf_counter()
            outcome = await burst()
            elapsed = time.perf_counter() - started
            for _ in range(100):  # the engine drains its last rows and frees their KV cache
                if (await running.backend.health()).running_requests == 0:
                    break
                await asyncio.sleep(0.05)
            gc.collect()
            await asyncio.sleep(0.2)
            return rss_before, process.memory_info().rss, elapsed, outcome

        rss_before, rss_after, elapsed, (other_errors, server_errors, wrong) = asyncio.run(scenario())
        stats = running.backend.memory_stats()
        device_slots = [a for a in running.backend.resident_adapters() if a.tier == "device"]

    assert server_errors == []
    assert other_errors == []
    assert wrong == [], f"{len(wrong)} wrong outputs, first: {wrong[:3]}"
    assert elapsed < BURST_TIMEOUT_S
    assert len(device_slots) <= 4
    assert stats["kv_cache_bytes"] == 0
    assert abs(rss_after - rss_before) <= 0.10 * rss_before, (rss_before, rss_after)
    print(f"\nload: {REQUESTS} requests in {elapsed:.1f}s, RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
