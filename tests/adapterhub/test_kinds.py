"""The kinds table and PEFT's module-matching rules, checked against PEFT's own functions."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from types import SimpleNamespace
from typing import Any

import pytest

from adapterhub import kinds
from adapterhub.kinds import (
    AdapterKind,
    PatternTimeoutError,
    UnknownKindError,
    feedforward_matcher,
    get_kind,
    kind_of,
    lora_rank,
    lora_scaling,
    merge_problems,
    pattern_value,
    register_kind,
    register_trait,
    target_matcher,
    why_not_served,
)

MODULES = [
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.12.mlp.gate_proj",
    "model.layers.1.mlp.experts.0.down_proj",
    "model.layers.3.mlp.experts.2.up_proj",
    "transformer.h.2.attn.c_attn",
    "encoder.block.1.layer.0.SelfAttention.q",
    "lm_head",
    "score",
    "q_proj",
    "model.layers.0.self_attn.q_proj_extra",
    "model.layers.0.self_attn.xq_proj",
]

TARGET_CONFIGS: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj"]},
    {"target_modules": ["proj"]},
    {"target_modules": ["q_proj"], "exclude_modules": ["model.layers.1.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": r".*\.(q_proj|v_proj)"},
    {"target_modules": r"model\.layers\.\d+\.mlp\..*"},
    {"target_modules": r"q_proj|lm_head"},
    {"target_modules": r".*experts.*"},
    {"target_modules": ["q_proj", "score", "lm_head"], "modules_to_save": ["score"]},
    {"target_modules": r".*", "modules_to_save": ["lm_head", "mlp"]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0]},
    {"target_modules": ["q_proj", "down_proj", "up_proj"], "layers_to_transform": 1},
    {"target_modules": ["down_proj", "up_proj"], "layers_to_transform": [0, 2], "layers_pattern": "experts"},
    {"target_modules": ["down_proj", "up_proj", "q"], "layers_to_transform": [1], "layers_pattern": ["block", "layers"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [], "layers_pattern": "layers"},
    {"target_modules": ["c_attn"], "layers_to_transform": [2], "layers_pattern": "h"},
    {"target_modules": ["q_proj"], "layers_to_transform": [12, 0], "layers_pattern": ""},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1, 3], "layers_pattern": ["", "experts", "layers"]},
    {"target_modules": ["model.layers.1.self_attn.q_proj", "down_proj"], "layers_to_transform": [0]},  # a full name skips the layer check
]


def _peft_config(config: dict[str, Any]) -> SimpleNamespace:
    """The attributes `check_target_module_exists` reads, without a PeftConfig's own checks."""
    fields = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
              "target_parameters", "feedforward_modules")
    return SimpleNamespace(**{f: config.get(f) for f in fields})


@pytest.mark.parametrize("config", TARGET_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_target_matching_is_peft_check_target_module_exists(config: dict[str, Any]) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    matches = target_matcher(config)
    for module in MODULES:
        assert matches(module) == bool(check_target_module_exists(_peft_config(config), module)), module


@pytest.mark.parametrize("feedforward", [["down_proj"], ["proj"], ["mlp.down_proj", "up_proj"], r".*\.mlp\..*", r"down_proj", []])
def test_feedforward_matching_is_peft_ia3(feedforward: Any) -> None:
    from peft.tuners.ia3.model import IA3Model

    is_feedforward = feedforward_matcher({"feedforward_modules": feedforward})
    for module in MODULES:
        expected = IA3Model._check_target_module_feedforward(_peft_config({"feedforward_modules": feedforward}), module)
        assert is_feedforward(module) == expected, module


PATTERNS: list[dict[str, int]] = [
    {},
    {"q_proj": 2},
    {"layers.0.self_attn.q_proj": 2, "q_proj": 6},
    {"q_proj": 6, "layers.0.self_attn.q_proj": 2},  # the first key that matches wins
    {r"layers\.1\..*": 3, "down_proj": 5},
    {"proj": 7},
    {"model.layers.0.mlp.down_proj": 9},
    {r"mlp\.(up|gate)_proj": 11},
    {"embed_tokens": 1, "lm_head": 12},
    {"a+b": 4},  # a key that spells a regex matching nothing here
]


@pytest.mark.parametrize("patterns", PATTERNS, ids=str)
def test_pattern_lookup_is_peft_get_pattern_key(patterns: dict[str, int]) -> None:
    from peft.utils.other import get_pattern_key

    for module in [*MODULES, "a+b", "x.a+b"]:
        expected = patterns.get(get_pattern_key(patterns.keys(), module), -1)
        assert pattern_value(patterns, module, -1) == expected, module


def _toy_model() -> Any:
    import torch
    from torch import nn

    def block() -> nn.Module:
        attention = nn.ModuleDict({name: nn.Linear(8, 8) for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
        mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 16), "gate_proj": nn.Linear(8, 16), "down_proj": nn.Linear(16, 8)})
        return nn.ModuleDict({"self_attn": attention, "mlp": mlp})

    torch.manual_seed(0)
    return nn.ModuleDict({"model": nn.ModuleDict({"layers": nn.ModuleList([block(), block(), block()])}), "lm_head": nn.Linear(8, 32)})


@pytest.mark.parametrize(
    "config",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        {"r": 4, "lora_alpha": 16, "target_modules": r".*\.(q|k|o)_proj", "rank_pattern": {"o_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
         "alpha_pattern": {"q_proj": 3}},
        {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ["up_proj", "gate_proj", "lm_head"]},
        {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "down_proj"], "rank_pattern": {"model.layers.2.mlp.down_proj": 3},
         "alpha_pattern": {r"layers\.[02]\..*": 7}, "layers_to_transform": [0, 2], "layers_pattern": "layers"},
    ],
)
def test_rank_and_scale_are_what_peft_gives_each_module(config: dict[str, Any]) -> None:
    """PEFT builds LoRA layers from the config; every one has the rank and scale computed here."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rsLoRA with patterns warns
        model = inject_adapter_in_model(LoraConfig(**config), _toy_model())
    adapted = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert adapted
    matches = target_matcher(config)
    for name, _ in _toy_model().named_modules():
        assert matches(name) == (name in adapted), name
    for name, layer in adapted.items():
        rank = layer.r["default"]
        assert lora_rank(config, name) == rank, name
        assert math.isclose(lora_scaling(config, name, rank), layer.scaling["default"], rel_tol=1e-12), name


# ------------------------------------------------------------------ catastrophic regexes


@pytest.mark.parametrize(
    "build, where",
    [
        (lambda p: target_matcher({"target_modules": p}), "target_modules"),
        (lambda p: target_matcher({"target_modules": ["q_proj"], "exclude_modules": p}), "exclude_modules"),
        (lambda p: feedforward_matcher({"feedforward_modules": p}), "feedforward_modules"),
        (lambda p: (lambda module: pattern_value({p: 4}, module, 8)), "rank_pattern key"),
    ],
)
def test_a_catastrophic_regex_is_one_error_naming_it_not_a_hang(build: Any, where: str) -> None:
    pattern = r"(.|.)*_[kv]"  # with `re`: 2^31 ways to fail on a 31-character name
    started = time.monotonic()
    with pytest.raises(PatternTimeoutError) as caught:
        build(pattern)("model.layers.0.self_attn.q_proj")
    assert time.monotonic() - started < 10 * kinds.REGEX_TIMEOUT_S
    message = str(caught.value)
    assert message.startswith(f"{where} '(.|.)*_[kv]' did not finish matching 'model.layers.0.self_attn.q_proj'")
    assert "backtracks catastrophically" in message


def test_nested_quantifiers_on_long_names_stay_bounded() -> None:
    """`(a+)+$` takes exponential time with `re`. Here each match either answers rightly or is
    refused by the timeout with an error naming the pattern; it never hangs. (Whether `regex`
    answers at once depends on its version and the CPU: a fresh clone on an AMX Xeon needed
    more than the 0.25 s timeout for the first text, so the test must not assume it.)"""
    matches = target_matcher({"target_modules": r"(a+)+$"})
    started = time.monotonic()
    for text, expected in (("a" * 5000 + "!", False), ("a" * 5000, True)):
        try:
            assert matches(text) is expected
        except kinds.PatternTimeoutError as exc:
            assert "backtracks catastrophically" in str(exc) and "(a+)+$" in str(exc)
    assert time.monotonic() - started < 2


def test_a_pattern_that_does_not_compile_is_an_error_naming_it() -> None:
    """What the registry refuses at import, a config read straight from a directory meets here."""
    with pytest.raises(kinds.PatternError, match=r"rank_pattern key '\(' is not a regular expression"):
        pattern_value({"(": 4}, "model.layers.0.self_attn.q_proj", 8)
    with pytest.raises(ValueError, match=r"target_modules '.*p\{L\}' is not a regular expression"):
        target_matcher({"target_modules": r"\p{L}"})


def test_regex_problem_refuses_what_either_engine_refuses() -> None:
    assert kinds.regex_problem(r"q_proj|v_proj") is None
    assert kinds.regex_problem("([") is not None
    assert kinds.regex_problem(r"\p{L}+") is not None  # `regex` reads it, PEFT's `re` does not


# ------------------------------------------------------------------ the table


def test_every_kind_the_registry_knows_is_in_the_table() -> None:
    assert kinds.kind_names() == ("lora", "rslora", "dora", "dora+rslora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "full")
    assert kinds.peft_types(adapters_only=True) == ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
    assert kinds.variant_flags() == ("use_dora", "use_rslora")
    for kind in kinds.kinds():
        assert set(kind.serving) == set(kinds.BACKENDS)
        assert (kind.merge is None) != (kind.not_mergeable is None)
        assert kind_of(kind.peft_type, dict(kind.flags)) is kind


@pytest.mark.parametrize(
    "peft_type, config, name",
    [
        ("LORA", {}, "lora"),
        ("LORA", {"use_rslora": True}, "rslora"),
        ("LORA", {"use_dora": True, "use_rslora": False}, "dora"),
        ("LORA", {"use_dora": True, "use_rslora": True}, "dora+rslora"),
        ("LORA", {"use_dora": None, "rank_pattern": {"q_proj": 2}}, "lora"),
        ("IA3", {"use_dora": True}, "ia3"),  # flags belong to the variants of their own PEFT type
        ("PREFIX_TUNING", {}, "prefix_tuning"),
        ("FULL", {"architectures": ["LlamaForCausalLM"]}, "full"),
    ],
)
def test_kind_of_picks_the_variant_by_its_flags(peft_type: str, config: dict[str, Any], name: str) -> None:
    assert kind_of(peft_type, config).name == name


def test_failed_lookups_list_the_valid_names() -> None:
    with pytest.raises(UnknownKindError, match="unknown adapter kind 'loha'; known kinds: lora, rslora, dora, dora\\+rslora, ia3"):
        get_kind("loha")
    with pytest.raises(UnknownKindError, match="unknown PEFT type 'LOHA'; known: LORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, FULL"):
        kind_of("LOHA")
    with pytest.raises(UnknownKindError, match="unknown serving backend 'tgi'; known: torch, vllm"):
        why_not_served(get_kind("lora"), "tgi")
    assert get_kind("DoRA") is get_kind("dora")


def test_registration_refuses_duplicates_and_incomplete_entries() -> None:
    lora = get_kind("lora")
    with pytest.raises(ValueError, match="'lora' is already registered"):
        register_kind(lora)
    with pytest.raises(ValueError, match="has the flags of 'lora'"):
        register_kind(dataclasses.replace(lora, name="lora2"))
    with pytest.raises(ValueError, match="must all set the flags"):
        register_kind(dataclasses.replace(lora, name="lora3", flags={"use_dora": False}))
    with pytest.raises(ValueError, match="must say for each backend"):
        register_kind(dataclasses.replace(lora, name="loha", peft_type="LOHA", flags={}, serving={"torch": None}))
    with pytest.raises(ValueError, match="exactly one of merge and not_mergeable"):
        register_kind(dataclasses.replace(lora, name="loha", peft_type="LOHA", flags={}, not_mergeable="why"))
    with pytest.raises(ValueError, match="named after it \\('loha'\\)"):
        register_kind(dataclasses.replace(lora, name="lokr", peft_type="LOHA", flags={}))
    with pytest.raises(ValueError, match="'task_head' is already registered"):
        register_trait(kinds.traits()[0])
    with pytest.raises(ValueError, match="unknown uses \\['tgi'\\]"):
        register_trait(kinds.Trait("x", lambda config, names: None, {"tgi": "no"}))
    assert kinds.kind_names()[-1] == "full"  # nothing was added


def test_entries_are_frozen() -> None:
    lora = get_kind("lora")
    with pytest.raises(dataclasses.FrozenInstanceError):
        lora.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        lora.serving["vllm"] = "no"  # type: ignore[index]
    assert hash(lora) == hash(get_kind("lora")) and isinstance(lora, AdapterKind)


def test_which_backends_serve_which_kinds() -> None:
    assert [k.name for k in kinds.served_kinds("torch")] == ["lora", "rslora", "dora", "dora+rslora", "ia3"]
    assert [k.name for k in kinds.served_kinds("vllm")] == ["lora", "rslora"]
    assert [k.name for k in kinds.mergeable_kinds()] == ["lora", "rslora", "dora", "dora+rslora", "ia3", "full"]
    assert why_not_served(get_kind("dora"), "vllm") == (
        "vLLM does not yet support DoRA; the vllm backend serves lora and lora with rsLoRA adapters"
    )
    assert why_not_served(get_kind("prompt_tuning"), "torch").startswith(  # type: ignore[union-attr]
        "prompt tuning prepends learned virtual tokens to every request; the torch backend serves lora, lora with rsLoRA, "
        "lora with DoRA, lora with DoRA+rsLoRA and (IA)³ adapters"
    )
    assert "needs 'r' and 'lora_alpha'" in why_not_served(get_kind("ia3"), "vllm")  # type: ignore[operator]
    assert "serve it as its own base model" in why_not_served(get_kind("full"), "torch")  # type: ignore[operator]
    assert why_not_served(get_kind("rslora"), "vllm", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 4}}) is None
    assert why_not_served(get_kind("dora+rslora"), "torch", {"task_type": "CAUSAL_LM"}) is None


def test_serving_reasons_and_kind_names_read_as_the_server_words_them() -> None:
    lora = get_kind("lora")
    config = {"task_type": "SEQ_CLS", "modules_to_save": ["classifier", "score"]}
    assert kinds.describe_kind(lora, config) == "lora, sequence classification head"
    assert kinds.describe_kind(get_kind("dora"), {"task_type": "CAUSAL_LM"}) == "lora with DoRA"
    assert kinds.describe_kind(get_kind("p_tuning")) == "p-tuning"
    assert why_not_served(lora, "torch", config) == (
        "it was trained for a sequence classification head, and this server generates text with the base model's "
        "language-model head; it replaces whole modules of the base (modules_to_save: classifier, score)"
    )
    assert why_not_served(lora, "vllm", {"task_type": "TOKEN_CLS"}).startswith("it was trained for a token classification head")  # type: ignore[union-attr]
    assert why_not_served(lora, "torch", {"lora_bias": True, "fan_in_fan_out": True}) == (
        "LoRA bias terms are not supported; fan_in_fan_out (Conv1D layers) is not supported"
    )


@pytest.mark.parametrize(
    "config, tensor_names, refused",
    [
        ({"modules_to_save": ["score"]}, (), {"merge", "torch", "vllm"}),
        ({"task_type": "SEQ_CLS"}, (), {"torch", "vllm"}),  # a LoRA of the body alone is still a weight delta
        ({"task_type": "seq_2_seq_lm"}, (), {"torch", "vllm"}),
        ({"architectures": ["LlamaForSequenceClassification"]}, (), {"merge"}),
        ({}, ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",), {"merge", "torch", "vllm"}),
        ({"lora_bias": True}, (), {"merge", "torch", "vllm"}),
        ({"init_lora_weights": "pissa_niter_4"}, (), {"merge", "torch", "vllm"}),
        ({"init_lora_weights": "gaussian"}, (), set()),
        ({"fan_in_fan_out": True}, (), {"torch"}),
        ({"task_type": "CAUSAL_LM", "modules_to_save": None, "lora_bias": False}, (), set()),
    ],
)
def test_traits_rule_out_uses_whatever_the_kind(config: dict[str, Any], tensor_names: tuple[str, ...], refused: set[str]) -> None:
    lora = get_kind("lora")
    found = {"merge"} if merge_problems(lora, config, tensor_names) else set()
    found |= {backend for backend in kinds.BACKENDS if why_not_served(lora, backend, config, tensor_names) is not None}
    assert found == refused


def test_merge_messages_name_the_kind_and_what_merges() -> None:
    (message,) = merge_problems(get_kind("prefix_tuning"))
    assert message.startswith("a PREFIX_TUNING adapter is not a change of the base weights (prefix tuning injects")
    assert message.endswith("(mergeable kinds: lora, lora with rsLoRA, lora with DoRA, lora with DoRA+rsLoRA, (IA)³ and full model)")
    (message,) = merge_problems(get_kind("p_tuning"), ref="soft:3")
    assert message.startswith("soft:3 is a P_TUNING adapter, which is not a change of the base weights")
    (message,) = merge_problems(get_kind("full"), {"architectures": ["LlamaForSequenceClassification"]})
    assert message == "a sequence classifier (LlamaForSequenceClassification) has a classification head the base lacks and cannot be merged"
    assert merge_problems(get_kind("lora"), {"modules_to_save": ["lm_head"]}, ref="x:1") == [
        "x:1: it replaces whole modules of the base (modules_to_save: lm_head): fully trained copies of layers are new "
        "weights, not a change of the base's, and cannot be merged"
    ]
    assert merge_problems(get_kind("dora+rslora"), {"use_dora": True}) == []


def test_tensor_naming_parses_what_peft_saves() -> None:
    lora, ia3 = get_kind("lora").naming, get_kind("ia3").naming
    module, part = lora.parse("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")  # type: ignore[misc]
    assert (module, part.role, part.factor) == ("model.layers.0.self_attn.q_proj", "lora_A", "A")
    assert lora.parse("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight")[1].role == "lora_magnitude_vector"  # type: ignore[index]
    assert lora.parse("base_model.model.model.embed_tokens.lora_embedding_B")[1].role == "lora_embedding_B"  # type: ignore[index]
    assert lora.parse("base_model.model.model.embed_tokens.base_layer.weight") is None
    assert lora.parse("lora_A.weight") is None  # a part needs a module
    assert ia3.parse("base_model.model.model.layers.0.mlp.down_proj.ia3_l") == ("model.layers.0.mlp.down_proj", ia3.parts[1])
    assert lora.factored and not ia3.factored and lora.part_names == "lora_A/lora_B" and ia3.part_names == "ia3_l"
    assert [k.naming.layout for k in kinds.kinds()].count("module_parts") == 5


def test_every_combination_of_flags_resolves_to_one_kind() -> None:
    for dora, rslora in itertools.product((False, True, None), repeat=2):
        kind = kind_of("LORA", {"use_dora": dora, "use_rslora": rslora})
        assert kind.flags == {"use_dora": bool(dora), "use_rslora": bool(rslora)}
