"""Quality on the real SmolLM2-135M: a LoRA trained through the CLI teaches it a task it cannot do.

The task is reversing three words. The instruct base answers with chatter, so its exact match is
near zero; a LoRA trained in a few CPU minutes must raise exact match on held-out triples (no
triple of the test set is in the training set) by at least 50 points, as measured by
`adapterhub eval --compare`, which also stores the result in the registry.

Calibration (same data, settings and fp32 code path, run on an H100 where it takes seconds):
base 0/24, LoRA 23/24 after 20 steps and 24/24 after 40; 24 steps here. On 2 idle CPU cores
SmolLM2 takes about 4-8 s per step of 8 examples, so the test takes a few minutes; on a
heavily shared machine it can take far longer (hence the long timeout).
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

_VOCABULARY = (
    "apple river stone cloud green table window music garden orange silver winter candle forest paper "
    "bottle yellow mountain pencil rabbit ocean planet summer kitchen bridge doctor flower button jacket"
).split()


def _triples(count: int, rng: random.Random, exclude: set[tuple[str, ...]]) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    while len(found) < count:
        triple = tuple(rng.sample(_VOCABULARY, 3))
        if triple not in exclude and triple not in found:
            found.append(triple)
    return found


def _rows(triples: list[tuple[str, ...]]) -> list[dict[str, str]]:
    return [{"prompt": f"Reverse the order of these words: {' '.join(t)}", "completion": " ".join(reversed(t))} for t in triples]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~5 min on 2 idle cores; a loaded shared machine is several times slower
def test_lora_through_the_cli_raises_exact_match_by_50_points(adapterhub_home: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    heldout = _triples(24, rng, set())
    train = _triples(320, rng, set(heldout))
    train_file = write_jsonl(tmp_path / "train.jsonl", _rows(train))
    heldout_file = write_jsonl(tmp_path / "heldout.jsonl", _rows(heldout))

    added = runner.invoke(app, ["models", "add", "smollm2"])
    assert added.exit_code == 0, added.output
    trained = runner.invoke(app, [
        "train", "--base", "smollm2", "--data", str(train_file), "--name", "reverse3", "--method", "lora",
        "--lora-rank", "16", "--lora-alpha", "32", "--target-modules", "all-linear", "--learning-rate", "2e-3", "--max-steps", "24",
        "--batch-size", "8", "--max-length", "96", "--validation-split", "0", "--no-progress", "--json",
    ])
    assert trained.exit_code == 0, trained.output

    evaluated = runner.invoke(app, [
        "eval", "reverse3", "--data", str(heldout_file), "--metrics", "exact_match", "--compare",
        "--max-new-tokens", "12", "--batch-size", "12", "--json",
    ])
    assert evaluated.exit_code == 0, evaluated.output
    payload = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
    base_em = payload["base"]["metrics"]["exact_match"]
    adapter_em = payload["adapter"]["metrics"]["exact_match"]
    print(f"exact match on {len(heldout)} held-out triples: base {base_em:.2f}, LoRA {adapter_em:.2f}")
    assert base_em <= 0.1
    assert adapter_em - base_em >= 0.5

    record = Registry.open(home=adapterhub_home).get("reverse3")
    assert any(e.metric == "exact_match" and e.value == pytest.approx(adapter_em) for e in record.evaluations)
    assert record.lineage is not None and record.lineage.details["metrics"]["global_step"] == 24
