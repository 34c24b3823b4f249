"""The registry on SQLite and on PostgreSQL, side by side: list, resolve, 4 concurrent writers.

    .venv/bin/python benchmarks/registry_db_bench.py [--records 10000] [--out benchmarks/results]

For each database (SQLite in WAL mode in a temp home; PostgreSQL 16 started by `pgserver`, the
`dev` extra, in a temp dir), a fresh registry is populated through the real `put_adapter` path
(names x 5 versions of a tiny LoRA, 10 tags), then timed as medians: `list` of everything and by
tag, `get`/`resolve` of `name`, `name:version`, a miss; and the import throughput of 4 writer
processes at once (each importing its own 25 new adapters) against 1 writer.
Writes `registry_db_bench.json` and prints one table with a column per database.
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterhub.registry import Registry  # noqa: E402
from tests.conftest import build_lora_adapter, build_tiny_llama  # noqa: E402
from tests.registry.conftest import make_variant  # noqa: E402

_WRITER = """
import sys
from pathlib import Path
from adapterhub.registry import Registry
home, worker, *dirs = sys.argv[1:]
import time
registry = Registry.open(Path(home))
start = time.time()
for i, source in enumerate(dirs):
    registry.put_adapter(name=f"writer{worker}-{i}", source_dir=Path(source), base="tiny")
print(start, time.time())
"""


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1000, 3)


def writers_throughput(home: Path, env: dict[str, str], sources: list[Path], writers: int) -> float:
    """Imports per second of `writers` processes importing `sources` split among them, from the
    first import's start to the last one's end (process start-up, the imports of Python and
    SQLAlchemy, is left out: it is no part of the registry's throughput)."""
    chunk = len(sources) // writers
    processes = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(home), f"{writers}x{w}", *map(str, sources[w * chunk:(w + 1) * chunk])],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for w in range(writers)
    ]
    spans = []
    for process in processes:
        out, _ = process.communicate(timeout=900)
        assert process.returncode == 0
        spans.append(tuple(map(float, out.split()[-2:])))
    return round(chunk * writers / (max(end for _, end in spans) - min(start for start, _ in spans)), 1)


def bench(database: str, url: str | None, work: Path, tiny: Path, lora: Path, records: int) -> dict[str, float]:
    home = work / f"home-{database}"
    env = {**os.environ, "ADAPTERHUB_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTERHUB_BLOB_DIR", None)
    if url:
        env["ADAPTERHUB_DATABASE_URL"] = url
    else:
        env.pop("ADAPTERHUB_DATABASE_URL", None)
    registry = Registry.open(home, database_url=url)
    registry.add_base_model(name="tiny", model_dir=tiny)
    versions = [make_variant(lora, work / f"{database}-v{v}", seed=v) for v in range(5)]
    start = time.perf_counter()
    for i in range(records // 5):
        for source in versions:
            registry.put_adapter(name=f"adapter-{i:05d}", source_dir=source, base="tiny", tags=(f"team{i % 10}",))
    result = {"populate imports/s": round(records / (time.perf_counter() - start), 1)}
    result[f"list all ({len(registry.list())}) ms"] = median_ms(registry.list, 5)
    result["list --tag team3 ms"] = median_ms(lambda: registry.list(tag="team3"), 5)
    result["get name ms"] = median_ms(lambda: registry.get("adapter-00042"), 100)
    result["get name:version ms"] = median_ms(lambda: registry.get("adapter-00042:3"), 100)
    result["resolve miss ms"] = median_ms(lambda: registry.resolve("no-such-adapter"), 100)
    sources = [make_variant(lora, work / f"{database}-w{i}", seed=1000 + i) for i in range(200)]
    result["1 writer imports/s"] = writers_throughput(home, env, sources[:100], 1)
    result["4 writers imports/s"] = writers_throughput(home, env, sources[100:], 4)
    registry.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import pgserver

    work = Path(tempfile.mkdtemp(prefix="registry-db-bench-"))
    server = pgserver.get_server(work / "pgdata", cleanup_mode="stop")
    try:
        tiny = build_tiny_llama(work / "tiny")
        lora = build_lora_adapter(tiny, work / "lora")
        results = {
            "sqlite": bench("sqlite", None, work, tiny, lora, args.records),
            "postgresql": bench("postgresql", server.get_uri(), work, tiny, lora, args.records),
        }
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'operation':<28} {'sqlite':>12} {'postgresql':>12}")
    for key in results["sqlite"]:
        pg_key = key if key in results["postgresql"] else next(k for k in results["postgresql"] if k.split(" (")[0] == key.split(" (")[0])
        print(f"{key:<28} {results['sqlite'][key]:>12} {results['postgresql'][pg_key]:>12}")
    out = args.out / "registry_db_bench.json"
    out.write_text(json.dumps({"records": args.records, "cpus": os.cpu_count(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
