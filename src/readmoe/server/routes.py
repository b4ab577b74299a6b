"""The OpenAI endpoints: /v1/models, /v1/completions and /v1/chat/completions.

Each request is checked in the order a client can act on: its model (404), fields we do not
implement (400), its prompt and the context it needs (400), then the engine's queue (503).
Only then is it submitted to the engine loop. Streams are server-sent events, one event per
generated token, ending in ``data: [DONE]``; the first chat event carries the role. A client
that goes away mid-stream cancels the response task, and closing its ``RequestStream``
aborts the request at once; a non-streamed request polls for its client's disconnect while
it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from readmoe.errors import ReadmoeError
from readmoe.serve.engine import RequestOutput
from readmoe.serve.launch import ServedEngine
from readmoe.server.bridge import EngineLoop, RequestStream
from readmoe.server.config import ServerConfig
from readmoe.server.errors import APIError, bad_request
from readmoe.server.prompts import chat_ids, check_context, completion_ids
from readmoe.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    finish_reason,
    usage,
    usage_chunk,
)
from readmoe.server.text import IncrementalText

OPENAI_COMPLETIONS_DEFAULT = 16  # max_tokens when a /v1/completions request names none
DISCONNECT_POLL_S = 0.5
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class OpenAIRoutes:
    def __init__(self, loop: EngineLoop, served: ServedEngine, config: ServerConfig,
                 model_name: str) -> None:
        self.loop, self.served, self.config = loop, served, config
        self.model_name = model_name
        self.tokenizer = served.tokenizer
        self.vocab_size = served.engine.model.config.vocab_size
        self.created = int(time.time())
        self.router = APIRouter(prefix="/v1")
        self.router.add_api_route("/models", self.models, methods=["GET"])
        self.router.add_api_route("/models/{model:path}", self.model, methods=["GET"])
        self.router.add_api_route("/completions", self.completions, methods=["POST"])
        self.router.add_api_route("/chat/completions", self.chat, methods=["POST"])

    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "readmoe", "max_model_len": self.served.max_model_len}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    async def model(self, model: str) -> dict:
        self._check_model(model)
        return self._card()

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves "
                           f"{self.model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def _admit(self, body: CompletionRequest | ChatCompletionRequest, ids: list[int],
               max_tokens: int | None, default: int, prefix: str) -> RequestStream:
        room = self.served.max_model_len - len(ids)
        if max_tokens is None:
            max_tokens = max(1, min(default, room))
        check_context(len(ids), max_tokens, self.served.max_model_len)
        try:
            params = body.sampling(max_tokens)
        except ReadmoeError as exc:
            raise bad_request(str(exc)) from None
        return self.loop.submit(ids, params, prefix)

    def _check(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        self._check_model(body.model)
        unsupported = body.unsupported()
        if unsupported:
            param, message = unsupported[0]
            raise bad_request(message, param)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check(body)
        ids = completion_ids(self.tokenizer, body.prompt, self.vocab_size)
        stream = self._admit(body, ids, body.max_tokens, OPENAI_COMPLETIONS_DEFAULT, "cmpl")
        if body.stream:
            return EventStream(self._completion_events(stream, body), stream)
        output = await self._final(stream, request)
        return completion_body(stream.request_id, self.model_name, output.text,
                               finish_reason(output), self._usage(stream, output))

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check(body)
        ids = chat_ids(self.tokenizer, [m.model_dump() for m in body.messages])
        stream = self._admit(body, ids, body.requested_max_tokens,
                             self.config.default_max_tokens, "chatcmpl")
        if body.stream:
            return EventStream(self._chat_events(stream, body), stream)
        output = await self._final(stream, request)
        return chat_body(stream.request_id, self.model_name, output.text, finish_reason(output),
                         self._usage(stream, output))

    @staticmethod
    def _usage(stream: RequestStream, output: RequestOutput) -> dict:
        return usage(stream.prompt_len, len(output.token_ids))

    async def _final(self, stream: RequestStream, request: Request) -> RequestOutput:
        """The finished output; aborts the request if its client disconnects meanwhile."""
        try:
            while True:
                try:
                    output = await asyncio.wait_for(anext(stream), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the connection") from None
                    continue
                if output.finished:
                    return output
        finally:
            stream.close()

    async def _events(self, stream: RequestStream, stops: list[str], include_usage: bool,
                      kind: str, event, first: dict | None = None) -> AsyncIterator[str]:
        """SSE events of one request; ``event(text, reason)`` builds a token's payload."""
        if first is not None:
            yield sse(first)
        text = IncrementalText(self.tokenizer, stops)
        try:
            async for output in stream:
                delta = (text.finish(output.text) if output.finished
                         else text.push(output.new_token_ids))
                yield sse(event(delta, finish_reason(output)))
                if output.finished and include_usage:
                    yield sse(usage_chunk(stream.request_id, self.model_name, kind,
                                          self._usage(stream, output)))
        except APIError as exc:  # the engine failed or the server is shutting down
            yield sse(exc.body())
        yield "data: [DONE]\n\n"

    def _completion_events(self, stream: RequestStream,
                           body: CompletionRequest) -> AsyncIterator[str]:
        def event(delta: str, reason: str | None) -> dict:
            return completion_body(stream.request_id, self.model_name, delta, reason, None,
                                   chunk=True)

        return self._events(stream, body.stops(), body.include_usage, "text_completion", event)

    def _chat_events(self, stream: RequestStream,
                     body: ChatCompletionRequest) -> AsyncIterator[str]:
        def event(delta: str, reason: str | None) -> dict:
            return chat_chunk(stream.request_id, self.model_name, {"content": delta}, reason)

        role = chat_chunk(stream.request_id, self.model_name,
                          {"role": "assistant", "content": ""}, None)
        return self._events(stream, body.stops(), body.include_usage, "chat.completion.chunk",
                            event, first=role)


class EventStream(StreamingResponse):
    """Server-sent events that abort their request however the response ends (a client
    that disconnects cancels the response mid-``send``, where the event generator itself
    would only learn of it once garbage-collected)."""

    def __init__(self, events: AsyncIterator[str], stream: RequestStream) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self.request_stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.request_stream.close()
