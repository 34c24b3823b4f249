"""Fixtures of the serving tests: a registry of real tiny LoRAs, a real uvicorn server on
loopback, and offline transformers+PEFT greedy references to compare the server against.

The server runs in a thread of the test process on a socket bound to 127.0.0.1 port 0 (a free
port, no race); every wait is bounded in time.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.conftest import build_lora_adapter

BASE_NAME = "tiny"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is ~10-60x faster than two
    threads spinning against other processes (measured here), and results do not change."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
# Twelve adapters that differ in rank, alpha, target modules and options, as real fleets do.
ADAPTER_SHAPES: list[dict[str, object]] = [
    {"rank": 4, "alpha": 8.0, "target_modules": ("q_proj", "v_proj")},
    {"rank": 8, "alpha": 16.0, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")},
    {"rank": 16, "alpha": 16.0, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
    {"rank": 2, "alpha": 4.0, "target_modules": ("o_proj",)},
    {"rank": 8, "alpha": 8.0, "target_modules": ("gate_proj", "up_proj", "down_proj"), "use_rslora": True},
    {"rank": 4, "alpha": 32.0, "target_modules": ("q_proj", "v_proj"), "rank_pattern": {"v_proj": 6}},
] * 2

def build_dora_adapter(base_dir: Path, out_dir: Path, *, seed: int) -> Path:
    """A DoRA test adapter on attention and a feedforward module (rank 4, alpha 8)."""
    return build_lora_adapter(base_dir, out_dir, rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), use_dora=True, seed=seed)


def build_ia3_adapter(base_dir: Path, out_dir: Path, *, seed: int) -> Path:
    """An (IA)3 test adapter: output scales on k/v, an input scale on the feedforward down_proj."""
    return build_lora_adapter(
        base_dir, out_dir, peft_type="ia3", target_modules=("k_proj", "v_proj", "down_proj"), feedforward_modules=("down_proj",), seed=seed
    )


@dataclass(frozen=True)
class AdapterFleet:
    """Registry home with `tiny` and adapters `task-0..task-11` (version 1 each)."""

    home: Path
    base_dir: Path
    names: tuple[str, ...]
    dirs: dict[str, Path]


@pytest.fixture(scope="session")
def adapter_fleet(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFleet:
    from adapterhub.registry import Registry

    root = tmp_path_factory.mktemp("fleet")
    registry = Registry.open(home=root / "home")
    registry.add_base_model(name=BASE_NAME, model_dir=tiny_base)
    dirs: dict[str, Path] = {}
    for index, shape in enumerate(ADAPTER_SHAPES):
        name = f"task-{index}"
        dirs[name] = build_lora_adapter(tiny_base, root / name, seed=100 + index, **shape)  # type: ignore[arg-type]
        registry.put_adapter(name=name, source_dir=dirs[name], base=BASE_NAME, tags=("test",))
    return AdapterFleet(home=root / "home", base_dir=Path(registry.get_base_model(BASE_NAME).path), names=tuple(dirs), dirs=dirs)


class ReferenceGenerator:
    """Offline greedy outputs of transformers (+ PEFT for adapters): the ground truth."""

    def __init__(self, base_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.base_dir = base_dir
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one instance per session
    def greedy(self, adapter_dir: Path | None, prompt_ids: tuple[int, ...], max_new_tokens: int) -> str:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.base_dir)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        model.eval()
        with torch.no_grad():
            output = model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)


    def greedy_table(
        self, adapter_dirs: dict[str, Path | None], prompt_ids: list[tuple[int, ...]], max_new_tokens: int
    ) -> dict[tuple[str, tuple[int, ...]], str]:
        """Greedy output of every (model, prompt), one PEFT model holding all adapters."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(self.base_dir)
        named = {name: path for name, path in adapter_dirs.items() if path is not None}
        model: torch.nn.Module = base
        if named:
            first, *rest = named.items()
            model = PeftModel.from_pretrained(base, first[1], adapter_name=first[0])
            for name, path in rest:
                model.load_adapter(path, adapter_name=name)
        model.eval()
        table: dict[tuple[str, tuple[int, ...]], str] = {}
        for name, path in adapter_dirs.items():
            context = model.disable_adapter() if (path is None and named) else contextlib.nullcontext()
            if path is not None:
                model.set_adapter(name)
            with context, torch.no_grad():
                for ids in prompt_ids:
                    output = model.generate(
                        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                    table[name, ids] = self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        return table


@pytest.fixture(scope="session")
def reference(adapter_fleet: AdapterFleet) -> ReferenceGenerator:
    return ReferenceGenerator(adapter_fleet.base_dir)


@dataclass
class RunningServer:
    base_url: str
    app: object
    backend: object

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        # max_retries=0: a 429/503 must reach the test, not be retried away.
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)


@contextlib.contextmanager
def serve_app(app: object, *, startup_timeout: float = 60.0) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def start_server(
    fleet: AdapterFleet, *, api_key: str | None = None, preload: tuple[str, ...] = (), lora_paths: object = None,
    app_options: dict[str, object] | None = None, base_dir: Path | None = None, **engine_options: object,
) -> Iterator[RunningServer]:
    """A real server over the fleet's registry with a fresh torch engine (`lora_paths`: which
    directories it may load by path, default none, as `serve`; `app_options` go to `create_app`;
    `base_dir` serves another copy of the base)."""
    from adapterhub.registry import Registry
    from adapterhub.serving.app import create_app
    from adapterhub.serving.backends.torch_engine import EngineConfig, TorchEngine
    from adapterhub.serving.resolver import RegistryResolver

    registry = Registry.open(home=fleet.home)
    # CPU in fp32 unless a test says otherwise: outputs are compared with offline PEFT exactly.
    engine_options = {"device": "cpu", **engine_options}
    backend = TorchEngine(base_dir or fleet.base_dir, base_name=BASE_NAME, config=EngineConfig(**engine_options))  # type: ignore[arg-type]
    app = create_app(
        backend, RegistryResolver(registry, BASE_NAME), api_key=api_key, preload=preload, lora_paths=lora_paths,  # type: ignore[arg-type]
        **(app_options or {}),  # type: ignore[arg-type]
    )
    with serve_app(app) as base_url:
        yield RunningServer(base_url=base_url, app=app, backend=backend)


@pytest.fixture(scope="module")
def server(adapter_fleet: AdapterFleet) -> Iterator[RunningServer]:
    """One shared server (max_resident 4) for tests that do not depend on its history; it loads
    adapters by any path (`serve --allow-lora-path`), as the tests of that endpoint need."""
    from adapterhub.serving.app import LoraPathPolicy

    with start_server(adapter_fleet, max_resident=4, max_cpu_adapters=8, lora_paths=LoraPathPolicy(allow_any=True)) as running:
        yield running
