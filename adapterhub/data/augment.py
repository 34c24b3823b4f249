"""`data augment`: paraphrase each row's prompt K times with a served model, each new row tagged.

Design decisions:
- The core knows no engine and no HTTP (DESIGN.md: `adapterhub` imports none of the other
  packages). It asks a `ChatModel` for chat completions; the CLI passes one of the two in
  `adapterhub.serving.chat_clients`: the embedded torch engine in this process (the server's own
  generation path, without HTTP) or a running `adapterhub serve` through the `openai` client.
- Reproducible with a seed, in-process and over HTTP alike: each row is one request with
  `n = K` (split into requests of at most `MAX_CHOICES` choices, the server's limit on `n`) and
  a seed derived from `--seed` and the row's number; the server draws choice i with seed + i, and
  the in-process path runs the very same job. A request's output does not depend on its
  batch-mates, so the batch size changes nothing either.
- What is paraphrased: the prompt of prompt/completion rows, the last user turn of chat rows, the
  text of text and text/label rows. Every other field is kept (a paraphrased prompt keeps its
  completion, a text its label, a chat row its other turns).
- Every output row carries `source_row` (the input's line, or row for Parquet: the number error
  messages give) and `augmented` (false for an original, true for a paraphrase), next to any
  column the row had (`data mix`'s `source` included; columns already named so are replaced, as
  the tags always refer to this verb's input); the trainer ignores both. Originals are
  written too, each before its paraphrases, unless `keep_originals` is off.
- A paraphrase is dropped when it is empty, or equal (normalized as `data dedup` compares rows:
  NFKC, casefold, whitespace collapsed) to its source or to an earlier paraphrase of that row;
  the card counts each reason.
- Two passes: the first checks every row (a bad line stops the verb before any model time is
  spent), the second sends `batch_rows` rows' requests at once (all in flight together, so the
  engine batches them) and writes in input order. Memory holds one batch. Outputs go to temp
  files renamed into place at the end (`output.py`): a failure writes nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adapterhub.data.output import StagedOutputs, VerbResult, check_output, parents_of, write_row
from adapterhub.data.schema import CHAT, MAX_REPORTED, PROMPT_COMPLETION, checked_rows, messages_of, normalize_key
from adapterhub.datafiles import Row
from adapterhub.errors import AdapterhubError, ValidationError

#: The paraphrase request, `{text}` standing for the text to paraphrase (`--instruction`).
DEFAULT_INSTRUCTION = (
    "Paraphrase the text below: say the same thing in different words, keeping its meaning, its "
    "language and any names, numbers and code. If it is a question or a request, reword it; do not "
    "answer it. Reply with the paraphrase only.\n\n{text}"
)
PLACEHOLDER = "{text}"
#: Most choices one request asks for (the server's limit on `n`, as OpenAI's).
MAX_CHOICES = 16
#: Highest sampling temperature the server accepts (OpenAI's range).
MAX_TEMPERATURE = 2.0
#: Paraphrase pairs the card shows, so a user can judge the model and the instruction.
EXAMPLES = 3


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request: `n` replies to `messages`, choice i drawn with `seed + i`."""

    messages: tuple[Mapping[str, str], ...]
    n: int
    seed: int
    temperature: float
    max_tokens: int


class ChatRequestError(AdapterhubError):
    """The model refused one request of a batch (a prompt longer than its context, say): the
    verb names the row it came from."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


class ChatModel(Protocol):
    """Something that answers chat completion requests (see `adapterhub.serving.chat_clients`)."""

    def complete(self, requests: Sequence[ChatRequest]) -> list[list[str]]:
        """The `n` replies of every request, in order; all may be in flight at once.

        Raises `ChatRequestError` for a request the model refuses, `AdapterhubError` when it
        cannot answer at all (unreachable, model unknown).
        """
        ...


@dataclass(frozen=True)
class AugmentSettings:
    """How rows are paraphrased; `check()` refuses bad values before any model is loaded."""

    paraphrases: int
    instruction: str = DEFAULT_INSTRUCTION
    temperature: float = 0.8
    max_tokens: int = 256
    seed: int = 0
    keep_originals: bool = True
    batch_rows: int = 8

    def check(self) -> AugmentSettings:
        problems = []
        if self.paraphrases < 1:
            problems.append(f"--paraphrases must be at least 1, got {self.paraphrases}")
        if not self.instruction.strip():
            problems.append("--instruction is empty")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            problems.append(f"--temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}")
        if self.max_tokens < 1:
            problems.append(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.batch_rows < 1:
            problems.append(f"--batch-rows must be at least 1, got {self.batch_rows}")
        if problems:
            raise ValidationError("augment", problems)
        return self


def request_text(instruction: str, text: str) -> str:
    """The user message asking for a paraphrase: `{text}` in the instruction replaced by the
    text, or the text after the instruction and a blank line when it has no `{text}`."""
    if PLACEHOLDER in instruction:
        return instruction.replace(PLACEHOLDER, text)
    return f"{instruction.rstrip()}\n\n{text}"


def row_seed(seed: int, number: int) -> int:
    """The seed of a row's request: a hash of the verb's seed and the row's number (48 bits,
    so `seed + i` of every choice stays far inside what the server accepts)."""
    digest = hashlib.blake2b(f"{seed}:{number}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big")


def _last_user_turn(messages: Any) -> int | None:
    if not isinstance(messages, list):
        return None
    for index in range(len(messages) - 1, -1, -1):
        if isinstance(messages[index], dict) and messages[index].get("role") == "user":
            return index
    return None


def source_text(values: Mapping[str, Any], fmt: str) -> str | None:
    """The text a row's paraphrases replace: prompt, last user turn or text (None: a chat row
    without a user turn)."""
    if fmt == CHAT:
        messages = messages_of(values)
        turn = _last_user_turn(messages)
        return None if turn is None else messages[turn]["content"]
    return values["prompt"] if fmt == PROMPT_COMPLETION else values["text"]


def with_text(values: Mapping[str, Any], fmt: str, text: str) -> dict[str, Any]:
    """A copy of the row with its paraphrased field replaced by `text` (chat: the last user turn)."""
    row = dict(values)
    if fmt == CHAT:
        messages = [dict(m) for m in messages_of(values)]
        messages[_last_user_turn(messages)]["content"] = text  # type: ignore[index]
        row["messages"] = messages
    else:
        row["prompt" if fmt == PROMPT_COMPLETION else "text"] = text
    return row


def _tagged(values: Mapping[str, Any], fmt: str, number: int, *, augmented: bool) -> dict[str, Any]:
    row = dict(values)
    if fmt == CHAT:
        row["messages"] = messages_of(values)  # a CSV cell's JSON text becomes the list it holds
    row["source_row"] = number
    row["augmented"] = augmented
    return row


def requests_for(text: str, number: int, settings: AugmentSettings) -> list[ChatRequest]:
    """A row's requests: K choices in requests of at most `MAX_CHOICES`, seeds continuing."""
    messages = ({"role": "user", "content": request_text(settings.instruction, text)},)
    first_seed = row_seed(settings.seed, number)
    requests = []
    for start in range(0, settings.paraphrases, MAX_CHOICES):
        requests.append(ChatRequest(
            messages=messages, n=min(MAX_CHOICES, settings.paraphrases - start), seed=first_seed + start,
            temperature=settings.temperature, max_tokens=settings.max_tokens,
        ))
    return requests


def select_paraphrases(source: str, replies: Sequence[str], dropped: Counter[str]) -> list[str]:
    """The replies worth a row, stripped, in order: not empty, not the source again and not a
    repeat of an earlier reply, compared normalized (`normalize_key`, as `data dedup` compares
    rows). Each one dropped is counted in `dropped` under `empty`, `same_as_source` or `repeated`."""
    source_key = normalize_key(source)
    keys = {source_key}
    kept = []
    for reply in replies:
        paraphrase = reply.strip()
        key = normalize_key(paraphrase)
        if not key:
            dropped["empty"] += 1
        elif key == source_key:
            dropped["same_as_source"] += 1
        elif key in keys:
            dropped["repeated"] += 1
        else:
            keys.add(key)
            kept.append(paraphrase)
    return kept


def _count_rows(path: Path) -> tuple[int, str]:
    """Pass one: every row checked (the trainer's checks, and a chat row needs a user turn)."""
    rows, fmt, problems, bad = 0, "", [], 0
    for row, fmt in checked_rows(path):
        rows += 1
        if fmt == CHAT and source_text(row.values, fmt) is None:
            bad += 1
            if len(problems) < MAX_REPORTED:
                problems.append(f"{row.where}: a chat row needs a user turn to paraphrase")
    if bad:
        if bad > len(problems):
            problems.append(f"... and {bad - len(problems)} more such rows ({bad} in all)")
        raise ValidationError(f"data {path}", problems)
    return rows, fmt


def augment_file(
    path: Path,
    out: Path,
    *,
    model: ChatModel,
    settings: AugmentSettings,
    source: Mapping[str, Any],
    progress: Callable[[int, int], None] | None = None,
) -> VerbResult:
    """Write `out`: every row of `path` (unless `keep_originals` is off) followed by up to K
    paraphrases of it by `model`. `source` says which model (recorded in the card's parameters);
    `progress(done, total)` is called after each batch of rows."""
    path, out = Path(path), check_output(out, [path])
    settings.check()
    total, fmt = _count_rows(path)
    dropped: Counter[str] = Counter()
    counts = {"originals": 0, "paraphrases": 0}
    examples: list[dict[str, Any]] = []
    seen = 0

    with StagedOutputs() as staged:
        handle = staged.open(out)

        def flush(batch: list[tuple[Row, str]]) -> None:
            requests: list[ChatRequest] = []
            owner: list[int] = []  # which row of the batch each request paraphrases
            for position, (row, text) in enumerate(batch):
                for request in requests_for(text, row.number, settings):
                    requests.append(request)
                    owner.append(position)
            try:
                replies = model.complete(requests)
            except ChatRequestError as exc:
                row = batch[owner[exc.index]][0]
                raise ValidationError(f"data {path}", [f"{row.where}: the model refused its paraphrase request: {exc.message}"]) from None
            per_row: list[list[str]] = [[] for _ in batch]
            for position, texts in zip(owner, replies, strict=True):
                per_row[position].extend(texts)
            for (row, text), texts in zip(batch, per_row):
                if settings.keep_originals:
                    write_row(handle, _tagged(row.values, fmt, row.number, augmented=False))
                    counts["originals"] += 1
                kept = select_paraphrases(text, texts, dropped)
                for paraphrase in kept:
                    write_row(handle, _tagged(with_text(row.values, fmt, paraphrase), fmt, row.number, augmented=True))
                counts["paraphrases"] += len(kept)
                if kept and len(examples) < EXAMPLES:  # one example per row, from the first rows
                    examples.append({"row": row.where, "source": text, "paraphrase": kept[0]})

        batch: list[tuple[Row, str]] = []
        for row, _ in checked_rows(path, fmt=fmt):
            batch.append((row, source_text(row.values, fmt)))  # type: ignore[arg-type]
            seen += 1
            if len(batch) == settings.batch_rows:
                flush(batch)
                batch = []
                if progress is not None:
                    progress(seen, total)
        if batch:
            flush(batch)
            if progress is not None:
                progress(seen, total)
        if seen != total:
            raise ValidationError(f"data {path}", ["the file changed while it was being read (row counts differ between passes)"])
        requested = total * settings.paraphrases
        result = VerbResult(
            verb="augment",
            outputs={out: counts["originals"] + counts["paraphrases"]},
            stats={
                "format": fmt, "rows_in": total, "originals_out": counts["originals"],
                "paraphrases_requested": requested, "paraphrases_out": counts["paraphrases"],
                "paraphrases_dropped": {reason: dropped[reason] for reason in ("empty", "same_as_source", "repeated")},
                "examples": examples,
            },
            parameters={
                **dict(source), "paraphrases": settings.paraphrases, "instruction": settings.instruction,
                "temperature": settings.temperature, "max_tokens": settings.max_tokens, "seed": settings.seed,
                "originals": settings.keep_originals,
            },
            parents=parents_of([path]),
        )
        staged.write_cards(result)
        staged.commit()
    return result
