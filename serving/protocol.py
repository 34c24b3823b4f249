"""Request and response bodies of the OpenAI-compatible API (pydantic v2).

Design decisions:
- Field names, defaults and limits follow OpenAI's API reference (`max_tokens` 16 by default
  for completions, `temperature` in [0, 2], `top_p` in (0, 1]), so the official `openai` client
  works unchanged. `max_completion_tokens` is accepted for chat. Stop strings are not held to
  OpenAI's 4: vLLM takes any number and lm-eval-harness sends 5 for HumanEval, so up to
  `MAX_STOP_STRINGS` are accepted.
- Unknown request fields are ignored, as vLLM does, so clients that send `user` are not
  refused. Fields that would change the output and are not implemented (tools,
  `response_format`, guided decoding, `best_of`, `suffix`, `echo` in chat) are refused with 400
  by the app rather than silently ignored.
- Text with an unpaired UTF-16 surrogate (JSON can spell one) is refused here: it is not
  Unicode, and tokenizers and encoders would fail on it later.
- vLLM's sampling extensions are accepted with vLLM's meanings (`top_k`, `min_p`,
  `repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`), since clients such as
  lm-eval-harness send them.
- Logprobs follow OpenAI's two shapes: completions' parallel lists (`tokens`, `token_logprobs`,
  `top_logprobs` as token -> logprob maps, `text_offset`), chat's `content` entries with `bytes`.
  Up to 20 alternatives per token, vLLM's default `max_logprobs`.
- vLLM's `/v1/load_lora_adapter` bodies are mirrored exactly (`lora_name`, `lora_path`), with
  lengths bounded: a name becomes a key the server keeps and a Prometheus label.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _has_unpaired_surrogate(value: Any) -> bool:
    """Whether any string in `value` holds a lone UTF-16 surrogate (JSON can spell `"\\ud800"`),
    which is not Unicode: tokenizers and UTF-8 encoders fail on it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_unpaired_surrogate(k) or _has_unpaired_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_unpaired_surrogate(item) for item in value)
    return False


class _Body(BaseModel):
    """A request body: its text must be valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if _has_unpaired_surrogate(data):
            raise ValueError("the body holds text with an unpaired UTF-16 surrogate (such as \\ud800), which is not valid Unicode")
        return data


class _Request(_Body):
    model_config = ConfigDict(extra="allow")


MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 32
# The limit counts strings in a list; a single stop string may be of any length.
StopList = Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(_Request):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM extension: 0 or -1 means every token
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # vLLM extension
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM extension (CTRL's penalty)
    logit_bias: dict[str, float] | None = None  # token id (as a string key) -> bias in [-100, 100]
    stop: str | StopList | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # torch generators take 64 bits
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension: keep generating past end-of-sequence (benchmarks)
    min_tokens: int = Field(0, ge=0)  # vLLM extension: no end token or stop string before this many
    stop_token_ids: list[int] | None = None  # vLLM extension: tokens that end the output like EOS

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return tuple(s for s in stops if s)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with `echo`: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per-token scores of a completion (with `echo`, the prompt's tokens come first and the first
    has no score). `top_logprobs` maps token text to logprob: the top alternatives plus the chosen
    token, as vLLM returns them."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adapterhub"
    root: str | None = None
    parent: str | None = None
    resident: bool = False  # in a compute-device slot now
    tier: Literal["device", "cpu"] | None = None
    aliases: list[str] = Field(default_factory=list)
    max_model_len: int | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


#: Longest `lora_name`: a registry ref (`name@sha256`, names of at most 128 characters) fits. A
#: name becomes a metrics label and a key the server holds; it need not be unbounded.
MAX_LORA_NAME = 256


class LoadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=MAX_LORA_NAME)
    lora_path: str | None = Field(None, min_length=1, max_length=4096)  # None: resolve `lora_name` from the registry and warm it


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=MAX_LORA_NAME)
    lora_int_id: int | None = None
