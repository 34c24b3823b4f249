"""Publishing to the Hugging Face Hub and pulling from it, on `huggingface_hub`.

Design decisions:
- The core takes plain inputs (a directory of files and a `CardInputs` describing them) and
  returns plain results; it never imports the registry. `adapterhub.cli.hub` reads registry
  records into these inputs and writes push and pull records back.
- Everything the Hub needs is the client's: `HfApi.create_repo`, `create_commit`, `repo_info`,
  `snapshot_download`, `ModelCard`/`ModelCardData`/`EvalResult`. Endpoint and token come from the
  client's own settings (`HF_ENDPOINT`, `HF_TOKEN`, `hf auth login`); nothing here is adapterhub's.
- Importing this package costs nothing: `ids` is plain Python (the registry checks Hub ids
  through it), and the parts that import `huggingface_hub` load on first use.

Modules: `ids` (repo ids, `OWNER/NAME[@REVISION]`), `card` (the model card), `client` (push,
pull, and the client's errors as one-line `HubError`s).
"""

from __future__ import annotations

import importlib
from typing import Any

from adapterhub.hub.ids import SMOLLM2_HUB_ID, hub_id_problems, parse_repo_spec, validate_hub_id

# Public name -> submodule that defines it (loaded on first use).
_LAZY = {
    "CardInputs": "card", "EvaluationRow": "card", "ParentInfo": "card", "CardInfo": "card",
    "build_card": "card", "read_card": "card", "point_config_at_hub_base": "card",
    "HubError": "client", "PushResult": "client", "PulledRepo": "client", "push_folder": "client",
    "pulled_repo": "client", "hub_endpoint": "client", "uploads_through_xet": "client",
}

__all__ = ["SMOLLM2_HUB_ID", "hub_id_problems", "parse_repo_spec", "validate_hub_id", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"adapterhub.hub.{module}"), name)
