"""What the route modules share: `ServerState` (backend, resolver, metrics, adapters loaded by
path) and `LoraPathPolicy` (which directories may be loaded by path).

Design decisions:
- `model` resolution order: the base name; adapters added with `/v1/load_lora_adapter` (the
  vLLM way, by path); then the resolver (the registry), which turns `name`, `name:version` or
  `name@sha` into a canonical key. A name nobody knows is 404 with close matches listed.
- The hot path: a request for an adapter the backend holds (`Backend.holds`), under a name
  whose cached answer the resolver knows to be still right (`AdapterResolver.cached`: no
  table read, no worker thread), costs no registry read. Anything else asks the resolver in a
  worker thread. So a version removed from the registry is served while this server holds it
  and refused (404) once it has left its tiers; unload it to stop serving it at once.
  Loading a path under a name the registry already knows is refused; if the registry gets that
  name later, the path adapter keeps it while loaded (the registry's stays reachable by
  `name:version`), and `/v1/models` never lists one name twice.
- Loading by `lora_path` makes the server read a directory a client names, so it is off unless
  the operator turns it on (`LoraPathPolicy`), as vLLM keeps it behind
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING`; loading a registry adapter by `lora_name` always works.
  A path outside what is allowed is refused before anything under it is read. Adapters loaded
  by path are capped in number (`max_path_adapters`), and their metrics series live only while
  they are loaded.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub.serving.backends.base import AdapterSpec, Backend
from adapterhub.serving.errors import OpenAIError, model_not_found
from adapterhub.serving.metrics import ServingMetrics
from adapterhub.serving.resolver import AdapterResolver
from adapterhub.serving.token_text import TokenTexts

# Engine keys of adapters added by `lora_path` (registry keys are `name:version`, never with '/').
LORA_PATH_KEY_PREFIX = "lora_path/"
#: Longest `lora_name` of an adapter loaded by path (as registry names): it is a metrics label.
MAX_PATH_ADAPTER_NAME = 128
#: Adapters loaded by path at once, by default: each is a name the server keeps.
DEFAULT_MAX_PATH_ADAPTERS = 256
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoraPathPolicy:
    """Which directories `/v1/load_lora_adapter` may load by `lora_path`.

    Off by default: `allow_any` (`serve --allow-lora-path`) takes any directory of the machine;
    `root` (`serve --adapter-dir DIR`) takes directories below it only, with symlinks resolved
    (the directory's and its two PEFT files'), and bounds `allow_any` too when both are given.
    """

    allow_any: bool = False
    root: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.allow_any or self.root is not None

    def check(self, lora_path: str) -> Path:
        """The directory to load, symlinks resolved; an `OpenAIError` naming the rule when
        `lora_path` is not allowed. Nothing under the path is opened here."""
        if not self.enabled:
            raise OpenAIError(
                403, "loading adapters by lora_path is turned off on this server: start it with --allow-lora-path "
                "(any directory) or --adapter-dir DIR (directories below DIR); registry adapters load by lora_name alone",
                param="lora_path", code="lora_path_not_allowed",
            )
        try:
            if self.root is None:
                return Path(lora_path).resolve()
            root = self.root.resolve()
            target = (root / lora_path).resolve()  # a relative lora_path is taken below the root
            resolved = [target, *((target / name).resolve() for name in _PEFT_FILES)]
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
            raise OpenAIError(400, "lora_path is not a usable path", param="lora_path", code="invalid_value") from None
        if target == root or not all(path.is_relative_to(root) for path in resolved):
            raise OpenAIError(
                403, f"lora_path must be a directory below {root} (this server's --adapter-dir), symlinks resolved, "
                "its adapter_config.json and adapter_model.safetensors included",
                param="lora_path", code="lora_path_not_allowed",
            )
        return target


@dataclass
class ServerState:
    """What the route handlers share: backend, resolver, metrics and runtime-loaded adapters."""

    backend: Backend
    resolver: AdapterResolver | None
    metrics: ServingMetrics
    api_key: str | None
    preload: tuple[str, ...]
    lora_paths: LoraPathPolicy = field(default_factory=LoraPathPolicy)
    max_path_adapters: int = DEFAULT_MAX_PATH_ADAPTERS
    # Adapters added by path through /v1/load_lora_adapter: name -> spec (their key is the name).
    loaded_by_path: dict[str, AdapterSpec] = field(default_factory=dict)
    started_at: int = field(default_factory=lambda: int(time.time()))

    def may_label(self, key: str) -> bool:
        """Whether adapter `key` may get metrics series of its own: registry adapters (as many
        as the registry holds), an adapter loaded by path only while it is loaded."""
        if not key.startswith(LORA_PATH_KEY_PREFIX):
            return True
        spec = self.loaded_by_path.get(key.removeprefix(LORA_PATH_KEY_PREFIX))
        return spec is not None and spec.key == key

    @functools.cached_property
    def token_texts(self) -> TokenTexts:
        """Exact bytes and text of each token, for logprobs (built on first use)."""
        return TokenTexts(self.backend.tokenizer)

    async def resolve_model(self, model: str, *, param: str = "model") -> AdapterSpec | None:
        """None for the base model, else the adapter `model` names; 404 when it names nothing."""
        if model == self.backend.base_name:
            return None
        spec = self.loaded_by_path.get(model)
        if spec is not None:
            return spec
        if self.resolver is not None:
            # An adapter the backend holds, under a name the resolver knows is still right,
            # costs no registry read and no worker thread (the hot path of every request).
            spec = self.resolver.cached(self.backend.base_name, model)
            if spec is not None and self.backend.holds(spec.key):
                return spec
            spec = await asyncio.to_thread(self.resolver.resolve, self.backend.base_name, model)
            if spec is not None:
                return spec
        known = [self.backend.base_name, *self.loaded_by_path]
        if self.resolver is not None:
            listings = await asyncio.to_thread(self.resolver.list, self.backend.base_name)
            known += [name for listing in listings for name in (listing.id, *listing.aliases)]
        raise model_not_found(model, known, param=param)


__all__ = ["DEFAULT_MAX_PATH_ADAPTERS", "LORA_PATH_KEY_PREFIX", "MAX_PATH_ADAPTER_NAME", "LoraPathPolicy", "ServerState"]
