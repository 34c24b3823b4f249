"""Every method and task trains for real on the tiny Llama; resume, early stopping, truncation, packing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.train import load_config, train
from adapterhub.train.progress import CURVE_FILE, METRICS_FILE

from .conftest import interrupt_after, write_jsonl

FAST = {"max_steps": 3, "batch_size": 4, "validation_split": 0.2, "eval_steps": 3}


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    batch = tokenizer(["reverse: fox dog"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, -1]  # the last position exists with or without virtual tokens


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "full", "layerwise"])
def test_each_method_trains_and_saves_a_loadable_result(method: str, tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    extra = {"learning_rate": 1e-2} if method in ("lora", "qlora", "dora") else {}
    config = load_config({"data": sft_jsonl, "method": method, **FAST, **extra, "layerwise_top_k": 1})
    result = train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    out = result.output_path
    assert out == tmp_path / "run" / "final"
    assert (out / CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["global_step"] == 3 and metrics["num_train_examples"] == 20 and metrics["num_validation_examples"] == 4
    assert metrics["eval_loss"] is not None and len(metrics["train_loss_history"]) >= 1
    # Evaluated before the first step too: the run reports before and after, the curve starts at 0.
    assert metrics["eval_loss_history"][0] == [0, metrics["initial_eval_loss"]]
    assert metrics["initial_eval_loss"] != metrics["eval_loss"]
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"] or method == "full"

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    before = _logits(base, tokenizer)
    if result.is_full_model:
        assert method in ("full", "layerwise")
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
        tuned = AutoModelForCausalLM.from_pretrained(out)
        changed = {k for k, v in load_file(out / "model.safetensors").items() if not torch.equal(v, base.state_dict()[k])}
        if method == "layerwise":
            # Only the top block moved; everything below it is bit-identical to the base.
            assert changed and all(k.startswith("model.layers.1.") for k in changed)
    else:
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        tuned = PeftModel.from_pretrained(base, out)
    assert not torch.allclose(_logits(tuned, tokenizer), before), "training left the model's outputs unchanged"


def test_lora_knobs_reach_the_saved_adapter_and_8bit_qlora_trains(tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    config = load_config({"data": sft_jsonl, "method": "qlora", "quant_bits": 8, "use_rslora": True, "lora_rank": 4,
                          "lora_alpha": 4, "lora_dropout": 0.1, "target_modules": "q_proj,k_proj,down_proj", "max_steps": 2,
                          "batch_size": 4, "validation_split": 0})
    result = train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    saved = json.loads((result.output_path / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["r"] == 4 and saved["lora_alpha"] == 4 and saved["lora_dropout"] == 0.1
    assert sorted(saved["target_modules"]) == ["down_proj", "k_proj", "q_proj"]
    assert result.metrics["global_step"] == 2


@pytest.mark.parametrize("quant_bits", [4, 8])
def test_qlora_still_gets_gradients_after_an_evaluation(quant_bits: int, tiny_base: Path) -> None:
    # bitsandbytes 0.50 on CPUs with AVX-512 BF16 (Intel Xeon/AMX) repacked 4-bit weights for a
    # backward-less inference kernel at the first no-grad eval forward: every later backward gave
    # the LoRA weights zero gradients (a run with a validation split trained nothing). Elsewhere
    # (AMD, CUDA) there is no repack, and this holds trivially.
    import bitsandbytes as bnb

    from adapterhub.train.methods import build_model
    from adapterhub.train.runner import load_tokenizer

    config = load_config({"method": "qlora", "quant_bits": quant_bits, "gradient_checkpointing": False})
    tokenizer = load_tokenizer(tiny_base)
    model = build_model(config, tiny_base, tokenizer=tokenizer, precision="fp32")
    batch = tokenizer(["reverse: fox dog sun moon"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        model(**batch)  # what the before-training evaluation does
    model.train()
    for step in range(2):  # LoRA B starts at zero: only its gradient is non-zero at first, A's follows
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter -= 0.05 * parameter.grad
        grads = {name: p.grad.abs().sum().item() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        model.zero_grad()
    assert grads and all(value > 0 for value in grads.values()), {k: v for k, v in grads.items() if v == 0}
    packed = [m for m in model.modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    assert not packed
    assert quant_bits == 8 or any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_qlora_builds_in_a_process_that_deferred_bitsandbytes_and_used_peft(tiny_base: Path) -> None:
    # The CLI defers bitsandbytes; `tune` may build LoRA models (PEFT then caches "bitsandbytes
    # absent") before a qlora trial: that trial must still get real 4-bit layers.
    import subprocess
    import sys

    script = f"""
import sys
from pathlib import Path
from adapterhub.models import defer_bitsandbytes
defer_bitsandbytes()
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base = Path({str(tiny_base)!r})
get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
assert "bitsandbytes.nn" not in sys.modules
from adapterhub.train import load_config
from adapterhub.train.methods import bitsandbytes_problem, build_model
from adapterhub.train.runner import load_tokenizer
assert bitsandbytes_problem() is None
model = build_model(load_config({{"method": "qlora"}}), base, tokenizer=load_tokenizer(base), precision="fp32")
from peft.tuners.lora.bnb import Linear4bit
print("4-bit LoRA layers:", sum(isinstance(m, Linear4bit) for m in model.modules()))
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "4-bit LoRA layers: 4" in completed.stdout  # q_proj and v_proj of both blocks


def test_qlora_is_refused_up_front_where_bitsandbytes_cannot_load(
    tiny_base: Path, sft_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ValidationError, match="qlora needs bitsandbytes, which cannot be imported here"):
        train(load_config({"data": sft_jsonl, "method": "qlora"}), base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "qlora", "ia3", "prompt_tuning", "full"])
def test_a_run_that_cannot_learn_is_refused(method: str, tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    # One step inside a linear warmup: its learning rate is 0, so the weights end where they began.
    config = load_config({"data": sft_jsonl, "method": method, "max_steps": 1, "warmup_steps": 5, "batch_size": 4,
                          "validation_split": 0.2, "logging_steps": 1})
    with pytest.raises(AdapterhubError, match=r"training changed none of the [\d,]+ trainable parameters: the learning rate was 0 "
                       r"at every logged step \(warmup_steps 5 outlasts the run\); nothing registered"):
        train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "final").exists()


def test_a_setfit_run_that_cannot_learn_is_refused(tmp_path: Path) -> None:
    from adapterhub.models import minilm_model_dir

    rows = [{"text": f"I loved the {w}", "label": "positive"} for w in ("film", "meal")]
    rows += [{"text": f"I hated the {w}", "label": "negative"} for w in ("film", "meal")]
    data = write_jsonl(tmp_path / "few.jsonl", rows)
    # SetFit warms up over its first 10% of steps: a one-step run's only step has learning rate 0.
    config = load_config({"data": data, "task": "setfit", "max_steps": 1, "batch_size": 4, "setfit_iterations": 1, "validation_split": 0})
    with pytest.raises(AdapterhubError, match=r"training changed none of the [\d,]+ trainable parameters: the learning rate was 0"):
        train(config, base_dir=minilm_model_dir(tmp_path / "encoders"), output_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "final").exists()


class _ZeroGradients(TrainerCallback):
    """Cuts every gradient on its way to the weights, as a kernel without a backward does."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.register_hook(torch.zeros_like)


def test_a_run_whose_gradients_are_all_zero_is_refused_with_that_cause(tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    config = load_config({"data": sft_jsonl, "method": "qlora", "max_steps": 2, "batch_size": 4, "validation_split": 0,
                          "logging_steps": 1, "learning_rate": 1e-2})
    with pytest.raises(AdapterhubError, match=r"every gradient was zero \(grad_norm 0 at every logged step\), as when "
                       "bitsandbytes has repacked the 4-bit weights for CPU inference"):
        train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False, callbacks=[_ZeroGradients()])
    assert not (tmp_path / "run" / "final").exists()


def test_training_lowers_the_loss(tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    # A random tiny base learns fastest through its output layer, so full fine-tuning shows the loop
    # really optimises; LoRA's learning is shown on SmolLM2 in test_train_quality.py.
    config = load_config({"data": sft_jsonl, "method": "full", "max_steps": 20, "batch_size": 8, "learning_rate": 3e-3,
                          "validation_split": 0, "logging_steps": 1})
    result = train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    losses = [loss for _, loss in result.metrics["train_loss_history"]]
    assert len(losses) == 20 and losses[-1] < 0.7 * losses[0], losses


def test_options_reach_the_trainer(tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    config = load_config({
        "data": sft_jsonl, "max_steps": 6, "batch_size": 2, "grad_accum": 2, "lr_scheduler": "cosine", "warmup_steps": 2,
        "optimizer": "adafactor", "gradient_checkpointing": True, "weight_decay": 0.1, "max_grad_norm": 0.5,
        "validation_split": 0, "logging_steps": 1, "learning_rate": 1e-3,
    })
    result = train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    rates = [rate for _, rate in result.metrics["learning_rate_history"]]
    assert result.metrics["global_step"] == 6 and len(rates) == 6
    assert result.config["precision"] == "fp32"  # CPU: full precision chosen from the hardware
    # Linear warmup over 2 steps to the peak, then a cosine decay towards zero.
    # (Each step logs the rate it used: 0 at the first warmup step.)
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3)
    assert rates[2] > rates[3] > rates[4] > rates[5] > 0


class _CollatorSpy(TrainerCallback):
    """Records which collator batches the training data."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seen.append(type(kwargs["train_dataloader"].collate_fn).__name__)


def test_truncation_is_counted_and_packing_reduces_steps(tiny_base: Path, tmp_path: Path) -> None:
    rows = [{"text": " ".join(["the quick brown fox jumps over the lazy dog"] * 6)} for _ in range(3)]
    rows += [{"text": "a short line"} for _ in range(13)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    common = {"data": path, "task": "causal_lm", "max_length": 32, "epochs": 1, "batch_size": 2, "validation_split": 0}
    plain = train(load_config(common), base_dir=tiny_base, output_dir=tmp_path / "plain", progress=False)
    assert plain.metrics["truncated_examples"] == 3
    assert plain.supervision is not None and plain.supervision["loss_on"] == "every token"  # causal LM: every token is a label
    assert plain.supervision["chat_template"] is False and plain.supervision["packing"] is False
    assert any("3 of 16 training examples exceed max_length 32" in note for note in plain.notes)
    collators = _CollatorSpy()
    packed = train(load_config({**common, "packing": True}), base_dir=tiny_base, output_dir=tmp_path / "packed", progress=False,
                   callbacks=[collators])
    assert plain.metrics["global_step"] == 8
    assert packed.metrics["global_step"] < plain.metrics["global_step"]
    assert packed.supervision is not None and packed.supervision["packing"] is True and packed.supervision["loss_on"] == "every token"
    assert collators.seen == ["PackedRowsCollator"]  # SDPA: packed rows stay rows


def test_padding_free_batches_train_exactly_like_padded_ones(tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    # Mixed lengths, one longer than max_length: the padded and the padding-free runs must see
    # the same truncated tokens and compute the same losses and updates (only the pads differ).
    rows = [json.loads(line) for line in sft_jsonl.read_text().splitlines()][:11]
    rows.append({"prompt": "reverse: " + " ".join(["fox dog cat"] * 20), "completion": "cat dog fox"})
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    common = {"data": path, "max_length": 40, "max_steps": 3, "batch_size": 4, "validation_split": 0,
              "learning_rate": 1e-2, "logging_steps": 1}
    padded = train(load_config({**common, "padding_free": False}), base_dir=tiny_base, output_dir=tmp_path / "padded", progress=False)
    flat = train(load_config(common), base_dir=tiny_base, output_dir=tmp_path / "flat", progress=False)
    assert flat.config["padding_free"] is True
    assert flat.metrics["tokens_seen"] == padded.metrics["tokens_seen"]
    assert flat.metrics["tokens_seen"] <= 40 * 12  # truncation applies without padding too
    losses = [[loss for _, loss in run.metrics["train_loss_history"]] for run in (padded, flat)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    weights = [load_file(run.output_path / "adapter_model.safetensors") for run in (padded, flat)]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-5)


def test_resume_ends_at_the_same_adapter(tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    values = {"data": sft_jsonl, "max_steps": 6, "save_steps": 2, "batch_size": 4, "learning_rate": 5e-3, "lora_dropout": 0.1,
              "validation_split": 0.2, "eval_steps": 3}
    config = load_config(values)
    straight = train(config, base_dir=tiny_base, output_dir=tmp_path / "straight", progress=False)

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(config, base_dir=tiny_base, output_dir=run_dir, progress=False, callbacks=[interrupt_after(4)])
    assert not (run_dir / "final").exists()
    assert (run_dir / "checkpoints" / "checkpoint-4").is_dir()
    with pytest.raises(ValidationError, match="learning_rate: was 0.005, now 0.001"):
        train(load_config({**values, "learning_rate": 1e-3}), base_dir=tiny_base, output_dir=run_dir, progress=False, resume=True)
    resumed = train(config, base_dir=tiny_base, output_dir=run_dir, progress=False, resume=True)
    assert resumed.metrics["resumed_from"] == "checkpoint-4"
    # The before-training numbers come from the first start, not from the resumed weights.
    assert resumed.metrics["initial_eval_loss"] == straight.metrics["initial_eval_loss"]
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], rel=1e-5)

    expected = load_file(straight.output_path / "adapter_model.safetensors")
    actual = load_file(resumed.output_path / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    initial_b = 0.0  # LoRA B starts at zero: a non-zero B proves the weights were trained
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
        if "lora_B" in key:
            assert expected[key].abs().max() > initial_b
    with pytest.raises(AdapterhubError, match="no complete checkpoint"):
        train(config, base_dir=tiny_base, output_dir=tmp_path / "fresh", progress=False, resume=True)


def test_early_stopping_stops_before_max_steps(tiny_base: Path, sft_jsonl: Path, tmp_path: Path) -> None:
    # A threshold no improvement can meet: every validation after the first counts as "no better".
    config = load_config({"data": sft_jsonl, "max_steps": 40, "batch_size": 4, "eval_steps": 2,
                          "early_stopping_patience": 2, "early_stopping_threshold": 100.0})
    result = train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    assert result.metrics["stopped_early"] is True
    assert result.metrics["global_step"] == 6  # validations at 2 (best), 4 and 6 (two without improvement)
    # The lineage says so: where it stopped, and which validation's weights were kept (the lowest loss).
    best_step, best_loss = min(result.metrics["eval_loss_history"][1:], key=lambda point: point[1])
    assert result.metrics["best_eval_loss"] == best_loss and result.metrics["best_step"] == best_step
    assert result.lineage_details()["early_stopping"] == {
        "patience": 2, "threshold": 100.0, "stopped_early": True, "stopped_at_step": 6, "max_steps": 40,
        "best_step": best_step, "best_eval_loss": best_loss,
    }
    # Patience never reached: the record says early stopping was on and did not end the run.
    config = load_config({"data": sft_jsonl, "max_steps": 4, "batch_size": 4, "eval_steps": 2, "early_stopping_patience": 5})
    ran = train(config, base_dir=tiny_base, output_dir=tmp_path / "full-run", progress=False)
    assert ran.metrics["stopped_early"] is False and ran.early_stopping is not None
    assert ran.early_stopping["stopped_at_step"] is None and ran.metrics["global_step"] == 4


@pytest.mark.parametrize("method", ["prefix_tuning", "full"])
def test_classification_with_other_methods_registers_and_scores(
    method: str, tiny_base: Path, classification_jsonl: Path, tmp_path: Path
) -> None:
    from adapterhub.eval import evaluate_model
    from adapterhub.registry import Registry

    config = load_config({"data": classification_jsonl, "task": "classification", "method": method, "max_steps": 2,
                          "batch_size": 4, "validation_split": 0})
    out = train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False).output_path
    registry = Registry.open(home=tmp_path / "home")
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    record = registry.put_adapter(name="cls", source_dir=out, base="tiny").record
    assert record.is_full_model == (method == "full")
    full = method == "full"
    report = evaluate_model(model_dir=out if full else tiny_base, adapter_dir=None if full else out, data=classification_jsonl,
                            tokenizer_dir=tiny_base)
    assert set(report.metrics) >= {"accuracy", "f1"}


def test_classification_with_a_head(tiny_base: Path, classification_jsonl: Path, tmp_path: Path) -> None:
    validation = write_jsonl(tmp_path / "val.jsonl", [{"text": "the film is great", "label": "positive"}, {"text": "the film is bad", "label": "negative"}])
    config = load_config({"data": classification_jsonl, "validation_data": validation, "task": "classification", "max_steps": 4,
                          "batch_size": 4, "learning_rate": 5e-3})
    result = train(config, base_dir=tiny_base, output_dir=tmp_path / "run", progress=False)
    assert result.metrics["labels"] == ["negative", "positive"]
    assert result.metrics["num_train_examples"] == 16 and result.metrics["num_validation_examples"] == 2
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0
    adapter_config = json.loads((result.output_path / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    tensors = load_file(result.output_path / "adapter_model.safetensors")
    assert any("score" in key for key in tensors)


def test_peak_memory_is_the_runs_own_not_its_parents(tmp_path: Path) -> None:
    """A run started from a big process (pytest, a benchmark driver) reports its own peak.

    getrusage's ru_maxrss survives fork + exec, so a child of a process that once held 1.5 GB
    reads at least 1.5 GB; `peak_resident_bytes` (VmHWM) does not carry it over.
    """
    import subprocess
    import sys

    from adapterhub.train.memory import peak_resident_bytes

    if not Path("/proc/self/status").is_file():
        pytest.skip("VmHWM is Linux's; elsewhere the peak is ru_maxrss")
    held = b"\x01" * (1536 * 2**20)  # written, so every page is resident (bytes(n) would stay untouched)
    assert peak_resident_bytes() >= len(held)
    child = subprocess.run(
        [sys.executable, "-c", "import resource; from adapterhub.train.memory import peak_resident_bytes; "
         "print(peak_resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    own, inherited = (int(value) for value in child.stdout.split()[-2:])
    del held
    assert inherited >= 1536 * 2**20  # what the old measurement reported
    assert 0 < own < 1536 * 2**20
