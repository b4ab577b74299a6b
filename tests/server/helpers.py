"""A tiny ReadME model folder a server can load, and a real `readmoe serve` subprocess
(``readmoe.server.process``: bound to 127.0.0.1 on a free port, stopped by its own pid)."""

from __future__ import annotations

from pathlib import Path

from readmoe.refactor.slicing import save_readme
from readmoe.server.process import ServerProcess as BaseServerProcess
from tests.conftest import char_tokenizer
from tests.model.test_modeling_readme import tiny_readme

VOCAB = 128
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
START_TIMEOUT_S = 90.0


def tiny_chat_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_served_model(seed: int = 0):
    """A tiny ReadME model with a pre-gating router (routing is real in every step)."""
    model = tiny_readme(seed, vocab_size=VOCAB, max_position_embeddings=1024)
    model.attach_router("pregating", seed=seed)
    return model.eval()


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    return save_readme(tiny_served_model(seed), folder, tokenizer=tiny_chat_tokenizer())


class ServerProcess(BaseServerProcess):
    """The server on 127.0.0.1 and the CPU, whatever the machine has."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(model, "--device", "cpu", *args, env=env,
                         start_timeout_s=START_TIMEOUT_S)
