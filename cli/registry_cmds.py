"""`adapterhub import|list|show|rm|tag|export|gc`: the adapter registry from the shell."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from adapterhub.cli.common import JsonOption, console, human_bytes, open_registry, print_json
from adapterhub.errors import AdapterhubError
from adapterhub.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapterhub.registry import AdapterRecord, Lineage


def _convert_pickled_adapter(source: Path, staging: Path) -> Path:
    """Copy an adapter dir, turning `adapter_model.bin` into safetensors via `weights_only=True`.

    `weights_only=True` makes torch refuse anything but tensors and plain containers, so a
    malicious pickle cannot run code; the registry itself never stores pickles.
    """
    import pickle

    import torch
    from safetensors.torch import save_file

    pickled = source / "adapter_model.bin"
    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise AdapterhubError(f"{pickled} is not a plain tensor checkpoint (refused by weights_only=True): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterhubError(f"{pickled} does not hold a flat name → tensor mapping")
    for item in source.iterdir():
        if item.is_file() and item.name != "adapter_model.bin":
            shutil.copy2(item, staging / item.name)
    save_file({k: v.contiguous() for k, v in state.items()}, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return staging


def import_adapter(
    path: Annotated[Path, typer.Argument(help="A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a full-model directory.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Registry name; each import of new content adds a version.")],
    base: Annotated[str, typer.Option("--base", "-b", help="Registered base model it was trained on.")],
    tag: Annotated[Optional[list[str]], typer.Option("--tag", "-t", help="Tag to attach (repeatable).")] = None,
    convert_bin: Annotated[bool, typer.Option("--convert-bin", help="Convert pickled adapter_model.bin with torch.load(weights_only=True).")] = False,
) -> None:
    """Import an adapter into the registry, validated against its base model."""
    registry = open_registry()
    source = path
    staging: Path | None = None
    if convert_bin and path.is_dir() and (path / "adapter_model.bin").exists() and not (path / ADAPTER_WEIGHTS).exists():
        if not (path / ADAPTER_CONFIG).exists():
            raise AdapterhubError(f"{path} has no {ADAPTER_CONFIG}")
        staging = Path(tempfile.mkdtemp(prefix="adapterhub-convert-"))
        source = _convert_pickled_adapter(path, staging)
    try:
        result = registry.put_adapter(
            name=name, source_dir=source, base=base, tags=tuple(tag or ()),
            lineage=Lineage(kind="imported", details={"source": str(path.resolve())}),
        )
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    record = result.record
    if result.created:
        console.print(f"imported [bold]{record.ref}[/] ({_kind(record)}, {human_bytes(record.size_bytes)}) sha256 {record.sha256[:12]}")
    else:
        console.print(f"identical content is already registered as [bold]{record.ref}[/]; nothing imported")


def _kind(record: AdapterRecord) -> str:
    if record.is_full_model:
        return "full model"
    if record.rank:
        return f"{record.peft_type.lower()} r={record.rank}"
    return record.peft_type.lower()


def list_adapters(
    base: Annotated[Optional[str], typer.Option(help="Only adapters of this base model.")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Only adapters with this tag.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Only versions of this name.")] = None,
    peft_type: Annotated[Optional[str], typer.Option("--type", help="Only this PEFT type (lora, ia3, full, …).")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Only the newest version of each name.")] = False,
    json_output: JsonOption = False,
) -> None:
    """List registered adapters and full models."""
    records = open_registry().list(base=base, tag=tag, name=name, peft_type=peft_type, latest_only=latest)
    if json_output:
        print_json([r.to_json() for r in records])
        return
    table = Table("REF", "KIND", "BASE", "SIZE", "TAGS", "ORIGIN", "CREATED", "SHA256")
    for r in records:
        table.add_row(
            r.ref, _kind(r), r.base_name, human_bytes(r.size_bytes), ",".join(r.tags),
            r.origin or "", r.created_at.strftime("%Y-%m-%d %H:%M"), r.sha256[:12],
        )
    console.print(table)
    console.print(f"{len(records)} record(s)")


def show(ref: Annotated[str, typer.Argument(help="name, name:version or name@sha-prefix")], json_output: JsonOption = False) -> None:
    """Show one record: its config, lineage and evaluations."""
    registry = open_registry()
    record = registry.get(ref)
    children = registry.children(record.ref)
    if json_output:
        print_json(record.to_json() | {"children": [c.ref for c in children]})
        return
    console.print(f"[bold]{record.ref}[/]  {_kind(record)}  on {record.base_name} ({record.base_fingerprint[:12]})")
    console.print(f"sha256 {record.sha256}\nsize {human_bytes(record.size_bytes)}, created {record.created_at:%Y-%m-%d %H:%M:%S} UTC")
    if record.target_modules:
        console.print(f"target modules: {', '.join(record.target_modules)}" + (f"   alpha {record.alpha:g}" if record.alpha else ""))
    if record.tags:
        console.print(f"tags: {', '.join(record.tags)}")
    if record.lineage:
        lineage = record.lineage
        console.print(f"lineage: [bold]{lineage.kind}[/]" + (f" from {', '.join(lineage.parents)}" if lineage.parents else ""))
        for key, value in lineage.details.items():
            text = str(value)
            console.print(f"  {key}: {text if len(text) < 160 else text[:157] + '…'}")
    if children:
        console.print(f"derived: {', '.join(c.ref for c in children)}")
    if record.evaluations:
        table = Table("METRIC", "VALUE", "DATASET", "SPLIT", "WHEN", title="evaluations")
        for e in record.evaluations:
            table.add_row(e.metric, f"{e.value:.4g}", e.dataset, e.split or "", e.created_at.strftime("%Y-%m-%d %H:%M"))
        console.print(table)
    console.print("files: " + ", ".join(sorted(record.files)))


def remove(ref: Annotated[str, typer.Argument(help="name:version, name@sha-prefix, or name (its latest version)")]) -> None:
    """Remove one record; `gc` reclaims blobs no record uses any more."""
    record = open_registry().remove(ref)
    console.print(f"removed {record.ref}")


def tag(
    ref: Annotated[str, typer.Argument(help="The record to tag.")],
    tag_name: Annotated[str, typer.Argument(metavar="TAG")],
    remove_tag: Annotated[bool, typer.Option("--remove", help="Remove the tag instead.")] = False,
) -> None:
    """Add (or remove) a tag."""
    registry = open_registry()
    record = registry.untag(ref, tag_name) if remove_tag else registry.tag(ref, tag_name)
    console.print(f"{record.ref} tags: {', '.join(record.tags) or '(none)'}")


def export(
    ref: Annotated[str, typer.Argument(help="The record to export.")],
    dest: Annotated[Path, typer.Argument(help="New or empty directory; PeftModel.from_pretrained loads it.")],
) -> None:
    """Write a record's files (verified) to a directory."""
    out = open_registry().export(ref, dest)
    console.print(f"exported to {out}")


def gc() -> None:
    """Delete blobs no record references, stray temp files and stale caches."""
    report = open_registry().gc()
    console.print(
        f"removed {report.removed_blobs} blob(s) ({human_bytes(report.removed_bytes)}), {report.removed_temp_files} temp file(s), "
        f"{report.removed_cache_dirs} cache dir(s); kept {report.kept_blobs} blob(s)"
    )


def register(app: typer.Typer) -> None:
    app.command("import")(import_adapter)
    app.command("list")(list_adapters)
    app.command("show")(show)
    app.command("rm")(remove)
    app.command("tag")(tag)
    app.command("export")(export)
    app.command("gc")(gc)
