"""Merge recipes: mergekit-style YAML parses; every problem of a bad recipe is named at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub.errors import ValidationError
from adapterhub.merge import MergeRecipe
from adapterhub.merge.methods import InputParams

MERGEKIT_TIES = """
merge_method: ties
base_model: smollm2
models:
  - model: smollm2
  - model: math-lora:2
    parameters:
      weight: 0.6
      density: 0.5
  - model: chat-lora
    parameters:
      weight: 0.4
parameters:
  normalize: true
  int8_mask: true
  density: 0.7
dtype: bfloat16
"""


def test_mergekit_style_yaml(tmp_path: Path) -> None:
    path = tmp_path / "ties.yml"
    path.write_text(MERGEKIT_TIES)
    recipe = MergeRecipe.from_yaml(path)
    assert recipe.merge_method == "ties" and recipe.dtype == "bfloat16"
    assert [m.model for m in recipe.inputs] == ["math-lora:2", "chat-lora"]  # the base entry is the base
    assert recipe.input_params() == [
        InputParams(weight=0.6, density=0.5),
        InputParams(weight=0.4, density=0.7),  # global density is the default for every input
    ]
    assert recipe.global_params().normalize is True
    assert MergeRecipe.from_dict(recipe.to_json()) == recipe  # what lineage stores rebuilds the recipe


def test_lambda_and_output_options() -> None:
    recipe = MergeRecipe.from_dict({
        "merge_method": "task_arithmetic",
        "models": [{"model": "a", "parameters": {"weight": -1}}],
        "parameters": {"lambda": 0.5, "seed": 3},
        "output": {"energy": 0.95},
    })
    assert recipe.global_params().lambda_ == 0.5 and recipe.global_params().seed == 3
    assert recipe.output.energy == 0.95
    assert recipe.to_json()["parameters"]["lambda"] == 0.5


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as caught:
        MergeRecipe.from_dict({
            "merge_method": "ties",
            "models": [
                {"model": "a", "parameters": {"density": 0}},
                {"model": "b", "parameters": {"density": 1.5, "wieght": 1}},
            ],
            "parameters": {"lambda": "big"},
            "slices": [],
        })
    problems = caught.value.problems
    text = "; ".join(problems)
    assert "models.0.parameters.density: Input should be greater than 0 (got 0)" in text
    assert "models.1.parameters.density: Input should be less than or equal to 1 (got 1.5)" in text
    assert "models.1.parameters.wieght: unknown key" in text
    assert "parameters.lambda" in text
    assert "'slices' (mergekit layer slicing) is not supported" in text
    assert len(problems) >= 5


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"merge_method": "tie", "models": [{"model": "a"}]}, "unknown method 'tie'; valid methods: breadcrumbs"),
        ({"merge_method": "slerp", "models": [{"model": m} for m in "abc"]}, "slerp takes 2 inputs, the recipe has 3"),
        ({"merge_method": "ties", "models": []}, "the recipe has no inputs to merge"),
        ({"merge_method": "ties", "base_model": "x", "models": [{"model": "x"}]}, "the recipe has no inputs to merge"),
        (
            {"merge_method": "della", "models": [{"model": "a", "parameters": {"density": 0.1, "epsilon": 0.2}}]},
            "della needs 0 < density − epsilon",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": [0, 1]}}]},
            "per-layer gradients and filters are not supported",
        ),
        ("merge_method: ties", "a recipe is a mapping"),
    ],
)
def test_bad_recipes(data: object, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        MergeRecipe.from_dict(data)


def test_unreadable_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("merge_method: [ties\n")
    with pytest.raises(ValidationError, match="not valid YAML"):
        MergeRecipe.from_yaml(path)
    with pytest.raises(ValidationError, match="does not exist"):
        MergeRecipe.from_yaml(tmp_path / "missing.yml")
