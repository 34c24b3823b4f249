"""Logprobs, prompt scoring (`echo`), logit bias, penalties, top-k and min-p through the real
server and the official `openai` client, checked against offline transformers+PEFT forwards."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import torch

from adapterhub.serving.backends.base import SamplingParams
from adapterhub.serving.backends.sampling import candidates, categorical, draw
from tests.serving.conftest import BASE_NAME, AdapterFleet, ReferenceGenerator, RunningServer

PROMPT = "reverse the words: apple banana"
TOLERANCE = 1e-4  # fp32 on the CPU: cached incremental decoding against one full forward


class OfflineModel:
    """Transformers (+ PEFT) run on whole sequences, no cache: the reference for scores."""

    def __init__(self, base_dir: Path, adapter_dir: Path | None) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir)
        self.model = (PeftModel.from_pretrained(model, adapter_dir) if adapter_dir is not None else model).eval()
        self.eos_token_id = model.config.eos_token_id

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """`[len(ids), vocab]` log-softmax; row p is the distribution of token p + 1."""
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids, output = list(prompt_ids), []
        for _ in range(max_new_tokens):
            token = int(self.logprobs(ids)[-1].argmax())
            output.append(token)
            ids.append(token)
            if token == self.eos_token_id:
                break
        return output

    def penalized_greedy(
        self, prompt_ids: list[int], max_new_tokens: int, *, presence: float, frequency: float, repetition: float,
        bias: dict[int, float],
    ) -> list[int]:
        """Greedy decoding with vLLM's penalty semantics, one token at a time in plain Python."""
        ids, output = list(prompt_ids), []
        for _ in range(max_new_tokens):
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()
            for token, value in bias.items():
                logits[token] += value
            for token, count in Counter(output).items():
                logits[token] -= frequency * count + presence
            for token in set(prompt_ids) | set(output):
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
            token = int(logits.argmax())
            output.append(token)
            ids.append(token)
            if token == self.eos_token_id:
                break
        return output


def _adapter_dir(fleet: AdapterFleet, model: str) -> Path | None:
    return None if model == BASE_NAME else fleet.dirs[model]


def _bytes_of(token: str) -> bytes:
    """A completions logprobs token as bytes (`bytes:\\xNN...` spells part of a character)."""
    if token.startswith("bytes:"):
        return bytes(int(pair, 16) for pair in re.findall(r"\\x([0-9a-f]{2})", token))
    return token.encode("utf-8")


def assert_tokens_spell(token_bytes: list[bytes], tokens: list[str], ids: list[int], tokenizer: object) -> None:
    """The tokens' exact bytes rejoin into the decoded text, and a token holding whole
    characters reads as it does decoded alone."""
    assert len(tokens) == len(ids)
    # As the tokenizer decodes: a character cut off at the end becomes U+FFFD.
    assert b"".join(token_bytes).decode("utf-8", errors="replace") == tokenizer.decode(ids)  # type: ignore[attr-defined]
    for token, token_id in zip(tokens, ids, strict=True):
        alone = tokenizer.decode([token_id])  # type: ignore[attr-defined]
        if "\ufffd" not in alone:
            assert token == alone


def expected_offsets(token_bytes: list[bytes]) -> list[int]:
    """Characters of the text before each token; a token inside a character gets its offset."""
    return [len(b"".join(token_bytes[:i]).decode("utf-8", errors="ignore")) for i in range(len(token_bytes))]


@pytest.mark.parametrize("model", [BASE_NAME, "task-2"])
def test_completion_logprobs_match_offline_scores(
    server: RunningServer, adapter_fleet: AdapterFleet, reference: ReferenceGenerator, model: str
) -> None:
    offline = OfflineModel(adapter_fleet.base_dir, _adapter_dir(adapter_fleet, model))
    prompt_ids = reference.prompt_ids(PROMPT)
    expected_ids = offline.greedy(prompt_ids, 10)
    scores = offline.logprobs(prompt_ids + expected_ids)

    response = server.client().completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    token_bytes = [_bytes_of(token) for token in logprobs.tokens]
    assert_tokens_spell(token_bytes, logprobs.tokens, expected_ids, reference.tokenizer)
    for position, token in enumerate(expected_ids):
        row = scores[len(prompt_ids) - 1 + position]
        assert logprobs.token_logprobs[position] == pytest.approx(float(row[token]), abs=TOLERANCE)
        top = logprobs.top_logprobs[position]
        expected_top = row.topk(3)
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(expected_top.values.tolist(), abs=TOLERANCE)
        assert max(top, key=top.get) == logprobs.tokens[position]  # greedy picks the most likely token
    assert logprobs.text_offset == expected_offsets(token_bytes)


def test_echo_scores_the_prompt_alongside_other_requests(
    server: RunningServer, adapter_fleet: AdapterFleet, reference: ReferenceGenerator
) -> None:
    """lm-eval-harness's log-likelihood request: echo + logprobs with max_tokens 0 or 1. Scoring
    requests are prefilled apart from plain ones; both must come out right when they meet."""
    prompt_ids = reference.prompt_ids("question: what is two plus two? answer: four")
    plain_prompt = reference.prompt_ids(PROMPT)
    offline = {name: OfflineModel(adapter_fleet.base_dir, _adapter_dir(adapter_fleet, name)) for name in (BASE_NAME, "task-2")}
    client = server.async_client()

    async def burst() -> list[object]:
        return await asyncio.gather(
            client.completions.create(model="task-2", prompt=prompt_ids, max_tokens=0, echo=True, logprobs=1, temperature=0),
            client.completions.create(model=BASE_NAME, prompt=prompt_ids, max_tokens=1, echo=True, logprobs=2, temperature=0),
            client.completions.create(model="task-0", prompt=PROMPT, max_tokens=8, temperature=0),
        )

    scored_adapter, scored_base, plain = asyncio.run(burst())

    only_prompt = scored_adapter.choices[0]
    assert only_prompt.text == reference.tokenizer.decode(prompt_ids)
    assert only_prompt.finish_reason == "length"
    assert scored_adapter.usage.completion_tokens == 0 and scored_adapter.usage.prompt_tokens == len(prompt_ids)
    scores = offline["task-2"].logprobs(prompt_ids)
    assert only_prompt.logprobs.token_logprobs[0] is None and only_prompt.logprobs.top_logprobs[0] is None
    assert only_prompt.logprobs.token_logprobs[1:] == pytest.approx(
        [float(scores[p - 1, token]) for p, token in enumerate(prompt_ids) if p > 0], abs=TOLERANCE
    )
    assert len(only_prompt.logprobs.tokens) == len(prompt_ids)

    with_next = scored_base.choices[0]
    next_token = offline[BASE_NAME].greedy(prompt_ids, 1)[0]
    base_scores = offline[BASE_NAME].logprobs(prompt_ids)
    assert len(with_next.logprobs.tokens) == len(prompt_ids) + 1
    assert with_next.logprobs.tokens[-1] == reference.tokenizer.decode([next_token])
    assert with_next.logprobs.token_logprobs[-1] == pytest.approx(float(base_scores[-1, next_token]), abs=TOLERANCE)
    assert with_next.logprobs.token_logprobs[1:-1] == pytest.approx(
        [float(base_scores[p - 1, token]) for p, token in enumerate(prompt_ids) if p > 0], abs=TOLERANCE
    )
    assert with_next.text.startswith(reference.tokenizer.decode(prompt_ids))

    assert plain.choices[0].text == reference.greedy(adapter_fleet.dirs["task-0"], tuple(plain_prompt), 8)
    assert plain.choices[0].logprobs is None


def test_echo_streams_the_prompt_first(server: RunningServer, reference: ReferenceGenerator) -> None:
    whole = server.client().completions.create(model=BASE_NAME, prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=0)
    stream = server.client().completions.create(
        model=BASE_NAME, prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=0, stream=True
    )
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    assert chunks[0].text.startswith(PROMPT)
    assert "".join(c.text for c in chunks) == whole.choices[0].text
    streamed = [value for c in chunks if c.logprobs for value in c.logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == whole.choices[0].logprobs.tokens
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset
    # logprobs=0: just the chosen token in each top map.
    assert all(len(top) == 1 for top in whole.choices[0].logprobs.top_logprobs[1:])


def test_chat_logprobs_streaming_and_not(server: RunningServer, adapter_fleet: AdapterFleet, reference: ReferenceGenerator) -> None:
    messages = [{"role": "user", "content": "translate to french: hello world"}]
    prompt_ids = reference.chat_ids(messages)
    offline = OfflineModel(adapter_fleet.base_dir, adapter_fleet.dirs["task-1"])
    expected_ids = offline.greedy(prompt_ids, 8)
    scores = offline.logprobs(prompt_ids + expected_ids)
    client = server.client()

    whole = client.chat.completions.create(
        model="task-1", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    content = whole.choices[0].logprobs.content
    assert_tokens_spell([bytes(entry.bytes) for entry in content], [entry.token for entry in content], expected_ids, reference.tokenizer)
    for position, (entry, token) in enumerate(zip(content, expected_ids, strict=True)):
        assert entry.logprob == pytest.approx(float(scores[len(prompt_ids) - 1 + position, token]), abs=TOLERANCE)
        assert bytes(entry.bytes) == _bytes_of(entry.token)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob

    stream = client.chat.completions.create(
        model="task-1", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [entry for chunk in stream for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    # A stop string that starts like the text holds tokens back; their logprobs come with the
    # next chunk sent, none is lost (the stop string itself never matches).
    held_stop = content[0].token + content[1].token + "\x01"
    stream = client.chat.completions.create(
        model="task-1", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        stop=[held_stop],
    )
    per_chunk = [choice.logprobs.content for chunk in stream for choice in chunk.choices if choice.logprobs]
    assert any(len(entries) > 1 for entries in per_chunk)  # a held-back token travelled with the next one
    assert [(e.token, e.logprob) for entries in per_chunk for e in entries] == [(e.token, e.logprob) for e in content]

    plain = client.chat.completions.create(model="task-1", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


def test_penalties_and_logit_bias_match_offline_and_leave_batch_mates_alone(
    server: RunningServer, adapter_fleet: AdapterFleet, reference: ReferenceGenerator
) -> None:
    prompt_ids = reference.prompt_ids(PROMPT)
    offline = OfflineModel(adapter_fleet.base_dir, adapter_fleet.dirs["task-4"])
    plain_ids = offline.greedy(prompt_ids, 16)
    biased_token = plain_ids[0] + 1
    settings = {"presence": 0.5, "frequency": 1.5, "repetition": 1.3, "bias": {biased_token: 3.0}}
    expected_ids = offline.penalized_greedy(prompt_ids, 16, **settings)
    assert expected_ids != plain_ids  # the penalties matter for this prompt, so the check can fail
    client = server.async_client()

    async def burst() -> list[object]:
        return await asyncio.gather(
            client.completions.create(
                model="task-4", prompt=PROMPT, max_tokens=16, temperature=0, presence_penalty=0.5, frequency_penalty=1.5,
                logit_bias={str(biased_token): 3.0}, extra_body={"repetition_penalty": 1.3}, logprobs=0,
            ),
            client.completions.create(model="task-4", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0),
        )

    penalized, plain = asyncio.run(burst())
    for response, ids in ((penalized, expected_ids), (plain, plain_ids)):
        tokens = response.choices[0].logprobs.tokens
        assert_tokens_spell([_bytes_of(token) for token in tokens], tokens, ids, reference.tokenizer)
    # Logprobs are the model's raw scores, not the penalized ones.
    raw = offline.logprobs(prompt_ids + expected_ids)
    assert penalized.choices[0].logprobs.token_logprobs == pytest.approx(
        [float(raw[len(prompt_ids) - 1 + p, token]) for p, token in enumerate(expected_ids)], abs=TOLERANCE
    )


def test_top_k_one_and_min_p_one_sample_the_greedy_token(server: RunningServer, reference: ReferenceGenerator) -> None:
    client = server.client()
    greedy = client.completions.create(model="task-3", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    unrestricted = [
        client.completions.create(model="task-3", prompt=PROMPT, max_tokens=10, temperature=1.5, seed=seed).choices[0].text
        for seed in (1, 2)
    ]
    assert greedy not in unrestricted  # hot sampling on a random model wanders off the arg-max path
    for seed in (1, 2):
        for narrowing in ({"top_k": 1}, {"min_p": 1.0}):
            text = client.completions.create(
                model="task-3", prompt=PROMPT, max_tokens=10, temperature=1.5, seed=seed, extra_body=narrowing
            ).choices[0].text
            assert text == greedy, narrowing


def test_bad_sampling_requests_are_refused(server: RunningServer) -> None:
    url = f"{server.base_url}/v1"

    def post(path: str, **body: object) -> httpx.Response:
        return httpx.post(f"{url}/{path}", json={"model": BASE_NAME, **body}, timeout=10)

    no_echo = post("completions", prompt="hi", max_tokens=0)
    assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"
    too_many = post("completions", prompt="hi", logprobs=21)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "logprobs"
    top_alone = post("chat/completions", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert top_alone.status_code == 400 and top_alone.json()["error"]["param"] == "top_logprobs"
    for bias in ({"x": 1.0}, {"99999999": 1.0}, {"5": 101.0}):
        refused = post("completions", prompt="hi", logit_bias=bias)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "logit_bias", bias
    penalty = post("completions", prompt="hi", presence_penalty=2.5)
    assert penalty.status_code == 400 and penalty.json()["error"]["param"] == "presence_penalty"


def test_draw_narrows_in_vllm_order() -> None:
    """min-p, then top-k, then top-p on what is left, renormalized."""
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])

    def drawn(**settings: float) -> set[int]:
        sampling = SamplingParams(max_tokens=1, **settings)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(0)
        return {draw(probs, sampling, generator) for _ in range(300)}

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {1, 3}
    assert drawn(min_p=0.5) == {1, 3}  # keeps p >= 0.25
    assert drawn(top_p=0.6) == {1, 3}  # 0.5 alone is short of 0.6
    # Top-k leaves [0.5, 0.3] -> [0.625, 0.375]: top-p 0.6 is reached by the first token alone.
    # Without renormalization the second token would survive too.
    assert drawn(top_k=2, top_p=0.6) == {1}


def test_draws_follow_the_distribution_and_skip_zero_weights() -> None:
    weights = torch.tensor([0.05, 0.5, 0.0, 0.15, 0.3]) * 3  # unnormalized
    generator = torch.Generator().manual_seed(0)
    draws = 20_000
    counts = Counter(categorical(weights, generator) for _ in range(draws))
    assert counts[2] == 0
    for index, share in enumerate((weights / weights.sum()).tolist()):
        assert counts[index] / draws == pytest.approx(share, abs=0.012)  # about 3.5 standard errors


def _sorted_candidates(probs: torch.Tensor, sampling: SamplingParams) -> list[int]:
    """The reference: sort the whole vocabulary, then min-p, top-k, top-p of the renormalized rest."""
    values, ids = torch.sort(probs, descending=True)
    keep = torch.ones_like(values, dtype=torch.bool)
    if sampling.min_p > 0:
        keep &= values >= sampling.min_p * values[0]
    if sampling.top_k > 0:
        keep[sampling.top_k :] = False
    kept = values[keep]
    if sampling.top_p < 1:
        shares = kept / kept.sum()
        kept = kept[: int((torch.cumsum(shares, 0) - shares < sampling.top_p).sum())]
    return ids[: len(kept)].tolist()


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 8.0])  # flat (nucleus past the head) to peaked
def test_candidates_equal_a_full_sort(scale: float) -> None:
    generator = torch.Generator().manual_seed(int(scale * 10))
    # float64: no two probabilities tie, so the order (and the cut) is the same for any method.
    probs = torch.softmax(torch.randn(8000, generator=generator, dtype=torch.float64) * scale, dim=0)
    for settings in (
        {"top_p": 0.9}, {"top_p": 0.5}, {"top_k": 40}, {"top_k": 3000, "top_p": 0.95}, {"min_p": 0.05},
        {"min_p": 0.001, "top_p": 0.8}, {"min_p": 0.01, "top_k": 20, "top_p": 0.7},
    ):
        sampling = SamplingParams(max_tokens=1, **settings)  # type: ignore[arg-type]
        values, ids = candidates(probs, sampling)
        assert ids.tolist() == _sorted_candidates(probs, sampling), settings
        assert torch.equal(values, probs[ids])


def test_extreme_settings_fail_only_their_own_request(server: RunningServer) -> None:
    """Below vLLM's 1e-5 a temperature decodes greedily (dividing by it would overflow); a
    penalty that overflows the logits fails its request alone, as the client's error (400, so
    SDKs do not retry it), and the engine goes on."""
    client = server.client()
    greedy = client.completions.create(model=BASE_NAME, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    for tiny in (1e-45, 1e-38, 9e-6):
        assert client.completions.create(model=BASE_NAME, prompt=PROMPT, max_tokens=6, temperature=tiny).choices[0].text == greedy

    async def burst() -> list[object]:
        async_client = server.async_client()
        return await asyncio.gather(
            async_client.completions.create(
                model="task-1", prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body={"repetition_penalty": 1e-300}
            ),
            async_client.completions.create(model=BASE_NAME, prompt=PROMPT, max_tokens=6, temperature=0),
            return_exceptions=True,
        )

    overflowed, batch_mate = asyncio.run(burst())
    assert isinstance(overflowed, openai.BadRequestError), overflowed
    assert overflowed.body["param"] == "repetition_penalty" and "non-finite" in overflowed.body["message"]
    assert batch_mate.choices[0].text == greedy
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_stop_token_ids_and_min_tokens(server: RunningServer, reference: ReferenceGenerator) -> None:
    """A +100 bias makes the model choose a token at once; `stop_token_ids` and end-of-sequence
    then end the output there, unless `min_tokens` masks them until that many tokens are out."""
    client = server.client()
    eos = reference.tokenizer.eos_token_id
    forced = reference.prompt_ids("banana")[-1]

    def complete(**settings: object) -> object:
        return client.completions.create(model="task-2", prompt=PROMPT, max_tokens=10, temperature=0, **settings).choices[0]

    for end_token, extra in ((eos, {}), (forced, {"stop_token_ids": [forced]})):
        at_once = complete(logit_bias={str(end_token): 100}, logprobs=0, extra_body=extra)
        assert at_once.text == "" and at_once.finish_reason == "stop" and len(at_once.logprobs.tokens) == 1
        later = complete(logit_bias={str(end_token): 100}, logprobs=0, extra_body={**extra, "min_tokens": 4})
        assert later.finish_reason == "stop" and len(later.logprobs.tokens) == 5
        assert reference.tokenizer.decode([end_token]) not in later.logprobs.tokens[:4]

    # Stop strings count only after min_tokens, from where the text then stood.
    full = complete().text
    stop = full[:2]
    assert complete(stop=[stop]).text == ""
    searched_from = len(client.completions.create(model="task-2", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text)
    found = full.find(stop, max(0, searched_from - len(stop) + 1))
    assert complete(stop=[stop], extra_body={"min_tokens": 4}).text == (full[:found] if found >= 0 else full)

    refused = httpx.post(
        f"{server.base_url}/v1/completions", timeout=10,
        json={"model": BASE_NAME, "prompt": "hi", "max_tokens": 2, "min_tokens": 3},
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "min_tokens"
    # min_tokens masking every token leaves nothing to choose: the client's error, not the server's.
    everything = list(range(len(reference.tokenizer)))
    masked_all = httpx.post(
        f"{server.base_url}/v1/completions", timeout=30,
        json={"model": BASE_NAME, "prompt": "hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": everything},
    )
    assert masked_all.status_code == 400 and masked_all.json()["error"]["param"] == "stop_token_ids"


def test_logprob_tokens_of_split_characters_carry_exact_bytes(server: RunningServer, reference: ReferenceGenerator) -> None:
    """The tiny tokenizer splits CJK characters into byte tokens: each token's bytes are exact
    (not U+FFFD), and text offsets index characters of the returned text."""
    text = "日本語 café"
    prompt_ids = reference.prompt_ids(text)
    assert any("\ufffd" in reference.tokenizer.decode([token]) for token in prompt_ids)  # characters are split
    scored = server.client().completions.create(model=BASE_NAME, prompt=text, max_tokens=0, echo=True, logprobs=0).choices[0]
    assert scored.text == text
    token_bytes = [_bytes_of(token) for token in scored.logprobs.tokens]
    assert_tokens_spell(token_bytes, scored.logprobs.tokens, prompt_ids, reference.tokenizer)
    assert scored.logprobs.text_offset == expected_offsets(token_bytes)
    # The token holding the first byte of "本" starts at character 1 of the text.
    first_byte_of_hon = len("日".encode())
    starts = [len(b"".join(token_bytes[:i])) for i in range(len(token_bytes))]
    hon = max(i for i, start in enumerate(starts) if start <= first_byte_of_hon)
    assert scored.logprobs.text_offset[hon] == 1


def test_text_offsets_index_the_returned_text(server: RunningServer, reference: ReferenceGenerator) -> None:
    """Special tokens take no room in generated text (it is decoded without them), and an echoed
    prompt that ends inside a character is decoded on its own, as the returned text is."""
    client = server.client()
    eos = reference.tokenizer.eos_token_id
    specials = client.completions.create(
        model=BASE_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0, logit_bias={str(eos): 100},
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert specials.text == "" and specials.logprobs.text_offset == [0, 0, 0, 0]

    cut = [token for token in reference.prompt_ids("日本") if "\ufffd" in reference.tokenizer.decode([token])][:1]
    assert cut, "the tiny tokenizer splits CJK characters into byte tokens"
    echoed = client.completions.create(model=BASE_NAME, prompt=cut, max_tokens=2, temperature=0, echo=True, logprobs=0).choices[0]
    prompt_text = reference.tokenizer.decode(cut)
    assert echoed.text.startswith(prompt_text)
    assert echoed.logprobs.text_offset[:2] == [0, len(prompt_text)]  # the completion starts after the prompt's U+FFFD
