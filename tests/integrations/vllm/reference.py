"""The main environment's side of the vLLM parity tests (run by .venv's python).

readmoe.model needs the transformers of the main environment, newer than vLLM's pin, so the
vLLM suite asks this script, in a subprocess, for tiny folders to serve and for what HF
``generate`` and readmoe's engine answer:

    python tests/integrations/vllm/reference.py tiny OUT_DIR
        OUT_DIR/<kind>/ for each of KINDS: a tiny random ReadME folder, with a character
        tokenizer, in shapes vLLM's CPU kernels take (head size 32)
    python tests/integrations/vllm/reference.py answer FOLDER MAX_TOKENS < prompts.json
        prints {"hf": [...], "engine": [...], "experts": [...]} for the token-id prompts on
        stdin: the greedy output (EOS honoured) of HF generate, one prompt at a time, and of
        readmoe's engine, all prompts at once; and the pre-gating router's expert at every
        position the backbone reads (prompt + output but its last token), by one full
        recompute (null without that router)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from readmoe.models import load_model, load_tokenizer  # noqa: E402
from readmoe.refactor.slicing import save_readme  # noqa: E402
from readmoe.serve.engine import Engine  # noqa: E402
from readmoe.serve.sampling import SamplingParams  # noqa: E402
from tests.conftest import char_tokenizer  # noqa: E402
from tests.model.test_modeling_readme import tiny_readme  # noqa: E402

# The character tokenizer's vocabulary, so vLLM can detokenize every id. Three layers as
# tiny_readme's (shared + routed, routed only, shared only) at hidden 128 / 4
# heads and a router of 64 / 2 heads: head size 32 everywhere. Odd FFN sizes, so vLLM's padding
# (its CPU kernels' multiples of 32, and tensor parallelism's even split) is exercised.
TINY = dict(vocab_size=len(char_tokenizer()), hidden_size=128, dense_intermediate_size=256,
            num_attention_heads=4, num_key_value_heads=2,
            shared_intermediate_sizes=[33, 0, 63], expert_intermediate_sizes=[17, 41, 0])
ROUTER = dict(router_dim=64, router_heads=2, router_mlp_dim=96)
KINDS = ("pregating", "layerwise", "one-expert")


def tiny(out: Path) -> None:
    for kind in KINDS:
        if kind == "one-expert":
            model = tiny_readme(0, num_experts=1, **TINY)
        else:
            model = tiny_readme(0, **TINY)
            model.attach_router(kind, seed=0, **(ROUTER if kind == "pregating" else {}))
        save_readme(model, out / kind, char_tokenizer())


@torch.inference_mode()
def answer(folder: str, max_tokens: int, prompts: list[list[int]],
           margin: float | None = None) -> dict:
    """``margin``: the routing hysteresis to answer with (None: the folder's)."""
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    if margin is not None:
        model.config.router_hysteresis = margin
    pad = model.generation_config.pad_token_id
    hf = [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=model.config.eos_token_id if pad is None else pad
                         )[0, len(p):].tolist() for p in prompts]
    engine = Engine(model, tokenizer)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens))
    experts = None
    if model.model.router is not None:
        experts = [model.route(torch.tensor([p + out[:-1]]))[0][0].tolist()
                   for p, out in zip(prompts, hf, strict=True)]
    return {"hf": hf, "engine": [o.token_ids for o in outputs], "experts": experts}


def main(argv: list[str]) -> None:
    if argv[0] == "tiny":
        tiny(Path(argv[1]))
    elif argv[0] == "answer":
        margin = float(argv[3]) if len(argv) > 3 else None
        print(json.dumps(answer(argv[1], int(argv[2]), json.load(sys.stdin), margin)))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
