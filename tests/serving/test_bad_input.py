"""Bad input to the server, from clients and from operators: each case here once broke it
(issue 11). A real uvicorn server or a real engine, tiny real models, outputs compared with a
solo run or with offline PEFT."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import torch

from adapterhub.serving.backends.base import AdapterSpec, SamplingParams
from adapterhub.serving.backends.sampling import candidates, draw
from adapterhub.serving.backends.torch_engine import EngineConfig, TorchEngine
from adapterhub.serving.errors import from_exception
from tests.serving.conftest import BASE_NAME, AdapterFleet, ReferenceGenerator, RunningServer, start_server

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


def test_token_ids_the_tokenizer_has_but_the_model_does_not_are_the_clients_400(
    adapter_fleet: AdapterFleet, tmp_path: Path
) -> None:
    """A tokenizer given tokens the model was never resized for is longer than the model's
    vocabulary: ids between passed the edge's check (against the tokenizer) and raised in the
    engine. They are refused as the client's error, naming the field, before any work."""
    from transformers import AutoTokenizer

    base_copy = Path(shutil.copytree(adapter_fleet.base_dir, tmp_path / "base"))
    tokenizer = AutoTokenizer.from_pretrained(base_copy)
    model_vocab = len(tokenizer)
    tokenizer.add_tokens(["<never-resized-1>", "<never-resized-2>"])
    tokenizer.save_pretrained(base_copy)
    with start_server(adapter_fleet, base_dir=base_copy, max_resident=1) as running:
        url = f"{running.base_url}/v1/completions"
        for extra, param in (
            ({"prompt": [5, model_vocab + 1]}, "prompt"),
            ({"prompt": "hi", "stop_token_ids": [model_vocab]}, "stop_token_ids"),
            ({"prompt": "hi", "logit_bias": {str(model_vocab + 1): 5}}, "logit_bias"),
        ):
            refused = httpx.post(url, json={"model": BASE_NAME, "max_tokens": 2, **extra}, timeout=30)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
            assert f"[0, {model_vocab})" in refused.json()["error"]["message"]
        assert httpx.post(url, json={"model": BASE_NAME, "prompt": [5, model_vocab - 1], "max_tokens": 2}, timeout=30).status_code == 200


# ----------------------------------------------------------------------------- loading by path


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_loading_by_path_is_off_unless_the_operator_turns_it_on(adapter_fleet: AdapterFleet, tmp_path: Path) -> None:
    """`lora_path` once loaded any directory of the machine holding an adapter_config.json, on
    a server without a key by default. It is refused now unless `serve` allows it, with the same
    answer whether the path exists or not; loading a registry adapter by name still works."""
    with start_server(adapter_fleet, max_resident=2) as running:
        url = f"{running.base_url}/v1/load_lora_adapter"
        answers = []
        for path in (adapter_fleet.dirs["task-0"], tmp_path / "no-such-dir", Path("/etc")):
            refused = httpx.post(url, json={"lora_name": "by-path", "lora_path": str(path)}, timeout=30)
            assert refused.status_code == 403, refused.text
            answers.append(_error(refused))
        assert answers[0] == answers[1] == answers[2]
        assert answers[0]["code"] == "lora_path_not_allowed" and answers[0]["param"] == "lora_path"
        assert "--allow-lora-path" in answers[0]["message"] and "--adapter-dir" in answers[0]["message"]
        assert "by-path" not in [m.id for m in running.client().models.list().data]
        assert running.backend.resident_adapters() == []
        assert httpx.post(url, json={"lora_name": "task-0"}, timeout=30).status_code == 200  # a registry ref
        assert [a.key for a in running.backend.resident_adapters()] == ["task-0:1"]


def test_lora_path_below_the_adapter_dir_only(adapter_fleet: AdapterFleet, reference: ReferenceGenerator, tmp_path: Path) -> None:
    """With an adapter directory, a path is loaded only when it, its config and its weights all
    lie below it once symlinks are resolved: `..`, a symlinked directory and a symlinked weights
    file that leave it are refused (403 naming the rule), and nothing outside is read."""
    from adapterhub.serving.app import LoraPathPolicy

    root = tmp_path / "adapters"
    inside = Path(shutil.copytree(adapter_fleet.dirs["task-4"], root / "team" / "task-4"))
    outside = Path(shutil.copytree(adapter_fleet.dirs["task-5"], tmp_path / "elsewhere"))
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    linked_weights = root / "linked-weights"
    linked_weights.mkdir()
    shutil.copy(outside / "adapter_config.json", linked_weights)
    (linked_weights / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with start_server(adapter_fleet, max_resident=2, lora_paths=LoraPathPolicy(root=root)) as running:
        url = f"{running.base_url}/v1/load_lora_adapter"
        for index, path in enumerate((str(outside), str(root / ".." / "elsewhere"), str(root / "linked-dir"), str(linked_weights), str(root))):
            refused = httpx.post(url, json={"lora_name": f"bad-{index}", "lora_path": path}, timeout=30)
            assert refused.status_code == 403, (path, refused.text)
            error = _error(refused)
            assert error["code"] == "lora_path_not_allowed" and str(root.resolve()) in error["message"]
        assert running.backend.resident_adapters() == []
        # Absolute, and relative to the adapter directory.
        for name, path in (("absolute", str(inside)), ("relative", "team/task-4")):
            assert httpx.post(url, json={"lora_name": name, "lora_path": path}, timeout=30).status_code == 200
            text = running.client().completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
            assert text == reference.greedy(adapter_fleet.dirs["task-4"], tuple(reference.prompt_ids(PROMPT)), 6)
        nul = httpx.post(url, json={"lora_name": "nul", "lora_path": "team/\u0000x"}, timeout=30)
        assert nul.status_code == 400 and _error(nul)["param"] == "lora_path"


# ----------------------------------------------------------------------------- metrics labels


def _series(metrics: str) -> set[str]:
    """Every series of a Prometheus text page (its name and labels, not its value)."""
    return {line.rsplit(" ", 1)[0] for line in metrics.splitlines() if line and not line.startswith("#")}


def test_metrics_stay_bounded_however_many_names_clients_load(adapter_fleet: AdapterFleet, tmp_path: Path) -> None:
    """A client-chosen `lora_name` was a Prometheus label for good: 300 loads of 2000-character
    names grew /metrics from 53 KB to 4.9 MB. Names are bounded, an adapter loaded by path has
    series only while it is loaded, and unloading removes them: after 150 loads, requests and
    unloads under new long names, /metrics has exactly the series it had after the first."""
    from adapterhub.serving.app import LoraPathPolicy

    path = str(adapter_fleet.dirs["task-3"])
    with start_server(adapter_fleet, max_resident=2, lora_paths=LoraPathPolicy(allow_any=True)) as running:
        http = httpx.Client(base_url=running.base_url, timeout=30)
        for name in ("x" * 2000, "y" * 129):
            too_long = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert too_long.status_code == 400 and _error(too_long)["param"] == "lora_name"
        names = [f"{i:04d}-" + "n" * 123 for i in range(150)]

        def cycle(name: str) -> None:
            assert http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}).status_code == 200
            assert http.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1}).status_code == 200
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200

        cycle(names[0])
        first = http.get("/metrics").text
        for name in names[1:]:
            cycle(name)
        last = http.get("/metrics").text
        assert _series(last) == _series(first)
        assert not any(name in last for name in names)
        assert len(last) < len(first) + 2_000  # values grew a digit or two, nothing else


def test_adapter_series_are_capped_and_the_rest_counted_together(server: RunningServer) -> None:
    from adapterhub.serving.metrics import OTHER_LABEL, ServingMetrics

    metrics = ServingMetrics(server.backend, max_adapter_labels=3)  # type: ignore[arg-type]
    for index in range(10):
        metrics.request_finished(f"a{index}:1", status=200, ttft=0.01, latency=0.1, completion_tokens=2)
        metrics.adapter_loaded(f"a{index}:1", source="disk", seconds=0.001, size_bytes=10)
    metrics.request_finished(BASE_NAME, status=200, ttft=0.01, latency=0.1, completion_tokens=2)  # the base: always its own
    page = metrics.render().decode()
    assert {f'model="a{i}:1"' in page for i in range(3)} == {True}
    assert not any(f"a{i}:1" in page for i in range(3, 10))
    assert f'adapterhub_requests_total{{model="{OTHER_LABEL}",status="200"}} 7.0' in page
    assert f'adapterhub_adapter_loads_total{{adapter="{OTHER_LABEL}",source="disk"}} 7.0' in page
    assert f'adapterhub_requests_total{{model="{BASE_NAME}",status="200"}} 1.0' in page
    metrics.forget("a0:1")  # room for one more
    metrics.request_finished("a9:1", status=200, ttft=None, latency=0.1, completion_tokens=0)
    page = metrics.render().decode()
    assert "a0:1" not in page and 'adapterhub_requests_total{model="a9:1",status="200"} 1.0' in page


# ----------------------------------------------------------------------------- kinds not served


def _classification_lora(base_dir: Path, out_dir: Path) -> Path:
    """A LoRA trained for sequence classification, as PEFT saves one: task SEQ_CLS, with the
    `score` head in `modules_to_save`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    model.config.pad_token_id = 0
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


def test_a_classification_adapter_is_not_listed_and_its_errors_name_ref_and_kind(
    tiny_base: Path, reference: ReferenceGenerator, tmp_path: Path
) -> None:
    """`/v1/models` listed a classification adapter the server cannot serve, and a request for
    it failed on `unsupported tensor ...score.weight` with cache paths and hashes in the
    message. It is left out of the listing, and refused from its record (nothing is read from
    the blob store) with an error naming its ref and kind; other adapters are unaffected."""
    from adapterhub.registry import Registry
    from tests.conftest import build_lora_adapter

    home = tmp_path / "home"
    registry = Registry.open(home=home)
    registry.add_base_model(name=BASE_NAME, model_dir=tiny_base)
    record = registry.put_adapter(name="cls", source_dir=_classification_lora(tiny_base, tmp_path / "cls"), base=BASE_NAME).record
    registry.put_adapter(name="lm", source_dir=build_lora_adapter(tiny_base, tmp_path / "lm", seed=3), base=BASE_NAME)
    fleet = AdapterFleet(home=home, base_dir=Path(registry.get_base_model(BASE_NAME).path), names=("cls", "lm"), dirs={})
    with start_server(fleet, max_resident=2) as running:
        assert {card.id for card in running.client().models.list().data} == {BASE_NAME, "lm:1"}
        assert httpx.get(f"{running.base_url}/v1/models/cls", timeout=10).status_code == 404
        for ref in ("cls", "cls:1", f"cls@{record.sha256[:8]}"):
            refused = httpx.post(f"{running.base_url}/v1/completions", json={"model": ref, "prompt": "hi", "max_tokens": 2}, timeout=30)
            assert refused.status_code == 400, refused.text
            error = _error(refused)
            assert error["code"] == "adapter_load_failed"
            assert error["message"].startswith(
                "adapter 'cls:1' (lora, sequence classification head) cannot be served by the torch backend: "
                "it was trained for a sequence classification head"
            ), error["message"]
            assert str(home) not in error["message"] and record.sha256[:12] not in error["message"]
        loaded = httpx.post(f"{running.base_url}/v1/load_lora_adapter", json={"lora_name": "cls"}, timeout=30)
        assert loaded.status_code == 400 and _error(loaded)["message"].startswith("adapter 'cls:1' (lora, sequence classification head)")
        assert not (home / "cache" / record.sha256).exists()  # refused from the record: never materialized
        text = running.client().completions.create(model="lm", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
        assert text == reference.greedy(tmp_path / "lm", tuple(reference.prompt_ids(PROMPT)), 4)
        assert httpx.get(f"{running.base_url}/health", timeout=10).json()["status"] == "ok"


def test_a_path_adapter_that_cannot_be_served_is_named_by_its_lora_name(
    server: RunningServer, adapter_fleet: AdapterFleet, tmp_path: Path
) -> None:
    """Errors for adapters loaded by path name the `lora_name` and the kind their config says,
    and say what is wrong (bad numbers, a broken pattern, a missing weights file) in one line."""
    bad_alpha = Path(shutil.copytree(adapter_fleet.dirs["task-0"], tmp_path / "nan-alpha"))
    config = json.loads((bad_alpha / "adapter_config.json").read_text())
    (bad_alpha / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    bad_pattern = Path(shutil.copytree(adapter_fleet.dirs["task-0"], tmp_path / "bad-pattern"))
    (bad_pattern / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"(": 4}}))
    no_weights = Path(shutil.copytree(adapter_fleet.dirs["task-0"], tmp_path / "no-weights"))
    (no_weights / "adapter_model.safetensors").unlink()
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    cls = _classification_lora(adapter_fleet.base_dir, tmp_path / "cls")
    for name, path, expected in (
        ("nan-alpha", bad_alpha, "adapter 'nan-alpha' (lora) cannot be served: lora_alpha is nan, not a finite number"),
        ("bad-pattern", bad_pattern, "adapter 'bad-pattern' (lora) cannot be served: "),
        ("no-weights", no_weights, "adapter 'no-weights' (lora) cannot be served: no adapter_model.safetensors"),
        ("nested", nested, "adapter 'nested' (unknown kind) cannot be served: adapter_config.json is not valid JSON"),
        ("cls-by-path", cls, "adapter 'cls-by-path' (lora, sequence classification head) cannot be served by the torch backend"),
    ):
        refused = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=30)
        assert refused.status_code == 400, refused.text
        message = _error(refused)["message"]
        assert message.startswith(expected) and str(tmp_path) not in message, message
        assert name not in [m.id for m in server.client().models.list().data]
    assert "pattern key '(' is not a regular expression" in httpx.post(
        f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(bad_pattern)}, timeout=30
    ).json()["error"]["message"]
    assert httpx.get(f"{server.base_url}/health", timeout=10).json()["status"] == "ok"
