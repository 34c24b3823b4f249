"""Metric functions against values worked out by hand on fixed strings (no model)."""

from __future__ import annotations

import math

import pytest

from adapterhub.errors import ValidationError
from adapterhub.eval import metrics as m


def test_exact_match_normalises_case_and_whitespace_only() -> None:
    predictions = ["Paris", "  the  cat sat ", "4.", "blue"]
    references = ["paris", "The cat sat", "4", "red"]
    # hits: "paris"==, "the cat sat"==, "4." != "4" (punctuation kept), blue != red
    assert m.exact_match(predictions, references) == pytest.approx(2 / 4)


def test_classification_scores_match_hand_computation() -> None:
    references = ["pos", "pos", "pos", "neg", "neg", "neu"]
    predictions = ["pos", "neg", "pos", "neg", "pos", m.NO_LABEL]
    scores = m.classification_scores(predictions, references, ["neg", "neu", "pos"])
    # accuracy: rows 1, 3, 4 right -> 3/6
    assert scores["accuracy"] == pytest.approx(0.5)
    # per class: pos P=2/3 R=2/3; neg P=1/2 R=1/2; neu P=0 (never predicted) R=0
    precision = (2 / 3 + 1 / 2 + 0) / 3
    recall = (2 / 3 + 1 / 2 + 0) / 3
    f1 = (2 / 3 + 1 / 2 + 0) / 3  # P == R per class, so F1 equals them
    assert scores["precision"] == pytest.approx(precision)
    assert scores["recall"] == pytest.approx(recall)
    assert scores["f1"] == pytest.approx(f1)


def test_confusion_keeps_unmatched_answers_by_name() -> None:
    table = m.confusion(["a", m.NO_LABEL, "b"], ["a", "a", "a"], ["a", "b"])
    assert table == {"a": {"a": 1, m.NO_LABEL: 1, "b": 1}, "b": {}}


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("Positive", "positive"),
        ("positive.", "positive"),
        ("negative\nbecause the text is sad", "negative"),
        ("positive, because it says great", "positive"),
        ("very positive!", "very positive"),  # the longest label that leads wins
        ("I think it is positive", m.NO_LABEL),  # a label mid-sentence is not an answer
        ("positively", m.NO_LABEL),  # a prefix of a word is not the label
        ("", m.NO_LABEL),
    ],
)
def test_match_label(generated: str, expected: str) -> None:
    assert m.match_label(generated, ["negative", "positive", "very positive"]) == expected


def test_rouge_against_hand_counts() -> None:
    # unigram overlap: {the, cat, sat} of 3 predicted and 4 reference tokens:
    # P = 3/3, R = 3/4, F = 2PR/(P+R) = 6/7; bigrams: "the cat", "cat sat" shared of 2 and 3
    scores = m.rouge_scores(["the cat sat"], ["the cat sat down"])
    assert scores["rouge1"] == pytest.approx(6 / 7)
    assert scores["rouge2"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert scores["rougeL"] == pytest.approx(6 / 7)
    assert m.rouge_scores(["a b"], ["a b"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_bleu_perfect_zero_and_brevity_penalty() -> None:
    sentence = "the quick brown fox jumps over the lazy dog"
    assert m.bleu_score([sentence], [sentence]) == pytest.approx(100.0)
    assert m.bleu_score(["zebra"], [sentence]) == pytest.approx(0.0)
    # All n-gram precisions are 1, only the brevity penalty acts: exp(1 - 9/8) * 100
    shorter = "the quick brown fox jumps over the lazy"
    assert m.bleu_score([shorter], [sentence]) == pytest.approx(100 * math.exp(1 - 9 / 8), rel=1e-6)


def test_perplexity_is_exp_of_mean_token_nll() -> None:
    assert m.perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        m.perplexity(1.0, 0)


def test_length_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        m.exact_match(["a", "b"], ["a"])


def test_unknown_and_inapplicable_metrics_listed_together() -> None:
    with pytest.raises(ValidationError) as info:
        m.resolve_metrics(["accuracy", "blue", "bleu"], "text", default=("perplexity",))
    message = str(info.value)
    assert "unknown metric 'blue'" in message and "valid metrics: accuracy" in message
    assert "'accuracy' does not apply to text data; usable here: perplexity" in message
    assert "'bleu' does not apply" in message


def test_resolve_metrics_defaults_and_dedup() -> None:
    assert m.resolve_metrics(None, "generation", default=("exact_match",)) == ("exact_match",)
    assert m.resolve_metrics(["bleu", " BLEU", "rouge"], "generation", default=()) == ("bleu", "rouge")
