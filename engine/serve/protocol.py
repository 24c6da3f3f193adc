"""The OpenAI request bodies the server accepts (pydantic models) and OpenAI-style error bodies.

Every field a client may send is declared here with its type and range, so a bad request is turned
into a 400 whose body names the field (``{"error": {"message", "type", "param", "code"}}``, as the
OpenAI API and vLLM answer). Fields of the OpenAI API the engine cannot honour (logprobs, echo,
penalties, logit_bias, best_of, suffix) are rejected when set to anything but their no-op value
rather than silently ignored. Unknown fields are ignored, as vLLM does.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
Number = Annotated[float, Strict()]  # strict float still accepts a JSON integer, but not "0.5" or true
TokenIds = list[Annotated[int, Strict(), Field(ge=0)]]


class RequestError(ValueError):
    """A request the server refuses with a 400; ``param`` is the offending field (None: the whole body)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(message: str, param: str | None = None, err_type: str = "invalid_request_error",
               code: int | str | None = None) -> dict:
    """The OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def validation_error_body(errors: list[dict]) -> dict:
    """A 400 body from pydantic/FastAPI validation errors; ``param`` is the top-level field of the first one.

    loc looks like ("body", "max_tokens") or ("body", "messages", 0, "content"); "body" is dropped, and
    pydantic's union-member tags (e.g. "str", "list[int]") are left out of the path in the message.
    """
    if not errors:
        return error_body("invalid request body")
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return error_body(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if not loc:
        got = first.get("input")
        kind = "not valid JSON" if isinstance(got, (bytes, str)) else f"a JSON {type(got).__name__}"
        return error_body(f"the request body must be a JSON object, but it is {kind}")
    param = str(loc[0])
    path = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:]
                           if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS))
    shown = "" if first.get("type") == "missing" else f" (got {first.get('input')!r:.80})"
    more = f"; and {len(errors) - 1} more error(s)" if len(errors) > 1 else ""
    return error_body(f"{path}: {first.get('msg')}{shown}{more}", param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, plus vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: StrictInt = Field(1, ge=1, le=128)
    temperature: Number = Field(1.0, ge=0.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = -1                      # vLLM extension: -1 is off
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stop_token_ids: TokenIds | None = None    # vLLM extension
    ignore_eos: StrictBool = False            # vLLM extension
    include_stop_str_in_output: StrictBool = False
    return_token_ids: StrictBool = False     # vLLM extension: each choice carries its token_ids
    stream: StrictBool = False
    stream_options: dict | None = None
    user: str | None = None
    # OpenAI fields without an engine behind them: only their neutral values are accepted.
    frequency_penalty: Number = 0.0
    presence_penalty: Number = 0.0
    logit_bias: dict | None = None
    logprobs: StrictBool | StrictInt | None = None
    best_of: StrictInt | None = None

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("top_k must be -1 (off) or an integer >= 1")
        return v

    def check(self) -> None:
        """Raise RequestError for what the types cannot say (unsupported fields, inconsistent ones)."""
        unsupported = {"frequency_penalty": self.frequency_penalty != 0, "presence_penalty": self.presence_penalty != 0,
                       "logit_bias": bool(self.logit_bias), "logprobs": self.logprobs not in (None, False, 0),
                       "best_of": self.best_of not in (None, self.n)}
        for name, set_ in unsupported.items():
            if set_:
                raise RequestError(f"{name} is not supported by this server; leave it unset", name)
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(SamplingFields):
    """POST /v1/completions. prompt: a string, token ids, or a batch of either."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = Field(16, ge=1)
    echo: StrictBool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise RequestError("echo is not supported by this server; leave it unset", "echo")
        if self.suffix:
            raise RequestError("suffix is not supported by this server; leave it unset", "suffix")
        if isinstance(self.prompt, list) and not self.prompt:
            raise RequestError("prompt is empty; give a string or at least one token id", "prompt")

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; a list of content parts must be text parts."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError("only text content parts are supported", "messages.content")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. max_tokens (or max_completion_tokens) None: up to max_model_len."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    add_generation_prompt: StrictBool = True     # vLLM extension
    chat_template: str | None = None             # vLLM extension

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
