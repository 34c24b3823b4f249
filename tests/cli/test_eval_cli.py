"""`adapterhub eval` end to end on tiny real models: results printed and stored in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterhub.cli.main import app
from adapterhub.errors import AdapterhubError
from adapterhub.registry import Lineage, Registry
from tests.conftest import build_lora_adapter, build_tiny_llama

runner = CliRunner()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture()
def registry_with_lora(adapterhub_home: Path, tiny_base: Path, lora_dir: Path) -> Registry:
    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    registry.put_adapter(name="rev", source_dir=lora_dir, base="tiny", lineage=Lineage(kind="imported", parents=(), details={}))
    return registry


@pytest.fixture()
def gen_data(tmp_path: Path) -> Path:
    rows = [{"prompt": f"reverse the words: apple banana {w}", "completion": f"{w} banana apple"} for w in ("cherry", "fox", "dog", "one")]
    return write_jsonl(tmp_path / "rev.jsonl", rows)


def test_eval_adapter_with_compare_and_forgetting_stores_results(registry_with_lora: Registry, gen_data: Path) -> None:
    result = runner.invoke(
        app,
        ["eval", "rev", "--data", str(gen_data), "--metrics", "exact_match,bleu,perplexity", "--compare",
         "--forgetting", "--max-new-tokens", "4", "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ref"] == "rev:1"
    assert set(payload["adapter"]["metrics"]) == {"exact_match", "bleu", "perplexity"}
    base_ppl, adapter_ppl = payload["base"]["metrics"]["perplexity"], payload["adapter"]["metrics"]["perplexity"]
    assert payload["deltas"]["perplexity"] == pytest.approx(adapter_ppl - base_ppl)
    assert adapter_ppl != base_ppl  # the random LoRA changes the model
    forgetting = payload["forgetting"]
    assert forgetting["ratio"] == pytest.approx(forgetting["adapter_perplexity"] / forgetting["base_perplexity"])

    record = registry_with_lora.get("rev")
    stored = {e.metric: e for e in record.evaluations}
    assert set(stored) == {"exact_match", "bleu", "perplexity", "heldout_perplexity"}
    assert stored["perplexity"].value == pytest.approx(adapter_ppl)
    assert stored["perplexity"].dataset.startswith("rev.jsonl@sha256:")
    assert stored["perplexity"].details["base_value"] == pytest.approx(base_ppl)
    assert stored["heldout_perplexity"].dataset.startswith("general_heldout.jsonl@sha256:")
    base_stored = {e.metric: e.value for e in registry_with_lora.get_base_model("tiny").evaluations}
    assert base_stored["perplexity"] == pytest.approx(base_ppl)
    assert base_stored["heldout_perplexity"] == pytest.approx(forgetting["base_perplexity"])


def test_eval_base_model_prints_table_and_stores_on_base(registry_with_lora: Registry, gen_data: Path) -> None:
    result = runner.invoke(
        app, ["eval", "tiny", "--data", str(gen_data), "--max-new-tokens", "4", "--max-examples", "2", "--show-examples", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "exact_match" in result.stdout and "rouge1" in result.stdout and "2 of 4 rows" in result.stdout
    assert "cherry banana apple" in result.stdout and "fox banana apple" not in result.stdout  # one example row
    stored = registry_with_lora.get_base_model("tiny").evaluations
    assert {e.metric for e in stored} == {"exact_match", "rouge1", "rouge2", "rougeL", "bleu"}
    assert all(e.details["num_evaluated"] == 2 for e in stored)

    again = runner.invoke(
        app, ["eval", "tiny", "--data", str(gen_data), "--max-new-tokens", "4", "--max-examples", "2", "--json", "--no-record"]
    )
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)["report"]
    assert report["metrics"] == {e.metric: e.value for e in stored}  # greedy: the same numbers again
    assert len(registry_with_lora.get_base_model("tiny").evaluations) == len(stored)  # --no-record stored nothing


def test_eval_full_model_record_compares_with_its_base(adapterhub_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    # Same architecture and tokenizer, other weights: stands in for a fully fine-tuned model.
    full = build_tiny_llama(tmp_path / "full", seed=7)
    registry.put_adapter(name="ft", source_dir=full, base="tiny", lineage=Lineage(kind="imported", parents=(), details={}))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox"}, {"text": "adapters are small"}])
    result = runner.invoke(app, ["eval", "ft", "--data", str(text), "--compare", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["adapter"]["adapter_dir"] is None
    assert payload["base"]["metrics"]["perplexity"] != payload["adapter"]["metrics"]["perplexity"]

    # Next to an adapter of the same base: the full model is loaded on its own, same numbers.
    lora = build_lora_adapter(tiny_base, tmp_path / "lora", seed=3)
    registry.put_adapter(name="rev", source_dir=lora, base="tiny", lineage=Lineage(kind="imported", parents=(), details={}))
    both = runner.invoke(app, ["eval", "ft", "rev", "--data", str(text), "--compare", "--json", "--no-record"])
    assert both.exit_code == 0, both.output
    side_by_side = json.loads(both.stdout)
    assert list(side_by_side["reports"]) == ["ft:1", "rev:1"]
    assert side_by_side["reports"]["ft:1"]["metrics"]["perplexity"] == pytest.approx(payload["adapter"]["metrics"]["perplexity"], rel=1e-5)
    assert side_by_side["base_report"]["metrics"]["perplexity"] == pytest.approx(payload["base"]["metrics"]["perplexity"], rel=1e-5)


def test_bad_input_is_one_line_and_nothing_stored(registry_with_lora: Registry, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "no completion"}])
    result = runner.invoke(app, ["eval", "rev", "--data", str(bad)])
    assert result.exit_code == 1
    assert "line 2: missing field 'completion'" in str(result.exception)
    result = runner.invoke(app, ["eval", "rev", "--data", str(bad.with_name("missing.jsonl"))])
    assert result.exit_code == 1 and "not found" in str(result.exception)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b"}])
    result = runner.invoke(app, ["eval", "rev", "--data", str(good), "--metrics", "acuracy"])
    assert "unknown metric 'acuracy'; valid metrics: accuracy, precision" in str(result.exception)
    result = runner.invoke(app, ["eval", "nothing-here", "--data", str(good)])
    assert "neither a registered adapter nor a base model" in str(result.exception)
    result = runner.invoke(app, ["eval", "tiny", "--data", str(good), "--compare"])
    assert "is a base model" in str(result.exception)
    # user errors, which the console script prints as one line and exit 1 (no traceback)
    assert isinstance(result.exception, AdapterhubError)
    assert registry_with_lora.get("rev").evaluations == ()
    assert registry_with_lora.get_base_model("tiny").evaluations == ()



def test_trained_model_is_asked_in_its_training_format(adapterhub_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    """`adapterhub train` then `adapterhub eval --compare`: the gain shows only if eval formats
    prompts exactly as the trainer did (chat template, generation prompt, stop at eos)."""
    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    pairs = [("fox", "dog"), ("cat", "sun")]
    rows = [{"prompt": f"reverse: {a} {b}", "completion": f"{b} {a}"} for a, b in pairs]
    train_data = write_jsonl(tmp_path / "train.jsonl", rows * 4)
    eval_data = write_jsonl(tmp_path / "eval.jsonl", rows)
    trained = runner.invoke(app, [
        "train", "--base", "tiny", "--data", str(train_data), "--name", "rev", "--method", "full",
        "--max-steps", "40", "--learning-rate", "5e-3", "--batch-size", "8", "--validation-split", "0", "--no-progress",
        "--output-dir", str(tmp_path / "run"),
    ])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["eval", "rev", "--data", str(eval_data), "--compare", "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["base"]["metrics"]["exact_match"] == 0.0
    assert payload["deltas"]["exact_match"] >= 0.5
    stored = {e.metric: e.value for e in registry.get("rev").evaluations}
    assert stored["exact_match"] == payload["adapter"]["metrics"]["exact_match"]



def test_eval_classifier_adapter_prints_confusion(adapterhub_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    from tests.adapterhub.test_eval_runner import build_classifier_adapter

    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    adapter = build_classifier_adapter(tiny_base, tmp_path / "cls", ["neg", "pos"])
    registry.put_adapter(name="sentiment", source_dir=adapter, base="tiny", lineage=Lineage(kind="imported", parents=(), details={}))
    rows = [("the quick brown fox", "pos"), ("hello world", "neg"), ("yes no", "pos")]
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": text, "label": label} for text, label in rows])
    result = runner.invoke(app, ["eval", "sentiment", "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "confusion" in result.stdout and "REFERENCE / PREDICTED" in result.stdout
    stored = {e.metric: e for e in registry.get("sentiment").evaluations}
    assert set(stored) == {"accuracy", "precision", "recall", "f1"}
    confusion = stored["accuracy"].details["confusion"]
    assert sum(sum(row.values()) for row in confusion.values()) == 3
    assert stored["accuracy"].details["label_source"] == "training_metrics.json labels"


def test_split_scores_exactly_the_rows_training_held_out(adapterhub_home: Path, tiny_base: Path, tmp_path: Path) -> None:
    from adapterhub.train import load_config
    from adapterhub.train.data import prepare_data

    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    rows = [{"prompt": f"say {i}", "completion": f"{i}"} for i in range(20)]
    train_data = write_jsonl(tmp_path / "train.jsonl", rows)
    trained = runner.invoke(app, [
        "train", "--base", "tiny", "--data", str(train_data), "--name", "say", "--max-steps", "1",
        "--validation-split", "0.25", "--seed", "7", "--no-progress", "--output-dir", str(tmp_path / "run"),
    ])
    assert trained.exit_code == 0, trained.output

    scored: dict[str, list[str]] = {}
    for split in ("validation", "train"):
        result = runner.invoke(app, ["eval", "say", "--split", split, "--metrics", "exact_match", "--max-new-tokens", "1", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)["report"]
        assert report["dataset"]["split"] == split and report["dataset"]["label"].startswith("train.jsonl@sha256:")
        scored[split] = [example["reference"] for example in report["examples"]]
    # The rows the trainer itself held out, and no others; together the splits are the whole file.
    held_out = prepare_data(load_config({"data": train_data, "validation_split": 0.25, "seed": 7}), chat=False).validation
    assert sorted(scored["validation"]) == sorted(example["completion"] for example in held_out)
    assert len(scored["validation"]) == 5 and sorted(scored["validation"] + scored["train"]) == sorted(r["completion"] for r in rows)
    stored = {(e.metric, e.split) for e in registry.get("say").evaluations}
    assert stored == {("exact_match", "validation"), ("exact_match", "train")}

    # One clear error, nothing stored: --data with --split, an adapter that was not trained here,
    # and a training file edited since the run.
    result = runner.invoke(app, ["eval", "say", "--split", "validation", "--data", str(train_data)])
    assert "--data FILE or --split validation|train (not both)" in str(result.exception)
    result = runner.invoke(app, ["eval", "say", "--split", "test"])
    assert "'test' is not one of train, validation" in str(result.exception)
    write_jsonl(train_data, rows[1:])
    result = runner.invoke(app, ["eval", "say", "--split", "validation"])
    assert isinstance(result.exception, AdapterhubError)
    assert "train.jsonl changed since the run (sha256 differs)" in str(result.exception)
    assert len(registry.get("say").evaluations) == 2


def test_split_needs_a_training_run(registry_with_lora: Registry) -> None:
    result = runner.invoke(app, ["eval", "rev", "--split", "validation"])
    assert isinstance(result.exception, AdapterhubError)
    assert "--split needs an adapter or model trained by adapterhub; 'rev:1' was not" in str(result.exception)


def test_several_adapters_side_by_side_on_one_base(registry_with_lora: Registry, gen_data: Path, tiny_base: Path, tmp_path: Path) -> None:
    other = build_lora_adapter(tiny_base, tmp_path / "other", rank=8, target_modules=("q_proj", "o_proj"), seed=9)
    registry_with_lora.put_adapter(name="other", source_dir=other, base="tiny", lineage=Lineage(kind="imported", parents=(), details={}))
    common = ["--data", str(gen_data), "--metrics", "exact_match,perplexity", "--max-new-tokens", "4"]
    result = runner.invoke(app, ["eval", "rev", "other", *common, "--compare", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert list(payload["reports"]) == ["rev:1", "other:1"]
    # Each equals its own single evaluation (the base is shared, each adapter detached after use).
    for ref in ("rev", "other"):
        alone = json.loads(runner.invoke(app, ["eval", ref, *common, "--json", "--no-record"]).stdout)["report"]
        assert payload["reports"][f"{ref}:1"]["metrics"]["perplexity"] == pytest.approx(alone["metrics"]["perplexity"], rel=1e-5)
    base_ppl = payload["base_report"]["metrics"]["perplexity"]
    stored = {e.metric: e for e in registry_with_lora.get("other").evaluations}
    assert stored["perplexity"].details["base_value"] == pytest.approx(base_ppl)
    base_stored = registry_with_lora.get_base_model("tiny").evaluations
    assert sorted(e.metric for e in base_stored) == ["exact_match", "perplexity"]  # the base once, not once per adapter
    assert base_stored[0].details["compared_with"] == ["rev:1", "other:1"]

    table = runner.invoke(app, ["eval", "rev", "other", *common, "--compare", "--no-record"])
    assert table.exit_code == 0, table.output
    assert "2 models on rev.jsonl" in table.stdout and "rev:1" in table.stdout and "other:1" in table.stdout
    assert table.stdout.index("tiny (base)") < table.stdout.index("rev:1") < table.stdout.index("other:1")

    for args, message in (
        (["rev", "tiny"], "'tiny' named a base model: add --compare"),
        (["rev", "rev:1"], "rev:1 named more than once"),
        (["rev", "other", "--split", "validation"], "several refs are scored on --data"),
    ):
        failed = runner.invoke(app, ["eval", *args, *common])
        assert isinstance(failed.exception, AdapterhubError) and message in str(failed.exception), failed.output
    assert len(registry_with_lora.get("rev").evaluations) == 2  # the failed calls stored nothing


def test_eval_compare_on_preference_pairs_scores_both_sides_by_log_probability(
    registry_with_lora: Registry, tiny_base: Path, tmp_path: Path
) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "reverse: fox dog", "chosen": "dog fox", "rejected": "fox dog"},
        {"prompt": "reverse: cat owl", "chosen": "owl cat", "rejected": "cat owl cat owl"},
        {"prompt": "reverse: bee elk", "chosen": "elk bee", "rejected": "bee"},
    ])
    result = runner.invoke(app, ["eval", "rev", "--data", str(pairs), "--compare", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    adapter, base = payload["adapter"]["metrics"], payload["base"]["metrics"]
    assert set(adapter) == {"preference_accuracy", "preference_margin"} and payload["adapter"]["dataset"]["kind"] == "preference"
    assert adapter["preference_accuracy"] in (0, 1 / 3, 2 / 3, 1) and adapter["preference_margin"] != base["preference_margin"]
    assert payload["deltas"]["preference_margin"] == pytest.approx(adapter["preference_margin"] - base["preference_margin"])
    stored = {e.metric: e for e in registry_with_lora.get("rev").evaluations}
    assert stored["preference_accuracy"].details["base_value"] == pytest.approx(base["preference_accuracy"])

    # The margin is log p(chosen) - log p(rejected) as `perplexity` scores a reply: checked on one pair by hand.
    from adapterhub.eval import evaluate_model
    from adapterhub.eval.generation import render_prompt, sequence_nll
    from adapterhub.eval.loading import load_causal

    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "reverse: fox dog", "chosen": "dog fox", "rejected": "fox dog"}])
    report = evaluate_model(model_dir=tiny_base, data=one)
    loaded = load_causal(tiny_base)
    prompt = render_prompt(loaded.tokenizer, [{"role": "user", "content": "reverse: fox dog"}], "reverse: fox dog")
    nll = sequence_nll(loaded.model, loaded.tokenizer, [(prompt, "dog fox"), (prompt, "fox dog")], batch_size=2, chat_formatted=True)
    assert report.metrics["preference_margin"] == pytest.approx(nll.per_sequence[1] - nll.per_sequence[0], rel=1e-4)


def test_eval_preference_row_problems_named_by_line(registry_with_lora: Registry, tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ])
    result = runner.invoke(app, ["eval", "rev", "--data", str(pairs)])
    assert result.exit_code != 0
    text = str(result.exception) + result.output
    assert "line 2" in text and "'rejected'" in text and "line 3" in text and "identical" in text
