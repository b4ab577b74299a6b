"""The HTTP server's settings, apart from how the engine batches (``serve.launch``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from readmoe.errors import ReadmoeError

API_KEY_ENV = "READMOE_API_KEY"
# What the server prints once it accepts requests, followed by its URL (``server.process``
# waits for it without importing the server itself).
LISTENING = "readmoe serve: listening on"


@dataclass(frozen=True)
class ServerConfig:
    """``max_queue`` bounds the requests waiting for the engine (back-pressure: beyond it a
    request gets 503 with Retry-After, so memory stays bounded); ``grace_s`` is how long a
    shutdown lets in-flight requests finish before aborting them; ``default_max_tokens``
    caps a chat reply that names no max_tokens (OpenAI's completions default, 16, applies
    to /v1/completions)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queue: int = 256
    grace_s: float = 10.0
    default_max_tokens: int = 256
    retry_after_s: int = 1
    access_log: bool = False

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ReadmoeError(f"--port must be in 0..65535 (0 picks a free one), got {self.port}")
        if self.max_queue < 0:
            raise ReadmoeError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.grace_s < 0:
            raise ReadmoeError(f"--grace must be >= 0 seconds, got {self.grace_s}")
        if self.default_max_tokens < 1:
            raise ReadmoeError("--default-max-tokens must be at least 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ReadmoeError("--api-key is empty; give a key or leave it out")


def api_key_from(flag: str | None) -> str | None:
    """The key the server requires: ``--api-key``, else $READMOE_API_KEY, else none."""
    return flag if flag is not None else (os.environ.get(API_KEY_ENV) or None)
