"""The engine's flags, shared by every command that runs one (`bench serve`, `serve`,
`generate`, `chat`), so each batches and offloads experts the same way."""

from __future__ import annotations

import argparse

from readmoe.serve.experts import POLICIES
from readmoe.serve.experts.store import TIERS
from readmoe.serve.kv_cache import KV_DTYPES
from readmoe.serve.launch import EngineOptions
from readmoe.serve.quantized import QUANTIZATIONS
from readmoe.serve.schedulers import SCHEDULERS


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    """The runner's precision flags (also `generate` and `chat`'s, which take no others)."""
    d = EngineOptions()
    parser.add_argument("--quantize", default=d.quantize, choices=QUANTIZATIONS,
                        help="int8: serve with int8 weights (fbgemm, CPU only; faster decode, "
                        "see results/kernel_probe.md and engine_speed.md for speed and "
                        "perplexity); bf16: every product through bf16 weights (CPUs with "
                        "AVX512-BF16 or AVX2, AMX where present, a float32 model; half the "
                        "weight bytes, 1.2-2.0x decode measured; with --capacity the offloaded "
                        "experts too, half the bytes a load moves); int8 keeps offloaded "
                        "experts in the model's dtype; none: the model's dtype")
    parser.add_argument("--kv-dtype", default=d.kv_dtype, choices=sorted(KV_DTYPES),
                        help="float16: keep the KV cache in float16 (half its memory and of the "
                        "bytes decode attention reads, as llama.cpp's default cache; keys and "
                        "values rounded when written); auto: the model's dtype")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineOptions()
    parser.add_argument("--scheduler", default=d.scheduler, choices=sorted(SCHEDULERS))
    parser.add_argument("--max-experts", type=int, default=None,
                        help="expert-aware and cache-aware: choose at most this many experts "
                        "per step (aged requests excepted); cache-aware defaults to --capacity")
    parser.add_argument("--max-wait", type=int, default=None,
                        help="expert-aware and cache-aware: steps a request may wait before "
                        "it is served first (default 8)")
    parser.add_argument("--load-ratio", type=float, default=None,
                        help="cache-aware: a non-resident expert joins a step only if its "
                        "queue holds this many times the step's tokens (about the time to load "
                        "it into every layer over one step's compute; default 1)")
    parser.add_argument("--decodes-first", action=argparse.BooleanOptionalAction, default=None,
                        help="expert-aware and cache-aware: give decoding requests their token "
                        "before prompt runs fill the step (cache-aware's default; expert-aware "
                        "defaults to --no-decodes-first, the paper's order)")
    parser.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                        help="tokens per engine step (prefill chunks and decode tokens)")
    parser.add_argument("--max-seqs", type=int, default=d.max_seqs,
                        help="requests per engine step")
    add_precision_args(parser)
    parser.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=d.prepack,
                        help="CPU fp32: also keep oneDNN's prepacked copy of each matrix for "
                        "products of 2+ rows (default; faster batched decode, one more copy "
                        "of the runner's matrices in memory: --no-prepack saves it)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="CUDA: run every decode step eagerly instead of replaying it from "
                        "CUDA graphs captured per batch and context bucket (vLLM's flag)")
    parser.add_argument("--router-hysteresis", type=float, default=None, metavar="MARGIN",
                        help="pre-gating router: keep a request's previous expert unless the "
                        "best router logit beats it by more than MARGIN (default: the folder's "
                        "config.json, 0 if unset; results/router_hysteresis.md measures it)")
    parser.add_argument("--kv-blocks", type=int, default=d.kv_blocks)
    parser.add_argument("--block-size", type=int, default=d.block_size)
    store = parser.add_argument_group(
        "expert offloading", "with --capacity, routed experts live in a slow tier and at most "
        "that many per layer in the fast tier (default: all resident)")
    store.add_argument("--capacity", type=int, default=None, help="routed experts per layer "
                       "in the fast tier")
    store.add_argument("--cache-policy", default=d.cache_policy, choices=sorted(POLICIES))
    store.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=d.prefetch,
                       help="load layer l+1's experts while layer l computes (default) or "
                       "on demand (--no-prefetch)")
    store.add_argument("--tier", default=d.tier, choices=TIERS,
                       help="slow tier: the model's safetensors read on demand, or CPU RAM "
                       "(pinned on CUDA)")
    store.add_argument("--bandwidth", type=float, default=d.bandwidth,
                       help="emulate a link of this many bytes/s (e.g. 25e9 for PCIe 4.0 x16); "
                       "results are then labelled emulated")
    store.add_argument("--predictor", default=d.predictor,
                       help="predict each decoding request's next expert ('last' or 'mode-K') "
                       "so Belady and the prefetcher see past the current step")
    store.add_argument("--prefetch-rate", type=float, default=d.prefetch_rate,
                       help="with --predictor: experts per step loaded ahead for the next step "
                       "from the predicted demand, on average (fractions allowed: what the "
                       "copy stream loads in one step's compute; default 0: none)")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        scheduler=args.scheduler, max_experts=args.max_experts, max_wait=args.max_wait,
        load_ratio=args.load_ratio, decodes_first=args.decodes_first,
        max_batch_tokens=args.max_batch_tokens,
        max_seqs=args.max_seqs, kv_blocks=args.kv_blocks, block_size=args.block_size,
        capacity=args.capacity, cache_policy=args.cache_policy, prefetch=args.prefetch,
        tier=args.tier, bandwidth=args.bandwidth, predictor=args.predictor,
        prefetch_rate=args.prefetch_rate, quantize=args.quantize, kv_dtype=args.kv_dtype,
        prepack=args.prepack, cuda_graphs=not args.enforce_eager,
        router_hysteresis=args.router_hysteresis)
