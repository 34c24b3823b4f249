"""Memory stays flat on a 1,000,000-row JSONL: inspect and exact dedup stream their input.

Split, mix and MinHash dedup stream through the same reader; their 1M-row figures are in
benchmarks/data_bench.py (each pass costs ~10 s here, so this test keeps to two passes).

Run in a fresh interpreter so the peak RSS measured is the verbs', not what earlier tests left.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROWS = 1_000_000
RSS_BOUND_MB = 150  # 93 MB measured (hashes.HashIndex); a dict of ints to strings took 187
SECONDS_BOUND = 120  # ~40 s measured on 2 shared cores; the bound catches a quadratic slip, not noise

SCRIPT = r"""
import json, sys, time
from pathlib import Path
from adapterhub.data import dedup_file, inspect_file
path, out = Path(sys.argv[1]), Path(sys.argv[2])

def status_mb(field):
    # /proc/self/status, not getrusage: ru_maxrss carries the parent's peak across fork + exec
    # (a child of a 1 GB pytest process reads >= 1 GB), VmHWM is this process image's own peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)

# The resident size now, not the peak so far: a transient peak while importing would hide the verbs' growth.
start = status_mb("VmRSS")
began = time.perf_counter()
report = inspect_file(path)
dedup = dedup_file(path, out / "dedup.jsonl")
peak = status_mb("VmHWM")
print(json.dumps({"rows": report.rows, "labels": report.labels, "duplicates": report.duplicate_rows,
                  "dedup_out": dedup.stats["rows_out"],
                  "grew_mb": peak - start, "seconds": time.perf_counter() - began}))
"""


def test_a_million_rows_stream_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        # Every 10th row repeats an earlier one, so dedup has work; three labels.
        handle.writelines(f'{{"text": "row {i - 5 if i % 10 == 9 else i}", "label": "l{i % 3}"}}\n' for i in range(ROWS))
    (tmp_path / "out").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path), str(tmp_path / "out")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == ROWS and result["duplicates"] == ROWS // 10
    assert result["dedup_out"] == ROWS - ROWS // 10
    assert result["seconds"] < SECONDS_BOUND, result
    assert result["grew_mb"] < RSS_BOUND_MB, result
    print(result)
