"""`evaluate_model`, `compare` and `forgetting_check` on tiny real models.

Expected numbers are computed independently here: plain unbatched `generate` for the
replies, the model's own `loss` for perplexity, a direct arg-max for the classifier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.eval import GENERAL_HELDOUT_PATH, compare, evaluate_adapters, evaluate_model, forgetting_check
from adapterhub.eval.data import load_eval_dataset
from tests.conftest import build_lora_adapter

PROMPTS = [
    "reverse the words: apple banana cherry",
    "translate to french: hello world",
    "question: what is two plus two? answer:",
    "the quick brown fox",
    "adapters are small",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def unbatched_greedy(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """One prompt at a time, no padding: what batched left-padded generation must reproduce."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    replies = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return replies


def test_batched_generation_matches_unbatched_and_exact_match_counts(tiny_base: Path, tmp_path: Path) -> None:
    expected = unbatched_greedy(tiny_base, PROMPTS, max_new_tokens=6)
    # References: the model's own reply for the first three rows, something else for the rest.
    references = expected[:3] + ["not this", "nor this"]
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "completion": r} for p, r in zip(PROMPTS, references)])
    pinned = {"device": "cpu", "dtype": "fp32"}  # the reference above runs in fp32 on the CPU
    report = evaluate_model(model_dir=tiny_base, data=data, max_new_tokens=6, batch_size=4, metrics=["exact_match", "rouge", "bleu"], **pinned)
    assert [e.prediction for e in report.examples] == expected
    assert report.metrics["exact_match"] == pytest.approx(3 / 5)
    assert set(report.metrics) == {"exact_match", "rouge1", "rouge2", "rougeL", "bleu"}
    assert report.details["decoding"] == "greedy" and report.details["chat_template"] is True
    again = evaluate_model(model_dir=tiny_base, data=data, max_new_tokens=6, batch_size=2, metrics=["exact_match", "rouge", "bleu"], **pinned)
    assert again.metrics == report.metrics  # deterministic, whatever the batch size


def test_perplexity_equals_model_loss(tiny_base: Path, tmp_path: Path) -> None:
    texts = ["the quick brown fox jumps over the lazy dog", "adapters are small task specific weights", "hello"]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    report = evaluate_model(model_dir=tiny_base, data=data, batch_size=2, device="cpu", dtype="fp32")
    assert list(report.metrics) == ["perplexity"]  # the default for raw text
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    total_nll, tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(ids, labels=ids).loss  # mean over len-1 predicted tokens
        total_nll += float(loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert report.details["perplexity_tokens"] == tokens
    assert report.metrics["perplexity"] == pytest.approx(math.exp(total_nll / tokens), rel=1e-4)


def test_compare_lora_base_side_equals_plain_base_eval(tiny_base: Path, lora_dir: Path, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "four"}]} for p in PROMPTS]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    settings = {"data": data, "metrics": ["perplexity", "exact_match"], "max_new_tokens": 4}
    base_alone = evaluate_model(model_dir=tiny_base, **settings)
    adapter_alone = evaluate_model(model_dir=tiny_base, adapter_dir=lora_dir, **settings)
    comparison = compare(model_dir=tiny_base, adapter_dir=lora_dir, forgetting=True, **settings)
    assert comparison.base.metrics["perplexity"] == pytest.approx(base_alone.metrics["perplexity"], rel=1e-5)
    assert comparison.adapter.metrics["perplexity"] == pytest.approx(adapter_alone.metrics["perplexity"], rel=1e-5)
    assert base_alone.metrics["perplexity"] != pytest.approx(adapter_alone.metrics["perplexity"], rel=1e-5)
    assert comparison.deltas["perplexity"] == pytest.approx(
        comparison.adapter.metrics["perplexity"] - comparison.base.metrics["perplexity"]
    )
    forgetting = comparison.forgetting
    assert forgetting is not None and forgetting.dataset.num_rows >= 40
    # The compare path (one model, adapter attached later) equals the standalone check.
    standalone = forgetting_check(model_dir=tiny_base, adapter_dir=lora_dir)
    assert standalone.base_perplexity == pytest.approx(forgetting.base_perplexity, rel=1e-5)
    assert standalone.adapter_perplexity == pytest.approx(forgetting.adapter_perplexity, rel=1e-5)
    heldout_base = evaluate_model(model_dir=tiny_base, data=GENERAL_HELDOUT_PATH)
    assert heldout_base.metrics["perplexity"] == pytest.approx(forgetting.base_perplexity, rel=1e-5)


def test_many_adapters_on_one_loaded_base_equal_each_alone(tiny_base: Path, lora_dir: Path, tmp_path: Path) -> None:
    # LoRA, (IA)3 and a soft prompt one after the other on the same loaded base: each is
    # detached before the next, so every score equals that adapter's own fresh evaluation.
    adapters = [
        lora_dir,
        build_lora_adapter(tiny_base, tmp_path / "ia3", peft_type="ia3", target_modules=("k_proj", "v_proj"), seed=3),
        build_lora_adapter(tiny_base, tmp_path / "prompt", peft_type="prompt_tuning", target_modules=(), seed=4),
        build_lora_adapter(tiny_base, tmp_path / "lora2", rank=8, target_modules=("q_proj", "o_proj"), seed=5),
    ]
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "completion": "four"} for p in PROMPTS])
    settings = {"data": data, "metrics": ["perplexity", "exact_match"], "max_new_tokens": 4}
    base_report, reports = evaluate_adapters(base_dir=tiny_base, adapter_dirs=adapters, include_base=True, **settings)
    assert base_report is not None
    base_alone = evaluate_model(model_dir=tiny_base, **settings)
    assert base_report.metrics["perplexity"] == pytest.approx(base_alone.metrics["perplexity"], rel=1e-5)
    perplexities = set()
    for adapter, report in zip(adapters, reports, strict=True):
        alone = evaluate_model(model_dir=tiny_base, adapter_dir=adapter, **settings)
        assert report.adapter_dir == str(adapter)
        assert report.metrics["perplexity"] == pytest.approx(alone.metrics["perplexity"], rel=1e-5)
        assert [e.prediction for e in report.examples] == [e.prediction for e in alone.examples]
        perplexities.add(round(report.metrics["perplexity"], 4))
    assert len(perplexities) == len(adapters) and base_alone.metrics["perplexity"] not in perplexities
    with pytest.raises(AdapterhubError, match="mix classification heads"):
        evaluate_adapters(base_dir=tiny_base, adapter_dirs=[lora_dir, build_classifier_adapter(tiny_base, tmp_path / "cls", ["a", "b"])], **settings)


@pytest.mark.parametrize("peft_type", ["prompt_tuning", "prefix_tuning", "ia3"])
def test_other_peft_types_evaluate(tiny_base: Path, tmp_path: Path, peft_type: str) -> None:
    targets = ("k_proj", "v_proj") if peft_type == "ia3" else ()
    adapter = build_lora_adapter(tiny_base, tmp_path / peft_type, peft_type=peft_type, target_modules=targets)
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "completion": "four"} for p in PROMPTS[:3]])
    comparison = compare(model_dir=tiny_base, adapter_dir=adapter, data=data, metrics=["perplexity", "bleu"], max_new_tokens=3)
    assert math.isfinite(comparison.adapter.metrics["perplexity"])
    assert comparison.deltas["perplexity"] != 0.0
    assert len(comparison.adapter.examples) == 3


def build_classifier_adapter(base_dir: Path, out_dir: Path, labels: list[str]) -> Path:
    """A real SEQ_CLS LoRA (head saved through modules_to_save) with its label names."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(labels))
    model.config.pad_token_id = AutoTokenizer.from_pretrained(base_dir).pad_token_id
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out_dir)
    # Where adapterhub's trainer keeps the label names of a classifier adapter.
    (out_dir / "training_metrics.json").write_text(json.dumps({"labels": labels}), encoding="utf-8")
    return out_dir


def test_classifier_adapter_scores_match_direct_argmax(tiny_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification

    labels = ["negative", "neutral", "positive"]
    adapter = build_classifier_adapter(tiny_base, tmp_path / "cls", labels)
    texts = ["the quick brown fox", "hello world", "two plus two", "adapters are small", "yes no", "the lazy dog"]
    gold = ["positive", "negative", "neutral", "positive", "negative", "neutral"]
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": g} for t, g in zip(texts, gold)])
    report = evaluate_model(model_dir=tiny_base, adapter_dir=adapter, data=data, batch_size=4, device="cpu", dtype="fp32")
    assert set(report.metrics) == {"accuracy", "precision", "recall", "f1"}
    assert report.details["label_source"] == "training_metrics.json labels"

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, adapter).eval()
    predicted = []
    for text in texts:
        with torch.no_grad():
            predicted.append(labels[int(model(**tokenizer(text, return_tensors="pt")).logits.argmax())])
    assert [e.prediction for e in report.examples] == predicted
    assert report.metrics["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert report.metrics["f1"] == pytest.approx(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0))

    # The base has no head: compared as a causal LM asked for the label in words.
    comparison = compare(model_dir=tiny_base, adapter_dir=adapter, data=data, max_new_tokens=3)
    assert comparison.base.details["unmatched_answers"] >= 0
    assert set(comparison.deltas) == {"accuracy", "precision", "recall", "f1"}

    outside = write_jsonl(tmp_path / "outside.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "sarcastic"}])
    with pytest.raises(ValidationError, match=r"line 2: label 'sarcastic' is not one of the model's labels"):
        evaluate_model(model_dir=tiny_base, adapter_dir=adapter, data=outside)
    with pytest.raises(AdapterhubError, match="classification model has none"):
        forgetting_check(model_dir=tiny_base, adapter_dir=adapter)


def test_label_style_generation_defaults(tiny_base: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"is {w} positive?", "completion": a} for w, a in
            [("good", "yes"), ("bad", "no"), ("great", "yes"), ("awful", "no"), ("fine", "yes"), ("sad", "no")]]
    data = write_jsonl(tmp_path / "yesno.jsonl", rows)
    report = evaluate_model(model_dir=tiny_base, data=data, max_new_tokens=2)
    assert set(report.metrics) >= {"exact_match", "accuracy", "f1"}
    assert report.details["labels"] == ["no", "yes"]
    matched = sum(sum(row.values()) for row in report.details["confusion"].values())
    assert matched == 6


def test_full_model_without_tokenizer_uses_the_given_one(tiny_base: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy2(tiny_base / name, bare / name)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox"}])
    with pytest.raises(AdapterhubError, match="no tokenizer in"):
        evaluate_model(model_dir=bare, data=data)
    with_tokenizer = evaluate_model(model_dir=bare, data=data, tokenizer_dir=tiny_base)
    original = evaluate_model(model_dir=tiny_base, data=data)
    assert with_tokenizer.metrics["perplexity"] == pytest.approx(original.metrics["perplexity"])


def test_bad_input_fails_before_loading_a_model(tmp_path: Path, tiny_base: Path) -> None:
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    with pytest.raises(ValidationError, match="'bleu' does not apply to text data"):
        evaluate_model(model_dir=tiny_base, data=data, metrics=["bleu"])
    with pytest.raises(AdapterhubError, match="has no config.json"):
        evaluate_model(model_dir=tmp_path, data=data)
    with pytest.raises(ValidationError, match="batch_size must be at least 1"):
        evaluate_model(model_dir=tiny_base, data=data, batch_size=0)
    with pytest.raises(ValidationError, match="max-examples"):
        load_eval_dataset(data, max_examples=0)


def test_setfit_model_scored_through_the_trainers_predictions(tiny_base: Path, tmp_path: Path) -> None:
    """A SetFit directory as adapterhub's trainer writes it (encoder + JSON head), built small."""
    import numpy as np
    from sentence_transformers import SentenceTransformer, models
    from setfit import SetFitModel
    from sklearn.linear_model import LogisticRegression

    from adapterhub.train.setfit_task import predict_setfit, save_head

    labels = ["neg", "pos"]
    body = SentenceTransformer(modules=[models.Transformer(str(tiny_base)), models.Pooling(64, "mean")], device="cpu")
    texts = ["the quick brown fox", "hello world", "yes no", "two plus two", "adapters are small", "the lazy dog"]
    gold = ["pos", "neg", "neg", "pos", "pos", "neg"]
    head = LogisticRegression().fit(body.encode(texts), np.array([labels.index(g) for g in gold]))
    model_dir = tmp_path / "setfit"
    body.save(str(model_dir))
    save_head(SetFitModel(model_body=body, model_head=head, labels=labels), model_dir, labels)

    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": g} for t, g in zip(texts, gold)])
    report = evaluate_model(model_dir=model_dir, data=data)
    expected = predict_setfit(model_dir, texts)
    assert [e.prediction for e in report.examples] == expected
    assert report.metrics["accuracy"] == pytest.approx(sum(p == g for p, g in zip(expected, gold)) / len(gold))
    outside = write_jsonl(tmp_path / "outside.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(ValidationError, match=r"line 2: label 'meh'"):
        evaluate_model(model_dir=model_dir, data=outside)
    with pytest.raises(AdapterhubError, match="cannot be compared with its base"):
        compare(model_dir=model_dir, base_dir=tiny_base, data=data)
