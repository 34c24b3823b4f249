"""The registry on SQLite and on PostgreSQL, side by side: list, resolve, 4 writers, import vs cp.

    .venv/bin/python benchmarks/registry_bench.py [--db sqlite,postgresql] [--records 10000]
        [--imports 10] [--postgres-url URL] [--out benchmarks/results]

For each database named in `--db` (SQLite in WAL mode in a temp home; PostgreSQL 16 started by
`pgserver`, the `dev` extra, in a temp dir, or the server `--postgres-url` names), a fresh
registry is populated through the real `put_adapter` path: `--records / 5` names x 5 versions,
alternating between two tiny base models, 10 tags. The 5 versions are 5 shared variants of one
tiny LoRA, so populating costs what an import of a small adapter costs (validation, hashing,
fsync of the blobs, one transaction), not the time to build 10,000 adapters. Then, as medians:
  - `list` of everything, by base, by tag (and the peak Python memory of listing everything);
  - `get` of `name`, `name:version`, `name@sha-prefix`, and `resolve` of a miss;
  - import throughput of 1 writer process, then of 4 writer processes at once (each importing
    its own new adapters), from the first import's start to the last one's end;
  - import of a rank-16 LoRA on SmolLM2 (q/k/v/o, every layer, new content each time) in MB/s,
    next to a plain `cp -r` of the same files and `cp -r` + `sync` (an import fsyncs every blob),
    timed in the same loop (`--imports 0` leaves these rows out, and SmolLM2 with them).
Goals (issue 2): list of 10k < 0.5 s, resolve < 5 ms, import dominated by hashing + fsync.
Prints one table with a column per database and writes `registry_bench.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterhub.registry import Registry  # noqa: E402
from tests.conftest import build_lora_adapter, build_tiny_llama  # noqa: E402
from tests.registry.conftest import make_variant  # noqa: E402

DATABASES = ("sqlite", "postgresql")

# One writer process: prints the wall-clock span of its imports (process start-up and the
# imports of Python and SQLAlchemy are no part of the registry's throughput).
_WRITER = """
import sys, time
from pathlib import Path
from adapterhub.registry import Registry
home, worker, *dirs = sys.argv[1:]
registry = Registry.open(Path(home))
start = time.time()
for i, source in enumerate(dirs):
    registry.put_adapter(name=f"writer{worker}-{i}", source_dir=Path(source), base="tiny")
print(start, time.time())
"""


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` calls, after one warm-up call (caches, query compilation)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1000, 3)


def peak_mb(fn: Callable[[], object]) -> float:
    """Peak Python memory (tracemalloc) of one call, in MB."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return round(peak, 2)


def writers_throughput(home: Path, env: dict[str, str], sources: list[Path], writers: int) -> float:
    """Imports per second of `writers` processes importing `sources` split among them."""
    chunk = len(sources) // writers
    processes = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(home), f"{writers}x{w}", *map(str, sources[w * chunk:(w + 1) * chunk])],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for w in range(writers)
    ]
    spans = []
    for process in processes:
        out, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"a writer process exited with {process.returncode}")
        spans.append(tuple(map(float, out.split()[-2:])))
    return round(chunk * writers / (max(end for _, end in spans) - min(start for start, _ in spans)), 1)


class Fixtures:
    """What every database's run shares: the tiny bases, the shared LoRA variants, SmolLM2."""

    def __init__(self, work: Path, imports: int) -> None:
        self.work = work
        self.tiny = build_tiny_llama(work / "tiny")
        self.tiny_wide = build_tiny_llama(work / "tiny-wide", hidden_size=96)
        lora = build_lora_adapter(self.tiny, work / "lora-tiny")
        lora_wide = build_lora_adapter(self.tiny_wide, work / "lora-wide")
        self.versions = {
            "tiny": [make_variant(lora, work / f"tiny-v{v}", seed=v) for v in range(5)],
            "tiny-wide": [make_variant(lora_wide, work / f"wide-v{v}", seed=v) for v in range(5)],
        }
        self.writer_sources = [make_variant(lora, work / f"writer-{i}", seed=1000 + i) for i in range(200)]
        self.smol_base: Path | None = None
        self.smol_lora: Path | None = None
        if imports:
            from adapterhub.models import prepare_base_model

            self.smol_base = prepare_base_model(None, work / "smollm2")
            self.smol_lora = build_lora_adapter(self.smol_base, work / "smollm2-lora", rank=16, alpha=32,
                                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


def bench(database: str, url: str | None, fx: Fixtures, records: int, imports: int) -> dict[str, object]:
    """Every row of the table for one database, in a fresh registry."""
    home = fx.work / f"home-{database}"
    env = {**os.environ, "ADAPTERHUB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTERHUB_BLOB_DIR", None)
    if url:
        env["ADAPTERHUB_DATABASE_URL"] = url
    else:
        env.pop("ADAPTERHUB_DATABASE_URL", None)
    registry = Registry.open(home, database_url=url)
    registry.add_base_model(name="tiny", model_dir=fx.tiny)
    registry.add_base_model(name="tiny-wide", model_dir=fx.tiny_wide)
    row: dict[str, object] = {}
    start = time.perf_counter()
    names = records // 5
    for i in range(names):
        base = "tiny" if i % 2 == 0 else "tiny-wide"
        for source in fx.versions[base]:
            registry.put_adapter(name=f"adapter-{i:05d}", source_dir=source, base=base, tags=(f"team{i % 10}",))
        if (i + 1) % 400 == 0:
            print(f"  {database}: populated {(i + 1) * 5} records", flush=True)
    populate_s = time.perf_counter() - start
    count = len(registry.list())
    probe = f"adapter-{names // 2:05d}"  # a name in the middle of the index
    sha = registry.get(f"{probe}:3").sha256
    row["populate, s"] = round(populate_s, 1)
    row["populate, imports/s"] = round(count / populate_s, 1)
    row[f"list all ({count}), ms"] = median_ms(registry.list, 5)
    row["list all, peak MB"] = peak_mb(registry.list)
    row["list --base tiny, ms"] = median_ms(lambda: registry.list(base="tiny"), 5)
    row["list --tag team3, ms"] = median_ms(lambda: registry.list(tag="team3"), 5)
    row["get name, ms"] = median_ms(lambda: registry.get(probe), 100)
    row["get name:version, ms"] = median_ms(lambda: registry.get(f"{probe}:3"), 100)
    row["get name@sha-prefix, ms"] = median_ms(lambda: registry.get(f"{probe}@{sha[:8]}"), 100)
    row["resolve (miss), ms"] = median_ms(lambda: registry.resolve("no-such-adapter"), 100)
    row["1 writer, imports/s"] = writers_throughput(home, env, fx.writer_sources[:100], 1)
    row["4 writers at once, imports/s"] = writers_throughput(home, env, fx.writer_sources[100:], 4)
    if imports and fx.smol_base is not None and fx.smol_lora is not None:
        registry.add_base_model(name="smollm2", model_dir=fx.smol_base)
        size_mb = sum(p.stat().st_size for p in fx.smol_lora.iterdir()) / 1e6
        import_s, cp_s, cp_sync_s = [], [], []
        scratch = fx.work / f"copies-{database}"
        scratch.mkdir()
        for i in range(imports):
            source = make_variant(fx.smol_lora, scratch / f"smol-v{i}", seed=2000 + i)
            start = time.perf_counter()
            registry.put_adapter(name="smol-import", source_dir=source, base="smollm2")
            import_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(["cp", "-r", str(source), str(scratch / f"cp-{i}")], check=True)
            cp_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(["cp", "-r", str(source), str(scratch / f"cps-{i}")], check=True)
            subprocess.run(["sync", "-f", str(scratch / f"cps-{i}")], check=True)
            cp_sync_s.append(time.perf_counter() - start)
        for label, samples in ((f"import SmolLM2 r16 LoRA ({size_mb:.1f} MB)", import_s), ("cp -r of the same files", cp_s),
                               ("cp -r + sync", cp_sync_s)):
            row[f"{label}, MB/s"] = round(size_mb / statistics.median(samples), 1)
    registry.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="sqlite,postgresql", help="comma list of: " + ", ".join(DATABASES))
    parser.add_argument("--records", type=int, default=10_000, help="records to populate each database with (a multiple of 5)")
    parser.add_argument("--imports", type=int, default=10, help="SmolLM2 LoRA imports to time against cp (0: skip)")
    parser.add_argument("--postgres-url", default=None, help="an existing PostgreSQL database to use (it must be empty) instead of a pgserver one")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    databases = [d.strip() for d in args.db.split(",") if d.strip()]
    unknown = [d for d in databases if d not in DATABASES]
    if unknown or not databases:
        parser.error(f"--db: unknown database(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(DATABASES)}")
    if args.records < 10 or args.records % 5:
        parser.error("--records must be a multiple of 5, at least 10")
    args.out.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    server = None
    try:
        urls: dict[str, str | None] = {"sqlite": None}
        if "postgresql" in databases:
            if args.postgres_url:
                urls["postgresql"] = args.postgres_url
            else:
                import pgserver  # the dev extra

                server = pgserver.get_server(work / "pgdata", cleanup_mode="stop")
                urls["postgresql"] = server.get_uri()
        fixtures = Fixtures(work, args.imports)
        results = {}
        for database in databases:
            results[database] = bench(database, urls[database], fixtures, args.records, args.imports)
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    labels = list(results[databases[0]])
    width = max(map(len, labels)) + 2
    print(f"\n{'operation':<{width}}" + "".join(f"{d:>14}" for d in databases))
    for label in labels:
        print(f"{label:<{width}}" + "".join(f"{results[d].get(label, ''):>14}" for d in databases))
    out = args.out / "registry_bench.json"
    out.write_text(json.dumps({"records": args.records, "imports": args.imports, "cpus": os.cpu_count(),
                               "load_average": os.getloadavg(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
