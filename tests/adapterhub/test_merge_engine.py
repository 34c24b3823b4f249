"""The merge engine on tiny real models: exact task vectors, LoRA and full-model outputs.

Every check compares against an independent path: PEFT's own `merge_and_unload` for task
vectors, transformers/PEFT loading for outputs, the full-model output minus the base for
the dense merged delta a LoRA output approximates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapterhub.errors import ValidationError
from adapterhub.merge import MERGE_REPORT, MergeRecipe, merge
from adapterhub.merge.io import LazyTensorReader
from adapterhub.merge.methods import GlobalParams, get_method
from adapterhub.merge.task_vectors import InputModel
from tests.conftest import build_lora_adapter

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRAs of different ranks, scalings and target modules, plus DoRA and (IA)³, on tiny_base."""
    root = tmp_path_factory.mktemp("merge-adapters")
    return {
        "a": build_lora_adapter(tiny_base, root / "a", rank=4, alpha=8, seed=1),
        "b": build_lora_adapter(
            tiny_base, root / "b", rank=8, alpha=4, seed=2, target_modules=("q_proj", "k_proj"),
            use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 3.0},
        ),
        "c": build_lora_adapter(tiny_base, root / "c", rank=2, alpha=2, seed=3, target_modules=("v_proj", "down_proj")),
        "dora": build_lora_adapter(tiny_base, root / "dora", rank=4, alpha=8, seed=4, use_dora=True),
        "ia3": build_lora_adapter(tiny_base, root / "ia3", seed=5, peft_type="ia3", target_modules=("q_proj", "v_proj")),
        "embed": build_lora_adapter(tiny_base, root / "embed", rank=4, alpha=4, seed=6, target_modules=("embed_tokens", "o_proj")),
    }


def _recipe(method: str, models: list[tuple[Path, dict]], **parameters) -> MergeRecipe:
    return MergeRecipe.from_dict({
        "merge_method": method,
        "models": [{"model": str(path), "parameters": params} for path, params in models],
        "parameters": parameters,
    })


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    reader = LazyTensorReader(model_dir)
    return {name: reader.get(name) for name in reader.names()}


def _lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW per base weight of a LoRA output, read with PEFT's config conventions."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    out = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
                b = handle.get_tensor(key.replace("lora_A", "lora_B"))
                out[module + ".weight"] = scale * b @ handle.get_tensor(key)
    return out


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind", ["b", "dora", "ia3", "embed"])
def test_task_vectors_match_peft_merge_and_unload(kind: str, tiny_base: Path, adapters: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapters[kind]).merge_and_unload()
    merged_state = merged.state_dict()
    base = LazyTensorReader(tiny_base)
    model = InputModel.open(adapters[kind])
    touched = model.touched_weights()
    assert touched, "the adapter touches no weight"
    for name in touched:
        expected = merged_state[name] - base.get(name)
        torch.testing.assert_close(model.task_vector(name, base.get_float), expected, atol=2e-6, rtol=1e-5)
    untouched = [n for n in base.names() if n not in touched and n in merged_state]
    assert all(torch.equal(merged_state[n], base.get(n)) for n in untouched)


def test_linear_merge_of_loras_is_an_exact_rank_concatenation(tiny_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe("task_arithmetic", [(adapters["a"], {"weight": 0.7}), (adapters["b"], {"weight": -0.4}), (adapters["c"], {"weight": 1.0})], **{"lambda": 0.9})
    result = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "out")
    assert result.exact and result.max_relative_error == 0.0
    assert result.rank == 4 + 8  # q_proj: a (4) + b (8); zero-padded elsewhere
    base = LazyTensorReader(tiny_base)
    inputs = [InputModel.open(adapters[k]) for k in ("a", "b", "c")]
    deltas = _lora_deltas(tmp_path / "out")
    assert set(deltas) == set().union(*(m.touched_weights() for m in inputs))
    for name, delta in deltas.items():
        expected = torch.zeros_like(delta)
        for model, weight in zip(inputs, (0.7, -0.4, 1.0)):
            tv = model.task_vector(name, base.get_float)
            if tv is not None:
                expected += 0.9 * weight * tv
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    report = json.loads((tmp_path / "out" / MERGE_REPORT).read_text())
    assert report["method"] == "task_arithmetic" and report["error_report"]["exact"] is True


@pytest.mark.parametrize(("method", "second"), [
    ("linear", "b"), ("ties", "b"), ("dare_ties", "b"), ("linear", "embed"), ("ties", "embed"),
    ("tsv", "b"), ("iso_c", "b"), ("iso_cts", "b"), ("knots", "b"), ("model_stock", "a"), ("nuslerp", "b"),
])
def test_lora_output_in_peft_gives_the_logits_of_base_plus_merged_delta(
    method: str, second: str, tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # model_stock of unrelated adapters is ~the base (cos θ ≈ 0): it is given the same adapter twice
    recipe = _recipe(method, [(adapters["a"], {"weight": 0.6, "density": 0.5}), (adapters[second], {"weight": 0.4, "density": 0.7})], seed=3)
    # rank 64 = full rank of the tiny model's 64-wide projections: the SVD is exact up to float error
    lora = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "lora", rank=None if method == "linear" else 64)
    full = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "full", full_model=True)
    assert lora.max_relative_error < 1e-5
    tokens = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 11]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "lora")
    full_model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_base), tokens)
    merged_logits = _logits(full_model, tokens)
    assert (merged_logits - base_logits).abs().max() > 1e-3, "the merge changed nothing"
    torch.testing.assert_close(_logits(peft_model, tokens), merged_logits, atol=1e-4, rtol=1e-4)


def test_full_model_output_is_base_plus_the_method_applied_to_task_vectors(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe("ties", [(adapters["a"], {"weight": 1.0, "density": 0.3}), (adapters["c"], {"weight": 0.5, "density": 0.6})])
    result = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "full", full_model=True, max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "full").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "full" / "model.safetensors.index.json").exists()
    merged_state, base = _state(tmp_path / "full"), LazyTensorReader(tiny_base)
    inputs = [InputModel.open(adapters["a"]), InputModel.open(adapters["c"])]
    ties = get_method("ties")
    params = recipe.input_params()
    changed = 0
    for name in base.names():
        vectors = [m.task_vector(name, base.get_float) for m in inputs]
        if all(v is None for v in vectors):
            assert torch.equal(merged_state[name], base.get(name))
            continue
        dense = [v if v is not None else torch.zeros_like(base.get_float(name)) for v in vectors]
        expected = base.get_float(name) + ties.function(dense, None, params=params, global_params=GlobalParams(), generator=torch.Generator())
        torch.testing.assert_close(merged_state[name], expected, atol=1e-6, rtol=1e-6)
        changed += 1
    assert changed == result.modules_merged > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert AutoTokenizer.from_pretrained(tmp_path / "full").chat_template


@pytest.mark.parametrize("option", [{"rank": 2}, {"energy": 0.8}])
def test_svd_output_error_is_within_the_reported_figure(option: dict, tiny_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe("ties", [(adapters["a"], {"density": 0.5}), (adapters["b"], {"density": 0.5})])
    lora = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "lora", **option)
    merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "full", full_model=True)
    full, base = _state(tmp_path / "full"), LazyTensorReader(tiny_base)
    assert not lora.exact
    for name, approx in _lora_deltas(tmp_path / "lora").items():
        dense = full[name] - base.get(name)
        actual = float((dense - approx).norm() / dense.norm())
        reported = lora.module_errors[name.removesuffix(".weight")]
        assert 0 < reported < 1
        assert actual <= reported + 1e-4
        if "energy" in option:
            assert reported <= (1 - option["energy"]) ** 0.5 + 1e-6


def test_default_lora_output_rank_is_the_smallest_keeping_the_default_energy_per_module(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from adapterhub.merge.engine import DEFAULT_ENERGY

    recipe = _recipe("ties", [(adapters["a"], {"density": 0.5}), (adapters["b"], {"density": 0.5})])
    lora = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "lora")
    merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "full", full_model=True)
    full, base = _state(tmp_path / "full"), LazyTensorReader(tiny_base)
    assert set(lora.module_ranks) == set(lora.module_errors) and lora.rank == max(lora.module_ranks.values())
    for name in _lora_deltas(tmp_path / "lora"):
        module = name.removesuffix(".weight")
        singular = torch.linalg.svdvals((full[name] - base.get(name)).double())
        captured = torch.cumsum(singular**2, 0) / (singular**2).sum()
        chosen = lora.module_ranks[module]
        assert captured[chosen - 1] >= DEFAULT_ENERGY - 1e-9  # the rank keeps the energy …
        assert chosen == 1 or captured[chosen - 2] < DEFAULT_ENERGY  # … and no smaller one does
        assert lora.module_errors[module] <= (1 - DEFAULT_ENERGY) ** 0.5 + 1e-6
    assert lora.rank > 12  # a TIES ΔW needs more than the inputs' 4 + 8: the old default lost it
    report = json.loads((tmp_path / "lora" / MERGE_REPORT).read_text())["error_report"]
    assert report["module_ranks"] == dict(lora.module_ranks) and report["warnings"] == list(lora.warnings)


def test_a_lora_output_much_worse_than_a_full_model_warns_and_suggests_it(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe("ties", [(adapters["a"], {"density": 0.5}), (adapters["b"], {"density": 0.5})])
    lora = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "lora", rank=1)
    assert any("--full-model" in w and "lose more than 20%" in w for w in lora.warnings), lora.warnings
    exact = merge(_recipe("linear", [(adapters["a"], {}), (adapters["b"], {})]), base_dir=tiny_base, out_dir=tmp_path / "exact")
    assert exact.exact and exact.warnings == ()


def test_lora_output_warnings_name_the_worst_modules_and_a_pointless_rank() -> None:
    from adapterhub.merge.engine import lora_output_warnings

    errors = {"q": 0.5, "k": 0.05, "v": 0.3}
    shapes = {"q": (64, 64), "k": (64, 64), "v": (64, 64)}
    (lossy,) = lora_output_warnings(errors, shapes, rank=2)
    assert lossy.startswith("2 of 3 modules") and "q 0.50, v 0.30" in lossy
    assert lora_output_warnings({"q": 0.01}, {"q": (64, 64)}, rank=8) == ()
    (pointless,) = lora_output_warnings({"q": 0.0}, {"q": (64, 64)}, rank=16)  # 16·128 = 50% of 64·64
    assert "holds 50% of the parameters" in pointless and "--full-model" in pointless


def test_random_methods_are_reproducible_and_seeded(tiny_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    def run(seed: int, out: str) -> dict[str, torch.Tensor]:
        recipe = _recipe("dare_ties", [(adapters["a"], {"density": 0.4}), (adapters["b"], {"density": 0.4})], seed=seed)
        merge(recipe, base_dir=tiny_base, out_dir=tmp_path / out, full_model=True)
        return _state(tmp_path / out)

    first, again, other = run(1, "x"), run(1, "y"), run(2, "z")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_full_fine_tuned_model_input(tiny_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    fine_tuned = tmp_path / "ft"
    shutil.copytree(tiny_base, fine_tuned)
    state = _state(tiny_base)
    generator = torch.Generator().manual_seed(0)
    changed = {"model.layers.0.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"}
    for name in changed:
        state[name] = state[name] + 0.01 * torch.randn(state[name].shape, generator=generator)
    for old in fine_tuned.glob("*.safetensors"):
        old.unlink()
    save_file(state, str(fine_tuned / "model.safetensors"), metadata={"format": "pt"})

    recipe = _recipe("task_arithmetic", [(fine_tuned, {"weight": 1.0}), (adapters["a"], {"weight": 1.0})])
    full = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "full", full_model=True)
    merged, base = _state(tmp_path / "full"), _state(tiny_base)
    lora_a = InputModel.open(adapters["a"])
    for name in base:
        expected = state[name].clone()
        tv = lora_a.task_vector(name, lambda n: base[n])
        if tv is not None:
            expected += tv
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-6)
    assert full.modules_merged == len(changed) + len(lora_a.touched_weights())

    lora = merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "lora")
    assert not lora.exact
    assert set(lora.dropped) == {"model.layers.1.input_layernorm.weight"}  # a norm is not expressible as LoRA
    assert "model.layers.0.mlp.up_proj" in lora.module_errors


def test_bad_inputs_raise_one_error_and_write_nothing(
    tiny_base: Path, tiny_base_other: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    other = build_lora_adapter(tiny_base_other, tmp_path / "other")
    prompt = build_lora_adapter(tiny_base, tmp_path / "prompt", peft_type="prompt_tuning")
    from transformers import AutoModelForSequenceClassification

    classifier = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=2).save_pretrained(classifier)
    recipe = _recipe("ties", [(adapters["a"], {}), (other, {}), (prompt, {}), (classifier, {})])
    with pytest.raises(ValidationError) as caught:
        merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "out")
    message = str(caught.value)
    assert f"input {other}: " in message and "does not fit the base model" in message
    assert "PROMPT_TUNING adapter is not a change of the base weights" in message
    assert "sequence classifier (LlamaForSequenceClassification)" in message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial*"))

    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(ValidationError, match="exists and is not empty"):
        merge(_recipe("linear", [(adapters["a"], {})]), base_dir=tiny_base, out_dir=existing)
    assert (existing / "keep.txt").read_text() == "x"


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT warns about lora_bias on bias-free layers
def test_what_the_kinds_table_rules_out_is_refused_in_its_words(tiny_base: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    """modules_to_save and LoRA biases are traits of the kinds table: the engine refuses them all at once."""
    saved = build_lora_adapter(tiny_base, tmp_path / "saved", modules_to_save=["lm_head"])
    biased = build_lora_adapter(tiny_base, tmp_path / "biased", lora_bias=True)
    recipe = _recipe("linear", [(adapters["a"], {}), (saved, {}), (biased, {})])
    with pytest.raises(ValidationError) as caught:
        merge(recipe, base_dir=tiny_base, out_dir=tmp_path / "out")
    assert caught.value.problems == [
        f"input {saved}: it replaces whole modules of the base (modules_to_save: lm_head): fully trained copies of layers "
        "are new weights, not a change of the base's, and cannot be merged",
        f"input {biased}: LoRA bias terms (lora_bias) cannot be merged: a bias is not part of the low-rank change",
    ]
    assert not (tmp_path / "out").exists()
