"""The vLLM resolver plugin: a plain `python -m vllm.entrypoints.openai.api_server` serving
registry adapters by ref, and the resolver's answers on their own.

The server test runs the real vLLM OpenAI server as a child process (one per module, ≈1 min to
start here) with only this plugin loaded, and checks its outputs against offline
transformers+PEFT. The other tests ask the resolver directly (no engine).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import build_lora_adapter, free_port, wait_healthy
from tests.serving.conftest import ReferenceGenerator

pytest.importorskip("vllm")

BASE = "tiny-vllm"
PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def plugin_home(tiny_vllm_base: Path, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A registry with two adapters of the vLLM base (one in two versions) and one of another base."""
    from adapterhub.registry import Registry

    root = tmp_path_factory.mktemp("vllm-plugin")
    registry = Registry.open(home=root / "home")
    registry.add_base_model(name=BASE, model_dir=tiny_vllm_base)
    registry.add_base_model(name="tiny-other", model_dir=tiny_base)
    dirs = {
        "writer:1": build_lora_adapter(tiny_vllm_base, root / "w1", seed=11, rank=8, target_modules=("q_proj", "v_proj")),
        "writer:2": build_lora_adapter(tiny_vllm_base, root / "w2", seed=12, rank=8, target_modules=("q_proj", "v_proj")),
        "critic:1": build_lora_adapter(tiny_vllm_base, root / "c1", seed=13, rank=4, target_modules=("o_proj", "down_proj")),
    }
    for ref, source in dirs.items():
        registry.put_adapter(name=ref.split(":")[0], source_dir=source, base=BASE)
    registry.put_adapter(name="elsewhere", source_dir=build_lora_adapter(tiny_base, root / "e", seed=14), base="tiny-other")
    return {"registry": registry, "home": root / "home", "dirs": dirs, "base_dir": Path(registry.get_base_model(BASE).path)}


def _resolver(plugin_home: dict[str, object]):
    from adapterhub.serving.backends.vllm_engine import RegistryLoRAResolver

    return RegistryLoRAResolver(open_registry=lambda: plugin_home["registry"])


def test_resolver_answers_refs_of_its_base_only(plugin_home: dict[str, object]) -> None:
    resolver = _resolver(plugin_home)
    base_dir = str(plugin_home["base_dir"])
    registry = plugin_home["registry"]
    assert resolver.lookup(base_dir, "writer:1") == registry.materialize("writer:1")  # type: ignore[attr-defined]
    assert resolver.lookup(base_dir, "writer") == registry.materialize("writer:2")  # type: ignore[attr-defined]
    assert resolver.lookup(BASE, "critic") == registry.materialize("critic:1")  # by the base's registry name too
    assert resolver.lookup(base_dir, "elsewhere") is None  # an adapter of another base
    assert resolver.lookup(base_dir, "writer:7") is None
    assert resolver.lookup("/not/a/registered/base", "writer") is None
    for not_a_ref in ("../home/registry.db", "/etc/passwd", "writer:0", "a b", "x@zz", ""):
        assert resolver.lookup(base_dir, not_a_ref) is None, not_a_ref


def test_resolver_builds_a_lora_request(plugin_home: dict[str, object]) -> None:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    from adapterhub.serving.backends.vllm_engine import register_registry_resolver

    register_registry_resolver()
    from vllm.lora.resolver import LoRAResolverRegistry

    assert isinstance(LoRAResolverRegistry.get_resolver("adapterhub"), LoRAResolver)
    request = asyncio.run(_resolver(plugin_home).resolve_lora(str(plugin_home["base_dir"]), "critic:1"))
    assert isinstance(request, LoRARequest) and request.lora_name == "critic:1"
    assert Path(request.lora_path) == plugin_home["registry"].materialize("critic:1")  # type: ignore[attr-defined]
    assert asyncio.run(_resolver(plugin_home).resolve_lora(str(plugin_home["base_dir"]), "nope")) is None


@pytest.fixture(scope="module")
def plain_vllm(plugin_home: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The command the README gives, on the tiny base, with only adapterhub's plugin loaded."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-log") / "server.log"
    env = {
        **os.environ, "ADAPTERHUB_HOME": str(plugin_home["home"]), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_PLUGINS": "adapterhub", "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    env.pop("ADAPTERHUB_DATABASE_URL", None)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(plugin_home["base_dir"]),
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--dtype", "float32", "--max-model-len", "256",
        "--max-num-seqs", "8", "--host", "127.0.0.1", "--port", str(port),
    ]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, url, log_path, timeout_s=300)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_plain_vllm_server_serves_registry_adapters_by_ref(plain_vllm: str, plugin_home: dict[str, object]) -> None:
    client = openai.OpenAI(base_url=f"{plain_vllm}/v1", api_key="unused", max_retries=0, timeout=120)
    reference = ReferenceGenerator(plugin_home["base_dir"])  # type: ignore[arg-type]
    ids = tuple(reference.prompt_ids(PROMPT))
    dirs: dict[str, Path] = plugin_home["dirs"]  # type: ignore[assignment]

    def expected(ref: str) -> str:
        # vLLM's detokenizer holds back a trailing incomplete UTF-8 sequence (the random tiny
        # model emits byte tokens) where a whole-sequence decode shows U+FFFD.
        return reference.greedy(dirs[ref], ids, 8).rstrip("\ufffd")

    for ref in ("writer:1", "writer:2", "critic:1"):
        answer = client.completions.create(model=ref, prompt=PROMPT, max_tokens=8, temperature=0)
        assert answer.choices[0].text.rstrip("\ufffd") == expected(ref), ref
    # A bare name is the latest version (vLLM keeps that answer for the life of its server).
    latest = client.completions.create(model="writer", prompt=PROMPT, max_tokens=8, temperature=0)
    assert latest.choices[0].text.rstrip("\ufffd") == expected("writer:2")
    for unknown in ("elsewhere", "missing", "../../etc/passwd"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=unknown, prompt=PROMPT, max_tokens=2)
