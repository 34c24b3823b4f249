"""`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`, with vLLM's bodies and answers.

Design decisions:
- By `lora_name` alone, a registry adapter is resolved and made resident ahead of use (always
  allowed: it reads nothing a client names). With `lora_path`, a directory is loaded under that
  name, only as `LoraPathPolicy` allows (off unless `serve` turns it on), checked before
  anything under the path is read.
- An adapter added by path gets the engine key `lora_path/<name>`, which no registry key can
  equal. A `lora_name` that already names a registry adapter is refused. The name is taken
  before the load, so its load events are labelled and a concurrent load of the same name is
  refused; a failed load gives it back.
- Unloading removes the adapter from every tier (after its running rows end) and its metrics
  series, so loading and unloading ever new names leaves `/metrics` as it was.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from adapterhub.serving.backends.base import AdapterSpec
from adapterhub.serving.errors import OpenAIError, from_exception
from adapterhub.serving.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from adapterhub.serving.routes.deps import State
from adapterhub.serving.state import LORA_PATH_KEY_PREFIX, MAX_PATH_ADAPTER_NAME

router = APIRouter()


def _already_loaded(name: str) -> OpenAIError:
    return OpenAIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name", code="already_loaded")


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, state: State) -> PlainTextResponse:
    name = body.lora_name
    if name == state.backend.base_name or name in state.loaded_by_path:
        raise _already_loaded(name)
    if body.lora_path is None:
        spec = await state.resolve_model(name, param="lora_name")
        assert spec is not None
        try:
            await state.backend.load_adapter(spec)
        except Exception as exc:
            raise from_exception(exc, param="lora_name") from exc
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    path = state.lora_paths.check(body.lora_path)  # refused before anything under it is read
    if len(name) > MAX_PATH_ADAPTER_NAME:
        raise OpenAIError(
            400, f"lora_name of an adapter loaded by path has at most {MAX_PATH_ADAPTER_NAME} characters ({len(name)} given)",
            param="lora_name", code="invalid_value",
        )
    if len(state.loaded_by_path) >= state.max_path_adapters:
        raise OpenAIError(
            400, f"{len(state.loaded_by_path)} adapters are loaded by path, the most this server takes; unload one first",
            param="lora_path", code="too_many_adapters",
        )
    if not await asyncio.to_thread((path / "adapter_config.json").is_file):
        raise OpenAIError(404, f"no PEFT adapter at lora_path {body.lora_path!r}", param="lora_path", code="not_found")
    if state.resolver is not None and await asyncio.to_thread(state.resolver.resolve, state.backend.base_name, name):
        raise OpenAIError(
            400, f"'{name}' already names an adapter in the registry; load this path under another lora_name",
            param="lora_name", code="already_loaded",
        )
    if name in state.loaded_by_path:  # loaded meanwhile, by a concurrent request
        raise _already_loaded(name)
    # Registry names cannot hold '/', so this key never meets a registry adapter's key.
    spec = AdapterSpec(key=f"{LORA_PATH_KEY_PREFIX}{name}", locate=lambda: path, name=name)
    state.loaded_by_path[name] = spec
    try:
        await state.backend.load_adapter(spec)
    except BaseException as exc:
        if state.loaded_by_path.get(name) is spec:
            del state.loaded_by_path[name]
        state.metrics.forget(spec.key)
        if isinstance(exc, Exception):
            raise from_exception(exc, param="lora_path") from exc
        raise  # cancelled: the client went away or the server stops
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, state: State) -> PlainTextResponse:
    name = body.lora_name
    spec = state.loaded_by_path.pop(name, None)
    added_by_path = spec is not None
    if spec is None and state.resolver is not None and name != state.backend.base_name:
        spec = await asyncio.to_thread(state.resolver.resolve, state.backend.base_name, name)
    if spec is None:
        raise OpenAIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="not_found")
    removed = await state.backend.unload_adapter(spec.key)
    state.metrics.forget(spec.key)  # unloaded: its series go (a path adapter's name may never return)
    if not removed and not added_by_path:
        raise OpenAIError(404, f"The lora adapter '{name}' is not loaded.", param="lora_name", code="not_found")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


__all__ = ["router"]
