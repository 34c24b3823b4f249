"""Data preparation benchmark: adapterhub.data against plain `datasets` + `datasketch` code.

On one generated JSONL file (`--rows`, default 1,000,000 text/label rows, every tenth a repeat
of an earlier row), each task runs in its own fresh interpreter, once with adapterhub's
streaming verb and once with the code one would write without it:

- inspect: adapterhub `inspect_file` vs `load_dataset("json")` + a Python loop counting labels,
  empty rows, normalized duplicates and character lengths;
- dedup (exact): `dedup_file` vs `load_dataset` + a seen-set `filter` + `to_json`;
- dedup (MinHash, Jaccard 0.8, 128 permutations, on the first `--minhash-rows` rows): `dedup_file(near=)`
  vs a loop building one `MinHash` per row and querying/inserting a `MinHashLSH`;
- split (80/10/10, stratified by label): `split_file` vs two `train_test_split(stratify_by_column=)`
  calls after `class_encode_column`, each part written with `to_json`.

Figures: wall seconds, rows/s, peak RSS (`VmHWM` of /proc/self/status, the task process's own
peak: getrusage's ru_maxrss would carry this script's peak into each child across fork + exec)
above the resident size once the imports are done, and the ratio
adapterhub / plain (time: < 1 is faster). The plain code loads the file into an Arrow table
(a fresh memory-mapped cache per run, so no run reuses another's parse) and holds Python sets;
adapterhub holds counts and 8-byte hashes.

Run:  .venv/bin/python benchmarks/data_bench.py [--rows 1000000] [--minhash-rows 100000]
Writes benchmarks/results/data_bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

PRELUDE = r"""
import json, sys, tempfile, time
from pathlib import Path
path, work = Path(sys.argv[1]), Path(sys.argv[2])
limit = int(sys.argv[3])
def status_mb(field):
    # /proc/self/status, not getrusage: ru_maxrss carries the parent's peak across fork + exec,
    # VmHWM is this process image's own peak resident size.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)
def start():
    # The resident size now, not the peak so far: a transient peak while importing would hide the task's growth.
    return status_mb("VmRSS"), time.perf_counter()
def done(rss0, t0, rows):
    print(json.dumps({"seconds": time.perf_counter() - t0, "rss_mb": status_mb("VmHWM") - rss0, "rows": rows}))
"""

TASKS: dict[str, dict[str, str]] = {
    "inspect": {
        "adapterhub": """
from adapterhub.data import inspect_file
rss0, t0 = start()
report = inspect_file(path)
done(rss0, t0, report.rows)
""",
        "plain": """
import re, unicodedata
from collections import Counter
from datasets import load_dataset
rss0, t0 = start()
ds = load_dataset("json", data_files=str(path), split="train", cache_dir=tempfile.mkdtemp(dir=work))
labels, seen, lengths, empty, dups = Counter(), set(), [], 0, 0
for row in ds:
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        empty += 1
        continue
    key = re.sub(r"\\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()
    if key in seen:
        dups += 1
    seen.add(key)
    labels[row["label"]] += 1
    lengths.append(len(text))
done(rss0, t0, len(ds))
""",
    },
    "dedup_exact": {
        "adapterhub": """
from adapterhub.data import dedup_file
rss0, t0 = start()
result = dedup_file(path, work / "ah_dedup.jsonl")
done(rss0, t0, result.stats["rows_in"])
""",
        "plain": """
import re, unicodedata
from datasets import load_dataset
rss0, t0 = start()
ds = load_dataset("json", data_files=str(path), split="train", cache_dir=tempfile.mkdtemp(dir=work))
seen = set()
def first(row):
    key = re.sub(r"\\s+", " ", unicodedata.normalize("NFKC", row["text"])).strip().casefold()
    if key in seen:
        return False
    seen.add(key)
    return True
kept = ds.filter(first)
kept.to_json(str(work / "plain_dedup.jsonl"))
done(rss0, t0, len(ds))
""",
    },
    "dedup_minhash": {
        "adapterhub": """
import itertools
from adapterhub.data import dedup_file
small = work / "small.jsonl"
with path.open() as src, small.open("w") as dst:
    dst.writelines(itertools.islice(src, limit))
rss0, t0 = start()
result = dedup_file(small, work / "ah_near.jsonl", near=0.8)
done(rss0, t0, result.stats["rows_in"])
""",
        "plain": """
from datasets import load_dataset
from datasketch import MinHash, MinHashLSH
rss0, t0 = start()
ds = load_dataset("json", data_files=str(path), split="train", cache_dir=tempfile.mkdtemp(dir=work)).select(range(limit))
lsh = MinHashLSH(threshold=0.8, num_perm=128)
keep = []
for i, row in enumerate(ds):
    words = row["text"].lower().split()
    grams = [" ".join(words[j:j + 3]) for j in range(len(words) - 2)] or [row["text"].lower()]
    m = MinHash(num_perm=128)
    for gram in grams:
        m.update(gram.encode("utf-8"))
    if lsh.query(m):
        continue
    lsh.insert(str(i), m)
    keep.append(i)
ds.select(keep).to_json(str(work / "plain_near.jsonl"))
done(rss0, t0, len(ds))
""",
    },
    "split": {
        "adapterhub": """
from adapterhub.data import split_file
rss0, t0 = start()
result = split_file(path, work, validation=0.1, test=0.1, seed=0)
done(rss0, t0, result.stats["rows_in"])
""",
        "plain": """
from datasets import load_dataset
rss0, t0 = start()
ds = load_dataset("json", data_files=str(path), split="train", cache_dir=tempfile.mkdtemp(dir=work)).class_encode_column("label")
first = ds.train_test_split(test_size=0.2, stratify_by_column="label", seed=0)
second = first["test"].train_test_split(test_size=0.5, stratify_by_column="label", seed=0)
first["train"].to_json(str(work / "p.train.jsonl"))
second["train"].to_json(str(work / "p.validation.jsonl"))
second["test"].to_json(str(work / "p.test.jsonl"))
done(rss0, t0, len(ds))
""",
    },
}


def generate(path: Path, rows: int) -> None:
    """Text/label rows of 8-12 words; every tenth repeats the row five before it."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            n = i - 5 if i % 10 == 9 else i
            text = " ".join(words[(n * k) % len(words)] for k in range(1, 8 + n % 5)) + f" item {n}"
            handle.write(json.dumps({"text": text, "label": f"class{n % 4}"}) + "\n")


def run_one(code: str, path: Path, work: Path, limit: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", PRELUDE + code, str(path), str(work), str(limit)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--minhash-rows", type=int, default=100_000)
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "bench.jsonl"
        generate(path, args.rows)
        for task in args.tasks.split(","):
            results[task] = {}
            for side in ("adapterhub", "plain"):
                figures = run_one(TASKS[task][side], path, work, args.minhash_rows)
                figures["rows_per_s"] = figures["rows"] / figures["seconds"]
                results[task][side] = figures
                print(f"{task:14} {side:10} {figures['rows']:>9} rows {figures['seconds']:8.1f} s "
                      f"{figures['rows_per_s']:>10.0f} rows/s {figures['rss_mb']:8.0f} MB", flush=True)
    print()
    print(f"{'task':14} {'rows':>9} {'adapterhub s':>12} {'plain s':>8} {'time ratio':>10} {'ah MB':>7} {'plain MB':>8}")
    for task, sides in results.items():
        ah, plain = sides["adapterhub"], sides["plain"]
        print(f"{task:14} {ah['rows']:>9} {ah['seconds']:>12.1f} {plain['seconds']:>8.1f} {ah['seconds'] / plain['seconds']:>10.2f} "
              f"{ah['rss_mb']:>7.0f} {plain['rss_mb']:>8.0f}")
    out = RESULTS / "data_bench.json"
    out.write_text(json.dumps({"rows": args.rows, "minhash_rows": args.minhash_rows, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
