"""`adapterhub serve` (the OpenAI-compatible server) and `adapterhub bench serve`.

The commands only wire things together: the registry, a backend, `create_app`, uvicorn; the
benchmark logic lives in `adapterhub.serving.bench`.

Design decisions:
- Safe by default: loopback only, loading adapters by `lora_path` off (`--allow-lora-path`, or
  directories below `--adapter-dir`), and a warning on stderr when the server listens beyond
  loopback without an API key or takes any path, as vLLM warns for runtime LoRA updating.
- The engine's defaults (tier sizes, batch, queue) are `EngineConfig`'s (`backends/config.py`),
  read without importing torch; nothing here repeats a number.
- Shutdown is bounded: after SIGTERM/SIGINT requests in flight get `--shutdown-timeout`
  seconds, then uvicorn cancels them and the engine stops (it would otherwise wait for every
  open stream, a stalled client's included, for ever).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from adapterhub.errors import AdapterhubError, NotFoundError
from adapterhub.serving.backends.config import DEFAULTS as ENGINE_DEFAULTS

bench_app = typer.Typer(help="Benchmarks that print a table and write JSON + PNG to benchmarks/results/.", no_args_is_help=True)


def serve(
    base: Annotated[str, typer.Option("--base", help="Registered base model name, a registered full model (a `merge --full-model --out` ref), or a transformers model directory.")],
    backend: Annotated[str, typer.Option(help="Engine: torch (embedded, CPU or CUDA) or vllm (vLLM's AsyncLLM in-process).")] = "torch",
    max_lora_rank: Annotated[
        Optional[int], typer.Option(help="vllm: LoRA slot rank (default: the smallest vLLM accepts covering the base's registered adapters).")
    ] = None,
    tensor_parallel_size: Annotated[
        int, typer.Option("--tensor-parallel-size", min=1, help="vllm: shard the base over this many GPUs (vLLM's tensor parallelism); the torch engine runs on one device.")
    ] = 1,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="ADAPTERHUB_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 routes.")
    ] = None,
    max_resident: Annotated[int, typer.Option(min=1, help="Adapters held in device slots at once.")] = ENGINE_DEFAULTS.max_resident,
    max_cpu_adapters: Annotated[
        int, typer.Option(min=1, help="Adapters kept parsed in host memory (device ones included).")
    ] = ENGINE_DEFAULTS.max_cpu_adapters,
    preload: Annotated[Optional[list[str]], typer.Option(help="Adapter reference to load and pin at start (repeatable).")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Rows decoded together in one step.")] = ENGINE_DEFAULTS.max_batch_size,
    max_waiting: Annotated[int, typer.Option(min=0, help="Queued requests beyond which new ones get 429.")] = ENGINE_DEFAULTS.max_waiting,
    scheduler_delay_factor: Annotated[float, typer.Option(
        min=0.0, help="torch backend: while rows run, a new request's prefill waits up to this many times the latest "
                      "prefill's duration for batch-mates (vLLM's --scheduler-delay-factor); 0 prefills at once.",
    )] = ENGINE_DEFAULTS.scheduler_delay_factor,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context window (default: the model's).")] = None,
    adapter_dir: Annotated[
        Optional[Path],
        typer.Option(help="Also serve PEFT adapters found in subdirectories of this folder (by folder name); "
                     "/v1/load_lora_adapter may then load paths below it."),
    ] = None,
    allow_lora_path: Annotated[
        bool, typer.Option("--allow-lora-path", help="Let /v1/load_lora_adapter load any directory by lora_path (off: only "
                           "below --adapter-dir, or none). Like vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: for local use.")
    ] = False,
    shutdown_timeout: Annotated[
        int, typer.Option(min=0, help="Seconds requests in flight get to finish after SIGTERM/SIGINT before they are cancelled.")
    ] = 5,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: CUDA when present).")] = None,
    dtype: Annotated[str, typer.Option(help="bf16, fp16, fp32 or auto (from the hardware).")] = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the base model and all of its adapters from one OpenAI-compatible endpoint."""
    import uvicorn

    from adapterhub.serving.app import LoraPathPolicy, create_app
    from adapterhub.serving.resolver import DirectoryResolver, RegistryResolver

    if backend not in ("torch", "vllm"):
        raise AdapterhubError(f"unknown backend {backend!r}; available: torch, vllm")
    if tensor_parallel_size > 1 and backend != "vllm":
        raise AdapterhubError(
            f"--tensor-parallel-size {tensor_parallel_size} needs --backend vllm: the {backend} engine runs the base on one device"
        )
    if max_cpu_adapters < max_resident:
        raise AdapterhubError("--max-cpu-adapters must be at least --max-resident")
    if len(preload or []) > max_resident:
        raise AdapterhubError(f"{len(preload or [])} --preload adapters do not fit in --max-resident {max_resident}")
    api_key = api_key or os.environ.get("ADAPTERHUB_API_KEY") or None
    for warning in exposure_warnings(host, api_key=api_key, allow_lora_path=allow_lora_path, adapter_dir=adapter_dir):
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    resolver = None
    if Path(base).is_dir():
        model_dir, base_name = Path(base), Path(base).resolve().name
    else:
        from adapterhub.registry import Registry

        registry = Registry.open()
        try:
            record = registry.get_base_model(base)
        except NotFoundError:
            model_dir, base_name = _full_model_base(registry, base)
        else:
            model_dir, base_name = Path(record.path), record.name
            resolver = RegistryResolver(registry, record.name)
    if adapter_dir is not None:
        if resolver is not None:
            raise AdapterhubError("--adapter-dir serves adapters of a base given as a directory; registry bases use the registry")
        resolver = DirectoryResolver(adapter_dir)
    if backend == "vllm":
        from adapterhub.serving.backends.vllm_engine import max_lora_rank_for

        if max_lora_rank is None:  # sized for the base's registered adapters (a summary's rank is `r`)
            ranks = [r.rank for r in registry.list(base=base_name) if r.rank] if isinstance(resolver, RegistryResolver) else []
            max_lora_rank = max_lora_rank_for(ranks)
        engine = vllm_engine(model_dir, base_name, max_resident=max_resident, max_cpu_adapters=max_cpu_adapters,
                             max_lora_rank=max_lora_rank, max_model_len=max_model_len, max_batch_size=max_batch_size,
                             dtype=dtype, tensor_parallel_size=tensor_parallel_size)
    else:
        engine = _torch_engine(model_dir, base_name, max_resident, max_cpu_adapters, max_batch_size, max_waiting,
                               max_model_len, device, dtype, scheduler_delay_factor)
    app = create_app(
        engine, resolver, api_key=api_key, preload=tuple(preload or ()),
        lora_paths=LoraPathPolicy(allow_any=allow_lora_path, root=adapter_dir),
    )
    typer.secho(f"serving {base_name} and its adapters at http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)


def _full_model_base(registry: object, ref: str) -> tuple[Path, str]:
    """A merged or fine-tuned full model of the registry (`merge --full-model --out NAME`) as the
    served base: its materialized directory, served under its ref. It has no adapters of its own
    (adapters are registered against base models), so only it is served."""
    from adapterhub.registry import Registry

    assert isinstance(registry, Registry)
    record = registry.resolve(ref)
    if record is None:
        raise AdapterhubError(
            f"no base model {ref!r} in the registry, no full model of that name and no such directory "
            "(see `adapterhub models list` and `adapterhub list`)"
        )
    if not record.is_full_model:
        raise AdapterhubError(
            f"{ref!r} is an adapter, not a base model or a full model: serve its base ({record.base_name}) "
            "and name the adapter as the request's model"
        )
    return Path(registry.materialize(record)), record.ref


def vllm_engine(
    model_dir: Path, base_name: str, *, max_resident: int, max_cpu_adapters: int, max_lora_rank: int,
    max_model_len: int | None, max_batch_size: int, dtype: str, tensor_parallel_size: int,
) -> object:
    """The vLLM backend with the command's settings, mapped onto vLLM's names (constructing it
    starts no engine: the server's start-up does)."""
    from adapterhub.serving.backends.vllm_engine import VllmEngine

    vllm_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    sharded = f", tensor parallel over {tensor_parallel_size} GPUs" if tensor_parallel_size > 1 else ""
    typer.secho(f"starting vLLM for {base_name} from {model_dir} (max LoRA rank {max_lora_rank}{sharded}) …", err=True)
    return VllmEngine(
        model_dir, base_name=base_name, max_resident=max_resident, max_cpu_adapters=max_cpu_adapters,
        max_lora_rank=max_lora_rank, max_model_len=max_model_len, max_num_seqs=max_batch_size, dtype=vllm_dtype,
        tensor_parallel_size=tensor_parallel_size,
    )


def _torch_engine(
    model_dir: Path, base_name: str, max_resident: int, max_cpu_adapters: int, max_batch_size: int, max_waiting: int,
    max_model_len: int | None, device: str | None, dtype: str, scheduler_delay_factor: float,
) -> object:
    """The embedded torch engine with the command's settings."""
    from adapterhub.models import default_device, resolve_dtype
    from adapterhub.serving.backends.config import EngineConfig
    from adapterhub.serving.backends.torch_engine import TorchEngine

    chosen_device = device or default_device()
    config = EngineConfig(
        max_resident=max_resident, max_cpu_adapters=max_cpu_adapters, max_batch_size=max_batch_size,
        max_waiting=max_waiting, max_model_len=max_model_len, device=chosen_device,
        dtype=resolve_dtype(dtype, chosen_device), scheduler_delay_factor=scheduler_delay_factor,
    )
    typer.secho(f"loading {base_name} from {model_dir} on {chosen_device} …", err=True)
    return TorchEngine(model_dir, base_name=base_name, config=config)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warnings(host: str, *, api_key: str | None, allow_lora_path: bool, adapter_dir: Path | None) -> list[str]:
    """What `serve` warns about at start: who can reach the server and what they can make it read."""
    warnings = []
    if not _is_loopback(host) and not api_key:
        warnings.append(
            f"--host {host} is not a loopback address and no --api-key (or ADAPTERHUB_API_KEY) is set: "
            "anyone who can reach this port can use every /v1 route"
        )
    if allow_lora_path:
        where = f"below {adapter_dir}" if adapter_dir is not None else "anywhere on this machine"
        warnings.append(
            f"--allow-lora-path: clients can make the server read any adapter directory {where} through "
            "/v1/load_lora_adapter; use it only for local development"
        )
    return warnings


@bench_app.command("serve")
def bench_serve(
    url: Annotated[str, typer.Option(help="Base URL of a running `adapterhub serve` (without /v1).")] = "http://127.0.0.1:8000",
    api_key: Annotated[Optional[str], typer.Option(envvar="ADAPTERHUB_API_KEY", help="API key of the server.")] = None,
    adapter_counts: Annotated[str, typer.Option(help="Distinct adapters in flight per level, comma-separated.")] = "1,4,16,64",
    concurrency: Annotated[str, typer.Option(help="Requests in flight at once (clients); comma-separated values run one after another, e.g. 16,32.")] = "16",
    requests_per_level: Annotated[int, typer.Option(min=1, help="Requests sent per level.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request (end-of-sequence ignored).")] = 32,
    rank: Annotated[int, typer.Option(min=1, help="Rank of the benchmark LoRAs (q/k/v/o).")] = 16,
    naive: Annotated[bool, typer.Option(help="Also time the naive PEFT set_adapter-per-group baseline in this process.")] = True,
    hot_loads: Annotated[int, typer.Option(min=0, help="Hot loads (registry -> resident) to time.")] = 8,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON and PNG go.")] = Path("benchmarks/results"),
) -> None:
    """Throughput and TTFT/latency vs distinct adapters, against base-only and naive PEFT swapping.

    Needs the server's registry (same ADAPTERHUB_HOME): random-weight rank-`rank` LoRAs tagged
    `bench` are registered on the served base when missing (`bench-lora-0..N`).
    """
    from adapterhub.serving.bench import BenchSettings, run_serve_benchmark

    counts = tuple(int(c) for c in adapter_counts.split(",") if c.strip())
    if not counts or min(counts) < 1:
        raise AdapterhubError("--adapter-counts needs positive integers, e.g. 1,4,16,64")
    try:
        concurrencies = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        concurrencies = ()
    if not concurrencies or min(concurrencies) < 1:
        raise AdapterhubError(f"--concurrency needs positive integers, e.g. 16 or 16,32 (got {concurrency!r})")
    settings = BenchSettings(
        url=url.rstrip("/"), api_key=api_key, adapter_counts=counts, concurrency=concurrencies,
        requests_per_level=requests_per_level, max_tokens=max_tokens, rank=rank, naive=naive,
        hot_loads=hot_loads, out_dir=out_dir,
    )
    run_serve_benchmark(settings)


@bench_app.command("backends")
def bench_backends(
    base: Annotated[str, typer.Option(help="Registered base model to serve.")] = "smollm2",
    systems: Annotated[str, typer.Option(help="Comma-separated: adapterhub vllm, vLLM's own server, adapterhub torch.")] = (
        "adapterhub vllm,vLLM's own server,adapterhub torch"
    ),
    dtype: Annotated[str, typer.Option(help="bf16 or fp32, for every system.")] = "bf16",
    adapter_counts: Annotated[str, typer.Option(help="Distinct adapters in flight per level, comma-separated.")] = "1,4,16",
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 16,
    requests_per_level: Annotated[int, typer.Option(min=1, help="Requests sent per level.")] = 32,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request (end-of-sequence ignored).")] = 32,
    rank: Annotated[int, typer.Option(min=1, help="Rank of the benchmark LoRAs (q/k/v/o).")] = 16,
    rounds: Annotated[int, typer.Option(min=1, help="Times each system is measured, the order reversed every other round; medians reported.")] = 2,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON, PNG and server logs go.")] = Path("benchmarks/results"),
) -> None:
    """The serving engines side by side: each system started as its own server in turn, same adapters,
    prompts and concurrency; throughput and p50/p99 latency at base-only and each adapter count.

    The goal it reports: adapterhub on vLLM within 10% of vLLM's own server at every level.
    """
    from adapterhub.serving.bench_backends import BackendsSettings, run_backends_benchmark

    try:
        counts = tuple(int(c) for c in adapter_counts.split(",") if c.strip())
    except ValueError:
        raise AdapterhubError(f"--adapter-counts {adapter_counts!r}: give positive integers, e.g. 1,4,16") from None
    run_backends_benchmark(BackendsSettings(
        base=base, systems=tuple(s.strip() for s in systems.split(",") if s.strip()), dtype=dtype, adapter_counts=counts,
        concurrency=concurrency, requests_per_level=requests_per_level, max_tokens=max_tokens, rank=rank, rounds=rounds,
        out_dir=out_dir, name="backends_bench",
    ))


def register(app: typer.Typer) -> None:
    """Add `serve` and the `bench` group (with `bench serve`) to `app`."""
    app.command("serve")(serve)
    app.add_typer(bench_app, name="bench")
