"""`adapterhub demo`: the main job, end to end, through the same commands a user types.

Each stage runs the real `adapterhub` CLI in a subprocess (so training and serving memory is
returned between stages, and the demo exercises exactly the user's path), then reads results
back from the registry. Stages: provision SmolLM2 → write two toy tasks → train a LoRA per
task → evaluate base vs adapters → merge them with several methods and one `merge --search`
(a few trials scored on rows kept apart from the held-out ones) → evaluate what each merge
keeps of each task → serve base + adapters + merges from one endpoint and query it with the
official `openai` client → write a report (Markdown tables + PNG plots).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from adapterhub.cli.common import console, open_registry
from adapterhub.errors import AdapterhubError

BASE = "smollm2"
MERGE_METHODS = ("linear", "ties", "dare_ties", "tsv", "iso_c")


def _cli(*args: str, capture: bool = False) -> str:
    """Run one `adapterhub` command; a failure stops the demo with that command's message."""
    command = [sys.executable, "-m", "adapterhub.cli.main", *args]
    console.print(f"[dim]$ adapterhub {' '.join(args)}[/]")
    result = subprocess.run(command, text=True, stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise AdapterhubError(f"demo stage failed: adapterhub {' '.join(args)} exited with {result.returncode}")
    return result.stdout or ""


def _latest_metric(ref: str, dataset_file: Path, metric: str, *, base_model: bool = False) -> float:
    registry = open_registry()
    evaluations = registry.get_base_model(ref).evaluations if base_model else registry.get(ref).evaluations
    matching = [e for e in evaluations if e.metric == metric and dataset_file.name in e.dataset]
    if not matching:
        raise AdapterhubError(f"no {metric} of {ref} on {dataset_file.name} was recorded")
    return matching[-1].value


def search_merge_args(
    adapters: Mapping[str, str], search_files: Mapping[str, Path], *, base: str, out: str, trials: int, rows: int,
    max_new_tokens: int = 12,
) -> list[str]:
    """The `adapterhub merge --search` command line of the demo's searched merge.

    Each adapter's task is scored on its own search file (rows in neither its training nor
    its held-out file, so the held-out figures stay unselected-on); `trials` × `rows` is kept
    small so the search adds about a minute to the demo on CPU.
    """
    args = ["merge", "--search", "--trials", str(trials), "--eval-rows", str(rows), "--max-new-tokens", str(max_new_tokens),
            "--base", base, "--out", out, "--tag", "demo"]
    for task, ref in adapters.items():
        args += ["--adapter", ref, "--eval", f"{search_files[task]}:{ref.split(':')[0]}"]
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_and_query(models: list[str], prompts: dict[str, list[dict[str, str]]], requests_per_model: int) -> dict[str, Any]:
    """Start `adapterhub serve`, query every model with the openai client, read /metrics, stop."""
    from openai import OpenAI

    port = _free_port()
    command = [sys.executable, "-m", "adapterhub.cli.main", "serve", "--base", BASE, "--port", str(port), "--max-resident", "4"]
    console.print(f"[dim]$ adapterhub {' '.join(command[3:])}[/]")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise AdapterhubError(f"the server exited: {server.stderr.read() if server.stderr else ''}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AdapterhubError("the server did not become healthy within 300 s")
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
        listed = [m.id for m in client.models.list().data]
        latencies: dict[str, list[float]] = {}
        answers: dict[str, list[tuple[str, str, str]]] = {}
        for model in models:
            task = "spell" if "spell" in model else "reverse"
            for row in prompts[task][:requests_per_model]:
                start = time.perf_counter()
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": row["prompt"]}], max_tokens=12, temperature=0,
                )
                latencies.setdefault(model, []).append(time.perf_counter() - start)
                answers.setdefault(model, []).append((row["prompt"], row["completion"], reply.choices[0].message.content or ""))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics_text = response.read().decode()
        rss = next((float(line.split()[-1]) for line in metrics_text.splitlines() if line.startswith("process_resident_memory_bytes")), None)
        return {"listed": listed, "latencies": latencies, "answers": answers, "rss_bytes": rss}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def demo(
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("reports/demo"),
    steps: Annotated[int, typer.Option(help="Training steps per adapter.")] = 40,
    heldout: Annotated[int, typer.Option(help="Held-out examples scored per task.")] = 30,
    requests_per_model: Annotated[int, typer.Option(help="Requests sent to each served model.")] = 4,
    search_trials: Annotated[int, typer.Option(help="Trials of the searched merge (merge --search).")] = 6,
    search_rows: Annotated[int, typer.Option(help="Rows per task each search trial is scored on (not the held-out rows).")] = 8,
) -> None:
    """Run the main job end to end and write a report (Markdown + PNG plots)."""
    from adapterhub.demo import (
        TASKS,
        gain_retention,
        markdown_table,
        plot_latency,
        plot_quality,
        retention_verdict,
        write_search_rows,
        write_task_data,
    )

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    console.rule("1. base model")
    _cli("models", "add", BASE)

    console.rule("2. data: two tasks the base model cannot do")
    data = {task: write_task_data(task, out / "data", heldout_rows=heldout) for task in TASKS}
    prompts = {task: [json.loads(line) for line in heldout_file.read_text().splitlines()] for task, (_, heldout_file) in data.items()}

    console.rule("3. train one LoRA adapter per task")
    adapters = {}
    for task, (train_file, _) in data.items():
        name = f"demo-{task}"
        _cli("train", "--base", BASE, "--data", str(train_file), "--name", name, "--method", "lora", "--lora-rank", "16",
             "--lora-alpha", "32", "--target-modules", "q_proj,k_proj,v_proj,o_proj", "--max-steps", str(steps),
             "--batch-size", "8", "--learning-rate", "2e-3", "--tag", "demo", "--overwrite")
        adapters[task] = open_registry().get(name).ref

    console.rule("4. merge the two adapters")
    merges = {}
    for method in MERGE_METHODS:
        name = f"demo-merge-{method.replace('_', '-')}"
        args = ["merge", "--method", method, "--base", BASE, "--out", name, "--tag", "demo", "--rank", "32"]
        for ref in adapters.values():
            args += ["--adapter", f"{ref}=1.0,0.5" if method in ("ties", "dare_ties") else f"{ref}=1.0"]
        _cli(*args)
        merges[method] = open_registry().get(name).ref
    search_files = {task: write_search_rows(task, out / "data", rows=search_rows, heldout_rows=heldout) for task in TASKS}
    _cli(*search_merge_args(adapters, search_files, base=BASE, out="demo-merge-search", trials=search_trials, rows=search_rows))
    merges["search"] = open_registry().get("demo-merge-search").ref

    console.rule("5. evaluate base, adapters and merges on both tasks")
    scores: dict[str, dict[str, float]] = {BASE: {}}
    evaluated = [*adapters.values(), *merges.values()]
    for task, (_, heldout_file) in data.items():
        # One process per task: the base loads once, each adapter is attached and detached in turn.
        _cli("eval", *evaluated, "--compare", "--data", str(heldout_file), "--metrics", "exact_match", "--max-new-tokens", "12")
        scores[BASE][task] = _latest_metric(BASE, heldout_file, "exact_match", base_model=True)
        for ref in evaluated:
            scores.setdefault(ref.split(":")[0], {})[task] = _latest_metric(ref, heldout_file, "exact_match")

    console.rule("6. serve everything from one endpoint")
    served_models = [BASE, *(r.split(":")[0] for r in adapters.values()), *(r.split(":")[0] for r in merges.values())]
    served = _serve_and_query(served_models, prompts, requests_per_model)

    console.rule("7. report")
    quality_png = plot_quality(scores, out / "quality.png")
    latency_png = plot_latency(served["latencies"], out / "latency.png")
    quality_rows = [[model, *(f"{100 * per_task[t]:.0f}%" for t in TASKS)] for model, per_task in scores.items()]
    retention = gain_retention(
        scores, base=BASE, adapter_for_task={t: ref.split(":")[0] for t, ref in adapters.items()},
        merges=[ref.split(":")[0] for ref in merges.values()],
    )
    retention_png = plot_quality(retention, out / "retention.png", metric="share of the adapter's gain kept", title="What each merge keeps of each task")
    retention_rows = [[merge, *(f"{100 * per_task[t]:.0f}%" if t in per_task else "-" for t in TASKS)] for merge, per_task in retention.items()]
    latency_rows = [
        [model, len(times), f"{1000 * sorted(times)[len(times) // 2]:.0f}", f"{1000 * max(times):.0f}"]
        for model, times in served["latencies"].items()
    ]
    sample_rows = [[m, p, e, repr(a)] for m, rows in served["answers"].items() for p, e, a in rows[:1]]
    rss = served["rss_bytes"]
    report = "\n\n".join([
        "# adapterhub demo report",
        f"Base model: SmolLM2-135M-Instruct (`{BASE}`). Adapters: LoRA r=16 on q/k/v/o, {steps} steps each. "
        f"Merges: {', '.join(MERGE_METHODS)} of the two adapters (LoRA output, rank 32), and `demo-merge-search`: "
        f"`merge --search`, {search_trials} trials over method, weights and densities, each scored on {search_rows} rows per task "
        f"that are in neither the training nor the held-out file (the trial table is in its lineage: `adapterhub show demo-merge-search`). Wall time {time.perf_counter() - started:.0f} s.",
        "## Exact match on held-out examples", markdown_table(["model", *TASKS], quality_rows), f"![quality]({quality_png.name})",
        "## Share of each adapter's gain each merge keeps, (merged − base) / (adapter − base)",
        markdown_table(["merge", *TASKS], retention_rows), retention_verdict(retention), f"![retention]({retention_png.name})",
        "## Serving (one endpoint, OpenAI client)",
        f"Models listed by `/v1/models`: {', '.join(served['listed'])}. Server RSS after the run: "
        + (f"{rss / 2**20:.0f} MiB." if rss else "n/a."),
        markdown_table(["model", "requests", "median ms", "max ms"], latency_rows), f"![latency]({latency_png.name})",
        "## One answer per model", markdown_table(["model", "prompt", "expected", "answer"], sample_rows),
    ])
    (out / "report.md").write_text(report + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"scores": scores, "retention": retention, "latencies": served["latencies"], "rss_bytes": rss}, indent=2))
    console.print(report)
    console.print(f"\n[bold green]report written to {out / 'report.md'}[/]")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)

