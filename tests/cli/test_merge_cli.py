"""`adapterhub merge` end to end on tiny real models: resolve refs, merge, register with lineage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterhub.cli.main import app
from adapterhub.cli.merge import parse_adapter_option, parse_param_option
from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.registry import Lineage, Registry
from tests.conftest import build_lora_adapter

runner = CliRunner()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base: Path, tiny_base_other: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Adapter directories (built once) and the base each belongs to."""
    root = tmp_path_factory.mktemp("merge-cli")
    return {
        "math": (build_lora_adapter(tiny_base, root / "m", seed=1), "tiny"),
        "chat": (build_lora_adapter(tiny_base, root / "c", rank=8, seed=2, target_modules=("q_proj", "k_proj")), "tiny"),
        "elsewhere": (build_lora_adapter(tiny_base_other, root / "o", seed=3), "other"),
        "prompt": (build_lora_adapter(tiny_base, root / "p", peft_type="prompt_tuning"), "tiny"),
    }


@pytest.fixture()
def registry(adapterhub_home: Path, tiny_base: Path, tiny_base_other: Path, adapter_dirs: dict[str, tuple[Path, str]]) -> Registry:
    reg = Registry.open(home=adapterhub_home)
    reg.add_base_model(name="tiny", model_dir=tiny_base)
    reg.add_base_model(name="other", model_dir=tiny_base_other)
    imported = Lineage(kind="imported", parents=(), details={})
    for name, (directory, base) in adapter_dirs.items():
        reg.put_adapter(name=name, source_dir=directory, base=base, lineage=imported)
    return reg


def test_adapter_option_syntax() -> None:
    assert parse_adapter_option("math:2=0.6,0.5") == ("math:2", {"weight": 0.6, "density": 0.5})
    assert parse_adapter_option("math@ab12cd=-1") == ("math@ab12cd", {"weight": -1.0})
    assert parse_adapter_option("chat") == ("chat", {})
    assert parse_param_option("lambda=0.5") == ("lambda", 0.5)
    assert parse_param_option("normalize=false") == ("normalize", False)
    assert parse_param_option("consensus=count") == ("consensus", "count")
    with pytest.raises(AdapterhubError, match="weight 'x' is not a number"):
        parse_adapter_option("math=x")
    with pytest.raises(AdapterhubError, match="expected REF=WEIGHT"):
        parse_adapter_option("math=1,0.5,3")


def test_merge_options_register_a_lora_with_lineage(registry: Registry) -> None:
    result = runner.invoke(app, [
        "merge", "--method", "ties", "--adapter", "math:1=0.6,0.5", "--adapter", "chat=0.4", "--rank", "8",
        "--seed", "5", "--out", "both", "--tag", "merged", "--json",
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ref"] == "both:1" and payload["parents"] == ["math:1", "chat:1"]
    assert payload["rank"] == 8 and not payload["exact"] and 0 < payload["max_relative_error"] < 1
    assert set(payload["module_ranks"].values()) == {8} and isinstance(payload["warnings"], list)

    record = registry.get("both")
    assert record.peft_type == "LORA" and record.rank == 8 and record.tags == ("merged",)
    assert record.lineage.kind == "merged" and record.lineage.parents == ("math:1", "chat:1")
    details = record.lineage.details
    assert details["method"] == "ties"
    assert details["recipe"]["models"][1] == {"model": "chat:1", "parameters": {"weight": 0.4}}  # ref resolved to its version
    assert details["recipe"]["parameters"]["seed"] == 5 and details["recipe"]["base_model"] == "tiny"
    assert details["error_report"]["max_relative_error"] == payload["max_relative_error"]
    assert details["error_report"]["module_ranks"] == payload["module_ranks"]
    assert len(details["error_report"]["modules"]) == 6  # q and v of math, q and k of chat, 2 layers: q, k, v each
    assert "merge_report.json" in record.files

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(registry.get_base_model("tiny").path)
    PeftModel.from_pretrained(base, registry.materialize(record))  # loads as a plain PEFT LoRA


def test_recipe_file_with_full_model_output_and_eval(registry: Registry, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        "merge_method: task_arithmetic\nbase_model: tiny\nmodels:\n"
        "  - model: math\n    parameters: {weight: 1.0}\n"
        "  - model: chat:1\n    parameters: {weight: -0.5}\n"
    )
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in ("yes", "no")))
    full_dir = tmp_path / "full"
    result = runner.invoke(app, ["merge", str(recipe), "--full-model", str(full_dir), "--out", "mixed", "--eval", str(data), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["output"] == "full" and payload["ref"] == "mixed:1"

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(full_dir)
    record = registry.get("mixed:1")
    assert record.peft_type == "FULL" and record.lineage.parents == ("math:1", "chat:1")
    assert {e.metric for e in record.evaluations} == set(payload["evaluations"]["mixed:1"])
    assert registry.get("math:1").evaluations, "parents are evaluated too"

    again = runner.invoke(app, ["merge", str(recipe), "--method", "ties", "--out", "x"])
    assert isinstance(again.exception, AdapterhubError) and "not both" in str(again.exception)


def test_bad_inputs_one_error_nothing_registered(registry: Registry) -> None:
    before = [r.ref for r in registry.list()]
    result = runner.invoke(app, [
        "merge", "--method", "ties", "--adapter", "math", "--adapter", "missing:3", "--adapter", "elsewhere",
        "--adapter", "prompt", "--out", "bad",
    ])
    error = result.exception
    assert isinstance(error, ValidationError)
    text = str(error)
    assert "missing" in text and "elsewhere:1 is on base model 'other', not 'tiny'" in text
    assert "prompt:1 is a PROMPT_TUNING adapter" in text
    assert len(error.problems) == 3

    for args, expected in (
        (["--method", "slerp", "--adapter", "math", "--adapter", "chat", "--adapter", "math"], "slerp takes 2 inputs"),
        (["--method", "ties", "--adapter", "math=1,1.5"], "density: Input should be less than or equal to 1"),
        (["--method", "ties"], "the recipe has no inputs to merge"),
    ):
        outcome = runner.invoke(app, ["merge", *args, "--out", "bad"])
        assert isinstance(outcome.exception, ValidationError) and expected in str(outcome.exception), outcome.output
    assert [r.ref for r in registry.list()] == before


def test_user_error_is_one_line_and_exit_code_1(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from adapterhub.cli.main import main

    monkeypatch.setattr(sys, "argv", ["adapterhub", "merge", "--method", "tie", "--adapter", "math", "--out", "x"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "unknown method 'tie'" in lines[0]
