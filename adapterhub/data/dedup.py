"""`data dedup`: exact and near-duplicate removal, and removal of rows that leak from a test file.

Design decisions:
- Exact: an 8-byte BLAKE2 hash of each row's normalized text (`schema.row_key`: NFKC,
  casefolded, whitespace collapsed); the first occurrence is kept. Memory: one slot of a compact
  hash index per distinct row (`hashes.HashIndex`: the hash and the kept row's number, 24-48
  bytes), not the rows.
- Near: MinHash over word 3-gram shingles (character 5-grams for texts of fewer than three
  words) with `datasketch`, and an LSH index at the Jaccard threshold. A row is a
  near-duplicate when the index returns an earlier kept row; the first is kept, so the output
  does not depend on batch size. MinHashes are computed a batch at a time (`MinHash.bulk`).
- Every cluster is reported with its size and one example pair (the kept row's line and text
  excerpt, and a removed one's), so a user can judge whether the threshold is right.
- `against`: the test file's rows are indexed first (exact, and near when asked); a training row
  matching one is removed as a leak and counted apart from ordinary duplicates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub.data.hashes import HashIndex, hash64
from adapterhub.data.output import StagedOutputs, VerbResult, check_output, parents_of, write_row
from adapterhub.data.schema import checked_rows, row_key
from adapterhub.datafiles import Row
from adapterhub.errors import ValidationError

BATCH_ROWS = 1024
MAX_CLUSTERS_REPORTED = 20
_EXCERPT = 80


def shingles(key: str) -> list[bytes]:
    """Word 3-grams of a normalized text (character 5-grams when it has fewer than three words)."""
    words = key.split()
    if len(words) >= 3:
        return [" ".join(words[i : i + 3]).encode("utf-8") for i in range(len(words) - 2)]
    return [key[i : i + 5].encode("utf-8") for i in range(max(1, len(key) - 4))]


def _excerpt(key: str) -> str:
    text = key.replace("\x1f", " | ")
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 3] + "..."


@dataclass
class _Cluster:
    kept_where: str
    kept_text: str
    removed_where: str
    removed_text: str
    size: int = 2
    leak: bool = False


def _batches(rows: Iterator[tuple[Row, str]]) -> Iterator[list[tuple[Row, str, str]]]:
    batch: list[tuple[Row, str, str]] = []
    for row, fmt in rows:
        batch.append((row, fmt, row_key(row.values, fmt)))
        if len(batch) >= BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def dedup_file(
    path: Path, out: Path, *, near: float | None = None, against: Path | None = None, num_perm: int = 128, seed: int = 1
) -> VerbResult:
    """Write the rows of `path` that are neither duplicates nor test leaks to `out` (+ cards)."""
    path, out = Path(path), check_output(out, [path] + ([Path(against)] if against else []))
    if near is not None and not 0.0 < near < 1.0:
        raise ValidationError("dedup", [f"the near-duplicate threshold is a Jaccard similarity in (0, 1), got {near}"])
    lsh = None
    if near is not None:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=near, num_perm=num_perm)

    def minhashes(batch: list[tuple[Row, str, str]]) -> list[Any]:
        return MinHash.bulk([shingles(key) for _, _, key in batch], num_perm=num_perm, seed=seed)

    seen = HashIndex()  # exact hash -> number of the kept row (its location is `unit number`)
    test_seen = HashIndex()
    test_unit = "line"
    excerpts: dict[str, str] = {}  # LSH key -> excerpt (near mode only)
    clusters: dict[str, _Cluster] = {}
    if against is not None:
        for batch in _batches(checked_rows(against)):
            hashes = minhashes(batch) if lsh is not None else [None] * len(batch)
            for (row, _, key), minhash in zip(batch, hashes):
                test_seen.setdefault(hash64(key), row.number)
                test_unit = row.unit
                if lsh is not None:
                    name = f"test {row.where}"
                    if not lsh.query(minhash):
                        lsh.insert(name, minhash)
                        excerpts[name] = _excerpt(key)

    read = kept = exact = near_removed = leaked = 0
    fmt = None
    with StagedOutputs() as staged:
        handle = staged.open(out)
        for batch in _batches(checked_rows(path)):
            hashes = minhashes(batch) if lsh is not None else [None] * len(batch)
            for (row, fmt, key), minhash in zip(batch, hashes):
                read += 1
                digest = hash64(key)
                number = test_seen.get(digest)
                match = None if number is None else f"{Path(against).name} {test_unit} {number}"  # type: ignore[arg-type]
                kind = "leak" if match else None
                if match is None:
                    number = seen.get(digest)
                    match = None if number is None else f"{row.unit} {number}"
                    kind = "exact" if match else None
                if match is None and lsh is not None:
                    found = lsh.query(minhash)
                    if found:
                        match = min(found, key=_order)
                        kind = "leak" if match.startswith("test ") else "near"
                if match is None:
                    seen.setdefault(digest, row.number)
                    if lsh is not None:
                        lsh.insert(row.where, minhash)
                        excerpts[row.where] = _excerpt(key)
                    write_row(handle, row.values, row.raw)
                    kept += 1
                    continue
                if kind == "leak":
                    leaked += 1
                elif kind == "exact":
                    exact += 1
                else:
                    near_removed += 1
                cluster = clusters.get(match)
                if cluster is None:
                    clusters[match] = _Cluster(match, excerpts.get(match, _excerpt(key)), row.where, _excerpt(key), leak=kind == "leak")
                else:
                    cluster.size += 1
        reported = sorted(clusters.values(), key=lambda c: -c.size)[:MAX_CLUSTERS_REPORTED]
        result = VerbResult(
            verb="dedup",
            outputs={out: kept},
            stats={
                "format": fmt, "rows_in": read, "rows_out": kept, "exact_removed": exact, "near_removed": near_removed,
                "leaked_removed": leaked, "clusters": len(clusters),
                "cluster_examples": [
                    {"size": c.size, "kept": f"{c.kept_where}: {c.kept_text}", "removed": f"{c.removed_where}: {c.removed_text}",
                     "leak": c.leak}
                    for c in reported
                ],
            },
            parameters={"near": near, "against": str(against) if against else None, "num_perm": num_perm if near else None},
            parents=parents_of([path] + ([Path(against)] if against else [])),
        )
        staged.write_cards(result)
        staged.commit()
    return result


def _order(where: str) -> tuple[int, int]:
    """Test rows first, then file order: the earliest kept row represents a cluster."""
    unit_number = where.rsplit(" ", 1)[-1]
    return (0 if where.startswith("test ") else 1, int(unit_number))
