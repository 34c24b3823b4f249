"""`adapterhub import|list|show|rm|tag|export|gc`: the adapter registry from the shell.

Design decisions:
- The commands own no logic: validation, lookups and file handling are the registry's
  (`registry/store.py`) and the format's (`adapterhub/formats.py`); a user error is one line.
- `import --convert-bin` is the one place a pickle is opened, with `torch.load(weights_only=True)`
  in a temporary directory that is removed whatever happens; anything torch raises on the bytes
  is the file's fault, so it is one error, not a traceback.
- What an import skipped (pickled extra files) is said on stderr; what `rm --force` orphaned is
  said on stdout, so `show` of such a child is no surprise.
- `list` prints references whole at any width (`common.print_table`), and `--tag` repeats.
- What a kind is and what can be done with it come from the kinds table (`adapterhub.kinds`):
  `list --type` takes its names (an unknown one is an error listing them), and `show` says
  whether the record merges and which backends serve it, with the table's reason when not.
- `show` lists where a record was pushed to and pulled from on the Hugging Face Hub (repo,
  revision, commit), oldest first; `adapterhub push` and `pull` write those records.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Column, Table

from adapterhub.cli.common import JsonOption, console, err_console, human_bytes, open_registry, print_json, print_table
from adapterhub.errors import AdapterhubError
from adapterhub.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, directory_files
from adapterhub.kinds import BACKENDS, describe_kind, kind_names, merge_problems, why_not_served
from adapterhub.registry import AdapterRecord, Lineage


def _convert_pickled_adapter(source: Path, staging: Path) -> Path:
    """Copy an adapter dir, turning `adapter_model.bin` into safetensors via `weights_only=True`.

    `weights_only=True` makes torch refuse anything but tensors and plain containers, so a
    malicious pickle cannot run code; the registry itself never stores pickles. The other files
    are the ones an import would store (`directory_files`: nothing from outside the directory,
    no other pickle).
    """
    import torch
    from safetensors.torch import save_file

    pickled = source / "adapter_model.bin"
    listing = directory_files(source)
    try:
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: torch raises anything from KeyError to BadZipFile
        raise AdapterhubError(f"{pickled} is not a plain tensor checkpoint: torch.load(weights_only=True) refused it ({_one_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterhubError(f"{pickled} does not hold a flat name → tensor mapping")
    for rel in listing.files:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, staging / rel)
    try:
        # A copy per tensor: safetensors refuses tensors that share memory (tied weights, views).
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    except (ValueError, RuntimeError, TypeError) as exc:
        raise AdapterhubError(f"{pickled}: its tensors cannot be written as safetensors ({exc})") from None
    return staging


def _one_line(exc: BaseException) -> str:
    """An exception as one short line; torch's weights-only refusal is paragraphs, its cause at the end."""
    text = " ".join(str(exc).split())
    text = text.rpartition("WeightsUnpickler error:")[2].partition(" Check the documentation")[0].strip() or text
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def import_adapter(
    path: Annotated[Path, typer.Argument(help="A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a full-model directory.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Registry name; each import of new content adds a version.")],
    base: Annotated[str, typer.Option("--base", "-b", help="Registered base model it was trained on.")],
    tag: Annotated[Optional[list[str]], typer.Option("--tag", "-t", help="Tag to attach (repeatable).")] = None,
    convert_bin: Annotated[bool, typer.Option("--convert-bin", help="Convert pickled adapter_model.bin with torch.load(weights_only=True).")] = False,
) -> None:
    """Import an adapter into the registry, validated against its base model.

    Only regular files inside the directory are stored; pickled extra files (training_args.bin,
    optimizer.pt, …) are skipped and named.
    """
    registry = open_registry()
    source = path
    staging: Path | None = None
    try:
        if convert_bin and path.is_dir() and (path / "adapter_model.bin").is_file() and not (path / ADAPTER_WEIGHTS).exists():
            if not (path / ADAPTER_CONFIG).exists():
                raise AdapterhubError(f"{path} has no {ADAPTER_CONFIG}")
            staging = Path(tempfile.mkdtemp(prefix="adapterhub-convert-"))
            source = _convert_pickled_adapter(path, staging)
        result = registry.put_adapter(
            name=name, source_dir=source, base=base, tags=tuple(tag or ()),
            lineage=Lineage(kind="imported", details={"source": str(path.resolve())}),
        )
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    record = result.record
    if result.skipped:
        err_console.print(f"skipped {len(result.skipped)} pickled file(s), which the registry never stores: {', '.join(result.skipped)}")
    if result.created:
        console.print(f"imported [bold]{record.ref}[/] ({_kind(record)}, {human_bytes(record.size_bytes)}) sha256 {record.sha256[:12]}")
    else:
        console.print(f"identical content is already registered as [bold]{record.ref}[/]; nothing imported")


def _kind(record: AdapterRecord) -> str:
    if record.is_full_model:
        return record.adapter_kind.label
    return f"{record.kind} r={record.rank}" if record.rank else record.kind


def _uses(record: AdapterRecord) -> dict[str, str | None]:
    """`merge` and each backend → None when the record can be used so, else the table's first reason.

    Read from the record's kind and config alone (no tensor names: nothing is materialized).
    """
    kind = record.adapter_kind
    config = {"task_type": record.task_type, **record.config}
    refused = merge_problems(kind, config)
    uses: dict[str, str | None] = {"merge": refused[0] if refused else None}
    for backend in BACKENDS:
        reason = why_not_served(kind, backend, config)
        uses[backend] = None if reason is None else f"{describe_kind(kind, config)} adapters cannot be served by the {backend} backend: {reason}"
    return uses


def list_adapters(
    base: Annotated[Optional[str], typer.Option(help="Only adapters of this base model.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", "-t", help="Only adapters with this tag (repeatable: all of them).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Only versions of this name.")] = None,
    peft_type: Annotated[Optional[str], typer.Option("--type", help=f"Only this kind ({', '.join(kind_names())}); lora is every LoRA variant.")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Only the newest version of each name.")] = False,
    json_output: JsonOption = False,
) -> None:
    """List registered adapters and full models."""
    records = open_registry().list(base=base, tag=tag or None, name=name, peft_type=peft_type, latest_only=latest)
    if json_output:
        print_json([r.to_json() for r in records])
        return
    # References are what users copy into the next command: never wrapped or cut.
    ref_width = max((len(r.ref) for r in records), default=3)
    table = Table(Column("REF", no_wrap=True, min_width=ref_width), "KIND", "BASE", "SIZE", "TAGS", "ORIGIN", "CREATED",
                  Column("SHA256", no_wrap=True))
    for r in records:
        table.add_row(
            r.ref, _kind(r), r.base_name, human_bytes(r.size_bytes), ",".join(r.tags),
            r.origin or "", r.created_at.strftime("%Y-%m-%d %H:%M"), r.sha256[:12],
        )
    print_table(table)
    console.print(f"{len(records)} record(s)")


def _print_dataset_chain(registry: Any, dataset: Any) -> None:
    """`data (train): clean:2 (clean, 900 rows) ← raw:1 (source, 1000 rows)`, from the dataset records."""
    from adapterhub.cli.data_records import dataset_chain

    if not isinstance(dataset, dict) or "sha256" not in dataset:
        return
    chain = dataset_chain(registry, dataset["sha256"])
    if not chain:
        console.print(f"data ({dataset.get('role', 'train')}): {dataset.get('ref', '?')} (record removed)", markup=False)
        return
    for step in chain:
        arrow = "  " * step["depth"] + ("← " if step["depth"] else "")
        label = f"data ({dataset.get('role', 'train')}): " if step["depth"] == 0 else "  "
        console.print(f"{label}{arrow}{step['ref']} ({step['verb']}, {step['rows']} rows) {step['path']}", markup=False)


def show(ref: Annotated[str, typer.Argument(help="name, name:version or name@sha-prefix")], json_output: JsonOption = False) -> None:
    """Show one record: its config, lineage and evaluations."""
    registry = open_registry()
    record = registry.get(ref)
    children = registry.children(record.ref)
    removed_parents = registry.removed_parents(record.ref)
    uses = _uses(record)
    if json_output:
        from adapterhub.cli.data_records import dataset_chain

        datasets = {
            d.get("role", "train"): dataset_chain(registry, d["sha256"])
            for d in ((record.lineage.details.get("datasets") or []) if record.lineage else []) if isinstance(d, dict) and "sha256" in d
        }
        print_json(record.to_json() | {"children": [c.ref for c in children], "removed_parents": list(removed_parents), "uses": uses,
                                       "datasets": datasets})
        return
    console.print(f"[bold]{record.ref}[/]  {_kind(record)}  on {record.base_name} ({record.base_fingerprint[:12]})")
    for use, reason in uses.items():
        what = "merge" if use == "merge" else f"serve on {use}"
        console.print(f"{what}: " + ("yes" if reason is None else f"no, {reason}"), markup=False)
    console.print(f"sha256 {record.sha256}\nsize {human_bytes(record.size_bytes)}, created {record.created_at:%Y-%m-%d %H:%M:%S} UTC")
    if record.target_modules:
        console.print(f"target modules: {', '.join(record.target_modules)}" + (f"   alpha {record.alpha:g}" if record.alpha else ""))
    if record.tags:
        console.print(f"tags: {', '.join(record.tags)}")
    if record.lineage:
        lineage = record.lineage
        removed = set(removed_parents)
        parents = ", ".join(f"{p} (removed)" if p in removed else p for p in lineage.parents)
        console.print(f"lineage: [bold]{lineage.kind}[/]" + (f" from {parents}" if parents else ""))
        for key, value in lineage.details.items():
            text = str(value)
            console.print(f"  {key}: {text if len(text) < 160 else text[:157] + '…'}")
    for dataset in (record.lineage.details.get("datasets") or []) if record.lineage else []:
        _print_dataset_chain(registry, dataset)
    if children:
        console.print(f"derived: {', '.join(c.ref for c in children)}")
    for transfer in record.hub:
        verb = "pushed to" if transfer.direction == "push" else "pulled from"
        pr = f", pull request {transfer.pr_url}" if transfer.pr_url else ""
        console.print(f"hub: {verb} {transfer.repo_id}@{transfer.revision} (commit {transfer.commit_sha[:12]}{pr}) "
                      f"on {transfer.endpoint}, {transfer.created_at:%Y-%m-%d %H:%M}", markup=False)
    if record.evaluations:
        table = Table("METRIC", "VALUE", "DATASET", "SPLIT", "WHEN", title="evaluations")
        for e in record.evaluations:
            table.add_row(e.metric, f"{e.value:.4g}", e.dataset, e.split or "", e.created_at.strftime("%Y-%m-%d %H:%M"))
        console.print(table)
    console.print("files: " + ", ".join(sorted(record.files)))


def remove(
    ref: Annotated[str, typer.Argument(help="name:version, name@sha-prefix, or name (its latest version)")],
    force: Annotated[bool, typer.Option("--force", help="Remove it even when other records name it as a lineage parent.")] = False,
) -> None:
    """Remove one record; `gc` reclaims blobs no record uses any more."""
    result = open_registry().remove(ref, force=force)
    console.print(f"removed {result.record.ref}")
    if result.orphaned:
        shown = ", ".join(result.orphaned[:10]) + (f" and {len(result.orphaned) - 10} more" if len(result.orphaned) > 10 else "")
        console.print(f"{len(result.orphaned)} record(s)' lineage now names a removed parent: {shown}")


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
