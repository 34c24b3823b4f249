"""The torch engine without HTTP: gathered LoRA against PEFT, batch-mate independence,
adapter validation, slot eviction and the non-blocking load path."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from adapterhub.serving.backends.base import AdapterLoadError, AdapterSpec, GenerationError, SamplingParams
from adapterhub.serving.backends.lora_slots import RowGroups, SlotTable, read_adapter_dir
from adapterhub.serving.backends.torch_engine import EngineConfig, TorchEngine
from adapterhub.serving.errors import from_exception
from tests.conftest import build_lora_adapter
from tests.serving.conftest import AdapterFleet, ReferenceGenerator, build_dora_adapter, build_ia3_adapter


def _spec(fleet: AdapterFleet, name: str) -> AdapterSpec:
    return AdapterSpec(key=name, locate=lambda: fleet.dirs[name])


def test_gathered_lora_logits_match_peft_row_by_row(adapter_fleet: AdapterFleet) -> None:
    """One forward pass with a different adapter (or none) per row equals PEFT per adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = ["task-0", "task-2", "task-4", "task-5"]
    model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir).eval()
    table = SlotTable(model)
    for slot, name in enumerate(names, start=1):
        table.write(slot, read_adapter_dir(adapter_fleet.dirs[name], table.base_layers))
    input_ids = torch.randint(3, 300, (len(names) + 1, 7), generator=torch.Generator().manual_seed(0))
    table.context.set_rows([1, 2, 3, 4, 0])
    with torch.no_grad():
        mixed = model(input_ids).logits
    table.context.set_rows(None)

    for row, name in enumerate([*names, None]):
        reference_model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir)
        if name is not None:
            reference_model = PeftModel.from_pretrained(reference_model, adapter_fleet.dirs[name])
        with torch.no_grad():
            expected = reference_model.eval()(input_ids[row : row + 1]).logits[0]
        if name is None:
            assert torch.equal(mixed[row], expected)  # base rows are bit-identical under mixed load
        else:
            torch.testing.assert_close(mixed[row], expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(mixed[row], mixed[-1], atol=1e-4)  # the adapter does change the row


def test_rows_sharing_adapters_read_each_once_and_equal_peft(adapter_fleet: AdapterFleet, tmp_path: Path) -> None:
    """Rows that share a slot are grouped (`RowGroups`): each group's A and B' are gathered once,
    or not copied at all where the slots are one run (views of the stacks), and every row still
    equals PEFT running its adapter alone; base rows stay bit-identical."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = {"task-0": adapter_fleet.dirs["task-0"], "task-2": adapter_fleet.dirs["task-2"],
            "dora": build_dora_adapter(adapter_fleet.base_dir, tmp_path / "dora", seed=3)}
    model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir).eval()
    table = SlotTable(model)
    for slot, adapter_dir in enumerate(dirs.values(), start=1):
        table.write(slot, read_adapter_dir(adapter_dir, table.base_layers))
    input_ids = torch.randint(3, 300, (8, 6), generator=torch.Generator().manual_seed(2))
    per_slot = sum(  # one slot's A and B' over every layer
        (layer.stack_a[0].numel() + layer.stack_b[0].numel()) * layer.stack_a.element_size()
        for layer in table.layers.values() if layer.stack_a is not None)

    def batch_logits(rows: list[int], ids: torch.Tensor = input_ids) -> torch.Tensor:
        table.context.set_rows(rows, keep_gathers=True)
        try:
            with torch.no_grad():
                return model(ids).logits
        finally:
            table.context.set_rows(None)

    gathered_rows = [1, 3, 3, 0, 3, 1, 3, 1]  # slots 0, 1 and 3 (groups of 1, 3 and 4 rows): not one run
    gathered = batch_logits(gathered_rows)
    assert table.gather_bytes() == 3 * per_slot  # one copy per distinct slot, not one per row
    table.context.set_rows(gathered_rows)
    assert table.context.groups is not None and table.context.groups.count == 3 and table.context.gather_range is None
    table.context.set_rows(None)
    table.forget_gathers()
    viewed_rows = [2, 1, 3, 0, 2, 1, 3, 1]  # slots 0-3: one run, so the stacks themselves
    viewed = batch_logits(viewed_rows)
    assert table.gather_bytes() == 0
    table.context.set_rows(viewed_rows)
    assert table.context.gather_range == (0, 4) and table.context.groups is not None
    table.context.set_rows(None)
    in_order = [1, 5, 0, 4, 2, 6]  # slots 1, 1, 2, 2, 3, 3: already the grouped layout
    table.context.set_rows([viewed_rows[row] for row in in_order])
    assert table.context.groups is not None and table.context.groups.in_order
    table.context.set_rows(None)
    torch.testing.assert_close(batch_logits([viewed_rows[row] for row in in_order], input_ids[in_order]), viewed[in_order], rtol=1e-5, atol=1e-5)

    names = [None, *dirs]
    for slot, name in enumerate(names):
        reference_model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir)
        if name is not None:
            reference_model = PeftModel.from_pretrained(reference_model, dirs[name])
        with torch.no_grad():
            expected = reference_model.eval()(input_ids).logits
        for rows, logits in ((gathered_rows, gathered), (viewed_rows, viewed)):
            for row in (row for row, row_slot in enumerate(rows) if row_slot == slot):
                if slot == 0:
                    assert torch.equal(logits[row], expected[row])
                else:
                    torch.testing.assert_close(logits[row], expected[row], rtol=1e-5, atol=1e-5)


def test_row_groups_lay_rows_out_by_slot() -> None:
    groups = RowGroups.of([3, 1, 3, 1, 3, 2], "cpu")
    assert groups is not None and (groups.count, groups.width) == (3, 3)
    assert groups.slots.tolist() == [1, 2, 3]  # in slot order, so a run of slots is a view
    members, positions = groups.members.tolist(), groups.positions.tolist()
    assert [members[p] for p in positions] == list(range(6))  # every row is computed at its position
    assert [[1, 2, 3][p // 3] for p in positions] == [3, 1, 3, 1, 3, 2]  # in its slot's group
    assert not groups.in_order
    in_order = RowGroups.of([2, 2, 5, 5], "cpu")
    assert in_order is not None and in_order.in_order and in_order.slots.tolist() == [2, 5]
    assert RowGroups.of([1, 2, 4, 5], "cpu") is None  # every row its own adapter: nothing to share
    run = RowGroups.of([4, 2, 3, 1], "cpu")  # ... unless the slots are one run (views, no copy)
    assert run is not None and (run.count, run.width) == (4, 1) and run.slots.tolist() == [1, 2, 3, 4]
    assert [run.members.tolist()[p] for p in run.positions.tolist()] == [0, 1, 2, 3]
    assert RowGroups.of([1, 1, 1, 1, 1, 1, 2, 3, 4, 5], "cpu") is None  # padded to 5 x 6: too uneven


def test_running_batch_stays_in_slot_order_with_every_row_its_own_cache() -> None:
    """Rows joining are placed by slot (stable), each row's keys, values and mask moving with it
    and left-padded to the longer part, so the batch equals an append sorted afterwards."""
    from transformers import DynamicCache

    from adapterhub.serving.backends.batch import Request, Row, RunningBatch

    generator = torch.Generator().manual_seed(0)
    loop = asyncio.new_event_loop()

    def prefilled(slots: list[int], length: int) -> tuple[list[Row], DynamicCache, torch.Tensor]:
        rows = [Row(request=Request([1], SamplingParams(max_tokens=1), None, loop, asyncio.Queue(), None), slot=slot) for slot in slots]
        layers = [(torch.randn(len(slots), 2, length, 3, generator=generator), torch.randn(len(slots), 2, length, 3, generator=generator)) for _ in range(2)]
        mask = torch.ones(len(slots), length, dtype=torch.long)
        mask[0, :1] = 0  # some left padding of its own
        return rows, DynamicCache(ddp_cache_data=layers), mask

    batch = RunningBatch(torch.device("cpu"))
    history: list[tuple[Row, list[torch.Tensor], torch.Tensor]] = []  # row, its keys/values, its mask (unpadded)
    for slots, length in (([3, 0, 3], 4), ([1, 3, 0], 6), ([2], 2)):
        rows, cache, mask = prefilled(slots, length)
        history += [(row, [t[i] for layer in cache.layers for t in (layer.keys, layer.values)], mask[i]) for i, row in enumerate(rows)]
        merged, merged_cache, merged_mask, places = batch.merged(rows, cache, mask)
        assert [merged[p] for p in places] == rows
        batch.rows, batch.cache, batch.mask = merged, merged_cache, merged_mask
    assert [row.slot for row in batch.rows] == [0, 0, 1, 2, 3, 3, 3]
    order = sorted(range(len(history)), key=lambda i: history[i][0].slot)  # stable, as merged is
    assert batch.rows == [history[i][0] for i in order]
    assert batch.mask is not None and batch.mask.shape == (7, 6)
    for place, i in enumerate(order):
        _, tensors, mask = history[i]
        pad = 6 - mask.shape[0]
        assert torch.equal(batch.mask[place], torch.cat([torch.zeros(pad, dtype=torch.long), mask]))
        got = [t[place] for layer in batch.cache.layers for t in (layer.keys, layer.values)]
        for expected, actual in zip(tensors, got):
            assert torch.equal(actual[:, pad:], expected) and not actual[:, :pad].any()
    loop.close()


def test_kept_gathers_are_never_stale(adapter_fleet: AdapterFleet) -> None:
    """Decode steps keep the rows' gathered adapters; rewriting a slot the rows use, or changing
    the rows, must give what a fresh gather gives; a prefill of other rows in between leaves the
    decode's copies for its next step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir).eval()
    table = SlotTable(model, max_slots=8)
    weights = {name: read_adapter_dir(adapter_fleet.dirs[name], table.base_layers) for name in ("task-0", "task-1", "task-2")}
    table.write(1, weights["task-0"])
    table.write(3, weights["task-1"])  # slots 0, 1, 3: not one run, so rows on them are gathered
    input_ids = torch.randint(3, 300, (3, 4), generator=torch.Generator().manual_seed(4))
    layer = next(layer for layer in table.layers.values() if layer.stack_a is not None)

    def logits(rows: list[int], *, keep: bool) -> torch.Tensor:
        table.context.set_rows(rows, keep_gathers=keep)
        try:
            with torch.no_grad():
                return model(input_ids[: len(rows)]).logits
        finally:
            table.context.set_rows(None)

    fresh = logits([1, 3, 0], keep=False)
    assert table.gather_bytes() == 0  # a prefill keeps nothing of its own
    assert torch.equal(logits([1, 3, 0], keep=True), fresh)
    assert table.gather_bytes() > 0  # kept for the next step of these rows
    kept = layer._gathers
    assert torch.equal(logits([1, 3, 0], keep=True), fresh)  # from the kept copies
    assert layer._gathers is kept
    logits([3], keep=False)  # a prefill of another row in between ...
    assert layer._gathers is kept  # ... leaves the batch's copies for its next step
    assert torch.equal(logits([1, 3, 0], keep=True), fresh)
    table.write(3, weights["task-2"])  # slot 3 changes hands (a wider adapter: the stacks grow too)
    rewritten = logits([1, 3, 0], keep=True)
    assert torch.equal(rewritten, logits([1, 3, 0], keep=False))
    assert not torch.allclose(rewritten, fresh, atol=1e-4)
    assert torch.equal(logits([3, 1], keep=True), logits([3, 1], keep=False))  # other rows
    table.forget_gathers()
    assert table.gather_bytes() == 0


def test_dora_and_ia3_rows_match_peft_beside_lora_and_base(adapter_fleet: AdapterFleet, tmp_path: Path) -> None:
    """DoRA (magnitude-rescaled LoRA) and (IA)3 (output and feedforward-input scaling) rows in one
    forward pass with a LoRA row and a base row each equal PEFT running that adapter alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = {
        "dora": build_dora_adapter(adapter_fleet.base_dir, tmp_path / "dora", seed=1),
        "ia3": build_ia3_adapter(adapter_fleet.base_dir, tmp_path / "ia3", seed=2),
        "task-2": adapter_fleet.dirs["task-2"],  # LoRA on every projection, overlapping both
    }
    model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir).eval()
    table = SlotTable(model)
    for slot, adapter_dir in enumerate(dirs.values(), start=1):
        weights = read_adapter_dir(adapter_dir, table.base_layers)
        table.write(slot, weights)
    assert [read_adapter_dir(d, table.base_layers).kind for d in dirs.values()] == ["DORA", "IA3", "LORA"]
    input_ids = torch.randint(3, 300, (4, 7), generator=torch.Generator().manual_seed(1))
    table.context.set_rows([1, 2, 3, 0])
    with torch.no_grad():
        mixed = model(input_ids).logits
    table.context.set_rows(None)

    for row, adapter_dir in enumerate([*dirs.values(), None]):
        reference_model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir)
        if adapter_dir is not None:
            reference_model = PeftModel.from_pretrained(reference_model, adapter_dir)
        with torch.no_grad():
            expected = reference_model.eval()(input_ids[row : row + 1]).logits[0]
        if adapter_dir is None:
            assert torch.equal(mixed[row], expected)
        else:
            torch.testing.assert_close(mixed[row], expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(mixed[row], mixed[-1], atol=1e-3)


def test_half_precision_slots_round_scaled_b_once(adapter_fleet: AdapterFleet, tmp_path: Path) -> None:
    """In bf16 (GPU serving), B * scale is formed in fp32 and rounded once, for LoRA and DoRA alike."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir, dtype=torch.bfloat16).eval()
    table = SlotTable(model)
    dora = build_dora_adapter(adapter_fleet.base_dir, tmp_path / "dora", seed=1)
    for slot, adapter_dir in enumerate((adapter_fleet.dirs["task-1"], dora), start=1):
        weights = read_adapter_dir(adapter_dir, table.base_layers)
        table.write(slot, weights)
        for name, delta in weights.modules.items():
            if delta.b is None:
                continue
            stored = table.layers[name].stack_b[slot, : delta.rank].t()
            assert stored.dtype == torch.bfloat16
            assert torch.equal(stored, (delta.b.float() * delta.b_scale).to(torch.bfloat16)), name


def test_read_adapter_dir_reports_every_problem(adapter_fleet: AdapterFleet, tiny_base_other: Path, tmp_path: Path) -> None:
    no_layers = SlotTable(torch.nn.Sequential()).base_layers  # no linear layers at all
    with pytest.raises(AdapterLoadError, match="no linear layer of that name"):
        read_adapter_dir(adapter_fleet.dirs["task-0"], no_layers)
    for kind in ("prompt_tuning", "prefix_tuning"):
        adapter = build_lora_adapter(adapter_fleet.base_dir, tmp_path / kind, peft_type=kind)
        with pytest.raises(AdapterLoadError, match=f"{kind.replace('_', ' ')} adapters cannot be served by the torch backend"):
            read_adapter_dir(adapter, no_layers)
    from transformers import AutoModelForCausalLM

    other = SlotTable(AutoModelForCausalLM.from_pretrained(tiny_base_other))
    with pytest.raises(AdapterLoadError) as wrong_base:
        read_adapter_dir(adapter_fleet.dirs["task-1"], other.base_layers)
    # Every one of the 8 target layers (q/k/v/o in 2 blocks) is listed, not just the first.
    assert str(wrong_base.value).count("do not fit") == 8


def test_output_is_independent_of_batch_mates(adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    """Each request alone vs all of them at once (different adapters, prompt lengths, lengths)."""
    prompts = ["hello", "the quick brown fox jumps over the lazy dog", "question: what is two plus two? answer:", "0 1 2"]
    jobs = [
        (name, prompt, max_tokens)
        for name, max_tokens in ((None, 10), ("task-0", 6), ("task-2", 14), ("task-5", 9), ("task-8", 12))
        for prompt in prompts
    ]

    async def run(engine: TorchEngine, name: str | None, prompt: str, max_tokens: int) -> str:
        spec = _spec(adapter_fleet, name) if name else None
        pieces = [
            chunk.text
            async for chunk in engine.generate(reference.prompt_ids(prompt), SamplingParams(max_tokens=max_tokens, temperature=0), spec)
        ]
        return "".join(pieces)

    async def scenario() -> tuple[list[str], list[str], int]:
        engine = TorchEngine(adapter_fleet.base_dir, base_name="tiny", config=EngineConfig(device="cpu", max_resident=5))
        await engine.start()
        try:
            alone = [await run(engine, *job) for job in jobs]
            steps_alone = engine.steps
            together = await asyncio.gather(*(run(engine, *job) for job in jobs))
            return alone, list(together), engine.steps - steps_alone
        finally:
            await engine.shutdown()

    alone, together, steps_together = asyncio.run(scenario())
    assert together == alone
    assert steps_together < sum(max_tokens for _, _, max_tokens in jobs) // 4  # they really shared steps
    for (name, prompt, max_tokens), text in zip(jobs, alone):
        adapter_dir = adapter_fleet.dirs[name] if name else None
        assert text == reference.greedy(adapter_dir, tuple(reference.prompt_ids(prompt)), max_tokens)


def test_delay_factor_prefills_requests_arriving_apart_together(adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    """With `scheduler_delay_factor`, requests that arrive while rows run wait for batch-mates
    and share one prefill; without it each gets its own. The wait ends when the batch can be
    filled, when the running rows finish, or after `factor` x the latest prefill's duration.
    It changes when a request starts, never what it produces."""
    long_job = ("task-0", "hello", 120)
    later_jobs = [(None, "the quick brown fox", 8), ("task-2", "0 1 2", 8)]

    async def scenario(delay_factor: float) -> tuple[list[str], int, list[int]]:
        config = EngineConfig(device="cpu", max_resident=3, max_batch_size=3, scheduler_delay_factor=delay_factor)
        engine = TorchEngine(adapter_fleet.base_dir, base_name="tiny", config=config)
        await engine.start()
        try:
            started = asyncio.Event()
            finished: list[int] = []

            async def run(index: int, name: str | None, prompt: str, max_tokens: int) -> str:
                spec = _spec(adapter_fleet, name) if name else None
                pieces = []
                async for chunk in engine.generate(reference.prompt_ids(prompt), SamplingParams(max_tokens=max_tokens, temperature=0), spec):
                    pieces.append(chunk.text)
                    started.set()
                finished.append(index)
                return "".join(pieces)

            async def later() -> list[str]:
                await started.wait()  # the long request is decoding
                first = asyncio.create_task(run(1, *later_jobs[0]))
                await asyncio.sleep(0.05)  # many decode steps of the tiny model
                second = asyncio.create_task(run(2, *later_jobs[1]))
                return [await first, await second]

            texts = await asyncio.gather(run(0, *long_job), later())
            return [texts[0], *texts[1]], engine.prefills, finished
        finally:
            await engine.shutdown()

    held, held_prefills, _ = asyncio.run(scenario(1e6))  # held until the two fill the batch
    eager, eager_prefills, _ = asyncio.run(scenario(0.0))
    timed, _, finish_order = asyncio.run(scenario(5.0))  # a wait of a few tiny prefills
    assert (held_prefills, eager_prefills) == (2, 3)
    assert finish_order[-1] == 0  # the wait ran out while the long request still ran
    assert held == eager == timed
    for (name, prompt, max_tokens), text in zip([long_job, *later_jobs], held):
        adapter_dir = adapter_fleet.dirs[name] if name else None
        assert text == reference.greedy(adapter_dir, tuple(reference.prompt_ids(prompt)), max_tokens)


def test_cold_load_does_not_stall_resident_adapters(adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    """While an adapter is read from disk (slowly), a resident adapter keeps producing tokens."""
    slow_dir = adapter_fleet.dirs["task-11"]

    def slow_locate() -> Path:
        time.sleep(1.0)  # a slow disk or registry: must not hold the engine
        return slow_dir

    async def scenario() -> tuple[list[float], float]:
        engine = TorchEngine(adapter_fleet.base_dir, base_name="tiny", config=EngineConfig(device="cpu", max_resident=2))
        await engine.start()
        try:
            await engine.load_adapter(_spec(adapter_fleet, "task-0"))
            token_times: list[float] = []
            cold_started = time.perf_counter()

            async def resident() -> None:
                sampling = SamplingParams(max_tokens=60, temperature=0)
                async for _ in engine.generate(reference.prompt_ids("hello"), sampling, _spec(adapter_fleet, "task-0")):
                    token_times.append(time.perf_counter() - cold_started)

            async def cold() -> float:
                spec = AdapterSpec(key="slow", locate=slow_locate)
                async for _ in engine.generate(reference.prompt_ids("hello"), SamplingParams(max_tokens=2, temperature=0), spec):
                    pass
                return time.perf_counter() - cold_started

            _, cold_done = await asyncio.gather(resident(), cold())
            return token_times, cold_done
        finally:
            await engine.shutdown()

    token_times, cold_done = asyncio.run(scenario())
    assert cold_done >= 1.0
    during_load = [t for t in token_times if t < 1.0]
    assert len(during_load) >= 5, token_times[:10]  # tokens kept flowing during the 1 s read


def test_lru_keeps_pinned_and_cpu_tier_avoids_disk(adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    reads: list[str] = []

    def counting_spec(name: str) -> AdapterSpec:
        def locate() -> Path:
            reads.append(name)
            return adapter_fleet.dirs[name]

        return AdapterSpec(key=name, locate=locate)

    async def scenario() -> list[tuple[str, str, bool]]:
        engine = TorchEngine(adapter_fleet.base_dir, base_name="tiny", config=EngineConfig(device="cpu", max_resident=2, max_cpu_adapters=4))
        await engine.start()
        try:
            await engine.load_adapter(counting_spec("task-0"), pin=True)
            for name in ["task-1", "task-2", "task-3", "task-1", "task-2", "task-3"]:
                async for _ in engine.generate(reference.prompt_ids("hi"), SamplingParams(max_tokens=2, temperature=0), counting_spec(name)):
                    pass
            return [(a.key, a.tier, a.pinned) for a in engine.resident_adapters()]
        finally:
            await engine.shutdown()

    held = asyncio.run(scenario())
    assert ("task-0", "device", True) in held  # pinned: never evicted by the five swaps
    assert sum(1 for _, tier, _ in held if tier == "device") == 2
    assert reads == ["task-0", "task-1", "task-2", "task-3"]  # second round came from the CPU tier


def test_slot_memory_follows_resident_adapters(adapter_fleet: AdapterFleet) -> None:
    """Stacks grow by one slot per adapter (not by doubling), so slot memory per resident adapter
    is the adapter's size; a slot rewritten after holding a wider adapter keeps none of it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(adapter_fleet.base_dir).eval()
    table = SlotTable(model, max_slots=20)
    weights = read_adapter_dir(adapter_fleet.dirs["task-1"], table.base_layers)  # rank 8 on q/k/v/o
    sizes = []
    for slot in range(1, 6):
        table.write(slot, weights)
        sizes.append(table.stack_bytes())
    assert table.capacity == 6
    assert {b - a for a, b in zip(sizes, sizes[1:])} == {weights.size_bytes}
    input_ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    table.context.set_rows([3])
    with torch.no_grad():
        expected = model(input_ids).logits
    table.write(3, read_adapter_dir(adapter_fleet.dirs["task-2"], table.base_layers))  # wider: rank 16, MLP too
    table.write(3, weights)
    with torch.no_grad():
        # Not bit-equal: the stacks' rank grew to 16, and a longer (zero-padded) inner dimension
        # changes the matmul's summation order.
        torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    table.context.set_rows(None)


def test_non_finite_logits_fail_only_that_request(adapter_fleet: AdapterFleet, reference: ReferenceGenerator, tmp_path: Path) -> None:
    """An adapter whose huge weights overflow the logits fails its own request; its batch-mates
    (greedy and sampled) finish normally and the engine keeps serving."""
    from safetensors.torch import load_file, save_file

    broken = build_lora_adapter(adapter_fleet.base_dir, tmp_path / "overflow", seed=5)
    weights_file = broken / "adapter_model.safetensors"
    # Finite weights near fp32's limit: every product with them overflows to inf in the forward pass.
    weights = {k: (torch.full_like(v, 3e38) if "lora_B" in k else v) for k, v in load_file(weights_file).items()}
    save_file(weights, weights_file, metadata={"format": "pt"})
    specs = {"overflow": AdapterSpec(key="overflow", locate=lambda: broken), "task-0": _spec(adapter_fleet, "task-0")}
    prompt = reference.prompt_ids("the quick brown fox")
    greedy = SamplingParams(max_tokens=6, temperature=0)
    sampled = SamplingParams(max_tokens=6, temperature=0.9, seed=3)

    async def run(engine: TorchEngine, sampling: SamplingParams, name: str | None) -> str:
        return "".join([c.text async for c in engine.generate(prompt, sampling, specs[name] if name else None)])

    async def scenario() -> tuple[list[object], str, str]:
        engine = TorchEngine(adapter_fleet.base_dir, base_name="tiny", config=EngineConfig(device="cpu", max_resident=3))
        await engine.start()
        try:
            together = await asyncio.gather(
                run(engine, greedy, "overflow"), run(engine, sampled, "overflow"), run(engine, greedy, "task-0"),
                run(engine, sampled, None), return_exceptions=True,
            )
            sampled_alone = await run(engine, sampled, None)
            after = await run(engine, greedy, "task-0")
            return list(together), sampled_alone, after
        finally:
            await engine.shutdown()

    together, sampled_alone, after = asyncio.run(scenario())
    for failed in together[:2]:
        assert isinstance(failed, GenerationError) and "non-finite logits at output token 1" in str(failed)
    answer = from_exception(together[0])  # what the API sends: OpenAI's error shape, a 500 for this request
    assert answer.status_code == 500 and answer.body()["error"]["code"] == "generation_failed"
    expected = reference.greedy(adapter_fleet.dirs["task-0"], tuple(prompt), 6)
    assert together[2] == expected and after == expected
    assert together[3] == sampled_alone  # the seeded batch-mate drew as it would alone
