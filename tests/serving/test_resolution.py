"""A resident adapter costs no registry read, and a bare name still follows the registry: another
process imports `hot:2` (or removes it) while the server runs, and the next request gets it.

The registry's SQL statements are counted on its real engine (SQLAlchemy's cursor events);
the other process is a real `python -c` writing into the same SQLite registry.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event

from tests.serving.conftest import BASE_NAME, AdapterFleet, ReferenceGenerator, serve_app

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "the quick brown fox"


def _in_another_process(home: Path, code: str) -> None:
    """Run `code` with `registry` open on `home` in a separate Python process, to its end (its
    commit is done when this returns)."""
    script = f"from adapterhub.registry import Registry\nregistry = Registry.open(home={str(home)!r})\n" + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.fixture(params=[True, False], ids=["change-counter", "latest-version-query"])
def hot_server(request: pytest.FixtureRequest, adapter_fleet: AdapterFleet, tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A server over a registry of its own holding `hot:1`; yields its URL, the registry home and
    the SQL statements the server's registry runs (appended as they run). Without the change
    counter, the resolver checks bare names as it does on databases that have none."""
    from adapterhub.registry import Registry
    from adapterhub.serving.app import create_app
    from adapterhub.serving.backends.torch_engine import EngineConfig, TorchEngine
    from adapterhub.serving.resolver import RegistryResolver

    home = tmp_path / "home"
    registry = Registry.open(home=home)
    registry.add_base_model(name=BASE_NAME, model_dir=adapter_fleet.base_dir)
    registry.put_adapter(name="hot", source_dir=adapter_fleet.dirs["task-1"], base=BASE_NAME)
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *rest: object) -> None:
        if statement.split()[0].upper() not in ("BEGIN", "COMMIT", "ROLLBACK"):  # queries, not transaction control
            statements.append(statement)

    event.listen(registry.engine, "before_cursor_execute", record)
    engine = TorchEngine(adapter_fleet.base_dir, base_name=BASE_NAME, config=EngineConfig(device="cpu", max_resident=2, max_cpu_adapters=4))
    app = create_app(engine, RegistryResolver(registry, BASE_NAME, watch_changes=request.param))
    with serve_app(app) as url:
        yield url, home, statements


def test_resident_adapters_cost_no_registry_read_and_bare_names_follow_other_processes(
    hot_server: tuple[str, Path, list[str]], adapter_fleet: AdapterFleet, reference: ReferenceGenerator, request: pytest.FixtureRequest,
) -> None:
    import openai

    url, home, statements = hot_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt_ids = tuple(reference.prompt_ids(PROMPT))
    expected = {name: reference.greedy(adapter_fleet.dirs[name], prompt_ids, 6) for name in ("task-1", "task-2")}
    assert expected["task-1"] != expected["task-2"]  # so the outputs say which version answered

    def complete(model: str) -> str:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text

    assert complete("hot") == expected["task-1"]  # first use: resolved, read, loaded
    assert complete("hot:1") == expected["task-1"]
    statements.clear()
    for _ in range(3):
        assert complete("hot:1") == expected["task-1"]
        assert complete("hot") == expected["task-1"]
    watching = "change-counter" in request.node.callspec.id
    # With SQLite's change counter: nothing at all. Without: one indexed query per request (a
    # bare name's latest version, a version's row still existing).
    assert len(statements) == (0 if watching else 6), statements
    assert all("max(adapters.version)" in s or "adapters.version =" in s for s in statements)

    _in_another_process(home, f"registry.put_adapter(name='hot', source_dir={str(adapter_fleet.dirs['task-2'])!r}, base={BASE_NAME!r})")
    assert complete("hot") == expected["task-2"]  # the very next request after the import's commit
    assert complete("hot:1") == expected["task-1"]  # a version keeps its meaning
    statements.clear()
    assert complete("hot") == expected["task-2"]
    assert len(statements) == (0 if watching else 1)

    _in_another_process(home, "registry.remove('hot:2')")
    assert complete("hot") == expected["task-1"]  # the latest is version 1 again

    # A removed version is refused on the next request, though its weights are still resident.
    _in_another_process(home, "registry.remove('hot:1')")
    for model in ("hot:1", "hot"):
        with pytest.raises(openai.NotFoundError):
            complete(model)
