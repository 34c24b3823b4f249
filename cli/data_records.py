"""Dataset records from the shell: what a data verb wrote is registered, `data list` / `data show` read them.

Design decisions:
- Parents are registered first (an input file not yet a record becomes one, verb `source`),
  then each output with edges to them, each record in one transaction (registry/datasets.py).
- `register_file` is what `adapterhub train` calls for its data files, so an adapter's
  `dataset_fingerprint` always leads to a record.
- `data show` follows a record's parents to the sources, and says when a file on disk no
  longer holds the registered bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from adapterhub.cli.common import JsonOption, console, open_registry, print_json, print_table
from adapterhub.data.output import card_paths
from adapterhub.datafiles import file_fingerprint, iter_data_file


def register_file(registry: Any, path: Path, *, rows: int | None = None) -> Any:
    """The record of `path`'s bytes, registering it (verb `source`) when there is none."""
    from adapterhub.registry.datasets import dataset_name

    path = Path(path)
    sha256 = file_fingerprint([path])
    existing = registry.datasets.by_sha256(sha256)
    if existing is not None:
        return existing
    if rows is None:
        rows = sum(1 for _ in iter_data_file(path))
    return registry.datasets.put(name=dataset_name(path), path=path, sha256=sha256, rows=rows, verb="source")


def register_outputs(result: Any) -> list[str]:
    """Register every output of a verb with its card and parents; returns the records' refs."""
    from adapterhub.registry.datasets import dataset_name

    registry = open_registry()
    try:
        single_parent_rows = result.stats.get("rows_in") if len(result.parents) == 1 else None
        parents = [
            register_file(registry, Path(p["path"]), rows=single_parent_rows if isinstance(single_parent_rows, int) else None)
            for p in result.parents
        ]
        refs = []
        for output, rows in result.outputs.items():
            record = registry.datasets.put(
                name=dataset_name(output), path=output, sha256=file_fingerprint([output]), rows=rows, verb=result.verb,
                parameters=result.parameters, stats=result.stats, parents=parents,
            )
            refs.append(record.ref)
        return refs
    finally:
        registry.close()


def dataset_chain(registry: Any, sha256: str) -> list[dict[str, Any]]:
    """The record of these bytes and its ancestors as JSON (depth, ref, verb, rows, path), or []."""
    record = registry.datasets.by_sha256(sha256)
    if record is None:
        return []
    return [
        {"depth": depth, "ref": r.ref, "verb": r.verb, "rows": r.rows, "path": str(r.path), "sha256": r.sha256}
        for depth, r in registry.datasets.ancestry(record)
    ]


def list_command(json_output: JsonOption = False) -> None:
    """List the registered dataset records, newest first."""
    registry = open_registry()
    try:
        records = registry.datasets.list()
    finally:
        registry.close()
    if json_output:
        print_json([r.to_json() for r in records])
        return
    table = Table("ref", "verb", "rows", "sha256", "path")
    table.columns[0].no_wrap = True
    for r in records:
        table.add_row(r.ref, r.verb, str(r.rows), r.sha256[:12], str(r.path))
    print_table(table)


def show_command(
    ref: Annotated[str, typer.Argument(help="name, name:version or @sha256-prefix")],
    json_output: JsonOption = False,
) -> None:
    """Show a dataset record, its card and its chain of parents."""
    registry = open_registry()
    try:
        record = registry.datasets.get(ref)
        chain = registry.datasets.ancestry(record)
    finally:
        registry.close()
    on_disk = record.path.is_file() and file_fingerprint([record.path]) == record.sha256
    if json_output:
        print_json(record.to_json() | {"file_matches": on_disk, "parents": [
            {"depth": d, "ref": r.ref, "verb": r.verb, "rows": r.rows, "path": str(r.path)} for d, r in chain[1:]
        ]})
        return
    console.print(f"[bold]{record.ref}[/bold]  {record.rows} rows  made by data {record.verb}  sha256 {record.sha256}")
    console.print(f"file: {record.path}" + ("" if on_disk else "  (missing or changed since it was registered)"))
    if record.parameters:
        console.print("parameters: " + ", ".join(f"{k}={v}" for k, v in record.parameters.items()))
    markdown = card_paths(record.path)[0]
    if markdown.is_file():
        console.print(f"card: {markdown}")
    for depth, parent in chain[1:]:
        console.print(f"{'  ' * depth}← {parent.ref} ({parent.verb}, {parent.rows} rows) {parent.path}")
