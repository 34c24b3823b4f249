"""`adapterhub serve --backend vllm` as a real process (vLLM's CPU build, tiny base), driven by the
official `openai` client, and `adapterhub bench serve` against it.

The in-process tests (tests/serving/test_vllm_backend.py) cover the routes in depth; this one
checks what only the command shows: the LoRA slots sized from the registry, the listing, a hot
load on first use matching offline PEFT, auth, both metric families on one `/metrics`, the
benchmark, and that SIGINT stops the server with vLLM's engine-core process gone too.
One vLLM engine start (about a minute here); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import build_lora_adapter, free_port, wait_healthy
from tests.serving.conftest import ReferenceGenerator, build_dora_adapter

pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")  # a dependency of vLLM

CLI = [sys.executable, "-m", "adapterhub.cli.main"]
BASE = "tiny-vllm"
PROMPT = "the cat sat on"


def test_serve_backend_vllm_process(tiny_vllm_base: Path, adapterhub_home: Path, tmp_path: Path) -> None:
    from adapterhub.registry import Registry

    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name=BASE, model_dir=tiny_vllm_base)
    dirs = {
        "small": build_lora_adapter(tiny_vllm_base, tmp_path / "small", seed=21, rank=4, target_modules=("q_proj", "v_proj")),
        "wide": build_lora_adapter(tiny_vllm_base, tmp_path / "wide", seed=22, rank=16, target_modules=("o_proj", "down_proj")),
    }
    for name, source in dirs.items():
        registry.put_adapter(name=name, source_dir=source, base=BASE)
    registry.put_adapter(name="with-dora", source_dir=build_dora_adapter(tiny_vllm_base, tmp_path / "dora", seed=23), base=BASE)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ADAPTERHUB_HOME": str(adapterhub_home), "ADAPTERHUB_API_KEY": "k3y", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("ADAPTERHUB_DATABASE_URL", None)
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*CLI, "serve", "--base", BASE, "--backend", "vllm", "--port", str(port), "--max-resident", "2",
             "--max-cpu-adapters", "4", "--max-batch-size", "8", "--max-model-len", "256", "--dtype", "fp32",
             "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(server, url, log_path, timeout_s=300)
        # Slots sized for the largest registered rank (16), not a fixed default.
        assert "max LoRA rank 16" in log_path.read_text()

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=120)
        listed = {card.id for card in client.models.list().data}
        assert {BASE, "small:1", "wide:1"} <= listed and "with-dora:1" not in listed  # only what vLLM serves

        reference = ReferenceGenerator(tiny_vllm_base)
        ids = tuple(reference.prompt_ids(PROMPT))
        for name in ("small", "wide"):  # each loaded on first use from the registry
            answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
            # vLLM holds back a trailing incomplete UTF-8 sequence where a whole decode shows U+FFFD.
            assert answer.choices[0].text.rstrip("\ufffd") == reference.greedy(dirs[name], ids, 8).rstrip("\ufffd"), name
        base_answer = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=8, temperature=0)
        assert base_answer.choices[0].text.rstrip("\ufffd") == reference.greedy(None, ids, 8).rstrip("\ufffd")
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="with-dora", prompt=PROMPT, max_tokens=2)
        assert refused.value.code == "adapter_load_failed"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert "vllm:" in metrics and 'adapterhub_requests_total{model="small:1",status="200"}' in metrics

        out_dir = tmp_path / "results"
        bench = subprocess.run(
            [*CLI, "bench", "serve", "--url", url, "--adapter-counts", "1,2", "--concurrency", "2", "--requests-per-level", "4",
             "--max-tokens", "3", "--rank", "4", "--no-naive", "--hot-loads", "1", "--out-dir", str(out_dir)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert bench.returncode == 0, bench.stdout + bench.stderr
        report = json.loads((out_dir / "serve_bench.json").read_text())
        assert {(level["system"], level["adapters"]) for level in report["levels"]} == {
            ("server (base only)", 0), ("server", 1), ("server", 2)
        }
        assert all(level["errors"] == 0 and level["output_tokens"] == 4 * 3 for level in report["levels"])

        children = psutil.Process(server.pid).children(recursive=True)  # vLLM's engine core among them
        assert children, "vLLM runs its engine core in a child process"
    finally:
        server.send_signal(signal.SIGINT)
        try:
            returncode = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise
    assert returncode == 0, log_path.read_text()[-4000:]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"processes left behind by the server: {alive}"
