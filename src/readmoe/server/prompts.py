"""Prompts as token ids: completion prompts (text or ids), chat messages through the model's
own chat template, and the context-length check every request passes before it is queued.

Text prompts are encoded exactly as ``Engine.add_request`` encodes text, so a server reply
equals the in-process engine's on the same prompt. A chat is rendered by the tokenizer's
template (SmolLM2's folder carries one) with the generation prompt appended, then encoded
without adding special tokens again (the template already placed them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from readmoe.server.errors import bad_request

ROLES = ("system", "developer", "user", "assistant")


def completion_ids(tokenizer, prompt: str | Sequence, vocab_size: int) -> list[int]:
    """The token ids of a /v1/completions prompt (one prompt per request)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise bad_request(f"one prompt per request, got a batch of {len(prompt)}: send "
                              "each prompt as its own request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                              "prompt")
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    return ids


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{index}]: only text content parts are supported, got "
                              f"type {part.get('type')!r}", f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Messages as the chat template reads them: role and plain-text content."""
    rendered = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{index}]: role {role!r} is not supported (use one of "
                              f"{', '.join(ROLES)}; tool messages need tool calling, which this "
                              "server does not do)", f"messages.{index}.role")
        rendered.append({"role": "system" if role == "developer" else role,
                         "content": _content(message, index)})
    return rendered


def chat_ids(tokenizer, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """The token ids of a chat, rendered with the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model's tokenizer has no chat template, so it cannot render "
                          "chat messages: use /v1/completions with a plain prompt", "messages")
    messages = chat_messages(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # a template may raise on what it does not accept
        raise bad_request(f"the chat template rejected the messages: {exc}",
                          "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the rendered chat is empty", "messages")
    return ids


def check_context(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """400 when the prompt and its output cannot fit the model's context."""
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens; the request has "
            f"{prompt_len} prompt tokens and asks for {max_tokens} more: shorten the prompt or "
            "lower max_tokens", "max_tokens" if prompt_len < max_model_len else "prompt")
