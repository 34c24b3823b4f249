"""Token ids to streamed text, one token at a time: incremental detokenization and stop strings.

Design decisions:
- A request's text is never decoded whole again per token (that costs O(length) per token,
  O(length²) per request, on the event loop). `IncrementalDecoder` keeps two offsets into the
  token ids, as vLLM's and TGI's detokenizers do: `prefix` (where the window decoded each step
  starts) and `read` (where the text already sent ends). Each new token decodes the short
  window `ids[prefix:]`; the characters beyond what `ids[prefix:read]` decodes to are new. A
  window that ends in U+FFFD is held back (a character whose bytes are still arriving), and
  the offsets move on only when the new text is whole, so a window always starts on a
  character boundary and decodes exactly as that stretch does inside the whole text.
- So the text of every request equals a full decode, `tokenizer.decode(ids,
  skip_special_tokens=True)`, character for character, held-back bytes included (`flush` gives
  them at the end, as U+FFFD where they never completed); the tests check this on random id
  sequences with the tiny test tokenizer, SmolLM2's and a SentencePiece-style one. A decoder that strips the first
  token's leading space (SentencePiece's) strips it from every window alike, so that holds
  there too. Tokenizers that "clean up tokenization spaces" (WordPiece-era, " ." -> ".") rewrite
  text across token boundaries after the fact, which no stream can follow; windows are decoded
  without that clean-up, as vLLM's incremental path does (causal LMs' tokenizers turn it off).
- SentencePiece's byte-fallback decoder is not local: it turns a whole run of `<0xNN>` tokens
  into text at once, and a run that is not valid UTF-8 becomes one U+FFFD per byte, valid
  bytes among them included. So a window stays open while it ends in such a run
  (`TokenDecoding.open_ids`), and its text is taken once the run ends.
- Fast tokenizers are called through their Rust `backend_tokenizer.decode`, which is what
  transformers' `decode` runs, without its Python wrapping (a window is a few tokens, so the
  wrapping was most of the cost). `TokenDecoding` is built once per tokenizer.
- Stop strings (`Detokenizer`) are searched only in text that is new since the last token (and
  the stop string's length before it), and a stop string counts once `min_tokens` tokens are
  out, from where the text stood then (one may straddle that point), as in vLLM. Streamed
  text holds back a tail that may still become a stop string; the text up to a stop string is
  what the request returns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: `decode(ids, skip_special_tokens)` -> text.
DecodeFn = Callable[[Sequence[int], bool], str]
_PARTIAL = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class TokenDecoding:
    """How one tokenizer's ids become text, piece by piece (built once per engine).

    `decode(ids, skip_special_tokens)` decodes a window: the Rust decoder of a fast tokenizer
    directly, else the tokenizer's own `decode`, never with clean-up of tokenization spaces.
    `open_ids` are tokens after which the text may still change whatever comes next:
    SentencePiece byte-fallback tokens (`<0xNN>`), since that decoder turns a whole run of them
    into text at once (every byte of a run that is not valid UTF-8 becomes U+FFFD, a valid one
    among them included), so a run's text is known only once the run ends. Special tokens that
    are skipped do not end a run (the decoder never sees them): they keep it open too.
    """

    decode: DecodeFn
    open_ids: frozenset[int] = frozenset()
    special_ids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, tokenizer: Any) -> TokenDecoding:
        from adapterhub.serving.token_text import decoder_types

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "decode"):
            def decode(ids: Sequence[int], skip: bool) -> str:
                return backend.decode(list(ids), skip_special_tokens=skip)
        else:
            def decode(ids: Sequence[int], skip: bool) -> str:
                return tokenizer.decode(list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        open_ids: frozenset[int] = frozenset()
        if "ByteFallback" in decoder_types(tokenizer):
            open_ids = frozenset(i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece))
        return cls(decode=decode, open_ids=open_ids, special_ids=frozenset(getattr(tokenizer, "all_special_ids", ()) or ()))


class IncrementalDecoder:
    """The text of a growing list of token ids, one token at a time (prefix-offset windows).

    The concatenation of everything `push` and `flush` return equals the full decode of all ids.
    """

    def __init__(self, decoding: TokenDecoding, *, skip_special_tokens: bool = True) -> None:
        self._decode = decoding.decode
        self._open_ids = decoding.open_ids | (decoding.special_ids if skip_special_tokens and decoding.open_ids else frozenset())
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # where the decoded window starts
        self._read = 0  # where the text already returned ends
        self._prefix_text = ""  # decode(ids[prefix:read]), kept between tokens

    def push(self, token_id: int) -> str:
        """Add one token; the text it completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        if token_id in self._open_ids:
            return ""  # a byte-fallback run: its text is known once it ends
        text = self._decode(self.ids[self._prefix :], self._skip)
        if len(text) <= len(self._prefix_text) or text.endswith(_PARTIAL):
            return ""  # nothing new, or a character whose bytes are still arriving
        new = text[len(self._prefix_text) :]
        # The next window starts where this step's new text starts: that stretch is whole. It
        # is decoded as a window of its own (not cut from `text`), since a decoder may treat a
        # window's first token differently (SentencePiece strips its leading space).
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read], self._skip)
        return new

    def flush(self) -> str:
        """Text held back at the end (bytes of a character that never completed, as U+FFFD)."""
        if self._read == len(self.ids):
            return ""
        text = self._decode(self.ids[self._prefix :], self._skip)
        self._prefix, self._read = len(self.ids), len(self.ids)
        new, self._prefix_text = text[len(self._prefix_text) :], ""
        return new


@dataclass(frozen=True)
class TextStep:
    """What one token adds to a request's streamed text, and whether a stop string ended it."""

    text: str
    stopped: bool = False


class Detokenizer:
    """One request's streamed text: incremental decoding, stop strings and what they hold back.

    `step` takes every token the engine produced (end tokens included: they count, but add no
    text) and returns the text that may be sent now.
    """

    def __init__(
        self, decoding: TokenDecoding, *, stops: Sequence[str] = (), min_tokens: int = 0, ending_ids: Iterable[int] = (),
    ) -> None:
        self._decoder = IncrementalDecoder(decoding, skip_special_tokens=True)
        self._stops = tuple(stop for stop in stops if stop)
        self._longest_stop = max((len(stop) for stop in self._stops), default=0)
        self._min_tokens = min_tokens
        self._ending_ids = frozenset(ending_ids)
        self._text = ""  # every whole character decoded so far
        self._sent = 0  # characters of `_text` already returned
        self._tokens = 0
        self._searched_from: int | None = 0 if min_tokens == 0 else None  # where stop strings count

    @property
    def text(self) -> str:
        return self._text

    def step(self, token_id: int, *, last: bool = False) -> TextStep:
        """Take the next token; `last`: the engine ends the request with it (flush held text)."""
        previous = len(self._text)
        if token_id not in self._ending_ids:
            self._text += self._decoder.push(token_id)
        if last:
            self._text += self._decoder.flush()
        self._tokens += 1
        stop_at = -1
        if self._searched_from is not None and self._stops:
            # Text before `previous` was searched at earlier tokens: only an occurrence ending in
            # the new text can be new.
            new_from = max(self._searched_from, previous)
            found = [index for stop in self._stops if (index := self._text.find(stop, max(0, new_from - len(stop) + 1))) >= 0]
            stop_at = min(found, default=-1)
        elif self._searched_from is None and self._tokens >= self._min_tokens:
            self._searched_from = len(self._text)  # stop strings count from the next token on
        if stop_at >= 0:
            self._text = self._text[:stop_at]
            return TextStep(self._take(len(self._text)), stopped=True)
        if last:
            return TextStep(self._take(len(self._text)))
        return TextStep(self._take(len(self._text) - self._held_for_stops()))

    def _held_for_stops(self) -> int:
        """Characters at the end that may be the start of a stop string: sent only once they
        are known not to be one."""
        tail = self._text[-self._longest_stop :] if self._longest_stop else ""
        held = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(tail)), held, -1):
                if tail.endswith(stop[:k]):
                    held = k
                    break
        return held

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        text, self._sent = self._text[self._sent : end], end
        return text


__all__ = ["DecodeFn", "Detokenizer", "IncrementalDecoder", "TextStep", "TokenDecoding"]
