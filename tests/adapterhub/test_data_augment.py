"""`data augment` on the real embedded engine in-process (a tiny random Llama and a LoRA of it).

The tiny model's paraphrases are gibberish: these tests check behaviour (row counts, tags, kept
fields, seeds, drops, errors), not quality.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterhub.data.augment import (
    DEFAULT_INSTRUCTION,
    MAX_CHOICES,
    AugmentSettings,
    augment_file,
    request_text,
    requests_for,
    select_paraphrases,
)
from adapterhub.errors import NotFoundError, ValidationError
from tests.adapterhub.conftest import write_jsonl
from tests.conftest import build_lora_adapter


@pytest.fixture(scope="module")
def registry_home(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import torch

    from adapterhub.registry import Registry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: one thread is far faster
    root = tmp_path_factory.mktemp("augment")
    registry = Registry.open(home=root / "home")
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    registry.put_adapter(name="greeter", source_dir=build_lora_adapter(tiny_base, root / "greeter", seed=5), base="tiny")
    registry.close()
    yield root / "home"
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat(registry_home: Path) -> Iterator[object]:
    """One in-process engine on the adapter `greeter` (CPU, fp32), shared by the module."""
    from adapterhub.registry import Registry
    from adapterhub.serving.backends.config import EngineConfig
    from adapterhub.serving.chat_clients import EngineChat

    registry = Registry.open(home=registry_home)
    with EngineChat.from_registry(registry, "greeter", config=EngineConfig(device="cpu")) as engine_chat:
        yield engine_chat
    registry.close()


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": f"reverse the words {i} one two", "completion": f"two one {i}", "task": "rev"} for i in range(n)]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


SMALL = {"max_tokens": 6, "temperature": 1.0}


def test_prompt_rows_keep_their_fields_and_are_tagged(chat: object, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(5))
    out = tmp_path / "out.jsonl"
    result = augment_file(source, out, model=chat, settings=AugmentSettings(paraphrases=3, seed=1, batch_rows=2, **SMALL),
                          source={"model": "greeter:1"})
    rows = read_rows(out)
    stats = result.stats
    assert stats["rows_in"] == 5 and stats["originals_out"] == 5 and stats["paraphrases_requested"] == 15
    assert stats["paraphrases_out"] + sum(stats["paraphrases_dropped"].values()) == 15
    assert len(rows) == result.outputs[out] == 5 + stats["paraphrases_out"]
    assert all(count <= 3 for count in Counter(r["source_row"] for r in rows if r["augmented"]).values())
    originals = [r for r in rows if not r["augmented"]]
    assert [r["source_row"] for r in originals] == [1, 2, 3, 4, 5]  # JSONL lines
    assert [{k: v for k, v in r.items() if k not in ("source_row", "augmented")} for r in originals] == prompt_rows(5)
    for row in rows:
        original = prompt_rows(5)[row["source_row"] - 1]
        assert row["completion"] == original["completion"] and row["task"] == "rev"
        if row["augmented"]:
            assert row["prompt"].strip() and row["prompt"] != original["prompt"]
    # Each original comes first, then its paraphrases.
    assert [r["source_row"] for r in rows] == sorted(r["source_row"] for r in rows)
    card = json.loads(out.with_name("out.jsonl.card.json").read_text())
    assert card["verb"] == "augment" and card["rows"] == len(rows)
    assert card["parameters"] == {
        "model": "greeter:1", "paraphrases": 3, "instruction": DEFAULT_INSTRUCTION, "temperature": 1.0,
        "max_tokens": 6, "seed": 1, "originals": True,
    }
    assert card["parents"][0]["path"] == str(source.resolve())
    assert card["stats"]["examples"][0]["row"] == "line 1"


def test_same_seed_same_bytes_for_any_batch_size_other_seed_other_rows(chat: object, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(4))
    outputs = {}
    for name, seed, batch_rows in (("a", 7, 1), ("b", 7, 4), ("c", 8, 4)):
        outputs[name] = tmp_path / f"{name}.jsonl"
        augment_file(source, outputs[name], model=chat, settings=AugmentSettings(paraphrases=2, seed=seed, batch_rows=batch_rows, **SMALL),
                     source={"model": "greeter:1"})
    assert outputs["a"].read_bytes() == outputs["b"].read_bytes()
    assert outputs["a"].read_bytes() != outputs["c"].read_bytes()


def test_chat_rows_paraphrase_the_last_user_turn_and_text_rows_keep_labels(chat: object, tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}] * 2)
    out = tmp_path / "chat.out.jsonl"
    augment_file(source, out, model=chat, settings=AugmentSettings(paraphrases=2, keep_originals=False, **SMALL), source={"model": "m"})
    rows = read_rows(out)
    assert rows and all(r["augmented"] for r in rows) and {r["source_row"] for r in rows} <= {1, 2}
    for row in rows:
        turns = row["messages"]
        assert [t["role"] for t in turns] == [t["role"] for t in conversation]
        assert [t["content"] for i, t in enumerate(turns) if i != 3] == [t["content"] for i, t in enumerate(conversation) if i != 3]
        assert turns[3]["content"] != "second question"

    labelled = write_jsonl(tmp_path / "cls.jsonl", [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": 0}])
    out = tmp_path / "cls.out.jsonl"
    result = augment_file(labelled, out, model=chat, settings=AugmentSettings(paraphrases=2, **SMALL), source={"model": "m"})
    assert result.stats["format"] == "text/label"
    for row in read_rows(out):
        assert row["label"] == ("pos" if row["source_row"] == 1 else 0)


def test_greedy_paraphrases_are_one_per_row_and_the_repeats_are_counted(chat: object, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))
    out = tmp_path / "out.jsonl"
    result = augment_file(source, out, model=chat, settings=AugmentSettings(paraphrases=4, temperature=0.0, max_tokens=6),
                          source={"model": "m"})
    dropped = result.stats["paraphrases_dropped"]
    # Greedy decoding gives the same reply four times: at most one is kept per row.
    assert result.stats["paraphrases_out"] <= 3 and dropped["repeated"] >= 9
    assert result.stats["paraphrases_out"] + sum(dropped.values()) == 12


def test_more_paraphrases_than_one_request_holds_continue_the_seeds(chat: object, tmp_path: Path) -> None:
    settings = AugmentSettings(paraphrases=MAX_CHOICES + 3, seed=2)
    requests = requests_for("some text", 7, settings)
    assert [r.n for r in requests] == [MAX_CHOICES, 3]
    assert requests[1].seed == requests[0].seed + MAX_CHOICES
    assert requests_for("some text", 8, settings)[0].seed != requests[0].seed  # each row its own seed
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(1))
    result = augment_file(source, tmp_path / "out.jsonl", model=chat, settings=AugmentSettings(paraphrases=MAX_CHOICES + 3, max_tokens=4),
                          source={"model": "m"})
    assert result.stats["paraphrases_requested"] == MAX_CHOICES + 3
    assert result.stats["paraphrases_out"] + sum(result.stats["paraphrases_dropped"].values()) == MAX_CHOICES + 3


def test_select_paraphrases_drops_empty_source_and_repeats_normalized() -> None:
    dropped: Counter[str] = Counter()
    kept = select_paraphrases("Hello  World", ["  ", "hello world", "HELLO\tWORLD ", "Hi there", "hi   THERE", "Hey"], dropped)
    assert kept == ["Hi there", "Hey"]
    assert dropped == Counter({"empty": 1, "same_as_source": 2, "repeated": 1})


def test_instruction_placeholder() -> None:
    assert request_text("Rewrite: {text} (keep it short)", "abc") == "Rewrite: abc (keep it short)"
    assert request_text("Rewrite this.\n", "a {text} b") == "Rewrite this.\n\na {text} b"
    assert "{text}" in DEFAULT_INSTRUCTION


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"paraphrases": 0}, "--paraphrases must be at least 1"),
        ({"paraphrases": 2, "temperature": 3.0}, "--temperature must be in [0, 2.0]"),
        ({"paraphrases": 2, "max_tokens": 0}, "--max-tokens must be at least 1"),
        ({"paraphrases": 2, "instruction": "  "}, "--instruction is empty"),
        ({"paraphrases": 2, "batch_rows": 0}, "--batch-rows must be at least 1"),
    ],
)
def test_bad_settings_write_nothing(chat: object, tmp_path: Path, settings: dict, message: str) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(2))
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        augment_file(source, tmp_path / "out.jsonl", model=chat, settings=AugmentSettings(**settings), source={"model": "m"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_bad_rows_name_their_lines_and_write_nothing(chat: object, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [*prompt_rows(2), '{"prompt": "x"', {"prompt": "", "completion": "y"}])
    with pytest.raises(ValidationError) as raised:
        augment_file(bad, tmp_path / "out.jsonl", model=chat, settings=AugmentSettings(paraphrases=2), source={"model": "m"})
    assert "line 3" in str(raised.value) and "line 4" in str(raised.value) and str(bad) in str(raised.value)
    no_user = write_jsonl(tmp_path / "nouser.jsonl", [{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ValidationError, match="line 1: a chat row needs a user turn"):
        augment_file(no_user, tmp_path / "out.jsonl", model=chat, settings=AugmentSettings(paraphrases=2), source={"model": "m"})
    # A prompt the model cannot take (longer than its 512-token context) names its row.
    too_long = write_jsonl(tmp_path / "long.jsonl", [*prompt_rows(2), {"prompt": "word " * 600, "completion": "c"}])
    with pytest.raises(ValidationError, match="line 3: the model refused its paraphrase request: .*maximum context length"):
        augment_file(too_long, tmp_path / "out.jsonl", model=chat, settings=AugmentSettings(paraphrases=2, max_tokens=4), source={"model": "m"})
    with pytest.raises(ValidationError, match="is one of the input files"):
        augment_file(bad, bad, model=chat, settings=AugmentSettings(paraphrases=2), source={"model": "m"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "long.jsonl", "nouser.jsonl"]


def test_model_refs_resolve_like_the_server(registry_home: Path, tiny_base: Path) -> None:
    from adapterhub.registry import Registry
    from adapterhub.serving.chat_clients import EngineChat

    registry = Registry.open(home=registry_home)
    try:
        assert EngineChat.from_registry(registry, "tiny").model == "tiny"
        on_adapter = EngineChat.from_registry(registry, "greeter")
        assert on_adapter.model == "greeter:1" and on_adapter.base_name == "tiny"
        with pytest.raises(NotFoundError, match="no base model, adapter or full model 'greter'.*did you mean 'greeter'"):
            EngineChat.from_registry(registry, "greter")
    finally:
        registry.close()


@pytest.mark.slow
def test_smollm2_paraphrases_keep_the_subject(smollm2_dir: Path, tmp_path: Path) -> None:
    """The default instruction on the real instruct model: replies are new wordings of the
    prompt (not empty, not the prompt, mostly about its subject), completions kept."""
    from adapterhub.registry import Registry
    from adapterhub.serving.backends.config import EngineConfig
    from adapterhub.serving.chat_clients import EngineChat

    registry = Registry.open(home=tmp_path / "home")
    registry.add_base_model(name="smollm2", model_dir=smollm2_dir)
    rows = [
        {"prompt": "What is the capital city of France?", "completion": "Paris"},
        {"prompt": "How many legs does a spider have?", "completion": "Eight"},
    ]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "qa.aug.jsonl"
    with EngineChat.from_registry(registry, "smollm2", config=EngineConfig(device="cpu")) as engine_chat:
        result = augment_file(source, out, model=engine_chat, settings=AugmentSettings(paraphrases=2, max_tokens=32, temperature=0.7),
                              source={"model": "smollm2"})
    registry.close()
    paraphrases = [r for r in read_rows(out) if r["augmented"]]
    assert result.stats["paraphrases_out"] == len(paraphrases) >= 2
    subjects = {1: ("france", "capital"), 2: ("spider", "legs")}
    on_subject = sum(any(word in r["prompt"].lower() for word in subjects[r["source_row"]]) for r in paraphrases)
    assert on_subject >= len(paraphrases) // 2, paraphrases
    assert all(r["completion"] == rows[r["source_row"] - 1]["completion"] for r in paraphrases)
    print(result.stats["examples"])
