"""`GET /v1/models` and `GET /v1/models/{id}`: the base and the adapters this server can serve.

Design decisions:
- The list is the base, adapters added by path, then the resolver's (the registry's) adapters
  of the base, each with its residency (device slot or CPU tier) read from the backend.
- Only what this backend can serve is listed, decided from each record's kind
  (`Backend.unservable_reason`) without reading weights: no prompt tuning, no classification
  head, no full models, as vLLM lists only what it can serve.
- A name is listed once: a registry adapter that took a path adapter's name later is listed by
  its versioned id only, while the path adapter holds the name.
- One card is found by id, alias or any ref a request accepts (`client.models.retrieve`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter

from adapterhub.serving.errors import model_not_found
from adapterhub.serving.protocol import ModelCard, ModelList
from adapterhub.serving.routes.deps import State
from adapterhub.serving.state import ServerState

router = APIRouter()


async def model_cards(state: ServerState) -> list[ModelCard]:
    """The base, adapters added by path, then the registry's servable adapters of the base."""
    backend = state.backend
    held = {adapter.key: adapter for adapter in backend.resident_adapters()}
    cards = [
        ModelCard(
            id=backend.base_name, created=state.started_at, root=str(getattr(backend, "model_dir", "")) or None,
            parent=None, resident=True, tier="device", max_model_len=backend.max_model_len, meta=backend.describe(),
        )
    ]

    def adapter_card(model_id: str, key: str, created: int, aliases: Sequence[str], meta: dict[str, Any]) -> ModelCard:
        resident = held.get(key)
        return ModelCard(
            id=model_id, created=created, parent=backend.base_name, root=key,
            resident=resident is not None and resident.tier == "device",
            tier=resident.tier if resident is not None else None,
            aliases=list(aliases), max_model_len=backend.max_model_len,
            meta={**meta, **({"pinned": resident.pinned} if resident is not None else {})},
        )

    for name, spec in state.loaded_by_path.items():
        cards.append(adapter_card(name, spec.key, state.started_at, (), {"source": "load_lora_adapter"}))
    if state.resolver is not None:
        for listing in await asyncio.to_thread(state.resolver.list, backend.base_name):
            peft_type, task_type = listing.meta.get("peft_type"), listing.meta.get("task_type")
            kind = listing.meta.get("kind")  # the variant (DoRA): a backend may serve LoRA but not it
            if backend.unservable_reason(
                str(peft_type) if peft_type is not None else None, str(task_type) if task_type is not None else None,
                {"kind": str(kind)} if kind is not None else None,
            ) is not None:
                continue  # prompt/prefix tuning, a classification head, full models: not advertised
            if listing.id in state.loaded_by_path:
                continue  # that name means the adapter loaded by path while it is loaded
            # A registry adapter that took a path adapter's name later is listed by its versioned id only.
            aliases = [alias for alias in listing.aliases if alias not in state.loaded_by_path]
            cards.append(adapter_card(listing.id, listing.key, listing.created, aliases, dict(listing.meta)))
    return cards


@router.get("/models")
async def list_models(state: State) -> ModelList:
    return ModelList(data=await model_cards(state))


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State) -> ModelCard:
    """One model's card, by id, alias or any ref requests accept (`client.models.retrieve`)."""
    cards = await model_cards(state)
    for card in cards:
        if model_id == card.id or model_id in card.aliases:
            return card
    spec = await state.resolve_model(model_id)  # `name@sha`, `name:version`: 404 when unknown
    found = next((card for card in cards if spec is not None and card.root == spec.key), None)
    if found is None:  # known to the registry but not servable here (prompt tuning, a full model)
        raise model_not_found(model_id, [name for card in cards for name in (card.id, *card.aliases)])
    return found


__all__ = ["model_cards", "router"]
