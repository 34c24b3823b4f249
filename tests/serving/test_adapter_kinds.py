"""DoRA and (IA)3 adapters served from the registry like LoRA ones; prompt and prefix tuning
refused by name and kept out of `/v1/models`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import build_lora_adapter
from tests.serving.conftest import (
    BASE_NAME,
    AdapterFleet,
    ReferenceGenerator,
    RunningServer,
    build_dora_adapter,
    build_ia3_adapter,
    start_server,
)

SERVED = ("dora", "ia3", "lora")
MAX_TOKENS = 10
PROMPTS = ["hello there", "the quick brown fox jumps over", "question: what is two plus two? answer:"]


@pytest.fixture(scope="module")
def kinds_fleet(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFleet:
    from adapterhub.registry import Registry

    root = tmp_path_factory.mktemp("kinds")
    registry = Registry.open(home=root / "home")
    registry.add_base_model(name=BASE_NAME, model_dir=tiny_base)
    dirs = {
        "dora": build_dora_adapter(tiny_base, root / "dora", seed=11),
        "ia3": build_ia3_adapter(tiny_base, root / "ia3", seed=12),
        "lora": build_lora_adapter(tiny_base, root / "lora", rank=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=13),
        "soft-prompt": build_lora_adapter(tiny_base, root / "soft-prompt", peft_type="prompt_tuning"),
        "prefix": build_lora_adapter(tiny_base, root / "prefix", peft_type="prefix_tuning"),
    }
    for name, adapter_dir in dirs.items():
        registry.put_adapter(name=name, source_dir=adapter_dir, base=BASE_NAME)
    return AdapterFleet(home=root / "home", base_dir=Path(registry.get_base_model(BASE_NAME).path), names=tuple(dirs), dirs=dirs)


@pytest.fixture(scope="module")
def kinds_server(kinds_fleet: AdapterFleet) -> Iterator[RunningServer]:
    with start_server(kinds_fleet, max_resident=4, max_cpu_adapters=8) as running:
        yield running


def test_models_lists_only_servable_kinds(kinds_server: RunningServer) -> None:
    cards = {card.id: card.model_dump() for card in kinds_server.client().models.list().data}
    assert set(cards) == {BASE_NAME, "dora:1", "ia3:1", "lora:1"}
    assert cards["ia3:1"]["meta"]["peft_type"] == "IA3"
    # Nor can one be retrieved by any ref: the registry knows it, this server cannot serve it.
    missing = httpx.get(f"{kinds_server.base_url}/v1/models/soft-prompt:1", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_prompt_and_prefix_tuning_get_an_error_naming_the_kind(kinds_server: RunningServer) -> None:
    for name, kind in (("soft-prompt", "prompt tuning"), ("prefix", "prefix tuning")):
        response = httpx.post(
            f"{kinds_server.base_url}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}, timeout=30
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "adapter_load_failed"
        # Named by its ref and kind, refused from its record: no cache path, no hash.
        assert error["message"].startswith(f"adapter '{name}:1' ({kind}) cannot be served by the torch backend: {kind} ")
        assert "cache" not in error["message"] and str(kinds_server.backend.model_dir) not in error["message"]
    assert httpx.get(f"{kinds_server.base_url}/health", timeout=10).json()["status"] == "ok"


def test_dora_and_ia3_match_offline_peft_alone_and_in_mixed_batches(
    kinds_server: RunningServer, kinds_fleet: AdapterFleet
) -> None:
    reference = ReferenceGenerator(kinds_fleet.base_dir)
    jobs = [(model, prompt) for model in (*SERVED, BASE_NAME) for prompt in PROMPTS]
    client = kinds_server.async_client()

    async def complete(model: str, prompt: str) -> str:
        response = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        return response.choices[0].text

    async def scenario() -> tuple[list[str], list[str]]:
        alone = [await complete(model, prompt) for model, prompt in jobs]
        together = await asyncio.gather(*(complete(model, prompt) for model, prompt in jobs))
        return alone, list(together)

    alone, together = asyncio.run(scenario())
    assert together == alone
    for (model, prompt), text in zip(jobs, alone):
        adapter_dir = None if model == BASE_NAME else kinds_fleet.dirs[model]
        assert text == reference.greedy(adapter_dir, tuple(reference.prompt_ids(prompt)), MAX_TOKENS), (model, prompt)
    by_model = {model: [t for (m, _), t in zip(jobs, alone) if m == model] for model in (*SERVED, BASE_NAME)}
    for model in SERVED:
        assert by_model[model] != by_model[BASE_NAME], model  # the adapter really changes the output
