"""Request bodies of the OpenAI API that the server accepts, and the JSON of its replies.

Bodies are strict (``extra="forbid"``): a field we do not know is a 400 naming it, and a
field we know but do not implement (``n`` > 1, ``logprobs``, tools, penalties, ...) is a
400 saying so (``unsupported``), never silently ignored. ``ignore_eos`` is vLLM's extension
(benchmarks with fixed output lengths use it).

Finish reasons: the engine's "eos" and "stop" are OpenAI's "stop"; "length" stays.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from readmoe.serve.engine import RequestOutput
from readmoe.serve.sampling import SamplingParams

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("temperature", "top_p", "stream", "n", "presence_penalty",
                     "frequency_penalty", "echo", "ignore_eos", mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Clients that send ``null`` for an optional field mean its default."""
        return cls.model_fields[info.field_name].default if value is None else value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, message) for every field set to something the server does not do."""
        found = []
        if self.n != 1:
            found.append(("n", "n must be 1: one choice per request (send parallel requests "
                          "for more)"))
        if self.presence_penalty or self.frequency_penalty:
            found.append(("presence_penalty" if self.presence_penalty else "frequency_penalty",
                          "presence and frequency penalties are not supported; leave them 0"))
        if self.logit_bias:
            found.append(("logit_bias", "logit_bias is not supported"))
        if self.stream_options is not None and not self.stream:
            found.append(("stream_options", "stream_options is only allowed with stream=true"))
        stops = self.stops()
        if len(stops) > 4:
            found.append(("stop", f"at most 4 stop sequences, got {len(stops)}"))
        if any(not s for s in stops):
            found.append(("stop", "stop sequences must not be empty"))
        return found

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=self.stops(), seed=self.seed,
                              ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.logprobs is not None:
            found.append(("logprobs", "logprobs are not supported"))
        if self.echo:
            found.append(("echo", "echo is not supported"))
        if self.best_of not in (None, 1):
            found.append(("best_of", "best_of must be 1"))
        if self.suffix is not None:
            found.append(("suffix", "suffix (insertion) is not supported"))
        return found


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.logprobs or self.top_logprobs is not None:
            found.append(("logprobs", "logprobs are not supported"))
        for name in ("tools", "functions", "function_call", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                found.append((name, "tool and function calling are not supported"))
        if self.tool_choice not in (None, "none"):
            found.append(("tool_choice", "tool and function calling are not supported"))
        if self.response_format not in (None, {"type": "text"}):
            found.append(("response_format", "only response_format {\"type\": \"text\"} is "
                          "supported"))
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            found.append(("max_completion_tokens", "give max_tokens or max_completion_tokens, "
                          "not both"))
        return found

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def finish_reason(output: RequestOutput) -> str | None:
    return FINISH_REASONS.get(output.finish_reason) if output.finished else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, text: str, reason: str | None,
                    usage_: dict | None, chunk: bool = False) -> dict:
    """A /v1/completions reply, or one streamed chunk of it."""
    return {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            **({} if chunk and usage_ is None else {"usage": usage_})}


def chat_body(request_id: str, model: str, text: str, reason: str | None,
              usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": reason}],
            "usage": usage_}


def chat_chunk(request_id: str, model: str, delta: dict, reason: str | None) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(request_id: str, model: str, kind: str, usage_: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices."""
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            "choices": [], "usage": usage_}
