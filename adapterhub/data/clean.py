"""`data clean`: normalize text, drop empty and over-length rows, optionally scrub PII.

Design decisions:
- Unicode is NFKC-normalized (full-width letters, ligatures, non-breaking spaces become their
  plain forms) and whitespace is tidied: runs of spaces/tabs collapse to one, trailing spaces
  go, line breaks stay (they carry structure in prompts and code).
- Empty rows are dropped and counted, not errors: removing them is what cleaning is for. Rows
  that are broken in other ways (not JSON, wrong columns, mixed formats) still stop the verb
  with their line numbers, because guessing what they meant would hide a broken file.
- PII scrubbing replaces matches with a placeholder (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IP]`)
  rather than dropping rows, and counts each kind. Card numbers must pass the Luhn check, so
  order numbers and timestamps are not taken for cards. E-mails go first, then cards, IP
  addresses, phones: each later pattern could match pieces of an earlier one.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adapterhub.data.output import StagedOutputs, VerbResult, check_output, parents_of, write_row
from adapterhub.data.schema import CHAT, MAX_REPORTED, PROMPT_COMPLETION, classify, detect_format, is_empty, messages_of
from adapterhub.datafiles import iter_data_file
from adapterhub.errors import ValidationError

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_IP = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}[ .-]\d{3,4}(?:[ .-]\d{2,4})?(?!\w)")
_INLINE_SPACE = re.compile(r"[^\S\n]+")
_TRAILING = re.compile(r"[^\S\n]+\n")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub_pii(text: str, counts: Counter[str]) -> str:
    """`text` with e-mails, card numbers, IP addresses and phone numbers replaced; `counts` gains each kind."""

    def replace(kind: str, check: Callable[[str], bool] | None = None) -> Callable[[re.Match[str]], str]:
        def substitute(match: re.Match[str]) -> str:
            if check is not None and not check(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return f"[{kind.upper()}]"

        return substitute

    text = _EMAIL.sub(replace("email"), text)
    text = _CARD.sub(replace("card", lambda m: _luhn_ok(re.sub(r"\D", "", m))), text)
    text = _IP.sub(replace("ip"), text)
    return _PHONE.sub(replace("phone", lambda m: len(re.sub(r"\D", "", m)) >= 7), text)


def normalize_text(text: str) -> str:
    """NFKC, inline whitespace runs collapsed to one space, trailing spaces removed, ends stripped."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    return _TRAILING.sub("\n", _INLINE_SPACE.sub(" ", text)).strip()


def _map_texts(values: Mapping[str, Any], fmt: str, change: Callable[[str], str]) -> dict[str, Any]:
    cleaned = dict(values)
    if fmt == CHAT:
        cleaned["messages"] = [dict(m, content=change(m["content"])) for m in messages_of(values)]
    else:
        for key in ("prompt", "completion") if fmt == PROMPT_COMPLETION else ("text",):
            cleaned[key] = change(values[key])
    return cleaned


def clean_file(
    path: Path, out: Path, *, scrub: bool = False, max_chars: int | None = None, tokenizer: Any = None, max_tokens: int | None = None
) -> VerbResult:
    """Write the cleaned rows of `path` to `out` (+ cards); see the module docstring."""
    path, out = Path(path), check_output(out, [path])
    if max_chars is not None and max_chars < 1:
        raise ValidationError("clean", [f"max_chars must be at least 1, got {max_chars}"])
    if max_tokens is not None and tokenizer is None:
        raise ValidationError("clean", ["max_tokens needs a tokenizer (--base)"])
    fmt: str | None = None
    read = kept = empty = too_long = bad = changed = 0
    problems: list[str] = []
    pii: Counter[str] = Counter()

    row_pii: Counter[str] = Counter()  # this row's replacements, counted only if it is kept

    def change(text: str) -> str:
        text = normalize_text(text)
        return scrub_pii(text, row_pii) if scrub else text

    with StagedOutputs() as staged:
        handle = staged.open(out)
        for row in iter_data_file(path):
            read += 1
            fmt, problem = classify(row, fmt)
            shape = detect_format(row.values)
            if problem is not None and row.problem is None and shape is not None and is_empty(row.values, shape):
                empty += 1
                continue
            if problem is not None:
                bad += 1
                if len(problems) < MAX_REPORTED:
                    problems.append(f"{row.where}: {problem}")
                continue
            assert fmt is not None
            row_pii.clear()
            cleaned = _map_texts(row.values, fmt, change)
            if is_empty(cleaned, fmt) or (fmt == CHAT and any(not m["content"] for m in cleaned["messages"])):
                empty += 1
                continue
            texts = "\n".join(m["content"] for m in cleaned["messages"]) if fmt == CHAT else "\n".join(
                str(cleaned[k]) for k in (("prompt", "completion") if fmt == PROMPT_COMPLETION else ("text",))
            )
            if (max_chars is not None and len(texts) > max_chars) or (
                max_tokens is not None and len(tokenizer(texts)["input_ids"]) > max_tokens
            ):
                too_long += 1
                continue
            changed += cleaned != row.values
            write_row(handle, cleaned)
            pii.update(row_pii)
            kept += 1
        if read == 0:
            raise ValidationError(f"data {path}", ["the dataset is empty"])
        if bad:
            if bad > len(problems):
                problems.append(f"... and {bad - len(problems)} more bad rows ({bad} in all)")
            raise ValidationError(f"data {path}", problems)
        result = VerbResult(
            verb="clean",
            outputs={out: kept},
            stats={
                "format": fmt, "rows_in": read, "rows_out": kept, "rows_changed": changed, "empty_dropped": empty,
                "over_length_dropped": too_long, "pii_replaced": dict(sorted(pii.items())),
            },
            parameters={"scrub_pii": scrub, "max_chars": max_chars, "max_tokens": max_tokens},
            parents=parents_of([path]),
        )
        staged.write_cards(result)
        staged.commit()
    return result
