"""Shared fixtures: tiny real models built in tmp dirs, and an isolated ADAPTERHUB_HOME.

The tiny base is a real `LlamaForCausalLM` (2 layers, hidden 64) with a real byte-level BPE
tokenizer trained here on a few sentences and a ChatML chat template, saved with
`save_pretrained` as safetensors. Everything that works on SmolLM2 works on it, in seconds.
`tiny_vllm_base` is wider (head_dim 32) because vLLM's CPU attention refuses head_dim < 32.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reverse the words: apple banana cherry",
    "translate to french: hello world",
    "question: what is two plus two? answer: four",
    "adapters are small task specific weights on one base model",
    "0 1 2 3 4 5 6 7 8 9 positive negative neutral yes no",
] * 20


def free_port() -> int:
    """A TCP port free on loopback now, for a server a test starts."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(server: Any, url: str, log_path: Path, timeout_s: float = 120) -> None:
    """Wait until the server process at `url` answers /health with 200; fail with the end of its
    log when it exits first or `timeout_s` passes (every wait in the tests is bounded)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, f"server exited ({server.returncode}):\n" + log_path.read_text()[-4000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"server not healthy after {timeout_s:g} s:\n" + log_path.read_text()[-4000:]
        time.sleep(0.25)


def build_tokenizer(out_dir: Path) -> None:
    """Train a tiny byte-level BPE and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)


def build_tiny_llama(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """A random LlamaForCausalLM with the tiny tokenizer, saved as safetensors in `out_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 1,
    peft_type: str = "lora",
    feedforward_modules: tuple[str, ...] = (),
    **config_kwargs: object,
) -> Path:
    """A real PEFT adapter on `base_dir` with random weights that look trained, saved by PEFT.

    LoRA/soft-prompt tensors get 0.05 * noise. DoRA magnitudes and (IA)3 scales stay near their
    identity values (the base's row norms, and 1) with 30% noise: filling them with small noise
    would zero the layer out. `feedforward_modules` are the (IA)3 modules that scale the input.
    """
    import torch
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if peft_type == "lora":
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), task_type="CAUSAL_LM", **config_kwargs)
    elif peft_type == "ia3":
        config = IA3Config(target_modules=list(target_modules), feedforward_modules=list(feedforward_modules), task_type="CAUSAL_LM")
    elif peft_type == "prompt_tuning":
        config = PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    elif peft_type == "prefix_tuning":
        config = PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    else:
        raise ValueError(peft_type)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "lora_magnitude_vector" in name or "ia3_l" in name:
                param.mul_(1 + 0.3 * noise)
            else:
                param.copy_(noise * 0.05)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama base model directory (shared by the session; treat as read-only)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny base of another hidden size: adapters of one must not fit the other."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-96"), hidden_size=96, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_vllm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with head_dim 32, the smallest vLLM's CPU attention accepts."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-vllm"), hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ADAPTERHUB_HOME where `adapterhub models add smollm2` ran (the real GGUF conversion, once
    per session, ~1 min). Tests that need SmolLM2 register `smollm2_dir` in their own home, or
    copy this home; they must not write into it."""
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("smollm2-home")
    env = os.environ | {"ADAPTERHUB_HOME": str(home)}
    env.pop("ADAPTERHUB_DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "adapterhub.cli.main", "models", "add", "smollm2"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_home: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors transformers directory (read-only)."""
    return smollm2_home / "models" / "smollm2"


@pytest.fixture()
def lora_dir(tiny_base: Path, tmp_path: Path) -> Path:
    """A rank-4 LoRA on q_proj/v_proj of `tiny_base`."""
    return build_lora_adapter(tiny_base, tmp_path / "lora")


@pytest.fixture()
def adapterhub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty ADAPTERHUB_HOME for one test (and no database URL leaking in)."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADAPTERHUB_HOME", str(home))
    monkeypatch.delenv("ADAPTERHUB_BLOB_DIR", raising=False)
    monkeypatch.delenv("ADAPTERHUB_DATABASE_URL", raising=False)
    yield home


def pytest_configure(config: pytest.Config) -> None:
    # No test may reach a hub; everything is built locally or shipped in a package.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A real PostgreSQL 16 for the session, started by `pgserver` in a temp dir (about a second).

    The data directory is not under pytest's basetemp: a concurrent pytest run on the same
    machine prunes old basetemps, which would pull the data out from under the server.

    `pgserver` and `psycopg` come with the `dev` extra (`make test` installs it); without them
    the PostgreSQL half of the suite is skipped, and `-ra` says so.
    """
    pgserver = pytest.importorskip("pgserver", reason="PostgreSQL tests need the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("psycopg", reason="PostgreSQL tests need the dev extra: pip install -e '.[dev]'")
    import shutil
    import tempfile

    data_dir = Path(tempfile.mkdtemp(prefix="adapterhub-pg-"))
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture()
def postgres_url(postgres_server: Any) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's PostgreSQL, dropped after the test."""
    import uuid

    import sqlalchemy

    admin = sqlalchemy.create_engine(_psycopg_url(postgres_server.get_uri()), isolation_level="AUTOCOMMIT")
    database = f"t_{uuid.uuid4().hex[:16]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
    yield _psycopg_url(postgres_server.get_uri(database))
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    admin.dispose()


def _psycopg_url(uri: str) -> str:
    return uri.replace("postgresql://", "postgresql+psycopg://", 1)
