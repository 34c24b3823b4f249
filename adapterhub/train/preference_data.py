"""Preference data (issue 17): pairs for DPO/ORPO/reward models, labelled completions for KTO.

Design decisions:
- Same contract as `adapterhub.train.data`: every row is checked before any weight is read,
  and every bad row is reported at once, in file order, with its location (`line 7`), in one
  `ValidationError`. Nothing is trained or registered from a file with a bad row.
- Rows are shaped into TRL's explicit-prompt formats, which DPOTrainer, ORPOTrainer,
  RewardTrainer and KTOTrainer consume natively:
  * pairs: `prompt`/`chosen`/`rejected` strings; with a chat template, conversational
    (`prompt=[user turn]`, `chosen=[assistant turn]`, `rejected=[assistant turn]`) so TRL
    applies the base's template. A row may instead give `chosen` and `rejected` as whole chats
    (lists of {role, content}); they must share every turn but the last, which must be the
    assistant's — that shared part becomes the prompt. A chosen answer identical to the
    rejected one teaches nothing and would make the preference margin 0 by construction, so
    it is refused.
  * KTO: `prompt`/`completion` strings and a boolean `label` (desirable or not). A CSV cell
    cannot hold a boolean, so the strings "true"/"false" are accepted; numbers are refused
    rather than guessed (is 2 desirable?).
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from adapterhub.datafiles import Row, describe_value
from adapterhub.errors import ValidationError

_MAX_REPORTED = 20
_ROLES = ("system", "user", "assistant")


class PreferenceShape(str, Enum):
    """Which rows a preference task reads."""

    PAIRS = "pairs"  # dpo, orpo, reward
    KTO = "kto"


def _text_problem(values: dict[str, Any], key: str) -> str | None:
    value = values.get(key)
    if value is None:
        return f"{key} missing"
    if not isinstance(value, str):
        return f"{key} is a {describe_value(value)}"
    if not value.strip():
        return f"{key} empty"
    return None


def _messages(value: Any) -> list[dict[str, str]] | None:
    """A list of {role, content} turns (JSON text in a CSV cell is parsed), or None if it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list) or not value:
        return None
    if any(not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str) for m in value):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _pair(row: Row, chat: bool) -> tuple[dict[str, Any] | None, str | None]:
    values = row.values
    chosen, rejected = values.get("chosen"), values.get("rejected")
    if isinstance(chosen, (list, str)) and isinstance(rejected, (list, str)) and "prompt" not in values:
        # Whole chats: the shared turns are the prompt, the last turns the answers.
        chosen_turns, rejected_turns = _messages(chosen), _messages(rejected)
        if chosen_turns is not None and rejected_turns is not None:
            if len(chosen_turns) < 2 or len(rejected_turns) < 2:
                return None, "chosen and rejected chats need a prompt turn and the assistant's answer"
            if chosen_turns[:-1] != rejected_turns[:-1]:
                return None, "chosen and rejected chats must share every turn but the last (the prompt)"
            if chosen_turns[-1]["role"] != "assistant" or rejected_turns[-1]["role"] != "assistant":
                return None, "the last turn of chosen and of rejected must be the assistant's"
            if chosen_turns[-1]["content"].strip() == rejected_turns[-1]["content"].strip():
                return None, "chosen and rejected answers are identical"
            prompt = chosen_turns[:-1]
            if chat:
                return {"prompt": prompt, "chosen": chosen_turns[-1:], "rejected": rejected_turns[-1:]}, None
            text = "\n".join(m["content"] for m in prompt) + "\n"
            return {"prompt": text, "chosen": chosen_turns[-1]["content"], "rejected": rejected_turns[-1]["content"]}, None
    bad = [p for key in ("prompt", "chosen", "rejected") if (p := _text_problem(values, key))]
    if bad:
        return None, f"needs non-empty 'prompt', 'chosen' and 'rejected' strings (or chosen/rejected chats); {', '.join(bad)}"
    if values["chosen"].strip() == values["rejected"].strip():
        return None, "chosen and rejected answers are identical"
    if chat:
        return {
            "prompt": [{"role": "user", "content": values["prompt"]}],
            "chosen": [{"role": "assistant", "content": values["chosen"]}],
            "rejected": [{"role": "assistant", "content": values["rejected"]}],
        }, None
    return {"prompt": values["prompt"], "chosen": values["chosen"], "rejected": values["rejected"]}, None


def _kto_label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _kto(row: Row, chat: bool) -> tuple[dict[str, Any] | None, str | None]:
    values = row.values
    bad = [p for key in ("prompt", "completion") if (p := _text_problem(values, key))]
    label = _kto_label(values.get("label"))
    if label is None:
        raw = values.get("label")
        bad.append("label missing" if raw is None else f"label is a {describe_value(raw)}, not true or false")
    if bad:
        return None, f"needs non-empty 'prompt' and 'completion' strings and a boolean 'label'; {', '.join(bad)}"
    if chat:
        return {
            "prompt": [{"role": "user", "content": values["prompt"]}],
            "completion": [{"role": "assistant", "content": values["completion"]}],
            "label": label,
        }, None
    return {"prompt": values["prompt"], "completion": values["completion"], "label": label}, None


def check_preference_rows(rows: list[Row], shape: PreferenceShape, *, chat: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """The examples in TRL's format and one problem per bad row, in file order."""
    examples: list[dict[str, Any]] = []
    problems: list[str] = []
    shaper = _pair if shape == PreferenceShape.PAIRS else _kto
    for row in rows:
        if row.problem is not None:
            problems.append(f"{row.where}: {row.problem}")
            continue
        example, problem = shaper(row, chat)
        if problem is not None:
            problems.append(f"{row.where}: {problem}")
        else:
            examples.append(example)
    if not problems and shape == PreferenceShape.KTO and examples and len({e["label"] for e in examples}) < 2:
        # KTO weighs desirable against undesirable answers; with one kind only it has nothing to weigh.
        problems.append("KTO needs both desirable (label true) and undesirable (label false) rows")
    return examples, problems


def normalise_preference_rows(rows: list[Row], shape: PreferenceShape, *, chat: bool) -> list[dict[str, Any]]:
    """Check and shape preference rows; raises one `ValidationError` naming every bad row."""
    examples, problems = check_preference_rows(rows, shape, chat=chat)
    if problems:
        capped = problems if len(problems) <= _MAX_REPORTED else problems[:_MAX_REPORTED] + [f"... and {len(problems) - _MAX_REPORTED} more"]
        raise ValidationError("preference data", capped)
    return examples
