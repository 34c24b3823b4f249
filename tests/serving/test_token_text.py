"""Exact bytes, text and offsets of tokens for logprobs, on a byte-level BPE (the tiny test
tokenizer, as GPT-2/Llama 3/SmolLM2) and a SentencePiece-style byte-fallback tokenizer."""

from __future__ import annotations

from pathlib import Path

from adapterhub.serving.token_text import TextOffsets, TokenTexts

TEXT = "日本 café"


def _byte_fallback_tokenizer() -> object:
    """Llama 2 style: '▁' for spaces, `<0xNN>` tokens for characters outside the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{byte:02X}>": 1 + byte for byte in range(256)}}
    for char in "\u2581abcdefghijklmnopqrstuvwxyzé本":
        vocab[char] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    model.normalizer = normalizers.Replace(" ", "\u2581")
    model.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")


def _check(tokenizer: object) -> list[int]:
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids  # type: ignore[operator]
    texts = TokenTexts(tokenizer)
    pieces = [texts.token_bytes(token) for token in ids]
    assert b"".join(pieces) == TEXT.encode("utf-8")
    split = [i for i, piece in enumerate(pieces) if _partial(piece)]
    assert split, "the test text must split a character across tokens"
    for i in split:
        assert texts.token_text(ids[i]) == "bytes:" + "".join(f"\\x{byte:02x}" for byte in pieces[i])
    offsets = TextOffsets(texts)
    first, rest = offsets.advance(ids[:2]), offsets.advance(ids[2:])  # as two streamed chunks
    assert first + rest == [len(b"".join(pieces[:i]).decode("utf-8", errors="ignore")) for i in range(len(ids))]
    return ids


def _partial(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_byte_level_bpe_tokens(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    _check(tokenizer)
    texts = TokenTexts(tokenizer)
    eos = tokenizer.eos_token_id
    assert texts.token_text(eos) == tokenizer.eos_token  # added tokens read as themselves


def test_sentencepiece_byte_fallback_tokens() -> None:
    tokenizer = _byte_fallback_tokenizer()
    ids = _check(tokenizer)
    texts = TokenTexts(tokenizer)
    assert [texts.token_text(token) for token in ids[-5:]] == [" ", "c", "a", "f", "é"]  # "▁" reads as a space
    assert texts.token_text(ids[3]) == "本"
