"""`adapterhub extract`: a registered full model's task vector as a registered LoRA.

    adapterhub extract my-finetune:2 --energy 0.95 --out my-finetune-lora
    adapterhub extract merged-full --rank 64 --out merged-lora --json

The full model (a full fine-tune imported into the registry, or a merge written with
`--full-model --out`) must be on a registered base; its difference from that base is
factored per module by truncated SVD (`--rank R`, or per module the smallest rank keeping
`--energy E` of the squared singular values; 0.99 when neither is given). The new adapter is
registered with lineage kind `extracted`: its parent, the rank chosen and the relative error
of every module, and the weights a LoRA cannot express (norms, biases), which are reported.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from adapterhub.cli.common import JsonOption, console, err_console, open_registry, print_json
from adapterhub.errors import AdapterhubError, ValidationError
from adapterhub.names import name_problems


def extract_command(
    model: Annotated[str, typer.Argument(help="Registry reference of a full model (NAME, NAME:VERSION).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Register the extracted LoRA under this name.")],
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", min=1, help="One rank for every module.")] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", help="Per module, the smallest rank keeping this share of the squared singular values (default 0.99).")] = None,
    tags: Annotated[Optional[list[str]], typer.Option("--tag", "-t", help="Tag for the registered adapter (repeatable).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Extract a full model's difference from its base as a LoRA adapter (truncated SVD per module)."""
    from adapterhub.merge import extract_lora
    from adapterhub.registry import Lineage

    problems = [f"--out: {p}" for p in name_problems(out)]
    for tag in tags or ():
        problems.extend(f"--tag: {p}" for p in name_problems(tag))
    if rank is not None and energy is not None:
        problems.append("give --rank or --energy, not both")
    if energy is not None and not 0 < energy <= 1:
        problems.append(f"--energy must be in (0, 1], got {energy}")
    if problems:
        raise ValidationError("extract", problems)

    registry = open_registry()
    record = registry.get(model)
    if not record.is_full_model:
        raise AdapterhubError(f"{record.ref} is an adapter ({record.peft_type}), not a full model: extraction needs a full model")
    base_record = registry.get_base_model(record.base_fingerprint, prefix=False)
    model_dir = registry.materialize(record)

    with tempfile.TemporaryDirectory(prefix="adapterhub-extract-") as scratch:
        out_dir = Path(scratch) / "extracted"
        with err_console.status(f"extracting {record.ref} …") as status:
            def progress(done: int, total: int, name: str) -> None:
                status.update(f"extracting {record.ref}: {done}/{total} {name}")

            result = extract_lora(model_dir, base_dir=Path(base_record.path), out_dir=out_dir, rank=rank, energy=energy, progress=progress)
        details = result.lineage_details() | {"operation": "extract", "source": record.ref}
        details["recipe"] = dict(details["recipe"]) | {"models": [{"model": record.ref}], "base_model": base_record.name}
        lineage = Lineage(kind="extracted", parents=(record.ref,), details=details)
        registered = registry.put_adapter(
            name=out, source_dir=out_dir, base=base_record.name, tags=tuple(tags or ()), lineage=lineage,
        ).record

    payload = {
        "ref": registered.ref,
        "source": record.ref,
        "base": base_record.name,
        "rank": result.rank,
        "module_ranks": dict(result.module_ranks),
        "module_errors": dict(result.module_errors),
        "max_relative_error": result.max_relative_error,
        "dropped": dict(result.dropped),
        "warnings": list(result.warnings),
        "wall_seconds": round(result.wall_seconds, 3),
    }
    if json_output:
        for warning in result.warnings:
            err_console.print(f"[yellow]warning: {warning}[/]")
        print_json(payload)
        return
    console.print(
        f"extracted {record.ref} → [bold]{registered.ref}[/] (LoRA rank {result.rank}, relative error max "
        f"{result.max_relative_error:.4f} over {len(result.module_errors)} modules, {result.wall_seconds:.1f} s)"
    )
    worst = sorted(result.module_errors.items(), key=lambda item: -item[1])[:5]
    for module, error in worst:
        console.print(f"  {module}: rank {result.module_ranks[module]}, relative error {error:.4f}")
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning}[/]")
    if result.dropped:
        console.print(f"[yellow]not expressible as LoRA and left out: {', '.join(result.dropped)}[/]")


def register(app: typer.Typer) -> None:
    """Add `extract` to `app`."""
    app.command("extract")(extract_command)
