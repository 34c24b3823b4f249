"""Quality on the real SmolLM2-135M: DPO with LoRA, through the CLI, turns a preference the base gets wrong.

The preferred style is unusual but learnable: asked to say a word, answer it in capitals with
an exclamation mark ("RABBIT!"); the rejected answer is the word as given ("rabbit"), which the
instruct base finds likelier. Held-out pairs use words no training pair has, so the adapter has
to have learned the style, not the words. `adapterhub eval --compare` scores both models on the
held-out pairs (summed log-probability of each answer given the chat-formatted prompt) and
stores both results in the registry; the adapter must win at least 30 points more pairs.

Calibration (this data and these settings, fp32 on 2 shared CPU cores, December 2026): the
base prefers the chosen answer on 5 of 20 held-out pairs (accuracy 0.25, mean margin -3.4
nats); after 3 DPO steps of 4 pairs the adapter prefers it on 20 of 20 (margin +21 nats), after
4 steps 20 of 20 (+25), after 8 steps 20 of 20 (+38). DPO's loss goes 0.69, 0.29, 0.13 over the
3 steps. A step takes 10-25 s on 2 idle-to-busy cores (110 s with four other jobs on them), so
the test takes about 2-3 minutes plus the session's one SmolLM2 conversion (~40 s).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterhub.cli.main import app
from adapterhub.registry import Registry

from .conftest import write_jsonl

runner = CliRunner()

_WORDS = (
    "apple river stone cloud green table window music garden orange silver winter candle forest paper "
    "bottle yellow mountain pencil rabbit ocean planet summer kitchen bridge doctor flower button jacket "
    "basket castle dragon engine feather guitar hammer island ladder mirror needle pillow rocket saddle "
    "tunnel violin wagon zebra anchor blanket carpet desert eagle falcon glove harbor lemon meadow"
).split()
_PROMPTS = ("Say the word {word}.", "Please repeat this word: {word}", "Echo back the word '{word}'.", "Can you say {word}?")


def _pairs(words: list[str]) -> list[dict[str, str]]:
    return [
        {"prompt": _PROMPTS[i % len(_PROMPTS)].format(word=word), "chosen": f"{word.upper()}!", "rejected": word}
        for i, word in enumerate(words)
    ]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~3 min on 2 loaded cores; a heavily shared machine is several times slower
def test_dpo_through_the_cli_raises_heldout_preference_accuracy_by_30_points(
    smollm2_dir: Path, adapterhub_home: Path, tmp_path: Path
) -> None:
    words = list(_WORDS)
    random.Random(0).shuffle(words)
    heldout_words, train_words = words[:20], words[20:]
    assert not set(heldout_words) & set(train_words)
    train_file = write_jsonl(tmp_path / "train.jsonl", _pairs(train_words))
    heldout_file = write_jsonl(tmp_path / "heldout.jsonl", _pairs(heldout_words))

    added = runner.invoke(app, ["models", "add", "smollm2", str(smollm2_dir)])
    assert added.exit_code == 0, added.output
    trained = runner.invoke(app, [
        "train", "--base", "smollm2", "--data", str(train_file), "--name", "shout", "--task", "dpo", "--beta", "0.1",
        "--method", "lora", "--lora-rank", "16", "--lora-alpha", "32", "--target-modules", "all-linear",
        "--learning-rate", "1e-3", "--max-steps", "3", "--batch-size", "4", "--max-length", "64",
        "--validation-split", "0", "--no-progress", "--json",
    ])
    assert trained.exit_code == 0, trained.output

    evaluated = runner.invoke(app, [
        "eval", "shout", "--data", str(heldout_file), "--metrics", "preference_accuracy,preference_margin", "--compare", "--json",
    ])
    assert evaluated.exit_code == 0, evaluated.output
    payload = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
    base, adapter = payload["base"]["metrics"], payload["adapter"]["metrics"]
    print(f"held-out preference accuracy on {len(heldout_words)} pairs: base {base['preference_accuracy']:.2f} "
          f"(margin {base['preference_margin']:.1f}), DPO LoRA {adapter['preference_accuracy']:.2f} "
          f"(margin {adapter['preference_margin']:.1f})")
    assert base["preference_accuracy"] <= 0.4 and base["preference_margin"] < 0  # the base prefers the rejected answer
    assert adapter["preference_accuracy"] - base["preference_accuracy"] >= 0.3
    assert adapter["preference_margin"] > 0

    registry = Registry.open(home=adapterhub_home)
    record = registry.get("shout")
    stored = {e.metric: e.value for e in record.evaluations}
    assert stored["preference_accuracy"] == pytest.approx(adapter["preference_accuracy"])
    assert stored["preference_margin"] == pytest.approx(adapter["preference_margin"])
    base_stored = {e.metric: e.value for e in registry.get_base_model("smollm2").evaluations}
    assert base_stored["preference_accuracy"] == pytest.approx(base["preference_accuracy"])
    assert record.lineage is not None
    assert record.lineage.details["config"]["task"] == "dpo" and record.lineage.details["metrics"]["global_step"] == 3
