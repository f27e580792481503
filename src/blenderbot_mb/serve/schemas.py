"""Request bodies: the OpenAI chat-completions shape plus Blenderbot's own settings, and the conversation
endpoints. Unknown fields are rejected (a client asking for `tools` learns at once that this server does not
do them), and every number is bounded."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_TEXT = 4000  # characters in one message: far beyond the model's 128-token context
MAX_MESSAGES = 256
MAX_PERSONA = 16


class Strict(BaseModel):
    """No unknown fields, and JSON's own types: "yes" is no boolean and "0.7" no number (as OpenAI's API
    answers); an integer is a valid float."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


MAX_STOP = 4  # OpenAI's limit on stop sequences
SAMPLING_EPS = 1e-5  # a temperature below this is greedy decoding (as vLLM: smaller ones overflow float32 scores)
MAX_STOP_TEXT = 200

MAX_LOGIT_BIAS = 300  # tokens in a request's logit_bias (OpenAI's bound)

# OpenAI fields this server does not implement, with the values that ask for nothing (what many clients send
# by default): accepted and dropped; any other value is an unsupported field (400)
NEUTRAL = {"logprobs": (False,), "top_logprobs": (0,), "store": (False,), "tools": ([],), "tool_choice": ("none",), "response_format": ({"type": "text"},),
           "parallel_tool_calls": (True, False)}


def _neutral(value, options) -> bool:
    """`value` is None or one of `options`, of its kind (0 takes 0.0, never False; False is not 0)."""
    if value is None:
        return True
    for n in options:
        if isinstance(n, bool) or isinstance(value, bool):
            if value is n:
                return True
        elif isinstance(n, int) and isinstance(value, (int, float)) and value == n:
            return True
        elif type(value) is type(n) and value == n:
            return True
    return False


class GenerationParams(Strict):
    """Decoding settings; unset ones take the model's own (generation_config.json). `stop` cuts the reply's
    text at the first of its strings (the server's side, `app.StopScan`), so it is no generate() setting."""

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # 0: greedy; > 0: sampling
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=1 << 16)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None  # vLLM's (and transformers')
    # OpenAI's: {token id as a string: bias from -100 to 100}, added to the logits (transformers' sequence_bias)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = None
    num_beams: Annotated[int, Field(ge=1, le=16)] | None = None
    no_repeat_ngram_size: Annotated[int, Field(ge=0, le=16)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10)] | None = None  # as vLLM's: transformers' rule
    length_penalty: Annotated[float, Field(ge=-10, le=10)] | None = None  # beam search's
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None  # OpenAI's, on the reply's tokens
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stop: str | list[str] | None = None  # up to MAX_STOP strings of 1 to MAX_STOP_TEXT characters

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value):
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
        if value is not None and not all(k.isascii() and k.isdigit() and len(k) <= 9 for k in value):
            raise ValueError("keys are token ids, written as decimal integers (\"50256\")")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if stops is not None and not all(1 <= len(x) <= MAX_STOP_TEXT for x in stops):
            raise ValueError(f"each stop string has 1 to {MAX_STOP_TEXT} characters")
        return value

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data):
        """OpenAI fields left at the values that ask for nothing are dropped, and so is null for a field that
        has a default (`"n": null`, `"stream": null`, as OpenAI takes them); others stay, to be refused."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in NEUTRAL and _neutral(v, NEUTRAL[k]) or v is None and
                                                          k in cls.model_fields and
                                                          not cls.model_fields[k].is_required())}
        return data

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def generation_kwargs(self, n: int = 1) -> dict:
        """Keyword arguments for the backends' generate(); settings left unset are left out."""
        kw: dict = {}
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        for name, value in (("max_new_tokens", max_tokens), ("min_new_tokens", self.min_tokens),
                            ("num_beams", self.num_beams), ("no_repeat_ngram_size", self.no_repeat_ngram_size),
                            ("repetition_penalty", self.repetition_penalty), ("length_penalty", self.length_penalty),
                            ("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty),
                            ("top_p", self.top_p), ("top_k", self.top_k), ("min_p", self.min_p), ("seed", self.seed)):
            if value is not None:
                kw[name] = value
        greedy = self.temperature is not None and self.temperature < SAMPLING_EPS
        sampling = not greedy and any(x is not None for x in (self.temperature, self.top_p, self.top_k, self.min_p))
        if greedy:  # OpenAI's greedy: one beam, unless the request asks for beam search
            kw["do_sample"] = False
            kw.setdefault("num_beams", 1)
        elif sampling:
            kw["do_sample"] = True
            kw.setdefault("num_beams", 1)  # OpenAI-style sampling; num_beams > 1 asks for beam sampling
            if self.temperature is not None:
                kw["temperature"] = self.temperature
        if self.logit_bias:  # (tuples: the settings are a hashable key of the engine's)
            kw["sequence_bias"] = tuple(((int(k),), float(v)) for k, v in self.logit_bias.items())
        if n > 1:
            kw["num_return_sequences"] = n
        return kw


class TextPart(Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT)]


# the fields of an assistant message as OpenAI returns it (`message.model_dump()` sent back in the history), at
# the values that say nothing: accepted and dropped; tool calls, audio and the like are refused
MESSAGE_NEUTRAL = {"refusal": (None,), "tool_calls": (None, []), "function_call": (None,), "audio": (None,),
                   "annotations": (None, [])}


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for "system"
    content: Annotated[str, Field(max_length=MAX_TEXT)] | list[TextPart] | None  # null: an assistant's only
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in MESSAGE_NEUTRAL and v in MESSAGE_NEUTRAL[k])}
        return data

    @field_validator("content")
    @classmethod
    def _null_content_is_an_assistants(cls, content, info: ValidationInfo):
        role = info.data.get("role")
        if content is None and role != "assistant":
            raise ValueError(f"null only in an assistant's message, not a {role}'s")
        return content

    @field_validator("content")
    @classmethod
    def _bounded_parts(cls, content):
        if isinstance(content, list) and sum(len(p.text) for p in content) > MAX_TEXT:
            raise ValueError(f"a message holds at most {MAX_TEXT} characters, its text parts together")
        return content

    def conversation_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())


class StreamOptions(Strict):
    include_usage: bool = False


MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class ChatCompletionRequest(GenerationParams):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, not used
    metadata: dict[str, str] | None = None  # OpenAI's tags for stored completions: accepted, not used (none stored)
    # each reply token's log-probability under the model (its own distribution, before temperature, top-p or
    # penalties: `blenderbot_mb.scoring`), and the top_logprobs likeliest tokens at each position
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, messages):
        if messages[-1].role != "user":
            raise ValueError("the last message must have role 'user': the model replies to it")
        return messages

    def logprobs_wanted(self) -> int | None:
        """None: no log-probabilities; k >= 0: each token's, with the k likeliest tokens at each position."""
        return (self.top_logprobs or 0) if self.logprobs else None


class NewConversation(Strict):
    persona: Annotated[list[Annotated[str, Field(min_length=1, max_length=500)]],
                       Field(max_length=MAX_PERSONA)] = []


class ConversationMessage(GenerationParams):
    content: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
    user: str | None = None  # accepted as in chat completions, not used
    stream: bool = False
    stream_options: StreamOptions | None = None  # accepted as in chat completions; usage is always streamed
