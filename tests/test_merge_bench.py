"""benchmarks/merge_bench.py measures what it says: every registered merge method has a case,
and a child's peak memory is the child's own.

The benchmark itself runs on SmolLM2 for minutes (docs/merging.md has its figures); these check
the two places where it could silently report the wrong thing: a method registered later
without a case (the table would claim "every method" and miss it), and peak RSS taken from
getrusage(RUSAGE_CHILDREN), which on Linux carries the forking process's own peak into the
child's figure across fork + exec.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def merge_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("merge_bench", REPO_ROOT / "benchmarks" / "merge_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_bench"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_every_registered_method_runs_or_says_why_not(merge_bench: ModuleType) -> None:
    from adapterhub.merge.methods import method_names

    cases, skipped = merge_bench.runnable_cases(8, None)
    run = {case.method for case in cases}
    assert run | set(skipped) == set(method_names())
    assert skipped == {"nuslerp": "takes 2..2 inputs, not 8", "slerp": "takes 2..2 inputs, not 8"}

    cases, skipped = merge_bench.runnable_cases(2, None)
    assert {case.method for case in cases} == set(method_names()) and not skipped

    cases, skipped = merge_bench.runnable_cases(4, ["ties", "tsv"])
    assert [case.method for case in cases] == ["ties", "tsv"]
    assert skipped["knots"] == "not selected (--methods)"


def test_the_goal_is_90_percent_for_two_tasks_and_75_for_more(merge_bench: ModuleType) -> None:
    assert merge_bench.goal_for(2) == 0.9
    assert merge_bench.goal_for(4) == merge_bench.goal_for(8) == 0.75


def test_peak_memory_is_the_childs_own_not_the_parents(merge_bench: ModuleType, tmp_path: Path) -> None:
    script = tmp_path / "allocate.py"
    script.write_text(
        "import sys\n"
        "block = bytearray(int(sys.argv[1]) * 1024 * 1024)\n"
        "for i in range(0, len(block), 4096):\n"
        "    block[i] = 1\n"
    )
    held = bytearray(400 * 1024 * 1024)  # this process's peak: what RUSAGE_CHILDREN would report for a small child
    for i in range(0, len(held), 4096):
        held[i] = 1
    small = merge_bench.measure(sys.executable, script, ["8"])
    large = merge_bench.measure(sys.executable, script, ["200"])
    del held
    assert small["peak_rss_mb"] < 120
    assert 200 <= large["peak_rss_mb"] < 320
    assert small["wall_s"] > 0


def test_a_failing_child_is_an_error_naming_it(merge_bench: ModuleType, tmp_path: Path) -> None:
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit('no such recipe')\n")
    with pytest.raises(RuntimeError, match="fails.py .*exited 1: no such recipe"):
        merge_bench.measure(sys.executable, script, [])


def test_the_interpreter_of_a_console_script_is_its_shebang(merge_bench: ModuleType, tmp_path: Path) -> None:
    script = tmp_path / "mergekit-yaml"
    script.write_text("#!/opt/mk/bin/python3.11\nimport sys\n")
    assert merge_bench.script_interpreter(script) == "/opt/mk/bin/python3.11"
    script.write_text("\x7fELF binary")
    with pytest.raises(RuntimeError, match="not a Python script"):
        merge_bench.script_interpreter(script)
