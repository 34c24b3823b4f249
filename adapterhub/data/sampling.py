"""`data balance`, `data split`, `data mix`: seeded row selection in two streaming passes.

Design decisions:
- Pass one counts rows (per label, per source); the selection is then drawn from counts with a
  seeded `random.Random` per stratum, as sets of row positions; pass two streams the file
  again and writes the chosen rows. Memory holds counts and positions, never rows. The second
  pass checks it saw the same counts (a file changed in between is an error, not a wrong split).
- A selection depends only on the seed and the counts, so the same file and seed give the same
  outputs on every machine and for every batch size.
- Up-sampling repeats every row `k // n` times and a seeded sample of `k % n` rows once more:
  no row is repeated twice more often than another.
- Split is stratified by label when rows have one (each label keeps its share in every split);
  otherwise the single stratum is the whole file.
- Mix takes weights (`A.jsonl:0.7`) or temperature sampling (share ∝ rowsᵢ^(1/T), T=1 is
  proportional, larger T flattens towards uniform). Its default size is the largest one that
  needs no up-sampling; rows of the sources are interleaved in a seeded order and tagged with
  their source task in a `source` column, which the trainer ignores and `adapterhub train` records.
"""

from __future__ import annotations

import math
import random
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub.data.output import StagedOutputs, VerbResult, check_output, parents_of, write_row
from adapterhub.data.schema import TEXT_LABEL, checked_rows, label_of
from adapterhub.errors import ValidationError

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Choice:
    """Which rows of one stratum of n rows are written, and how often: every row `repeat` times, `extra` once more."""

    repeat: int
    extra: frozenset[int]

    def copies(self, position: int) -> int:
        return self.repeat + (position in self.extra)


def choose(n: int, k: int, rng: random.Random) -> Choice:
    """k of n rows (k > n up-samples), seeded."""
    repeat, rest = divmod(k, n) if n else (0, 0)
    return Choice(repeat, frozenset(rng.sample(range(n), rest)))


def _strata(path: Path) -> tuple[Counter[str], str]:
    counts: Counter[str] = Counter()
    fmt = ""
    for row, fmt in checked_rows(path):
        counts[label_of(row.values, fmt) or ""] += 1
    return counts, fmt


def _check_same(path: Path, counts: Counter[str], seen: Counter[str]) -> None:
    if counts != seen:
        raise ValidationError(f"data {path}", ["the file changed while it was being read (row counts differ between passes)"])


def parse_target(text: str) -> dict[str, float]:
    """'pos=0.5,neg=0.5' -> {'pos': 0.5, 'neg': 0.5}, each share positive."""
    target: dict[str, float] = {}
    problems = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        label, sep, share = part.rpartition("=")
        try:
            value = float(share)
        except ValueError:
            value = math.nan
        if not sep or not label or not math.isfinite(value) or value <= 0:
            problems.append(f"{part!r} is not LABEL=SHARE with a positive share")
        else:
            target[label.strip()] = value
    if problems or not target:
        raise ValidationError("balance target", problems or ["no LABEL=SHARE given"])
    return target


def balance_file(
    path: Path, out: Path, *, mode: str = "down", target: dict[str, float] | None = None, rows: int | None = None, seed: int = 0
) -> VerbResult:
    """Resample a labelled file's classes: `down` to the smallest, `up` to the largest, or to `target` shares."""
    path, out = Path(path), check_output(out, [path])
    if mode not in ("down", "up", "target"):
        raise ValidationError("balance", [f"mode {mode!r} is not one of down, up, target"])
    counts, fmt = _strata(path)
    if fmt != TEXT_LABEL:
        raise ValidationError(f"data {path}", [f"balancing needs text/label rows; the file is {fmt}"])
    if mode == "target" or target is not None:
        if not target:
            raise ValidationError("balance", ["mode target needs --target LABEL=SHARE,..."])
        unknown = sorted(set(target) - set(counts))
        if unknown:
            raise ValidationError("balance target", [f"labels {unknown} are not in the file (it has {sorted(counts)})"])
        total = rows if rows is not None else sum(counts.values())
        share_sum = sum(target.values())
        wanted = {label: round(total * target.get(label, 0.0) / share_sum) for label in counts}
        mode = "target"
    else:
        size = min(counts.values()) if mode == "down" else max(counts.values())
        wanted = {label: size for label in counts}
    choices = {label: choose(counts[label], wanted[label], random.Random(f"{seed}:{label}")) for label in sorted(counts)}
    seen: Counter[str] = Counter()
    written: Counter[str] = Counter()
    with StagedOutputs() as staged:
        handle = staged.open(out)
        for row, fmt in checked_rows(path):
            label = label_of(row.values, fmt) or ""
            for _ in range(choices[label].copies(seen[label])):
                write_row(handle, row.values, row.raw)
                written[label] += 1
            seen[label] += 1
        _check_same(path, counts, seen)
        result = VerbResult(
            verb="balance",
            outputs={out: sum(written.values())},
            stats={"rows_in": sum(counts.values()), "labels_in": dict(sorted(counts.items())), "labels_out": dict(sorted(written.items()))},
            parameters={"mode": mode, "target": target, "rows": rows, "seed": seed},
            parents=parents_of([path]),
        )
        staged.write_cards(result)
        staged.commit()
    return result


def split_file(
    path: Path, out_dir: Path, *, validation: float = 0.1, test: float = 0.1, seed: int = 0, stratify: bool = True
) -> VerbResult:
    """Write train/validation/test JSONL files into `out_dir` (`<stem>.train.jsonl`, ...), stratified by label."""
    path, out_dir = Path(path), Path(out_dir)
    problems = [f"{name} fraction {value} is not in [0, 1)" for name, value in (("validation", validation), ("test", test)) if not 0 <= value < 1]
    if not problems and validation + test >= 1:
        problems.append(f"validation + test = {validation + test} leaves no training rows")
    if problems:
        raise ValidationError("split", problems)
    if not out_dir.is_dir():
        raise ValidationError(f"output directory {out_dir}", ["does not exist"])
    outputs = {name: check_output(out_dir / f"{path.stem}.{name}.jsonl", [path]) for name in SPLIT_NAMES}
    counts, fmt = _strata(path)
    if not stratify or fmt != TEXT_LABEL:
        counts = Counter({"": sum(counts.values())})
    held: dict[str, tuple[frozenset[int], frozenset[int]]] = {}
    for label in sorted(counts):
        n = counts[label]
        n_validation, n_test = math.floor(n * validation + 0.5), math.floor(n * test + 0.5)
        if n_validation + n_test >= n and n > 0 and validation + test > 0:
            n_test = min(n_test, max(0, n - 1 - n_validation))
            n_validation = min(n_validation, n - 1)
        picked = random.Random(f"{seed}:{label}").sample(range(n), n_validation + n_test)
        held[label] = (frozenset(picked[:n_validation]), frozenset(picked[n_validation:]))
    seen: Counter[str] = Counter()
    written: dict[str, Counter[str]] = {name: Counter() for name in SPLIT_NAMES}
    with StagedOutputs() as staged:
        handles = {name: staged.open(destination) for name, destination in outputs.items()}
        for row, fmt in checked_rows(path):
            label = (label_of(row.values, fmt) or "") if "" not in counts else ""
            position = seen[label]
            seen[label] += 1
            in_validation, in_test = held[label]
            name = "validation" if position in in_validation else "test" if position in in_test else "train"
            write_row(handles[name], row.values, row.raw)
            written[name][label_of(row.values, fmt) or ""] += 1
        _check_same(path, counts, seen)
        result = VerbResult(
            verb="split",
            outputs={outputs[name]: sum(written[name].values()) for name in SPLIT_NAMES},
            stats={
                "format": fmt, "rows_in": sum(counts.values()),
                "rows_out": {name: sum(written[name].values()) for name in SPLIT_NAMES},
                **({"labels": {name: dict(sorted(written[name].items())) for name in SPLIT_NAMES}} if fmt == TEXT_LABEL else {}),
            },
            parameters={"validation": validation, "test": test, "seed": seed, "stratify": stratify and fmt == TEXT_LABEL},
            parents=parents_of([path]),
        )
        staged.write_cards(result)
        staged.commit()
    return result


@dataclass(frozen=True)
class MixSource:
    """One input of a mix: a file, its weight (None: temperature sampling decides) and its task name."""

    path: Path
    weight: float | None
    name: str


def parse_source(text: str) -> MixSource:
    """'A.jsonl:0.7' -> MixSource(A.jsonl, 0.7, 'A'); 'A.jsonl' -> weight None.

    A tail after the last ':' that is not a number is an error naming it, unless the whole text
    names an existing file (paths may hold colons).
    """
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            if not Path(text).is_file():
                raise ValidationError(f"--data {text}", [f"weight {tail!r} is not a number (use FILE or FILE:WEIGHT)"]) from None
        else:
            if not math.isfinite(weight) or weight <= 0:
                raise ValidationError(f"--data {text}", [f"weight {tail!r} must be a positive number"])
            return MixSource(Path(head), weight, Path(head).stem)
    return MixSource(Path(text), None, Path(text).stem)


def mix_shares(sources: Sequence[MixSource], counts: Sequence[int], temperature: float | None) -> list[float]:
    """Each source's share of the mix: its weight, or rowsᵢ^(1/T) normalized."""
    weights = [s.weight for s in sources]
    if any(w is not None for w in weights):
        if any(w is None for w in weights):
            raise ValidationError("mix", ["give a weight to every --data (FILE:WEIGHT) or to none (temperature sampling)"])
        if temperature is not None:
            raise ValidationError("mix", ["weights and --temperature exclude each other"])
        raw = [float(w) for w in weights]  # type: ignore[arg-type]
    else:
        t = 1.0 if temperature is None else temperature
        if not math.isfinite(t) or t <= 0:
            raise ValidationError("mix", [f"temperature must be a positive number, got {temperature}"])
        raw = [n ** (1.0 / t) for n in counts]
    total = sum(raw)
    return [w / total for w in raw]


def mix_files(
    sources: Sequence[MixSource], out: Path, *, temperature: float | None = None, rows: int | None = None, seed: int = 0
) -> VerbResult:
    """Write a multi-task mix of `sources` to `out`, each row tagged with its source task (see module docstring)."""
    if len(sources) < 2:
        raise ValidationError("mix", ["a mix needs at least two --data files"])
    out = check_output(out, [s.path for s in sources])
    names: list[str] = []
    for source in sources:
        name, i = source.name, 2
        while name in names:
            name, i = f"{source.name}_{i}", i + 1
        names.append(name)
    counts: list[int] = []
    formats: list[str] = []
    for source in sources:
        n, fmt = 0, ""
        for _, fmt in checked_rows(source.path):
            n += 1
        counts.append(n)
        formats.append(fmt)
    if len(set(formats)) > 1:
        listed = ", ".join(f"{s.path} is {f}" for s, f in zip(sources, formats))
        raise ValidationError("mix", [f"the sources are in different formats ({listed}); the trainer reads one format"])
    shares = mix_shares(sources, counts, temperature)
    if rows is not None and rows < 1:
        raise ValidationError("mix", [f"rows must be at least 1, got {rows}"])
    total = rows if rows is not None else int(min(n / share for n, share in zip(counts, shares)) + 1e-9)
    wanted = [math.floor(total * share + 0.5) for share in shares]
    rng = random.Random(seed)
    choices = [choose(n, k, random.Random(f"{seed}:{i}")) for i, (n, k) in enumerate(zip(counts, wanted))]
    order = array("B" if len(sources) < 256 else "I")
    for i, k in enumerate(wanted):
        order.extend([i] * k)
    rng.shuffle(order)

    def stream(i: int) -> Iterator[dict[str, Any]]:
        for position, (row, _) in enumerate(checked_rows(sources[i].path)):
            for _ in range(choices[i].copies(position)):
                yield dict(row.values, source=names[i])

    with StagedOutputs() as staged:
        handle = staged.open(out)
        streams = [stream(i) for i in range(len(sources))]
        for i in order:
            write_row(handle, next(streams[i]))
        result = VerbResult(
            verb="mix",
            outputs={out: len(order)},
            stats={
                "format": formats[0], "rows_out": len(order),
                "sources": [{"task": name, "file": str(s.path), "rows_in": n, "share": round(share, 4), "rows_out": k}
                            for name, s, n, share, k in zip(names, sources, counts, shares, wanted)],
            },
            parameters={"weights": [s.weight for s in sources], "temperature": temperature, "rows": rows, "seed": seed},
            parents=parents_of([s.path for s in sources]),
        )
        staged.write_cards(result)
        staged.commit()
    return result
