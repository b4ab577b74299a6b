"""llama.cpp as a peer engine in the speed benchmark: greedy decode timings of a GGUF file.

Why: users who want speed on a CPU pick llama.cpp, so the engine's numbers mean something only
beside it, on the same weights, threads and prompts. llama-cpp-python is a benchmark-only
dependency (``make bench-deps`` builds it); nothing else in readmoe imports it.

Batch 1 runs through ``llama_cpp.Llama.generate`` (what a user of the Python API gets: its
sampler chain, greedy at temperature 0, one token per ``llama_decode``). A batch of B prompts
runs through the C API directly, as llama.cpp's own ``batched`` example does: one context with
``n_seq_max`` = B, one sequence per prompt, the prompts prefilled in one ``llama_batch``, then
one ``llama_decode`` per step carrying every sequence's next token, each chosen by argmax over
its logits. Both return wall seconds to produce ``new`` tokens per prompt, prefill included, so
a caller subtracts the time of ``new`` = 1 as it does for every peer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from readmoe.errors import ReadmoeError


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot be benchmarked here (one line naming the fix), or None."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # an ImportError, or a build whose shared library fails to load
        return (f"llama_cpp is not importable ({type(exc).__name__}: {exc}); `make bench-deps` "
                "builds llama-cpp-python from source into .venv")
    return None


class LlamaCppPeer:
    """One GGUF file loaded once at a thread count (prefill and decode both use ``threads``)."""

    def __init__(self, path: str | Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.path = Path(path)
        self.threads = threads
        self.llm = Llama(model_path=str(self.path), n_ctx=max(512, context), n_gpu_layers=0,
                         n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)

    def command(self, batch: int) -> str:
        """How a row of this peer was produced, for the results."""
        if batch == 1:
            return (f"llama_cpp.Llama('{self.path.name}', n_threads={self.threads})"
                    ".generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0)")
        return (f"llama_decode of one llama_batch per step on '{self.path.name}', "
                f"n_seq_max={batch}, n_threads={self.threads}, greedy argmax")

    def seconds(self, prompts: Sequence[Sequence[int]], new: int) -> float:
        """Wall seconds to decode ``new`` tokens greedily after each prompt (EOS ignored)."""
        if len(prompts) == 1:
            return self._single(list(prompts[0]), new)
        return self._batched(prompts, new)

    def _single(self, prompt: list[int], new: int) -> float:
        self.llm.reset()  # no prefix reuse from the previous run: every run prefills
        start = time.perf_counter()
        tokens = self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        for count, _ in enumerate(tokens, 1):
            if count == new:
                break
        elapsed = time.perf_counter() - start
        tokens.close()
        return elapsed

    def _batched(self, prompts: Sequence[Sequence[int]], new: int) -> float:
        import llama_cpp as lc

        lengths = [len(p) for p in prompts]
        params = lc.llama_context_default_params()
        params.n_seq_max = len(prompts)
        params.n_ctx = len(prompts) * (max(lengths) + new)
        params.n_batch = params.n_ubatch = max(sum(lengths), len(prompts))
        params.n_threads = params.n_threads_batch = self.threads
        ctx = lc.llama_init_from_model(self.llm.model, params)
        if ctx is None:
            raise ReadmoeError(f"llama.cpp could not create a context for {len(prompts)} "
                               "sequences")
        batch = lc.llama_batch_init(params.n_batch, 0, 1)
        vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.llm.model))

        def decode(entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
            """Feed (token, position, sequence, wants logits) entries; argmax of each output."""
            batch.n_tokens = len(entries)
            for i, (token, position, seq, output) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = output
            if lc.llama_decode(ctx, batch) != 0:
                raise ReadmoeError("llama_decode failed (the KV cache is too small?)")
            rows = sum(output for *_, output in entries)
            return np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(rows, vocab)).argmax(1)

        try:
            start = time.perf_counter()
            chosen = decode([(token, pos, seq, pos == len(prompt) - 1)
                             for seq, prompt in enumerate(prompts)
                             for pos, token in enumerate(prompt)])
            for step in range(1, new):
                chosen = decode([(int(token), lengths[seq] + step - 1, seq, True)
                                 for seq, token in enumerate(chosen)])
            return time.perf_counter() - start
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
