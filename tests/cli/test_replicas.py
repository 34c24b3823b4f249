"""Two `adapterhub serve` replicas on one PostgreSQL registry and one shared blob store.

A third process imports and removes adapters with the real CLI; both replicas must serve an
import on the next request and refuse a removed record on the next request (404, not the
weights they still hold). Mixed concurrent traffic through the official `openai` client to
both replicas must see no 5xx and the same greedy outputs as single requests.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import free_port, wait_healthy
from tests.conftest import build_lora_adapter

CLI = [sys.executable, "-m", "adapterhub.cli.main"]
PROMPT = [{"role": "user", "content": "reverse the words: apple banana"}]


def _env(home: Path, database_url: str, blob_dir: Path) -> dict[str, str]:
    return {
        **os.environ, "ADAPTERHUB_HOME": str(home), "ADAPTERHUB_DATABASE_URL": database_url,
        "ADAPTERHUB_BLOB_DIR": str(blob_dir), "OMP_NUM_THREADS": "1", "ADAPTERHUB_API_KEY": "k3y",
    }


@pytest.fixture()
def replicas(postgres_url: str, tiny_base: Path, tmp_path: Path) -> Iterator[tuple[list[openai.OpenAI], dict[str, str]]]:
    blob_dir = tmp_path / "shared-store"
    admin_env = _env(tmp_path / "home-admin", postgres_url, blob_dir)
    added = subprocess.run([*CLI, "models", "add", "tiny", str(tiny_base)], env=admin_env, capture_output=True, text=True, timeout=300)
    assert added.returncode == 0, added.stdout + added.stderr
    servers, clients, logs = [], [], []
    try:
        for replica in ("a", "b"):
            port = free_port()
            log_path = tmp_path / f"replica-{replica}.log"
            logs.append(log_path.open("w"))
            servers.append((subprocess.Popen(
                [*CLI, "serve", "--base", "tiny", "--port", str(port), "--max-resident", "2", "--log-level", "warning"],
                env=_env(tmp_path / f"home-{replica}", postgres_url, blob_dir), stdout=logs[-1], stderr=subprocess.STDOUT,
            ), f"http://127.0.0.1:{port}", log_path))
        for server, url, log_path in servers:
            wait_healthy(server, url, log_path)
            clients.append(openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=120))
        yield clients, admin_env
    finally:
        for server, _, _ in servers:
            server.send_signal(signal.SIGINT)
        for server, _, _ in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        for log in logs:
            log.close()


def _reply(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=6, temperature=0)
    return reply.choices[0].message.content or ""


def test_replicas_serve_an_import_at_once_honour_rm_and_agree_under_load(
    replicas: tuple[list[openai.OpenAI], dict[str, str]], tiny_base: Path, tmp_path: Path,
) -> None:
    clients, admin_env = replicas
    for client in clients:
        with pytest.raises(openai.NotFoundError):
            _reply(client, "late")

    for name, seed in (("late", 11), ("other", 12)):
        source = build_lora_adapter(tiny_base, tmp_path / name, seed=seed, rank=8)
        result = subprocess.run([*CLI, "import", str(source), "--name", name, "--base", "tiny"], env=admin_env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr

    # The next request on each replica serves the import; both answer alike.
    references = {model: _reply(clients[0], model) for model in ("late", "late:1", "other", "tiny")}
    assert references["late"] == references["late:1"] != references["other"]
    for model, expected in references.items():
        assert _reply(clients[1], model) == expected

    # Mixed traffic on both replicas at once: no 5xx (the client raises on any), the same outputs.
    jobs = [(clients[i % 2], model) for i in range(24) for model in [("late", "other", "tiny", "late:1")[i % 4]]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        outputs = list(pool.map(lambda job: (job[1], _reply(*job)), jobs))
    assert all(text == references[model] for model, text in outputs)

    # `rm` in a third process: both replicas refuse the record on the next request, by any ref.
    removed = subprocess.run([*CLI, "rm", "late:1"], env=admin_env, capture_output=True, text=True, timeout=300)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    for client in clients:
        for ref in ("late", "late:1"):
            with pytest.raises(openai.NotFoundError):
                _reply(client, ref)
        assert _reply(client, "other") == references["other"]
        assert "late:1" not in {card.id for card in client.models.list().data}
