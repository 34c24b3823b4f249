"""`adapterhub train` / `tune` end to end on the tiny Llama: registered last, with lineage, or not at all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterhub.cli.main import app
from adapterhub.errors import AdapterhubError, NotFoundError, ValidationError
from adapterhub.registry import Registry
from tests.adapterhub.conftest import reverse_rows, write_jsonl

runner = CliRunner()
ADAPTERHUB = Path(sys.executable).parent / "adapterhub"
ACCELERATE = Path(sys.executable).parent / "accelerate"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def registry(adapterhub_home: Path, tiny_base: Path) -> Registry:
    reg = Registry.open(home=adapterhub_home)
    reg.add_base_model(name="tiny", model_dir=tiny_base)
    return reg


@pytest.fixture()
def sft_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "rev.jsonl", reverse_rows(16))


def test_train_with_yaml_and_flags_registers_with_lineage(registry: Registry, sft_data: Path, tmp_path: Path) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"base: tiny\ndata: {sft_data.name}\nmethod: lora\nlora_rank: 4\nmax_steps: 3\nbatch_size: 4\n")
    result = runner.invoke(app, ["train", "--config", str(run_file), "--name", "rev", "--lora-rank", "2", "--use-rslora", "--tag", "demo", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # The kind a user calls it (the LoRA variant), not the PEFT type.
    assert summary["ref"] == "rev:1" and summary["kind"] == "rslora" and summary["steps"] == 3
    # Validation loss before and after training (the default 10% split holds validation rows).
    assert summary["eval_loss_before"] > 0 and summary["eval_loss"] > 0 and summary["eval_loss_before"] != summary["eval_loss"]

    record = registry.get("rev")
    assert record.rank == 2 and record.tags == ("demo",)  # the flag overrode the file's rank 4
    assert record.lineage is not None and record.lineage.kind == "trained"
    details = record.lineage.details
    assert {"dataset_fingerprint", "config", "base_fingerprint", "wall_time_s", "peak_memory_bytes"} <= set(details)
    assert details["base_fingerprint"] == registry.get_base_model("tiny").fingerprint
    assert details["config"]["lora_rank"] == 2 and details["config"]["max_steps"] == 3
    assert details["config"]["data"] == str(sft_data.resolve()) and details["config"]["precision"] == "fp32"
    assert details["peak_memory_bytes"] > 0 and details["wall_time_s"] > 0
    # What the loss was computed on: the base's chat template applied, prompt tokens masked out.
    supervision = details["supervision"]
    assert supervision["chat_template"] is True and supervision["loss_on"] == "completion only"
    assert 0 < supervision["supervised_tokens"] < supervision["tokens"] and supervision["padding_free"] is True
    assert summary["supervision"] == supervision
    assert {"learning_curve.png", "training_metrics.json", "adapter_model.safetensors"} <= set(record.files)
    materialized = registry.materialize(record)
    assert json.loads((materialized / "training_metrics.json").read_text())["global_step"] == 3
    assert not (registry.home / "runs" / "rev").exists()  # the run dir goes once the registry holds the result

    shown = runner.invoke(app, ["show", "rev"])
    assert "trained" in shown.output and "dataset_fingerprint" in shown.output
    assert "supervision: {'chat_template': True, 'loss_on': 'completion only'" in shown.output


@pytest.mark.parametrize(
    ("args", "error", "fragment"),
    [
        (["--base", "nope"], NotFoundError, "tiny"),
        (["--method", "qlora", "--task", "setfit"], ValidationError, "setfit trains the whole sentence encoder"),
        (["--task", "setfit", "--base", "tiny"], ValidationError, "setfit needs a sentence encoder"),
        (["--learning-rate", "-1", "--batch-size", "0"], ValidationError, "learning_rate"),
        # One step inside a warmup learns nothing: refused, and the run directory it made goes too.
        (["--max-steps", "1", "--warmup-steps", "5"], AdapterhubError, "training changed none of the"),
        (["--bad-rows"], ValidationError, "line 2"),
    ],
)
def test_bad_input_is_one_error_and_registers_nothing(
    registry: Registry, sft_data: Path, tmp_path: Path, args: list[str], error: type[Exception], fragment: str
) -> None:
    data = sft_data
    if args == ["--bad-rows"]:
        data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"completion": "c"}])
        data.write_text(data.read_text() + '{"prompt": "a", \n{"prompt": 1, "completion": "d"}\n')
        args = []
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", str(data), "--name", "x", "--max-steps", "2", *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, error), result.output
    assert fragment in str(result.exception)
    if fragment == "line 2":
        # Every bad row in the one error, a line that is not JSON among them.
        assert "line 3" in str(result.exception) and "line 4: not valid JSON" in str(result.exception)
        assert "line 5: needs non-empty 'prompt' and 'completion' strings (or 'messages'); prompt is a number 1" in str(result.exception)
    assert registry.list() == []
    assert not (registry.home / "runs" / "x").exists()


def test_an_early_stopped_run_says_so(registry: Registry, sft_data: Path) -> None:
    # A threshold no improvement can meet: validations at 2, 4, 6, then patience 2 is used up.
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", str(sft_data), "--name", "early", "--max-steps", "40",
                                 "--batch-size", "4", "--eval-steps", "2", "--early-stopping-patience", "2",
                                 "--early-stopping-threshold", "100", "--validation-split", "0.25", "--no-progress"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "stopped early at step 6 of 40; best eval_loss" in result.stdout
    early = registry.get("early").lineage.details["early_stopping"]  # type: ignore[union-attr]
    assert early["stopped_early"] is True and early["stopped_at_step"] == 6 and early["best_step"] in (2, 4, 6)


def _own_options(command_name: str, module: str = "train") -> dict[str, Any]:
    from adapterhub.cli.main import module_commands

    command = module_commands(module)[command_name]
    return {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def test_the_training_docs_name_only_flags_that_exist() -> None:
    root = Path(__file__).resolve().parents[2]
    # Benchmark command lines (`benchmarks/train_bench.py --runs ...`) have their own flags.
    text = "".join(
        line for line in (root / "docs" / "training.md").read_text().splitlines(keepends=True) if "benchmarks/" not in line
    ) + "".join(
        line for line in (root / "README.md").read_text().splitlines(keepends=True) if "adapterhub train" in line or "adapterhub tune" in line
    )
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z](?![\w-])", text))
    known = {"--help"} | set(_own_options("train")) | set(_own_options("tune")) | set(_own_options("eval", "evaluate"))
    assert mentioned and mentioned <= known, sorted(mentioned - known)


@pytest.mark.parametrize("command_name", ["train", "tune"])
def test_every_setting_is_one_flag_named_after_it(command_name: str) -> None:
    from adapterhub.train import TrainConfig

    options = _own_options(command_name)
    for field in TrainConfig.model_fields:
        flag = "--" + field.replace("_", "-")
        assert flag in options, f"{field} has no {flag}"
        assert options[flag].name == field and options[flag].help, field
    # The former names are no settings' flags: hidden, and refused with the name the setting has now.
    former = {"--lr": "--learning-rate", "--rank": "--lora-rank", "--alpha": "--lora-alpha", "--dropout": "--lora-dropout",
              "--rslora": "--use-rslora", "--scheduler": "--lr-scheduler", "--early-stopping": "--early-stopping-patience",
              "--top-k": "--layerwise-top-k"}
    assert all(options[flag].hidden and not options[flag].expose_value for flag in former)
    for flag, now in former.items():
        args = [command_name, flag] if flag == "--rslora" else [command_name, flag, "2"]
        refused = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert refused.exit_code == 2 and f"the flag is now {now}" in refused.output, refused.output


def test_help_shows_the_real_defaults() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from adapterhub.train import DEFAULT_LEARNING_RATES, Method

    options = _own_options("train")
    rate_help = options["--learning-rate"].help
    assert "default per method" not in rate_help
    for method, rate in DEFAULT_LEARNING_RATES.items():
        assert method.value in rate_help
    assert "2e-4 for lora, qlora and dora" in rate_help and "2e-5 for full" in rate_help
    assert DEFAULT_LEARNING_RATES[Method.FULL] == 2e-5
    # What "not given" means is PEFT's table for the architecture; the help names it for Llama.
    modules_help = options["--target-modules"].help
    assert ",".join(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["llama"]) + " on Llama" in modules_help
    assert "ia3: " + ",".join(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["llama"]) in modules_help
    assert "(default: 8)" in options["--lora-rank"].help and "(default: linear)" in options["--lr-scheduler"].help
    shown = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "--learning-rate" in shown.output and "lora|qlora|dora" in shown.output


@pytest.mark.parametrize(("yaml_key", "meant"), [("lr", "learning_rate"), ("learning-rate", "learning_rate"), ("rank", "lora_rank"),
                                                 ("top_k", "layerwise_top_k"), ("lerning_rate", "learning_rate")])
def test_a_run_file_key_that_is_no_setting_says_which_it_means(
    registry: Registry, sft_data: Path, tmp_path: Path, yaml_key: str, meant: str
) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"base: tiny\ndata: {sft_data}\nname: x\n{yaml_key}: 2\n")
    result = runner.invoke(app, ["train", "--config", str(run_file)])
    assert isinstance(result.exception, ValidationError), result.output
    assert f"{yaml_key}: not a training setting (did you mean '{meant}'?)" in str(result.exception)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("zzz: 1\n")
    result = runner.invoke(app, ["train", "--config", str(unknown)])
    assert "zzz: not a training setting (the settings are base, name, data," in str(result.exception)
    assert registry.list() == []


def test_full_model_and_classification_register(registry: Registry, sft_data: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", str(sft_data), "--name", "fullft", "--method", "layerwise",
                                 "--layerwise-top-k", "1", "--max-steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    record = registry.get("fullft")
    assert record.is_full_model and {"config.json", "model.safetensors", "tokenizer.json"} <= set(record.files)

    rows = [{"text": f"the {w} is good", "label": "pos"} for w in ("day", "film", "song", "cake")]
    rows += [{"text": f"the {w} is bad", "label": "neg"} for w in ("day", "film", "song", "cake")]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", str(data), "--name", "sentiment", "--task", "classification",
                                 "--labels", "neg,pos", "--max-steps", "2", "--validation-split", "0.25", "--no-progress"])
    assert result.exit_code == 0, result.output
    record = registry.get("sentiment")
    assert record.config["task_type"] == "SEQ_CLS"
    assert record.lineage is not None and record.lineage.details["metrics"]["labels"] == ["neg", "pos"]

    # Layer-wise classification: the top block and the new head train; the result is a full
    # XForSequenceClassification model kept on the base, which `eval` scores as a classifier.
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", str(data), "--name", "sentiment-top", "--task", "classification",
                                 "--method", "layerwise", "--layerwise-top-k", "1", "--labels", "neg,pos", "--max-steps", "2",
                                 "--validation-split", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    record = registry.get("sentiment-top")
    assert record.is_full_model and record.base_name == "tiny"
    assert json.loads((registry.materialize("sentiment-top") / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    result = runner.invoke(app, ["eval", "sentiment-top", "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert 0.0 <= payload["report"]["metrics"]["accuracy"] <= 1.0


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "ADAPTERHUB_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("progress", ["--progress", "--no-progress"])
def test_train_json_is_all_that_goes_to_stdout(registry: Registry, sft_data: Path, progress: str) -> None:
    completed = subprocess.run(
        [str(ADAPTERHUB), "train", "--base", "tiny", "--data", str(sft_data), "--name", "js", "--max-steps", "2", "--json", progress],
        env=_env(registry.home), capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout)  # the progress bar and the step lines go to stderr
    assert summary["ref"] == "js:1" and summary["steps"] == 2
    assert "{'loss'" not in completed.stdout + completed.stderr  # no raw trainer log dicts anywhere
    if progress == "--no-progress":
        # One short human line per logging step instead (every step of a 2-step run).
        assert "lora/sft step 1/2: loss " in completed.stderr and "lora/sft step 2/2: loss " in completed.stderr


def test_tune_json_is_all_that_goes_to_stdout(registry: Registry, sft_data: Path, tmp_path: Path) -> None:
    run_file = tmp_path / "tune.yaml"
    run_file.write_text(
        f"base: tiny\ndata: {sft_data}\nname: tj\nmax_steps: 1\nbatch_size: 4\n"
        "search:\n  sampler: grid\n  space:\n    lora_rank: [2, 4]\n"
    )
    completed = subprocess.run([str(ADAPTERHUB), "tune", "--config", str(run_file), "--json"], env=_env(registry.home),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload = json.loads(completed.stdout)
    assert payload["ref"] == "tj:1" and len(payload["trials"]) == 2
    assert "{'loss'" not in completed.stdout + completed.stderr


# Runs the CLI as its console script does and reports, at exit, whether bitsandbytes was loaded.
_BITSANDBYTES_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('bitsandbytes loaded:', 'bitsandbytes.nn' in sys.modules, file=sys.stderr))\n"
    "from adapterhub.cli.main import main\n"
    "main(sys.argv[1:])\n"
)


def _run_cli_probe(home: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BITSANDBYTES_PROBE, *args], env=_env(home), capture_output=True, text=True, timeout=300)


def test_bitsandbytes_is_imported_only_for_quantization(registry: Registry, sft_data: Path, lora_dir: Path) -> None:
    # PEFT imports bitsandbytes whenever it is installed (at `import peft`, and for every LoRA layer
    # it builds); on AVX-512 BF16 CPUs that import logged "Failed to load CPU gemm_4bit_forward
    # from kernels-community" on every command.
    registry.put_adapter(name="ad", source_dir=lora_dir, base="tiny")
    for args in (
        ["list"],
        ["eval", "ad", "--data", str(sft_data), "--max-examples", "2", "--no-record"],
        ["train", "--base", "tiny", "--data", str(sft_data), "--name", "plain", "--max-steps", "1", "--no-progress"],
    ):
        completed = _run_cli_probe(registry.home, args)
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert "bitsandbytes loaded: False" in completed.stderr, args
        assert "gemm_4bit_forward" not in completed.stdout + completed.stderr
    quantized = _run_cli_probe(registry.home, ["train", "--base", "tiny", "--data", str(sft_data), "--name", "quantized",
                                               "--method", "qlora", "--max-steps", "2", "--no-progress"])
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    assert "bitsandbytes loaded: True" in quantized.stderr
    assert registry.get("quantized").lineage.details["config"]["method"] == "qlora"  # type: ignore[union-attr]


def test_sigkill_leaves_no_record_and_resume_finishes(registry: Registry, sft_data: Path) -> None:
    args = ["train", "--base", "tiny", "--data", str(sft_data), "--name", "killed", "--max-steps", "12",
            "--save-steps", "2", "--batch-size", "2", "--validation-split", "0", "--no-progress"]
    checkpoints = registry.home / "runs" / "killed" / "checkpoints"
    process = subprocess.Popen([str(ADAPTERHUB), *args], env=_env(registry.home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # Killed once a first checkpoint is complete (wherever the run is then, even mid-way through writing the next).
        while not (checkpoints / "checkpoint-2" / "trainer_state.json").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert registry.list() == []

    again = runner.invoke(app, args)
    assert isinstance(again.exception, AdapterhubError) and "--resume" in str(again.exception)
    resumed = runner.invoke(app, [*args, "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    record = registry.get("killed")
    metrics = record.lineage.details["metrics"]  # type: ignore[union-attr]
    assert metrics["global_step"] == 12 and metrics["resumed_from"].startswith("checkpoint-")


def test_overwrite_clears_only_what_a_run_wrote_then_trains(registry: Registry, sft_data: Path, tmp_path: Path) -> None:
    """An unfinished run's directory is refused without --resume or --overwrite; --overwrite
    removes the run's checkpoints, result and run files, never a user's other files."""
    run_dir = tmp_path / "my-run"
    (run_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (run_dir / "run_config.json").write_text('{"lora_rank": 99}')
    (run_dir / "notes.txt").write_text("mine")
    args = ["train", "--base", "tiny", "--data", str(sft_data), "--name", "again", "--max-steps", "2", "--batch-size", "4",
            "--validation-split", "0", "--no-progress", "--output-dir", str(run_dir)]
    refused = runner.invoke(app, args)
    assert isinstance(refused.exception, AdapterhubError) and "--resume" in str(refused.exception) and "--overwrite" in str(refused.exception)
    assert registry.list() == []

    done = runner.invoke(app, [*args, "--overwrite", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["ref"] == "again:1"
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert not (run_dir / "checkpoints" / "checkpoint-2").exists()
    assert json.loads((run_dir / "run_config.json").read_text())["max_steps"] == 2  # the new run's, not the old one


def test_tune_grid_registers_the_best_trial(registry: Registry, sft_data: Path, tmp_path: Path) -> None:
    run_file = tmp_path / "tune.yaml"
    run_file.write_text(
        f"base: tiny\ndata: {sft_data}\nname: tuned\nmax_steps: 2\nbatch_size: 4\nvalidation_split: 0.25\n"
        "search:\n  sampler: grid\n  space:\n    lora_rank: [2, 4]\n    learning_rate: [0.001, 0.01]\n"
    )
    result = runner.invoke(app, ["tune", "--config", str(run_file), "--trials", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    trials = payload["trials"]
    assert len(trials) == 3 and all(t["state"] == "complete" for t in trials)
    assert len({(t["params"]["lora_rank"], t["params"]["learning_rate"]) for t in trials}) == 3  # grid points, no repeats
    best = min(trials, key=lambda t: t["value"])
    assert payload["best"] == best["number"] and payload["objective"] == "eval_loss"
    record = registry.get("tuned")
    assert "tuned" in record.tags and record.rank == best["params"]["lora_rank"]
    assert record.lineage is not None and record.lineage.details["config"]["learning_rate"] == best["params"]["learning_rate"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: tiny\ndata: {sft_data}\nname: t2\nsearch:\n  sampler: grid\n  space:\n    lora_rank: {{low: 1, high: 8}}\n")
    failed = runner.invoke(app, ["tune", "--config", str(bad)])
    assert isinstance(failed.exception, ValidationError) and "grid search needs lists" in str(failed.exception)


def test_setfit_on_the_embedded_minilm(adapterhub_home: Path, tmp_path: Path) -> None:
    rows = [{"text": f"I loved the {w}, wonderful", "label": "positive"} for w in ("film", "meal", "trip", "book")]
    rows += [{"text": f"I hated the {w}, terrible", "label": "negative"} for w in ("film", "meal", "trip", "book")]
    data = write_jsonl(tmp_path / "few.jsonl", rows)
    result = runner.invoke(app, ["train", "--task", "setfit", "--data", str(data), "--name", "fewshot", "--max-steps", "2",
                                 "--batch-size", "4", "--setfit-iterations", "1", "--validation-split", "0", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2  # the encoder's steps (SetFit's own Trainer keeps none)
    registry = Registry.open(home=adapterhub_home)
    record = registry.get("fewshot")
    assert record.base_name == "all-minilm-l6-v2" and record.is_full_model
    assert "setfit_head.json" in record.files and not any(f.endswith(".pkl") for f in record.files)
    from adapterhub.train.setfit_task import predict_setfit

    predictions = predict_setfit(registry.materialize(record), ["I loved the song, wonderful", "I hated the song, terrible"])
    assert set(predictions) <= {"positive", "negative"}


def test_runs_under_accelerate_launch_with_two_processes(registry: Registry, tmp_path: Path) -> None:
    """The shipped DDP config, launched for real: two ranks over gloo, and only rank 0 writes.

    On a CPU-only machine accelerate's multi-process launcher is the config's MULTI_GPU one
    (torchrun; `--cpu` would start a single process) and the trainer runs DDP over gloo;
    `--mixed_precision no` overrides the config's bf16, which is for GPUs. Both ranks train; one
    mixes the two `--data` files and registers them, one registers the adapter, one prints the
    summary, and both exit 0 (torchrun's exit status is non-zero when any rank fails).
    """
    first = write_jsonl(tmp_path / "rev-a.jsonl", reverse_rows(16))
    second = write_jsonl(tmp_path / "rev-b.jsonl", reverse_rows(24)[8:])
    command = [
        str(ACCELERATE), "launch", "--config_file", str(REPO_ROOT / "examples" / "accelerate" / "ddp.yaml"),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "adapterhub.cli.main", "train", "--base", "tiny", "--data", f"{first}:1", "--data", f"{second}:1",
        "--name", "ddp", "--max-steps", "3", "--batch-size", "2", "--no-progress", "--json",
    ]
    env = {**_env(registry.home), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [r.ref for r in registry.list()] == ["ddp:1"]  # only the main process registered
    record = registry.get("ddp:1")
    metrics = record.lineage.details["metrics"]  # type: ignore[union-attr]
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    # One summary on stdout (a JSON document per rank would not parse), one mix, made once.
    assert json.loads(completed.stdout)["ref"] == "ddp:1"
    assert completed.stderr.count("mixed rev-a.jsonl:1.0, rev-b.jsonl:1.0 into") == 1, completed.stderr[-3000:]
    datasets = sorted(d.ref for d in registry.datasets.list())
    assert len(datasets) == 3 and all(ref.endswith(":1") for ref in datasets)  # the two sources and their mix
    # No rank but the main one wrote blobs: the store holds exactly what the record references.
    assert sorted(sha for sha, _ in registry.blobs.iter_blobs()) == sorted(set(record.files.values()))
    assert not (registry.home / "runs" / "ddp").exists()


def test_train_dpo_registers_the_adapter_with_preference_figures(registry: Registry, tmp_path: Path) -> None:
    words = ["fox", "dog", "cat", "owl", "bee", "elk", "ant", "yak", "emu", "cod"]
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"say {w}", "chosen": w, "rejected": f"no {w} here"} for w in words])
    result = runner.invoke(app, [
        "train", "--base", "tiny", "--data", str(data), "--task", "dpo", "--name", "pref", "--beta", "0.3", "--loss-type", "sigmoid",
        "--max-steps", "2", "--batch-size", "2", "--validation-split", "0.3", "--learning-rate", "0.01", "--json", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ref"] == "pref:1" and summary["kind"] == "lora"
    assert summary["reward_margin_before"] == 0 and summary["reward_margin"] != 0
    assert 0 <= summary["preference_accuracy"] <= 1
    details = registry.get("pref").lineage.details
    assert details["config"]["task"] == "dpo" and details["config"]["beta"] == 0.3
    assert details["metrics"]["held_out_pairs"] == 3 and "initial_preference_accuracy" in details["metrics"]


def test_train_with_a_bad_preference_row_registers_nothing(registry: Registry, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    result = runner.invoke(app, ["train", "--base", "tiny", "--data", str(data), "--task", "orpo", "--name", "bad", "--no-progress"])
    assert isinstance(result.exception, ValidationError), result.output
    assert "line 2" in str(result.exception) and "rejected missing" in str(result.exception)
    with pytest.raises(NotFoundError):
        registry.get("bad")
