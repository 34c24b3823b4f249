"""`adapterhub serve` as a real process and `adapterhub bench serve` against it (tiny sizes).

Every wait is bounded: the server must answer /health within 120 s, the benchmark must end
within 240 s, and the server must exit within 30 s of SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import build_lora_adapter, free_port, wait_healthy

CLI = [sys.executable, "-m", "adapterhub.cli.main"]


@pytest.fixture()
def tiny_home(tiny_base: Path, adapterhub_home: Path, tmp_path: Path) -> Path:
    from adapterhub.registry import Registry

    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    registry.put_adapter(name="greeter", source_dir=build_lora_adapter(tiny_base, tmp_path / "greeter", seed=5), base="tiny")
    return adapterhub_home


def _env(home: Path) -> dict[str, str]:
    # One intra-op thread: a tiny model on a shared 2-core machine runs far faster that way.
    return {**os.environ, "ADAPTERHUB_HOME": str(home), "OMP_NUM_THREADS": "1", "ADAPTERHUB_API_KEY": "k3y"}


def test_serve_process_answers_openai_client_and_bench_runs(tiny_home: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [*CLI, "serve", "--base", "tiny", "--port", str(port), "--max-resident", "2", "--preload", "greeter", "--log-level", "warning",
         "--tensor-parallel-size", "1"],  # accepted on the torch engine: one device
        env=_env(tiny_home), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, url, tmp_path / "server.log")

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=60)
        cards = {card.id: card.model_dump() for card in client.models.list().data}
        assert cards["greeter:1"]["resident"] is True and cards["greeter:1"]["meta"]["pinned"] is True
        reply = client.chat.completions.create(model="greeter", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

        out_dir = tmp_path / "results"
        bench = subprocess.run(
            [*CLI, "bench", "serve", "--url", url, "--adapter-counts", "1,2", "--concurrency", "1,2",
             "--requests-per-level", "4", "--max-tokens", "3", "--rank", "4", "--hot-loads", "2", "--out-dir", str(out_dir)],
            env=_env(tiny_home), capture_output=True, text=True, timeout=240,
        )
        assert bench.returncode == 0, bench.stdout + bench.stderr
        report = json.loads((out_dir / "serve_bench.json").read_text())
        systems = {(level["system"], level["adapters"], level["concurrency"]) for level in report["levels"]}
        assert systems == {(system, count, clients) for clients in (1, 2) for system, count in (
            ("server (base only)", 0), ("server", 1), ("server", 2), ("naive PEFT set_adapter", 1), ("naive PEFT set_adapter", 2))}
        assert set(report["goals"]) >= {"2_adapters_vs_base_only_at_1_clients", "2_adapters_vs_base_only_at_2_clients"}
        assert all(level["errors"] == 0 and level["output_tokens"] == 4 * 3 for level in report["levels"])
        assert len(report["hot_load_ms"]) == 2 and len(report["hot_load_first_ms"]) == 2
        assert (out_dir / "serve_bench.png").stat().st_size > 10_000
        assert "tok/s" in bench.stdout and "clients" in bench.stdout
        assert f"dtype {report['server']['dtype']}" in " ".join(bench.stdout.split())  # the table's title states the dtype
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
            log.close()


def test_serve_unknown_base_is_one_line_error(adapterhub_home: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--base", "no-such-model"], env=_env(adapterhub_home), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: no base model 'no-such-model'")
    assert "Traceback" not in result.stderr


def test_tensor_parallel_beyond_one_device_needs_the_vllm_backend(tiny_home: Path) -> None:
    """Refused before anything loads, in one line: the torch engine cannot shard a base."""
    result = subprocess.run(
        [*CLI, "serve", "--base", "tiny", "--tensor-parallel-size", "2"], env=_env(tiny_home), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --tensor-parallel-size 2 needs --backend vllm: the torch engine runs the base on one device"


def test_serve_defaults_are_the_engine_configs_and_the_readme_repeats_none() -> None:
    """`serve`, `EngineConfig` and the README once gave three different tier sizes (8/64, 4/32,
    4/64). `serve --help` shows `EngineConfig`'s defaults, and the README names no number for them."""
    import re

    from adapterhub.serving.backends.config import EngineConfig

    result = subprocess.run([*CLI, "serve", "--help"], env={**os.environ, "COLUMNS": "250"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shown = {
        match["flag"]: int(match["value"])
        for match in re.finditer(r"--(?P<flag>max-[a-z-]+)\b[^\n]*?\[default: (?P<value>\d+)\]", result.stdout)
    }
    defaults = EngineConfig()
    assert shown == {
        "max-resident": defaults.max_resident, "max-cpu-adapters": defaults.max_cpu_adapters,
        "max-batch-size": defaults.max_batch_size, "max-waiting": defaults.max_waiting,
    }
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert not re.search(r"--(max-resident|max-cpu-adapters|max-batch-size|max-waiting)[ =]\d", readme)


def _post_and_stall(port: int, path: str, body: dict, *, key: str = "k3y", withhold: int = 0) -> socket.socket:
    """Send a request on a socket that then reads nothing, with a tiny receive buffer, so the
    server's writes to it back up: a client that stalls mid-stream. With `withhold`, the last
    bytes of the body are never sent: a client that stalls mid-request."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload[: len(payload) - withhold]
    )
    return sock


def test_sigterm_stops_a_busy_server(tiny_base: Path, adapterhub_home: Path, tmp_path: Path) -> None:
    """SIGTERM once left the server at "Waiting for background tasks" until SIGKILL, with an
    adapter beyond equal tiers being read for ever. Now it stops whatever is in flight: streams
    whose clients read nothing, requests for adapters beyond both tiers (`--max-resident 2
    --max-cpu-adapters 2` with three adapters), a busy engine. 30 s is a hang guard only."""
    from adapterhub.registry import Registry

    registry = Registry.open(home=adapterhub_home)
    registry.add_base_model(name="tiny", model_dir=tiny_base)
    for index in range(3):
        registry.put_adapter(name=f"a{index}", source_dir=build_lora_adapter(tiny_base, tmp_path / f"a{index}", seed=index), base="tiny")
    port = free_port()
    log_path = tmp_path / "server.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        [*CLI, "serve", "--base", "tiny", "--port", str(port), "--max-resident", "2", "--max-cpu-adapters", "2", "--log-level", "info"],
        env=_env(adapterhub_home), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    stalled: list[socket.socket] = []
    try:
        wait_healthy(server, url, log_path)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=60)
        # The adapter beyond both tiers answers (it was read from disk for ever before).
        for name in ("a0", "a1", "a2", "a0"):
            assert client.completions.create(model=name, prompt="hello", max_tokens=2, temperature=0).usage.completion_tokens >= 1
        # Megabytes of stream per client (16 choices with 20 logprobs a token): more than the
        # socket buffers hold, so the server's writes to them wait for good.
        long_stream = {"prompt": "hello", "max_tokens": 400, "n": 16, "stream": True, "logprobs": 20, "ignore_eos": True}
        for name in ("a0", "a1", "a2", "tiny"):
            stalled.append(_post_and_stall(port, "/v1/completions", {**long_stream, "model": name}))
        stalled.append(_post_and_stall(port, "/v1/completions", {**long_stream, "model": "a1"}, withhold=5))
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=5).json()["running"] == 0:
            assert time.monotonic() < deadline, "the streams never started"
            time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not stop within 30 s of SIGTERM:\n" + log_path.read_text()[-3000:])
    finally:
        for sock in stalled:
            sock.close()
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


def test_serve_warns_when_it_listens_beyond_loopback_without_a_key(adapterhub_home: Path) -> None:
    from adapterhub.cli.serve import exposure_warnings

    env = {key: value for key, value in _env(adapterhub_home).items() if key != "ADAPTERHUB_API_KEY"}
    # The base does not exist, so the command stops after its checks: nothing binds or loads.
    exposed = subprocess.run(
        [*CLI, "serve", "--base", "no-such-model", "--host", "0.0.0.0", "--allow-lora-path"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert exposed.returncode == 1
    warnings = [line for line in exposed.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, exposed.stderr
    assert "--host 0.0.0.0 is not a loopback address and no --api-key" in warnings[0]
    assert "--allow-lora-path" in warnings[1] and "anywhere on this machine" in warnings[1]
    assert exposed.stdout == ""  # human output on stderr only
    quiet = subprocess.run([*CLI, "serve", "--base", "no-such-model"], env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1 and "warning:" not in quiet.stderr, quiet.stderr

    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"):
        assert exposure_warnings(host, api_key=None, allow_lora_path=False, adapter_dir=None) == [], host
    for host in ("0.0.0.0", "::", "192.168.1.4", "my-host.example"):
        assert len(exposure_warnings(host, api_key=None, allow_lora_path=False, adapter_dir=None)) == 1, host
        assert exposure_warnings(host, api_key="k3y", allow_lora_path=False, adapter_dir=None) == [], host
    below = exposure_warnings("127.0.0.1", api_key=None, allow_lora_path=True, adapter_dir=Path("/srv/adapters"))
    assert len(below) == 1 and "below /srv/adapters" in below[0]


def test_serve_a_registered_full_model_as_the_base(tiny_home: Path, tmp_path: Path) -> None:
    """`serve --base REF` of a merged full model (`merge --full-model --out`) serves it under its
    ref, with the outputs transformers gives for its materialized directory; an adapter ref as
    --base is refused by name."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterhub.registry import Registry

    recipe = tmp_path / "recipe.yml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: tiny\nmodels:\n  - model: greeter\n    parameters: {weight: 1.0}\n")
    merged = subprocess.run([*CLI, "merge", str(recipe), "--full-model", str(tmp_path / "full"), "--out", "greeter-full"],
                            env=_env(tiny_home), capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    refused = subprocess.run([*CLI, "serve", "--base", "greeter"], env=_env(tiny_home), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "'greeter' is an adapter, not a base model or a full model" in refused.stderr

    model_dir = Registry.open(home=tiny_home).materialize("greeter-full:1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(model_dir).generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([*CLI, "serve", "--base", "greeter-full:1", "--port", str(port), "--log-level", "warning"],
                                  env=_env(tiny_home), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, url, log_path)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0, timeout=60)
        assert [card.id for card in client.models.list().data] == ["greeter-full:1"]
        answer = client.completions.create(model="greeter-full:1", prompt="hello there", max_tokens=6, temperature=0)
        assert answer.choices[0].text == expected
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def test_bench_backends_starts_each_server_and_reports_it(tiny_home: Path, tmp_path: Path) -> None:
    """`bench backends` with the torch system alone (the vLLM systems are the same code path with
    another command line; tests/cli/test_serve_vllm_cli.py runs `serve --backend vllm`)."""
    out_dir = tmp_path / "results"
    env = {**_env(tiny_home), "ADAPTERHUB_API_KEY": ""}
    result = subprocess.run(
        [*CLI, "bench", "backends", "--base", "tiny", "--systems", "adapterhub torch", "--dtype", "fp32", "--adapter-counts", "1,2",
         "--concurrency", "2", "--requests-per-level", "4", "--max-tokens", "3", "--rank", "4", "--out-dir", str(out_dir)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out_dir / "backends_bench.json").read_text())
    (torch_result,) = report["results"]
    assert torch_result["system"] == "adapterhub torch" and torch_result["startup_s"] > 0
    assert [level["adapters"] for level in torch_result["levels"]] == [0, 1, 2]
    assert all(level["errors"] == 0 and level["output_tokens"] == 4 * 3 for level in torch_result["levels"])
    # Two rounds by default, each its own server; the figures are their medians.
    assert len(torch_result["rounds"]) == 2
    for index, level in enumerate(torch_result["levels"]):
        rates = sorted(run["levels"][index]["tokens_per_s"] for run in torch_result["rounds"])
        assert level["tokens_per_s"] == pytest.approx(sum(rates) / 2)
    assert (out_dir / "backends_bench.adapterhub-torch.round2.log").exists()
    assert report["goals"] == {}  # no vLLM pair to compare
    assert (out_dir / "backends_bench.png").stat().st_size > 10_000
    assert (out_dir / "backends_bench.adapterhub-torch.log").exists()
    refused = subprocess.run([*CLI, "bench", "backends", "--base", "tiny", "--systems", "tgi"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "unknown system(s) ['tgi']" in refused.stderr
