"""Registry benchmark: list/resolve at 10,000 records, and import throughput against `cp`.

    .venv/bin/python benchmarks/registry_bench.py [--records 10000] [--out benchmarks/results]

Populates a fresh registry (in a temp dir) through the real `put_adapter` path: 2,000 names
x 5 versions on two base models, 10 tags. Then times, as medians over repeats:
  - `list` of everything, filtered by base, filtered by tag (and peak Python memory of a call);
  - `get` of `name`, `name:version`, `name@sha-prefix`;
  - import of a rank-16 LoRA on SmolLM2 (q/k/v/o, every layer; new content each time), in
    MB/s, next to a plain `cp` of the same files and `cp` + `sync` (import fsyncs every blob).
Goals (issue 2): list of 10k < 0.5 s, resolve < 5 ms, import dominated by hashing + fsync.
Writes `registry_bench.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
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
from tests.registry.conftest import make_variant as variant  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds over `repeats`, and the peak traced memory (MB) of one call."""
    fn()  # warm caches (SQLite pages, imports)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return statistics.median(samples), peak


def smollm2_lora(work: Path) -> tuple[Path, Path]:
    """SmolLM2 as a safetensors dir and a rank-16 LoRA on q/k/v/o of every layer."""
    from adapterhub.models import prepare_base_model

    base = prepare_base_model(None, work / "smollm2")
    adapter = build_lora_adapter(base, work / "smollm2-lora", rank=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    return base, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--imports", type=int, default=10, help="SmolLM2 LoRA imports to time")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    try:
        registry = Registry.open(work / "home")
        tiny = build_tiny_llama(work / "tiny")
        tiny_other = build_tiny_llama(work / "tiny-wide", hidden_size=96)
        registry.add_base_model(name="tiny", model_dir=tiny)
        registry.add_base_model(name="tiny-wide", model_dir=tiny_other)
        sources = {
            "tiny": [variant(build_lora_adapter(tiny, work / "l-tiny"), work / f"tiny-v{v}", v) for v in range(5)],
            "tiny-wide": [variant(build_lora_adapter(tiny_other, work / "l-wide"), work / f"wide-v{v}", v) for v in range(5)],
        }
        names = args.records // 5
        start = time.perf_counter()
        for i in range(names):
            base = "tiny" if i % 2 == 0 else "tiny-wide"
            for version in range(5):
                registry.put_adapter(name=f"adapter-{i:05d}", source_dir=sources[base][version], base=base, tags=(f"team{i % 10}",))
            if (i + 1) % 200 == 0:
                print(f"  populated {(i + 1) * 5} records …", flush=True)
        populate_s = time.perf_counter() - start
        count = len(registry.list())
        sha = registry.get("adapter-00042:3").sha256

        rows: list[dict[str, object]] = []

        def add(operation: str, fn: Callable[[], object], repeats: int, goal: str) -> None:
            median, peak = timed(fn, repeats)
            rows.append({"operation": operation, "median_ms": round(median * 1000, 3), "peak_mb": round(peak, 2), "goal": goal})

        add(f"list all ({count})", lambda: registry.list(), 5, "< 500 ms")
        add("list --base tiny", lambda: registry.list(base="tiny"), 5, "< 500 ms")
        add("list --tag team3", lambda: registry.list(tag="team3"), 5, "< 500 ms")
        add("get name (latest)", lambda: registry.get("adapter-00042"), 100, "< 5 ms")
        add("get name:version", lambda: registry.get("adapter-00042:3"), 100, "< 5 ms")
        add("get name@sha-prefix", lambda: registry.get(f"adapter-00042@{sha[:8]}"), 100, "< 5 ms")
        add("resolve (miss)", lambda: registry.resolve("no-such-adapter"), 20, "< 5 ms")

        smol_base, smol_lora = smollm2_lora(work)
        registry.add_base_model(name="smollm2", model_dir=smol_base)
        size_mb = sum(p.stat().st_size for p in smol_lora.iterdir()) / 1e6
        import_s, cp_s, cp_sync_s = [], [], []
        for i in range(args.imports):
            source = variant(smol_lora, work / f"smol-v{i}", 1000 + i)
            start = time.perf_counter()
            registry.put_adapter(name="smol-import", source_dir=source, base="smollm2")
            import_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(["cp", "-r", str(source), str(work / f"cp-{i}")], check=True)
            cp_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run(["cp", "-r", str(source), str(work / f"cps-{i}")], check=True)
            subprocess.run(["sync", "-f", str(work / f"cps-{i}")], check=True)
            cp_sync_s.append(time.perf_counter() - start)
        imp, cp, cps = (statistics.median(x) for x in (import_s, cp_s, cp_sync_s))
        for label, seconds in (("import SmolLM2 r16 LoRA", imp), ("cp -r (same files)", cp), ("cp -r + sync", cps)):
            rows.append({"operation": label, "median_ms": round(seconds * 1000, 2), "peak_mb": None,
                         "goal": f"{size_mb / seconds:.0f} MB/s ({size_mb:.1f} MB)"})

        print()
        print(f"{'operation':<28} {'median ms':>10} {'peak MB':>8}  goal / throughput")
        for row in rows:
            peak = "" if row["peak_mb"] is None else f"{row['peak_mb']:.2f}"
            print(f"{row['operation']:<28} {row['median_ms']:>10} {peak:>8}  {row['goal']}")
        print(f"\npopulating {count} records through put_adapter took {populate_s:.1f} s ({count / populate_s:.0f} imports/s)")
        result = {"records": count, "populate_seconds": populate_s, "rows": rows, "adapter_mb": size_mb,
                  "import_vs_cp": imp / cp, "import_vs_cp_sync": imp / cps}
        (args.out / "registry_bench.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out / 'registry_bench.json'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
