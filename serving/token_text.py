"""Each token's exact bytes, text and offset, as OpenAI's logprobs report them.

Design decisions:
- OpenAI reports per token its text and (in chat) its UTF-8 `bytes`, so a client can rejoin a
  character split across tokens. Decoding a token alone cannot give them: a partial character
  decodes to U+FFFD. So the bytes are read from the vocabulary:
  - byte-level BPE tokens (GPT-2, Llama 3, Qwen, SmolLM2) spell each byte as one character,
    mapped back by the inverse of `bytes_to_unicode`;
  - SentencePiece byte-fallback tokens `<0xNN>` are that byte, and '▁' is a space;
  - added (special) tokens are their own text;
  - other tokenizers fall back to the token decoded alone.
- A token's text is its bytes decoded when they are whole UTF-8, else OpenAI's `bytes:\\xNN`
  spelling for the part of a character.
- A text offset counts characters of the decoded text. A token that starts inside a character
  gets that character's offset. Generated text is decoded without special tokens, so they
  take no room there; an echoed prompt is decoded on its own, with them.
- Results are cached per token id; a vocabulary is a few hundred thousand entries at most.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def decoder_types(tokenizer: Any) -> set[str]:
    """The `type`s in a fast tokenizer's decoder (nested `Sequence` decoders included)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    found: set[str] = set()
    pending = [json.loads(decoder.__getstate__())]  # the decoder's own JSON, not the whole vocabulary's
    while pending:
        decoder = pending.pop()
        found.add(str(decoder.get("type")))
        pending.extend(decoder.get("decoders") or [])
    return found


class TokenTexts:
    """Bytes, text and offsets of a tokenizer's tokens, for logprobs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoders = decoder_types(tokenizer)
        self._byte_level = "ByteLevel" in decoders
        self._byte_fallback = "ByteFallback" in decoders
        self._byte_of_char: dict[str, int] = {}
        if self._byte_level:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
        self._added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        self._bytes: dict[int, bytes] = {}
        self._texts: dict[int, str] = {}

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes `token_id` adds to the output."""
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._read_bytes(token_id)
        return cached

    def _read_bytes(self, token_id: int) -> bytes:
        if token_id not in self._added:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                if self._byte_level and all(char in self._byte_of_char for char in piece):
                    return bytes(self._byte_of_char[char] for char in piece)
                if self._byte_fallback:
                    match = _BYTE_FALLBACK.fullmatch(piece)
                    return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """The token's text, or `bytes:\\xNN...` when it holds only part of a character."""
        cached = self._texts.get(token_id)
        if cached is None:
            raw = self.token_bytes(token_id)
            try:
                cached = raw.decode("utf-8")
            except UnicodeDecodeError:
                cached = "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)
            self._texts[token_id] = cached
        return cached



class TextOffsets:
    """Character offsets of tokens in the text they decode to, token after token: a stream keeps
    one per choice, since a chunk may end inside a character."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.position = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token_ids: Sequence[int], *, skip_special: bool = False) -> list[int]:
        """Where each of the next `token_ids` starts; `skip_special`: special tokens take no
        room (the text was decoded without them)."""
        offsets = []
        for token_id in token_ids:
            offsets.append(self.position)
            if skip_special and token_id in self.texts.special_ids:
                continue
            self.position += len(self._decoder.decode(self.texts.token_bytes(token_id)))
        return offsets

    def end_text(self) -> None:
        """The text decoded so far ends here (an echoed prompt): a character it left unfinished
        becomes U+FFFD, as a decoder's `errors="replace"` makes it."""
        self.position += len(self._decoder.decode(b"", final=True))
        self._decoder.reset()
