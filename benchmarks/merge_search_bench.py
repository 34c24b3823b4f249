"""`merge --search` on SmolLM2-135M: what a searched merge keeps of each task, beside fixed merges.

Two rank-16 LoRAs (q/k/v/o) are trained with `adapterhub train` on the demo's `reverse` and
`spell` tasks (cached in the work directory's registry, so reruns do not retrain). They are
merged with fixed recipes (linear, task arithmetic, ties, tsv at weight 1, as the demo does) and with
`adapterhub merge --search` scored on search rows (`adapterhub.demo.write_search_rows`: in
neither the training nor the held-out file). Everything — base, adapters, fixed merges, the
searched merge — is then scored by exact match on the held-out rows with one
`adapterhub.eval.TaskScorer` (the base loaded once), and each merge's retained gain per task,
(merged − base) / (adapter − base), is printed as a table with a line saying which merges keep
90% of each task's gain (or that none does) and what task arithmetic and TIES keep, and
written to JSON (with the search's wall time, seconds per trial and base loads) and a PNG.

Run:  .venv/bin/python benchmarks/merge_search_bench.py [--steps 40] [--trials 6] [--search-rows 8] [--heldout 20]
Writes benchmarks/results/merge_search_bench.json and merge_search_bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_WORK = Path("/tmp/adapterhub-merge-search-bench")
BASE = "smollm2"
TASKS = ("reverse", "spell")
FIXED = ("linear", "task_arithmetic", "ties", "tsv")
GOAL = 0.9  # the goal for two tasks: every task keeps ≥ 90% of its gain


def cli(*args: str, capture: bool = False) -> str:
    """One `adapterhub` command in a subprocess (its memory returns between stages)."""
    result = subprocess.run([sys.executable, "-m", "adapterhub.cli.main", *args], text=True,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    if result.returncode != 0:
        raise SystemExit(f"adapterhub {' '.join(args)} exited with {result.returncode}")
    return result.stdout or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--search-rows", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=20)
    args = parser.parse_args()
    os.environ["ADAPTERHUB_HOME"] = str(args.work / "home")

    from adapterhub.cli.common import open_registry
    from adapterhub.demo import gain_retention, plot_quality, retention_of, retention_verdict, write_search_rows, write_task_data
    from adapterhub.eval import TaskScorer
    from adapterhub.errors import AdapterhubError

    registry = open_registry()
    try:
        registry.get_base_model(BASE)
    except AdapterhubError:
        cli("models", "add", BASE)
    data = {task: write_task_data(task, args.work / "data", heldout_rows=args.heldout) for task in TASKS}
    search_files = {task: write_search_rows(task, args.work / "data", rows=args.search_rows, heldout_rows=args.heldout) for task in TASKS}
    adapters = {}
    for task, (train_file, _) in data.items():
        name = f"bench-{task}"
        try:
            adapters[task] = open_registry().get(name).ref
        except AdapterhubError:
            cli("train", "--base", BASE, "--data", str(train_file), "--name", name, "--method", "lora", "--lora-rank", "16",
                "--lora-alpha", "32", "--target-modules", "q_proj,k_proj,v_proj,o_proj", "--max-steps", str(args.steps),
                "--batch-size", "8", "--learning-rate", "2e-3")
            adapters[task] = open_registry().get(name).ref

    merges = {}
    for method in FIXED:
        name = f"bench-{method}"
        merge_args = ["merge", "--method", method, "--base", BASE, "--out", name, "--rank", "32"]
        for ref in adapters.values():
            merge_args += ["--adapter", f"{ref}=1.0,0.5" if method == "ties" else f"{ref}=1.0"]
        cli(*merge_args)
        merges[method] = open_registry().get(name).ref
    search_args = ["merge", "--search", "--trials", str(args.trials), "--eval-rows", str(args.search_rows),
                   "--max-new-tokens", "12", "--base", BASE, "--out", "bench-search", "--json"]
    for task, ref in adapters.items():
        search_args += ["--adapter", ref, "--eval", f"{search_files[task]}:{ref.split(':')[0]}"]
    started = time.perf_counter()
    searched = json.loads(cli(*search_args, capture=True))
    search_wall = time.perf_counter() - started
    merges["search"] = searched["ref"]

    registry = open_registry()
    scorer = TaskScorer(base_dir=Path(registry.get_base_model(BASE).path),
                        tasks={task: (heldout, None) for task, (_, heldout) in data.items()}, max_new_tokens=12)
    scores: dict[str, dict[str, float]] = {"base": scorer.score(None)}
    for label, ref in [*adapters.items(), *merges.items()]:
        scores[label] = scorer.score(registry.materialize(registry.get(ref)))
    retention = gain_retention(scores, base="base", adapter_for_task={t: t for t in TASKS}, merges=list(merges))

    search = searched["search"]
    print(f"{'model':<10}" + "".join(f"{t + ' EM':>12}" for t in TASKS) + "".join(f"{t + ' kept':>14}" for t in TASKS))
    for label, per_task in scores.items():
        kept = retention.get(label, {})
        print(f"{label:<10}" + "".join(f"{per_task[t]:>12.2f}" for t in TASKS)
              + "".join(f"{kept[t]:>14.0%}" if t in kept else f"{'':>14}" for t in TASKS))
    per_trial = search_wall / max(len(search["trials"]), 1)
    print(f"search: {len(search['trials'])} trials in {search_wall:.0f} s (≈{per_trial:.0f} s per trial, including "
          f"scoring the base and both adapters once), base loads {search['base_loads']}, best {search['trials'][search['best_trial']]['params']}")
    verdict = [retention_verdict(retention, threshold=GOAL), retention_of(retention, ["task_arithmetic", "ties"])]
    print("\n".join(line for line in verdict if line))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "merge_search_bench.json"
    payload: dict[str, Any] = {
        "base": BASE, "steps": args.steps, "heldout_rows": args.heldout, "search_rows": args.search_rows,
        "scores_heldout": scores, "retention_heldout": retention, "search_wall_s": round(search_wall, 1),
        "search_seconds_per_trial": round(per_trial, 1), "search": search, "goal": GOAL, "verdict": verdict,
    }
    out.write_text(json.dumps(payload, indent=2))
    png = plot_quality(retention, RESULTS / "merge_search_bench.png", metric="share of the task's gain kept",
                       title=f"2 LoRAs → 1 on SmolLM2: held-out gain kept per task (goal ≥ {GOAL:.0%})")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
