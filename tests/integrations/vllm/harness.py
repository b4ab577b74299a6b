"""vLLM as the tests drive it: an in-process ``LLM`` on CPU in fp32, greedy generation from
token ids, a hook that records every pre-gating router call, and ``readmoe serve --backend
vllm`` as a child process."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import httpx
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from readmoe.server.process import ServerProcess

KV_CACHE_BYTES = 256 << 20


def make_llm(folder: Path, **overrides) -> LLM:
    """fp32 (vLLM's CPU path takes it), eager, a small explicit KV cache (on CPU the default
    reserves 90% of the machine's memory), chunked prefill in steps of at most 32 tokens."""
    fields = dict(model=str(folder), dtype="float32", enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=KV_CACHE_BYTES, max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=32)
    fields.update(overrides)
    return LLM(**fields)


def greedy(llm: LLM, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """The greedy output token ids (EOS honoured) of ``prompts``, submitted together."""
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens),
                           use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def one_by_one(llm: LLM, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    return [greedy(llm, [p], max_tokens)[0] for p in prompts]


class RouterCalls:
    """Every call of the model's pre-gating router while open: (token ids, chosen experts).

    The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a forward hook
    on the router sees each model step's input: what the router really computes."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.calls: list[tuple[list[int], list[int]]] = []

    def _record(self, module, args, output) -> None:
        input_ids, _positions = args
        self.calls.append((input_ids.tolist(), output.argmax(-1).tolist()))

    def __enter__(self) -> RouterCalls:
        self.handles = self.llm.apply_model(
            lambda model: model.model.router.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    @property
    def tokens(self) -> list[int]:
        return [token for ids, _ in self.calls for token in ids]

    @property
    def experts(self) -> list[int]:
        return [expert for _, experts in self.calls for expert in experts]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer(ServerProcess):
    """``readmoe serve MODEL --backend vllm`` on 127.0.0.1, ready once /health answers."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None,
                 start_timeout_s: float = 600.0) -> None:
        super().__init__(model, "--backend", "vllm", *args, env=env, port=free_port(),
                         start_timeout_s=start_timeout_s)

    def listening(self, line: str) -> str | None:
        if "Application startup complete" not in line:
            return None
        url = f"http://{self.host}:{self.port}"
        httpx.get(f"{url}/health", timeout=10).raise_for_status()
        return url
