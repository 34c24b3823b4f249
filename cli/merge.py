"""`adapterhub merge`: merge registered adapters (or fine-tuned models) into a new one.

Two ways to say what to merge:

    adapterhub merge RECIPE.yml [--out NAME] [--rank R | --energy E] [--full-model DIR]
    adapterhub merge --method ties --adapter math:2=0.6,0.5 --adapter chat=0.4 --out both

`--adapter REF[=WEIGHT[,DENSITY]]`: a registry reference (`name`, `name:version`,
`name@sha`), then optionally `=` and the weight, then optionally `,` and the density. Names
never hold `=` or `,`, so the syntax is unambiguous even though a REF may hold ':'.
Global parameters go in `--param KEY=VALUE` (lambda, normalize, rescale, t, consensus,
epsilon, gamma, density, weight) and `--seed`.

This module owns no merge logic: it resolves references to directories through the
registry, checks every input shares one base (by fingerprint) and is of a kind that merges
(`adapterhub.kinds.merge_problems`, read from the record), runs `adapterhub.merge.merge`
and registers the output with `Lineage(kind="merged")`: parents as `name:version`, details
with the recipe (refs resolved to versions), the method and the per-module error report.
Every input problem is reported in one error before anything is merged or registered.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from adapterhub.cli.common import JsonOption, console, err_console, open_registry, print_json
from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.kinds import merge_problems
from adapterhub.names import name_problems

_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_adapter_option(text: str) -> tuple[str, dict[str, float]]:
    """`REF[=WEIGHT[,DENSITY]]` → (ref, parameters); a malformed value is a user error."""
    ref, _, values = text.partition("=")
    ref = ref.strip()
    if not ref:
        raise AdapterhubError(f"--adapter {text!r}: give a reference before '='")
    parameters: dict[str, float] = {}
    if values:
        parts = values.split(",")
        if len(parts) > 2:
            raise AdapterhubError(f"--adapter {text!r}: expected REF=WEIGHT[,DENSITY]")
        for key, raw in zip(("weight", "density"), parts):
            try:
                parameters[key] = float(raw)
            except ValueError:
                raise AdapterhubError(f"--adapter {text!r}: {key} {raw!r} is not a number") from None
    return ref, parameters


def parse_param_option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE a number, a boolean word or a string (consensus)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise AdapterhubError(f"--param {text!r}: expected KEY=VALUE")
    raw = raw.strip()
    value: Any
    if raw.lower() in _BOOL_WORDS and key.strip() in ("normalize", "rescale", "int8_mask"):
        value = _BOOL_WORDS[raw.lower()]
    else:
        try:
            value = int(raw) if key.strip() == "seed" else float(raw)
        except ValueError:
            value = raw
    return key.strip(), value


def _recipe_data(
    recipe_file: Path | None, method: str | None, base: str | None, adapters: list[str], params: list[str], seed: int | None,
) -> dict[str, Any]:
    if recipe_file is not None:
        if method or adapters or params:
            raise AdapterhubError("give either a RECIPE file or --method/--adapter/--param, not both")
        import yaml

        try:
            data = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AdapterhubError(f"recipe {recipe_file} does not exist") from None
        except yaml.YAMLError as exc:
            raise AdapterhubError(f"recipe {recipe_file} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise AdapterhubError(f"recipe {recipe_file} is not a mapping with merge_method and models")
        data = dict(data)
        if base is not None:
            data["base_model"] = base
    else:
        if not method:
            raise AdapterhubError("give a RECIPE file, or --method and at least one --adapter")
        models = []
        for text in adapters:
            ref, parameters = parse_adapter_option(text)
            models.append({"model": ref, "parameters": parameters} if parameters else {"model": ref})
        data = {"merge_method": method, "models": models, "parameters": dict(parse_param_option(p) for p in params)}
        if base is not None:
            data["base_model"] = base
    if seed is not None:
        data["parameters"] = dict(data.get("parameters") or {}) | {"seed": seed}
    return data


def merge_command(
    recipe_file: Annotated[Optional[Path], typer.Argument(metavar="RECIPE", help="A mergekit-style YAML recipe (models are registry refs).")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Merge method: linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, breadcrumbs, della, slerp, tsv, iso_c, iso_cts, knots, model_stock, nuslerp, ... (docs/merging.md)")] = None,
    base: Annotated[Optional[str], typer.Option("--base", "-b", help="Registered base model (default: the inputs' base).")] = None,
    adapters: Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="REF[=WEIGHT[,DENSITY]], repeatable, e.g. math:2=0.6,0.5")] = None,
    params: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Global parameter KEY=VALUE (lambda, normalize, rescale, t, consensus, epsilon, gamma, density, weight).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the random methods (DARE, DELLA).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Register the result under this name.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", min=1, help="LoRA output rank (SVD when the merge is not an exact rank concatenation); default: per module, the smallest rank keeping --energy 0.99.")] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", help="LoRA output: smallest rank per module keeping this share of the squared singular values (default 0.99 unless --rank).")] = None,
    full_model: Annotated[Optional[Path], typer.Option("--full-model", help="Write base + merged delta as a full model to DIR (registered too with --out).")] = None,
    tags: Annotated[Optional[list[str]], typer.Option("--tag", "-t", help="Tag for the registered result (repeatable).")] = None,
    eval_specs: Annotated[Optional[list[str]], typer.Option("--eval", help="Evaluate the result and its parents on this file and store the figures; with --search, FILE[:TASK] once per input adapter (TASK names the input whose task the file holds).")] = None,
    search: Annotated[bool, typer.Option("--search", help="Find the method, weights and densities by scoring merges on each task's --eval rows (worst task's retained gain).")] = False,
    trials: Annotated[int, typer.Option("--trials", help="--search: number of merges tried.")] = 12,
    eval_rows: Annotated[int, typer.Option("--eval-rows", help="--search: held-out rows scored per task and trial (the first N of each file).")] = 16,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="--search: tokens generated per scored row (cover the longest answer).")] = 32,
    json_output: JsonOption = False,
) -> None:
    """Merge adapters or fine-tuned models on one base into a new LoRA or a full model."""
    from adapterhub.merge import MergeRecipe, merge
    from adapterhub.registry import Lineage

    if search:
        _search_command(
            method=method, base=base, adapters=list(adapters or ()), recipe_file=recipe_file, params=list(params or ()),
            seed=seed, out=out, rank=rank, energy=energy, full_model=full_model, tags=list(tags or ()),
            eval_specs=list(eval_specs or ()), trials=trials, eval_rows=eval_rows, max_new_tokens=max_new_tokens,
            json_output=json_output,
        )
        return
    problems: list[str] = []
    if len(eval_specs or ()) > 1:
        problems.append("--eval: give one file (several, one per task, only with --search)")
    eval_file = Path(eval_specs[0]) if eval_specs else None
    if out is None and full_model is None:
        problems.append("give --out NAME (register the result) and/or --full-model DIR")
    if out is not None:
        problems.extend(f"--out: {p}" for p in name_problems(out))
    for tag in tags or ():
        problems.extend(f"--tag: {p}" for p in name_problems(tag))
    if eval_file is not None and not eval_file.is_file():
        problems.append(f"--eval: {eval_file} is not a file")
    if eval_file is not None and out is None:
        problems.append("--eval stores figures in the registry: give --out too")
    if problems:
        raise ValidationError("merge", problems)

    data = _recipe_data(recipe_file, method, base, list(adapters or ()), list(params or ()), seed)
    source = f"merge recipe {recipe_file}" if recipe_file else "merge options"
    recipe = MergeRecipe.from_dict(data, source=source)

    registry = open_registry()
    records, base_record = _resolve_inputs(registry, recipe)
    # Lineage and the stored recipe name exact versions, whatever the user typed.
    resolved = recipe.to_json()
    refs = {entry.model: record.ref for entry, record in zip(recipe.inputs, records)}
    resolved["models"] = [m | {"model": refs.get(m["model"], m["model"])} for m in resolved["models"] if m["model"] in refs]
    resolved["base_model"] = base_record.name
    recipe = MergeRecipe.from_dict(resolved, source=source)
    input_dirs = {record.ref: registry.materialize(record) for record in records}

    with tempfile.TemporaryDirectory(prefix="adapterhub-merge-") as scratch:
        out_dir = full_model if full_model is not None else Path(scratch) / "merged"
        with err_console.status(f"merging {len(records)} inputs with {recipe.merge_method} …") as status:
            def progress(done: int, total: int, name: str) -> None:
                status.update(f"merging with {recipe.merge_method}: {done}/{total} {name}")

            result = merge(
                recipe, out_dir=out_dir, base_dir=Path(base_record.path), input_dirs=input_dirs,
                full_model=full_model is not None, rank=rank, energy=energy, progress=progress,
            )
        registered = None
        if out is not None:
            lineage = Lineage(kind="merged", parents=tuple(r.ref for r in records), details=result.lineage_details())
            registered = registry.put_adapter(
                name=out, source_dir=out_dir, base=base_record.name, tags=tuple(tags or ()), lineage=lineage,
            ).record

    evaluations = _evaluate(registry, registered, records, base_record, eval_file) if eval_file and registered else {}
    payload = {
        "ref": registered.ref if registered else None,
        "output": result.output,
        "full_model_dir": str(full_model) if full_model else None,
        "method": result.method,
        "parents": [r.ref for r in records],
        "base": base_record.name,
        "exact": result.exact,
        "rank": result.rank,
        "max_relative_error": result.max_relative_error,
        "mean_relative_error": result.error_report()["mean_relative_error"],
        "dropped": dict(result.dropped),
        "module_ranks": dict(result.module_ranks),
        "warnings": list(result.warnings),
        "modules_merged": result.modules_merged,
        "wall_seconds": round(result.wall_seconds, 3),
        "evaluations": evaluations,
    }
    if json_output:
        for warning in result.warnings:
            err_console.print(f"[yellow]warning: {warning}[/]")
        print_json(payload)
        return
    _print_summary(payload)


def _search_command(
    *, method: str | None, base: str | None, adapters: list[str], recipe_file: Path | None, params: list[str],
    seed: int | None, out: str | None, rank: int | None, energy: float | None, full_model: Path | None,
    tags: list[str], eval_specs: list[str], trials: int, eval_rows: int, max_new_tokens: int, json_output: bool,
) -> None:
    """`merge --search`: score candidate merges on each task's rows, register the best with every trial.

    Why here and not in the core: the search (`adapterhub.merge.search`) only sees a scorer
    callable; this wires it to `adapterhub.eval.TaskScorer`, which loads the base once and
    attaches each trial's LoRA to it, and to the registry for inputs and the result. Every
    check runs before any model loads, and nothing is registered unless the search finished.
    """
    from adapterhub.eval import TaskScorer
    from adapterhub.merge import MergeRecipe, merge
    from adapterhub.merge.methods import get_method
    from adapterhub.merge.search import DEFAULT_SEARCH_METHODS, search_merge
    from adapterhub.registry import Lineage

    problems: list[str] = []
    if out is None:
        problems.append("--search registers the best merge: give --out NAME")
    else:
        problems.extend(f"--out: {p}" for p in name_problems(out))
    for tag in tags:
        problems.extend(f"--tag: {p}" for p in name_problems(tag))
    if recipe_file is not None or params:
        problems.append("--search chooses the recipe: give the inputs as --adapter REF, without a RECIPE file or --param")
    if trials < 1:
        problems.append(f"--trials must be at least 1, got {trials}")
    if eval_rows < 1:
        problems.append(f"--eval-rows must be at least 1, got {eval_rows}")
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if len(adapters) < 2:
        problems.append(f"--search merges at least two --adapter inputs, got {len(adapters)}")
    refs = []
    for text in adapters:
        ref, parameters = parse_adapter_option(text)
        if parameters:
            problems.append(f"--adapter {text}: --search chooses weights and densities; give the reference alone")
        refs.append(ref)
    methods = [m.strip() for m in method.split(",") if m.strip()] if method else list(DEFAULT_SEARCH_METHODS)
    if not methods:
        problems.append(f"--method {method!r}: name at least one method to search over, comma-separated")
    for name in methods:  # checked here, before any model loads, not at the first trial
        try:
            chosen = get_method(name)
        except AdapterhubError as exc:
            problems.append(f"--method: {exc}")
            continue
        if len(adapters) < chosen.min_inputs or (chosen.max_inputs is not None and len(adapters) > chosen.max_inputs):
            problems.append(f"--method: {name} cannot merge {len(adapters)} inputs")
    if not eval_specs:
        problems.append("--search scores each trial on held-out rows: give --eval FILE[:TASK] once per input adapter")
    if problems:
        raise ValidationError("merge --search", problems)

    data: dict[str, Any] = {"merge_method": methods[0], "models": [{"model": ref} for ref in refs]}
    if base is not None:
        data["base_model"] = base
    registry = open_registry()
    records, base_record = _resolve_inputs(registry, MergeRecipe.from_dict(data, source="merge options"))
    full = [r.ref for r in records if r.is_full_model]
    if full:
        raise ValidationError("merge --search", [f"{ref} is a full model: --search merges LoRA adapters" for ref in full])
    tasks, adapter_for_task = _eval_tasks(eval_specs, records, refs)
    scorer = TaskScorer(base_dir=Path(base_record.path), tasks=tasks, max_examples=eval_rows, max_new_tokens=max_new_tokens)
    input_dirs = {record.ref: registry.materialize(record) for record in records}

    with err_console.status("scoring the base and each adapter on its task …") as status:
        base_scores = scorer.score(None)
        single_scores = {task: scorer.score(input_dirs[ref], tasks=[task])[task] for task, ref in adapter_for_task.items()}

        def score(adapter_dir: Path) -> dict[str, float]:
            status.update(f"merge search: trial {scorer.calls - len(single_scores)}/{trials} …")
            return scorer.score(adapter_dir)

        found = search_merge(
            [r.ref for r in records], base_dir=Path(base_record.path), input_dirs=input_dirs, score=score,
            base_scores=base_scores, single_scores=single_scores, trials=trials, methods=methods,
            seed=seed if seed is not None else 0, energy=energy, task_inputs=adapter_for_task,
        )
    best_recipe = MergeRecipe.from_dict(found.best_recipe.to_json() | {"base_model": base_record.name}, source="merge search")
    search_details = {
        "objective": "min over tasks of (merged - base) / (adapter - base)",
        "methods": methods,
        "trials_requested": trials,
        "max_new_tokens": max_new_tokens,
        "seed": seed if seed is not None else 0,
        "tasks": {task: info | {"adapter": adapter_for_task[task]} for task, info in scorer.dataset_info().items()},
        "base_scores": base_scores,
        "adapter_scores": single_scores,
        "best_trial": found.best_trial,
        "best_objective": found.best_objective,
        "best_retention": dict(found.best_retention),
        "trials": [dict(row) for row in found.trials],
        "base_loads": scorer.base_loads,
        "models_scored": scorer.calls,
    }
    with tempfile.TemporaryDirectory(prefix="adapterhub-merge-") as scratch:
        out_dir = full_model if full_model is not None else Path(scratch) / "merged"
        result = merge(best_recipe, out_dir=out_dir, base_dir=Path(base_record.path), input_dirs=input_dirs,
                       full_model=full_model is not None, rank=rank, energy=energy)
        details = dict(result.lineage_details()) | {"search": search_details}
        lineage = Lineage(kind="merged", parents=tuple(r.ref for r in records), details=details)
        assert out is not None
        registered = registry.put_adapter(name=out, source_dir=out_dir, base=base_record.name, tags=tuple(tags), lineage=lineage).record
    payload = {
        "ref": registered.ref, "output": result.output, "full_model_dir": str(full_model) if full_model else None,
        "method": result.method, "parents": [r.ref for r in records], "base": base_record.name, "exact": result.exact,
        "rank": result.rank, "max_relative_error": result.max_relative_error,
        "mean_relative_error": result.error_report()["mean_relative_error"], "dropped": dict(result.dropped),
        "module_ranks": dict(result.module_ranks), "warnings": list(result.warnings),
        "modules_merged": result.modules_merged, "wall_seconds": round(result.wall_seconds, 3), "evaluations": {},
        "recipe": best_recipe.to_json(), "search": search_details,
    }
    if json_output:
        print_json(payload)
        return
    _print_search(search_details)
    _print_summary(payload)


def _eval_tasks(
    specs: list[str], records: list[Any], typed_refs: list[str]
) -> tuple[dict[str, tuple[Path, Any]], dict[str, str]]:
    """`FILE[:TASK]` options → ({task: (file, rows of that task)}, {task: adapter ref}).

    TASK names the input whose task the file holds (its name, its ref, or the reference as
    typed); without it the files pair with the inputs in order. When a file's rows carry a
    `task` field, only the rows whose task is the input's name are scored, so one mixed file
    can serve every input.
    """
    from adapterhub.datafiles import read_data_file
    from adapterhub.eval import RowSubset

    lookup: dict[str, Any] = {}
    for typed, record in zip(typed_refs, records):
        for key in (typed, record.ref, record.name):
            lookup.setdefault(key, record)
    problems: list[str] = []
    if len(specs) != len(records):
        problems.append(f"--search needs one --eval FILE[:TASK] per input adapter ({len(records)}), got {len(specs)}")
    tasks: dict[str, tuple[Path, Any]] = {}
    adapter_for_task: dict[str, str] = {}
    for position, text in enumerate(specs):
        path_text, task = text, None
        if not Path(text).is_file() and ":" in text:
            path_text, _, task = text.rpartition(":")
        path = Path(path_text)
        if task is not None:
            record = lookup.get(task)
            if record is None:
                problems.append(f"--eval {text}: unknown task {task!r}: name one of the inputs ({', '.join(r.name for r in records)})")
                continue
        elif position < len(records):
            record = records[position]
        else:
            continue
        label = record.name
        if label in adapter_for_task:
            problems.append(f"--eval {text}: task {label} already has an eval file")
            continue
        if not path.is_file():
            problems.append(f"--eval {text}: {path} is not a file")
            continue
        try:
            rows = [row for row in read_data_file(path) if row.problem is None]
        except AdapterhubError as exc:
            problems.append(f"--eval {text}: {exc}")
            continue
        subset = None
        if any("task" in row.values for row in rows):
            indices = frozenset(i for i, row in enumerate(rows) if str(row.values.get("task")) == label)
            if not indices:
                present = sorted({str(row.values.get("task")) for row in rows})
                problems.append(f"--eval {text}: {path.name} has no rows of task {label!r} (its rows' task field holds {', '.join(present)})")
                continue
            subset = RowSubset(name=f"task {label}", indices=indices)
        elif not rows:
            problems.append(f"--eval {text}: {path.name} holds no rows")
            continue
        tasks[label] = (path, subset)
        adapter_for_task[label] = record.ref
    for record in records:
        if record.name not in adapter_for_task and not problems:
            problems.append(f"no --eval file for input {record.ref}")
    if problems:
        raise ValidationError("merge --search", problems)
    return tasks, adapter_for_task


def _print_search(search: dict[str, Any]) -> None:
    """The trial table (best marked), then the base's and each adapter's score per task."""
    tasks = list(search["tasks"])
    table = Table("TRIAL", "METHOD", "WEIGHTS", "DENSITIES", *[t.upper() for t in tasks], "WORST KEPT",
                  title=f"merge search: {len(search['trials'])} trials, objective = worst task's retained gain")
    for row in search["trials"]:
        params = row["params"]
        weights = ", ".join(f"{v:.2f}" for k, v in sorted(params.items()) if k.startswith("weight_"))
        densities = ", ".join(f"{v:.2f}" for k, v in sorted(params.items()) if k.startswith("density_")) or "-"
        best = row["trial"] == search["best_trial"]
        cells = [str(row["trial"]) + (" *" if best else ""), params["method"], weights, densities,
                 *[f"{row['scores'][t]:.3f}" for t in tasks], f"{row['objective']:.0%}"]
        table.add_row(*cells, style="bold green" if best else None)
    console.print(table)
    base = ", ".join(f"{t} {search['base_scores'][t]:.3f}" for t in tasks)
    single = ", ".join(f"{t} {search['adapter_scores'][t]:.3f}" for t in tasks)
    console.print(f"base: {base}; each adapter on its task: {single}")
    kept = ", ".join(f"{t} {v:.0%}" for t, v in search["best_retention"].items())
    console.print(f"best trial {search['best_trial']} keeps {kept} of each task's gain")


def _resolve_inputs(registry: Any, recipe: Any) -> tuple[list[Any], Any]:
    """Records of every input and the base record; one error naming every problem."""
    problems: list[str] = []
    records = []
    for entry in recipe.inputs:
        try:
            record = registry.get(entry.model)
        except AdapterhubError as exc:
            problems.append(str(exc))
            continue
        # The kinds table's refusals, from the record alone: nothing is materialized for an input that cannot merge.
        problems.extend(merge_problems(record.adapter_kind, record.config, ref=record.ref))
        records.append(record)
    base_record = None
    base_name = recipe.base_model or (records[0].base_name if records else None)
    if base_name is not None:
        try:
            base_record = registry.get_base_model(base_name)
        except AdapterhubError as exc:
            problems.append(str(exc))
    if base_record is not None:
        for record in records:
            if record.base_fingerprint != base_record.fingerprint:
                problems.append(
                    f"{record.ref} is on base model {record.base_name!r}, not {base_record.name!r}: all inputs must share one base"
                )
    if problems:
        raise ValidationError("merge", problems)
    assert base_record is not None
    return records, base_record


def _evaluate(registry: Any, registered: Any, parents: list[Any], base_record: Any, data: Path) -> dict[str, dict[str, float]]:
    """Score the result and each parent on `data`; every figure is stored in the registry."""
    from adapterhub.eval import evaluate_model

    figures: dict[str, dict[str, float]] = {}
    base_dir = Path(base_record.path)
    for record in [registered, *parents]:
        materialized = registry.materialize(record)
        model_dir, adapter_dir = (materialized, None) if record.is_full_model else (base_dir, materialized)
        with err_console.status(f"evaluating {record.ref} on {data.name} …"):
            report = evaluate_model(model_dir=model_dir, adapter_dir=adapter_dir, data=data)
        for metric, value in report.metrics.items():
            details = dict(report.details) | {"after_merge": registered.ref}
            registry.record_evaluation(record.ref, metric=metric, value=value, dataset=report.dataset.label, details=details)
        figures[record.ref] = dict(report.metrics)
    return figures


def _print_summary(payload: dict[str, Any]) -> None:
    where = payload["ref"] or payload["full_model_dir"]
    if payload["output"] == "full":
        fidelity = "full model (base + merged delta)"
    elif payload["exact"]:
        fidelity = f"exact LoRA (rank {payload['rank']}, rank concatenation)"
    else:
        fidelity = (
            f"LoRA rank {payload['rank']} by SVD: relative error max {payload['max_relative_error']:.4f}, "
            f"mean {payload['mean_relative_error']:.4f}"
        )
    console.print(f"merged {', '.join(payload['parents'])} with {payload['method']} → [bold]{where}[/] ({fidelity}, {payload['wall_seconds']:.1f} s)")
    if payload["full_model_dir"] and payload["ref"]:
        console.print(f"full model written to {payload['full_model_dir']} and registered as {payload['ref']}")
    if payload["output"] == "lora" and not payload["exact"] and payload["module_ranks"]:
        ranks = sorted(payload["module_ranks"].values())
        console.print(f"rank per module: min {ranks[0]}, median {ranks[len(ranks) // 2]}, max {ranks[-1]} (all in the lineage)")
    for warning in payload["warnings"]:
        console.print(f"[yellow]warning: {warning}[/]")
    if payload["dropped"]:
        console.print(f"[yellow]not expressible as LoRA and left out: {', '.join(payload['dropped'])}[/]")
    if payload["evaluations"]:
        metrics = sorted({m for figures in payload["evaluations"].values() for m in figures})
        table = Table("MODEL", *[m.upper() for m in metrics], title="evaluation")
        for ref, figures in payload["evaluations"].items():
            table.add_row(ref, *[f"{figures[m]:.4f}" if m in figures else "-" for m in metrics])
        console.print(table)


def register(app: typer.Typer) -> None:
    """Add `merge` to `app`."""
    app.command("merge")(merge_command)
