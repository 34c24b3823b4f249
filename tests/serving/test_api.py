"""The OpenAI-compatible API end to end: a real uvicorn server, the official `openai` client,
tiny real models, outputs compared with offline transformers+PEFT greedy generation."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.serving.conftest import BASE_NAME, AdapterFleet, ReferenceGenerator, RunningServer, start_server

MAX_TOKENS = 12
JSON_HEADERS = {"content-type": "application/json"}
PROMPTS = ["the quick brown fox", "reverse the words: apple banana", "question: what is two plus two? answer:"]


def _adapter_dir(fleet: AdapterFleet, model: str):
    return None if model == BASE_NAME else fleet.dirs[model.split(":")[0]]


@pytest.mark.parametrize("model", [BASE_NAME, "task-0", "task-2:1", "task-4", "task-5"])
def test_completions_match_offline_peft_greedy(
    server: RunningServer, adapter_fleet: AdapterFleet, reference: ReferenceGenerator, model: str
) -> None:
    client = server.client()
    for prompt in PROMPTS:
        response = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        expected = reference.greedy(_adapter_dir(adapter_fleet, model), tuple(reference.prompt_ids(prompt)), MAX_TOKENS)
        assert response.choices[0].text == expected
        assert response.model == model
        assert response.usage is not None
        assert response.usage.prompt_tokens == len(reference.prompt_ids(prompt))
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
        assert 1 <= response.usage.completion_tokens <= MAX_TOKENS


@pytest.mark.parametrize("model", [BASE_NAME, "task-1", "task-3"])
def test_chat_streaming_and_not_match_offline_greedy(
    server: RunningServer, adapter_fleet: AdapterFleet, reference: ReferenceGenerator, model: str
) -> None:
    client = server.client()
    messages = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "translate to french: hello world"}]
    expected = reference.greedy(_adapter_dir(adapter_fleet, model), tuple(reference.chat_ids(messages)), MAX_TOKENS)

    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(reference.chat_ids(messages))

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish_reasons, usages, roles = [], [], [], []
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            roles.append(choice.delta.role)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert "".join(pieces) == expected
    assert roles[0] == "assistant"
    assert finish_reasons == [whole.choices[0].finish_reason]
    assert len(usages) == 1 and usages[0].completion_tokens == whole.usage.completion_tokens
    assert usages[0].prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream_raw_sse_ends_with_done(server: RunningServer, reference: ReferenceGenerator) -> None:
    def events(**extra: object) -> list[dict]:
        with httpx.stream(
            "POST", f"{server.base_url}/v1/completions", timeout=60,
            json={"model": BASE_NAME, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, **extra},
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    payloads = events()
    text = "".join(p["choices"][0]["text"] for p in payloads)
    assert text == reference.greedy(None, tuple(reference.prompt_ids(PROMPTS[0])), MAX_TOKENS)
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # OpenAI: usage is null on every chunk unless asked for, then it comes once, in a last chunk
    # with no choices.
    assert all(p["usage"] is None for p in payloads)
    with_usage = events(stream_options={"include_usage": True})
    assert all(p["usage"] is None for p in with_usage[:-1])
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["prompt_tokens"] == len(reference.prompt_ids(PROMPTS[0]))
    whole = server.client().completions.create(model=BASE_NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert with_usage[-1]["usage"] == whole.usage.model_dump(exclude_none=True)


def test_stop_strings_seed_and_sampling(server: RunningServer, reference: ReferenceGenerator) -> None:
    client = server.client()
    full = client.completions.create(model="task-0", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = client.completions.create(model="task-0", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # One stop string of any length; more strings than OpenAI's 4 (vLLM and lm-eval-harness do).
    long_stop = full[1:9]
    single = client.completions.create(model="task-0", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=long_stop)
    assert single.choices[0].text == full[: full.index(long_stop)] and single.choices[0].finish_reason == "stop"
    several = ["\x01", "\x02", "\x03", "\x04", stop]
    five = client.completions.create(model="task-0", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=several)
    assert five.choices[0].text == full[: full.index(stop)]
    # Seeded sampling repeats exactly; another seed gives (almost surely) another text.
    runs = [
        client.completions.create(model="task-1", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.5, top_p=0.95, seed=seed).choices[0].text
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_n_and_prompt_lists(server: RunningServer, reference: ReferenceGenerator) -> None:
    client = server.client()
    response = client.completions.create(model=BASE_NAME, prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0, n=2)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    expected = [reference.greedy(None, tuple(reference.prompt_ids(p)), MAX_TOKENS) for p in PROMPTS[:2]]
    assert texts == [expected[0], expected[0], expected[1], expected[1]]
    # Each prompt's tokens are counted once, however many choices it has (as OpenAI and vLLM).
    assert response.usage.prompt_tokens == sum(len(reference.prompt_ids(p)) for p in PROMPTS[:2])

    # Seeded choices: choice i draws with seed + i, so they differ and the request repeats.
    def seeded() -> list[str]:
        choices = client.completions.create(model="task-1", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.5, seed=7, n=3).choices
        return [c.text for c in sorted(choices, key=lambda c: c.index)]

    first = seeded()
    assert len(set(first)) == 3 and seeded() == first
    alone = client.completions.create(model="task-1", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=1.5, seed=8).choices[0].text
    assert first[1] == alone


def test_retrieve_one_model_by_id_or_alias(server: RunningServer) -> None:
    client = server.client()
    assert client.models.retrieve(BASE_NAME).id == BASE_NAME
    by_alias = client.models.retrieve("task-0")
    assert by_alias.id == "task-0:1" and by_alias.parent == BASE_NAME  # type: ignore[attr-defined]
    by_digest = client.models.retrieve(f"task-0@{by_alias.model_dump()['meta']['sha256'][:8]}")
    assert by_digest.id == "task-0:1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("task-99")


def test_models_lists_base_and_registry_adapters_with_residency(server: RunningServer, adapter_fleet: AdapterFleet) -> None:
    client = server.client()
    client.completions.create(model="task-3", prompt="hello", max_tokens=2, temperature=0)
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert BASE_NAME in cards and cards[BASE_NAME]["parent"] is None
    for name in adapter_fleet.names:
        card = cards[f"{name}:1"]
        assert card["parent"] == BASE_NAME
        assert card["aliases"] == [name]
    assert cards["task-3:1"]["resident"] is True
    assert cards["task-3:1"]["meta"]["rank"] == 2


def test_hot_load_on_first_use_and_metrics(adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    with start_server(adapter_fleet, max_resident=2) as running:
        assert running.backend.resident_adapters() == []
        client = running.client()
        text = client.completions.create(model="task-7", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        assert text == reference.greedy(adapter_fleet.dirs["task-7"], tuple(reference.prompt_ids(PROMPTS[0])), MAX_TOKENS)
        assert [a.key for a in running.backend.resident_adapters()] == ["task-7:1"]
        metrics = httpx.get(f"{running.base_url}/metrics", timeout=10).text
        assert 'adapterhub_adapter_loads_total{adapter="task-7:1",source="disk"} 1.0' in metrics
        assert 'adapterhub_adapter_loads_total{adapter="task-7:1",source="cpu"} 1.0' in metrics
        assert 'adapterhub_requests_total{model="task-7:1",status="200"} 1.0' in metrics
        assert 'adapterhub_time_to_first_token_seconds_count{model="task-7:1"} 1.0' in metrics
        assert 'adapterhub_adapter_resident_bytes{adapter="task-7:1",tier="device"}' in metrics
        assert "process_resident_memory_bytes" in metrics
        assert 'adapterhub_memory_bytes{kind="process_rss"}' in metrics


def test_eviction_with_two_resident_slots_and_five_adapters(adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    names = ["task-0", "task-1", "task-2", "task-3", "task-4"]
    with start_server(adapter_fleet, max_resident=2, max_cpu_adapters=3) as running:
        client = running.client()
        for round_index in range(2):
            for name in names:
                text = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0).choices[0].text
                assert text == reference.greedy(adapter_fleet.dirs[name], tuple(reference.prompt_ids(PROMPTS[2])), MAX_TOKENS)
                held = running.backend.resident_adapters()
                device = [a.key for a in held if a.tier == "device"]
                assert len(device) <= 2 and f"{name}:1" in device
                assert len(held) <= 3
        metrics = httpx.get(f"{running.base_url}/metrics", timeout=10).text
        evictions = [line for line in metrics.splitlines() if line.startswith("adapterhub_adapter_evictions_total{")]
        device_evictions = sum(float(line.rsplit(" ", 1)[1]) for line in evictions if 'tier="device"' in line)
        assert device_evictions == 2 * len(names) - 2  # every request after the first two swapped a slot


def test_load_and_unload_lora_adapter_endpoints(
    server: RunningServer, adapter_fleet: AdapterFleet, reference: ReferenceGenerator, tmp_path
) -> None:
    client = server.client()
    path = str(adapter_fleet.dirs["task-9"])
    response = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "by-path", "lora_path": path}, timeout=30)
    assert response.status_code == 200 and "added successfully" in response.text
    assert "by-path" in [m.id for m in client.models.list().data]
    text = client.completions.create(model="by-path", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0).choices[0].text
    assert text == reference.greedy(adapter_fleet.dirs["task-9"], tuple(reference.prompt_ids(PROMPTS[0])), MAX_TOKENS)
    again = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "by-path", "lora_path": path}, timeout=30)
    assert again.status_code == 400 and again.json()["error"]["code"] == "already_loaded"

    response = httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "by-path"}, timeout=30)
    assert response.status_code == 200 and "removed successfully" in response.text
    assert not [a.key for a in server.backend.resident_adapters() if a.key.endswith("by-path")]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="by-path", prompt="hello", max_tokens=2)
    missing = httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "by-path"}, timeout=30)
    assert missing.status_code == 404
    unknown = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "no-such-adapter"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "lora_name"

    # A path adapter never shadows a registry adapter, nor the other way round: a lora_name that
    # names one is refused, and a free name like `task-8:2` (the registry has only version 1) keeps
    # `task-8` meaning the registry's adapter.
    def greedy_text(model: str) -> str:
        return client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0).choices[0].text

    task8 = reference.greedy(adapter_fleet.dirs["task-8"], tuple(reference.prompt_ids(PROMPTS[0])), MAX_TOKENS)
    task9 = reference.greedy(adapter_fleet.dirs["task-9"], tuple(reference.prompt_ids(PROMPTS[0])), MAX_TOKENS)
    assert greedy_text("task-8") == task8  # resident under its registry key
    clash = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "task-8:1", "lora_path": path}, timeout=30)
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "lora_name"
    beside = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "task-8:2", "lora_path": path}, timeout=30)
    assert beside.status_code == 200
    assert greedy_text("task-8:2") == task9
    assert greedy_text("task-8") == task8 and greedy_text("task-8:1") == task8
    assert httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "task-8:2"}, timeout=30).status_code == 200

    # The registry gets a path adapter's name later: the path adapter keeps the name while loaded,
    # the registry's answers to its versioned ref, and the listing shows each name once.
    from adapterhub.registry import Registry

    assert httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "late-name", "lora_path": path}, timeout=30).status_code == 200
    Registry.open(home=adapter_fleet.home).put_adapter(name="late-name", source_dir=adapter_fleet.dirs["task-8"], base=BASE_NAME)
    assert greedy_text("late-name") == task9 and greedy_text("late-name:1") == task8
    listed = [(card.id, tuple(card.model_dump().get("aliases") or ())) for card in client.models.list().data]
    names = [name for card_id, aliases in listed for name in (card_id, *aliases)]
    assert names.count("late-name") == 1 and "late-name:1" in names
    assert httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "late-name"}, timeout=30).status_code == 200
    assert greedy_text("late-name") == task8  # the name is the registry's again

    # Registry adapters: load warms by reference, unload drops every tier.
    response = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "task-10"}, timeout=30)
    assert response.status_code == 200
    assert "task-10:1" in {a.key for a in server.backend.resident_adapters()}
    response = httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": "task-10:1"}, timeout=30)
    assert response.status_code == 200
    assert "task-10:1" not in {a.key for a in server.backend.resident_adapters()}


def test_api_key_guards_v1_routes(adapter_fleet: AdapterFleet) -> None:
    with start_server(adapter_fleet, api_key="sekret", max_resident=1) as running:
        with pytest.raises(openai.AuthenticationError) as wrong:
            running.client(api_key="nope").models.list()
        assert wrong.value.status_code == 401
        assert wrong.value.body["code"] == "invalid_api_key"
        missing = httpx.post(f"{running.base_url}/v1/completions", json={"model": BASE_NAME, "prompt": "hi"}, timeout=10)
        assert missing.status_code == 401 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
        ok = running.client(api_key="sekret").completions.create(model=BASE_NAME, prompt="hello", max_tokens=3, temperature=0)
        assert ok.choices[0].text is not None
        assert httpx.get(f"{running.base_url}/health", timeout=10).status_code == 200  # probes stay open


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_error_shapes_and_statuses(server: RunningServer, tmp_path) -> None:
    url = f"{server.base_url}/v1"
    unknown = httpx.post(f"{url}/completions", json={"model": "task-O", "prompt": "hi"}, timeout=10)
    assert unknown.status_code == 404
    assert _error(unknown)["code"] == "model_not_found" and "did you mean 'task-" in _error(unknown)["message"]
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope:3", messages=[{"role": "user", "content": "hi"}])

    bad_json = httpx.post(f"{url}/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    assert bad_json.status_code == 400 and _error(bad_json)["code"] == "invalid_json"
    bad_value = httpx.post(f"{url}/completions", json={"model": BASE_NAME, "prompt": "hi", "temperature": 7}, timeout=10)
    assert bad_value.status_code == 400 and _error(bad_value)["param"] == "temperature"
    missing = httpx.post(f"{url}/chat/completions", json={"model": BASE_NAME}, timeout=10)
    assert missing.status_code == 400 and _error(missing)["param"] == "messages"
    unsupported = httpx.post(f"{url}/completions", json={"model": BASE_NAME, "prompt": "hi", "best_of": 3}, timeout=10)
    assert unsupported.status_code == 400 and _error(unsupported)["param"] == "best_of"
    json_mode = httpx.post(
        f"{url}/completions", json={"model": BASE_NAME, "prompt": "hi", "response_format": {"type": "json_object"}}, timeout=10
    )
    assert json_mode.status_code == 400 and _error(json_mode)["param"] == "response_format"
    # Values that change nothing are accepted, as clients send defaults.
    harmless = {"best_of": 1, "suffix": "", "tool_choice": "none", "response_format": {"type": "text"}, "max_tokens": 2}
    assert httpx.post(f"{url}/completions", json={"model": BASE_NAME, "prompt": "hi", **harmless}, timeout=30).status_code == 200
    chat = {"model": BASE_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    no_stream = httpx.post(f"{url}/chat/completions", json={**chat, "stream_options": {"include_usage": True}}, timeout=10)
    assert no_stream.status_code == 400 and _error(no_stream)["param"] == "stream_options"
    assert httpx.post(f"{url}/chat/completions", json={**chat, "top_logprobs": 0}, timeout=30).status_code == 200
    # More completions than the engine could ever queue at once: a 400 now, not a 429 forever.
    rows = server.backend.max_request_rows
    too_many = httpx.post(f"{url}/completions", json={"model": BASE_NAME, "prompt": ["hi"] * (rows // 16 + 1), "n": 16}, timeout=10)
    assert too_many.status_code == 400 and _error(too_many)["code"] == "too_many_completions"
    chat_echo = httpx.post(
        f"{url}/chat/completions", json={"model": BASE_NAME, "messages": [{"role": "user", "content": "hi"}], "echo": True}, timeout=10
    )
    assert chat_echo.status_code == 400 and _error(chat_echo)["code"] == "unsupported_parameter"

    # Inputs that once reached the engine, the tokenizer or SQLite and came back as 500s.
    for body, status, param in (
        ({"prompt": "hi", "temperature": 1.0, "seed": 2**64}, 400, "seed"),
        ({"prompt": "hi", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),  # '²' passes str.isdigit
        ({"prompt": "hi", "model": "task-0:99999999999999999999999"}, 404, "model"),
        ({"prompt": "a\ud800b"}, 400, None),  # an unpaired surrogate is not Unicode
        ({"prompt": "hi", "model": "task-\ud800"}, 400, None),
    ):
        # json.dumps escapes a lone surrogate as `\\ud800`, as a client in another language may send it.
        refused = httpx.post(f"{url}/completions", content=json.dumps({"model": BASE_NAME, **body}), headers=JSON_HEADERS, timeout=10)
        assert refused.status_code == status and _error(refused)["param"] == param, (body, refused.text)
    surrogate_chat = httpx.post(
        f"{url}/chat/completions", content=json.dumps({"model": BASE_NAME, "messages": [{"role": "user", "content": "\udfff"}]}),
        headers=JSON_HEADERS, timeout=10,
    )
    assert surrogate_chat.status_code == 400 and "surrogate" in _error(surrogate_chat)["message"]

    too_long = httpx.post(f"{url}/completions", json={"model": BASE_NAME, "prompt": "hi", "max_tokens": 100_000}, timeout=10)
    assert too_long.status_code == 400 and _error(too_long)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as long_prompt:
        server.client().completions.create(model=BASE_NAME, prompt="the quick brown fox " * 200, max_tokens=1)
    assert long_prompt.value.body["code"] == "context_length_exceeded"
    assert httpx.get(f"{url}/nothing-here", timeout=10).status_code == 404


def test_adapter_that_fails_to_load_fails_only_its_request(
    server: RunningServer, adapter_fleet: AdapterFleet, reference: ReferenceGenerator, tmp_path
) -> None:
    from tests.conftest import build_lora_adapter

    soft_prompt = build_lora_adapter(adapter_fleet.base_dir, tmp_path / "soft-prompt", peft_type="prompt_tuning")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapter_fleet.dirs["task-0"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")

    async def scenario() -> list[object]:
        client = server.async_client()
        good = [
            client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
            for name in ("task-0", BASE_NAME, "task-6")
        ]
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            bad = [
                http.post("/v1/load_lora_adapter", json={"lora_name": "soft-prompt", "lora_path": str(soft_prompt)}),
                http.post("/v1/load_lora_adapter", json={"lora_name": "corrupt", "lora_path": str(corrupt)}),
            ]
            return await asyncio.gather(*good, *bad)

    results = asyncio.run(scenario())
    for name, result in zip(("task-0", BASE_NAME, "task-6"), results[:3]):
        adapter_dir = None if name == BASE_NAME else adapter_fleet.dirs[name]
        assert result.choices[0].text == reference.greedy(adapter_dir, tuple(reference.prompt_ids(PROMPTS[0])), MAX_TOKENS)
    for response in results[3:]:
        assert response.status_code == 400
        assert _error(response)["code"] == "adapter_load_failed"
    assert "adapter 'soft-prompt' (prompt tuning) cannot be served by the torch backend" in _error(results[3])["message"]
    assert _error(results[4])["message"].startswith("adapter 'corrupt' (lora) cannot be served: adapter_model.safetensors ")
    assert httpx.get(f"{server.base_url}/health", timeout=10).json()["status"] == "ok"


def test_queue_full_is_429_and_pinned_slots_are_503(adapter_fleet: AdapterFleet) -> None:
    with start_server(adapter_fleet, max_resident=1, max_batch_size=1, max_waiting=1, preload=("task-0",)) as running:
        client = running.client()
        assert [(a.key, a.pinned) for a in running.backend.resident_adapters()] == [("task-0:1", True)]
        # Every slot is pinned: another adapter cannot be served, the pinned one and the base can.
        with pytest.raises(openai.APIStatusError) as unavailable:
            client.completions.create(model="task-1", prompt="hello", max_tokens=2)
        assert unavailable.value.status_code == 503
        assert unavailable.value.body["code"] == "service_unavailable"

        async def fill_then_overflow() -> int:
            aclient = running.async_client()
            # One long request holds the only batch row, a second one waits in the queue ...
            holder = await aclient.completions.create(model="task-0", prompt="hello", max_tokens=400, temperature=0, stream=True)
            first = await anext(holder.__aiter__())
            assert first.choices[0].index == 0
            waiter = asyncio.create_task(aclient.completions.create(model=BASE_NAME, prompt="hi", max_tokens=2, temperature=0))
            for _ in range(500):
                if (await running.backend.health()).waiting_requests == 1:
                    break
                await asyncio.sleep(0.01)
            # ... so a third one finds the queue full.
            try:
                await aclient.completions.create(model=BASE_NAME, prompt="hi", max_tokens=2)
            except openai.RateLimitError as exc:
                status = exc.status_code
            else:
                status = 200
            await holder.close()
            await waiter
            return status

        assert asyncio.run(fill_then_overflow()) == 429


def test_client_disconnect_cancels_its_rows(server: RunningServer) -> None:
    """Closing a stream early frees its batch row: the engine stops generating for it."""

    async def scenario() -> tuple[int, int]:
        client = server.async_client()
        steps_before = server.backend.steps
        stream = await client.completions.create(model="task-1", prompt="hello", max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        await stream.close()
        for _ in range(200):
            if (await server.backend.health()).running_requests == 0:
                break
            await asyncio.sleep(0.02)
        return (await server.backend.health()).running_requests, server.backend.steps - steps_before

    running, steps = asyncio.run(scenario())
    assert running == 0
    assert steps < 200  # far fewer than the 400 tokens it asked for
