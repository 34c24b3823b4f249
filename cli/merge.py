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
    eval_file: Annotated[Optional[Path], typer.Option("--eval", help="Evaluate the result and its parents on this file and store the figures.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Merge adapters or fine-tuned models on one base into a new LoRA or a full model."""
    from adapterhub.merge import MergeRecipe, merge
    from adapterhub.registry import Lineage

    problems: list[str] = []
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
