"""Decode speed of the serving engine side by side with the engines users would pick, on the
same weights, threads and prompts, and against the machine's limits measured in the same run.

Peers (``--peers``, default all): ``hf`` and ``engine`` on the ReadME model; ``hf-dense`` and
``engine-dense`` on the dense model it was refactored from (the engine serves it as a one-expert
folder, ``refactor.pipeline.write_dense_experts``, so engine against engine is the same work);
``llama.cpp-f32`` on that dense model written as an F32 GGUF (``models.gguf_export``) and
``llama.cpp-quantized`` on the GGUF it came from (the built-in Q4_1 file), at batch 1 through
``llama_cpp.Llama`` and at larger batches through its batch API (``serve.llama_cpp_peer``).
llama.cpp is a benchmark-only dependency (``make bench-deps``); without it the run says which
rows are missing and why, and measures the rest. ``engine-torch-ops`` and
``engine-dense-torch-ops`` are the engine with its fused CPU ops off (``serve/cpu_ops.py``),
what they buy side by side; ``engine-onednn`` and ``engine-dense-onednn`` (AVX2 and AVX-512 CPUs,
where the engine multiplies 2-48 rows through the fused ops' panels, ``serve/csrc/gemm.cpp``,
``gemm_avx2.cpp``, one row too on AVX2) the engine with oneDNN's
prepacked copies and ``x @ W`` instead (``READMOE_PANELS=0``), what the panels buy;
``engine-bf16`` and ``engine-dense-bf16`` (AVX512-BF16 or AVX2 CPUs) the engine with its
matrices in bf16 panels (``--quantize bf16``, ``serve/csrc/gemm_bf16.cpp``,
``gemm_bf16_avx2.cpp``), what halving the weights' bytes buys, and at what perplexity;
``engine-kvf16`` and ``engine-dense-kvf16`` the engine with its KV cache in float16
(``--kv-dtype float16``, llama.cpp's default cache type), what halving the attention's bytes
buys (its perplexity beside the others'). On CUDA, ``engine-eager`` and ``engine-dense-eager``
are the engine with its decode steps run eagerly instead of replayed from CUDA graphs
(``--enforce-eager``, ``serve/graphs.py``), what the graphs buy.
Every peer runs at the same thread counts (llama.cpp's ``n_threads`` = torch's).

ReadME model: ``--model`` (a ReadME folder); by default the last round of runs/bench/train-readme
when it exists (``benchmarks/train_quality.py`` trains it), else the untrained refactor
runs/bench/moe-readme with a fresh pre-gating router attached (speed does not depend on router
quality beyond how many experts a batch touches), refactored from smollm2-135m over
runs/bench/corpus first if that folder is missing too. Dense model: ``--dense``, by default the
model named in the ReadME folder's plan.

Every peer decodes the same equal-length prompts, taken from the corpus's domains in turn (so a
batch mixes domains and experts), greedily for exactly ``--new-tokens`` tokens (EOS ignored),
after a warm-up: the engine is built once per batch size and variant and run once untimed
on the same batch (as a server's engine is warm; HF's model and llama.cpp's context are
reused warm the same way). Decode tokens/s = batch * (new - 1) / (time(new) - time(1)), best
of ``--repeats`` each, so prefill is excluded on every side. Contention (``contention.py``): a
256 MiB read is timed before each timed run and the CPU time stolen during it is counted; a row
whose slowest read falls below 85% of the best seen at its thread count, or that lost over 2%
of its CPU time, is timed again up to ``--quiet-retries`` times, the quietest try kept; the
table says how quiet each row was.

Limits. Bytes per token: the weights one decode step reads (every matrix once, the LM head too
when it is tied to the embedding, only the routed experts the engine's decode steps really
touched) over the batch. Roofline tokens/s = batch * bandwidth / (those weights + the batch's KV
cache at the mean context; llama.cpp keeps its cache in F16); bandwidth is the fastest timed
read of a 512 MiB tensor at the row's thread count: torch's sum (one stream a thread) or the
fused ops' ``read_streams`` (1-16 neighbouring streams a thread, as the panel products read:
one core reads several streams faster than one). Matmul floor (engine rows): the seconds the
engine's packed matrix products alone take for one decode step of the batch (every layer, the
shared expert on all rows, each routed expert on the rows the engine's own decode steps gave
it, those steps replayed in turn, the LM head), run as the engine runs them (where its decode
step is one parallel region, ``serve/csrc/team.cpp``: 2-48 rows, or 1-48 where one row goes
through the panels, every product on panels, that region with every op but the
products skipped; on CUDA each step replayed from a CUDA graph, as the engine's decode steps
are; elsewhere one call a product) and timed as the engine's decode is: the best
of ``--repeats`` runs of ``new - 1`` such steps in a row, per step. (The best single step of
15, kept in the JSON as ``matmul_floor_best_step_tokens_per_s``, is lower on a shared machine
by the noise between steps, which the engine's whole runs average over.) Outside the floor: the
attention (it reads the KV cache), the norms and activations, the pre-gating router's step and
sampling.
HF's step time over it bounds what any engine using these kernels can gain here.

``--device`` / ``--dtype`` as every command (default: CUDA bf16 with a GPU, else CPU fp32);
on CUDA every timing synchronises the device before and after (llama.cpp runs on the CPU).

Writes results/engine_speed.{json,md}.

    .venv/bin/python benchmarks/engine_speed.py [--model DIR] [--dense SPEC] [--batches 1 8 32]
        [--threads 1 2] [--peers hf engine ...] [--device cuda --dtype bfloat16
        --results results/gpu]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from readmoe.data.corpus import load_corpus
from readmoe.errors import ReadmoeError
from readmoe.eval.domains import heldout_blocks
from readmoe.io import command_line, write_results
from readmoe.models import load_config, load_model, load_tokenizer, resolve_model
from readmoe.models.builtin import DEFAULT_MODEL
from readmoe.models.device import Placement, add_placement_args, placement_from_args
from readmoe.models.gguf_export import (
    export_llama_gguf,
    gguf_precision,
    gguf_step_weight_bytes,
    source_gguf,
)
from readmoe.serve import cpu_ops
from readmoe.serve.engine import Engine
from readmoe.serve.graphs import capture_graph
from readmoe.serve.llama_cpp_peer import LlamaCppPeer, llama_cpp_missing
from readmoe.serve.packed import PackedExpert
from readmoe.serve.quantized import check_quantization
from readmoe.serve.sampling import SamplingParams
from readmoe.serve.scoring import served_nll
from readmoe.serve.types import Budget
from readmoe.train.rounds import final_model_dir

sys.path.insert(0, str(Path(__file__).parent))
from contention import (  # noqa: E402
    MAX_STOLEN,
    PROBE_STREAMS,
    QUIET,
    Quietness,
    ReadProbe,
    contended,
    quietest,
    timed,
)
from engine_speed_report import markdown  # noqa: E402

TRAINED_RUN = Path("runs/bench/train-readme")
REFACTORED = Path("runs/bench/moe-readme")
CORPUS = Path("runs/bench/corpus")
DENSE_EXPERTS = Path("runs/bench/dense-experts")
GGUF_DIR = Path("runs/bench/gguf")
README_PEERS = ("hf", "engine", "engine-int8", "engine-bf16", "engine-onednn",  # ReadME model
                "engine-torch-ops", "engine-kvf16", "engine-eager")
DENSE_PEERS = ("hf-dense", "engine-dense", "engine-dense-int8", "engine-dense-bf16",
               "engine-dense-onednn", "engine-dense-torch-ops", "engine-dense-kvf16",
               "engine-dense-eager")
PEERS = (*README_PEERS, *DENSE_PEERS, "llama.cpp-f32", "llama.cpp-quantized")
QUALITY_TOKENS = 1024  # held-out tokens per domain for the served-weights perplexity
FLOOR_REPEATS = 15  # best of: one step of products is ~30-300 ms and this machine is shared
LLAMA_CPP_KV_BYTES = 2  # llama.cpp's default KV cache type is F16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a ReadME model folder")
    parser.add_argument("--dense", default=None,
                        help="the dense model (default: the one the ReadME plan names)")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to measure, the same for every peer (default: "
                        "torch's own choice); on a shared machine 1 avoids OpenMP stalls")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--quiet-retries", type=int, default=1,
                        help="times a row is timed again while contended: a neighbour slowed "
                        "the machine's memory reads below 85%% of the best seen or stole "
                        "over 2%% of its CPU time (contention.py); the quietest try is kept")
    parser.add_argument("--results", default="results")
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help=f"where the prompts come from (default {CORPUS})")
    add_placement_args(parser)
    return parser.parse_args()


def load(spec: str | None, placement: Placement, corpus: Path):
    """(model, tokenizer, description, folder) of the benchmarked ReadME model."""
    where = {"dtype": placement.dtype, "device": placement.device}
    if spec is None and any(TRAINED_RUN.glob("round-*")):
        spec = str(final_model_dir(TRAINED_RUN))
    if spec is not None:
        return load_model(spec, **where), load_tokenizer(spec), spec, Path(spec)
    if not REFACTORED.is_dir():
        from readmoe.refactor.pipeline import run_refactor

        run_refactor("smollm2-135m", str(corpus), REFACTORED, placement=placement)
    model = load_model(str(REFACTORED), **where)
    model.attach_router("pregating", seed=0)
    model.to(**where)
    described = f"{REFACTORED} + untrained pre-gating router"
    return model, load_tokenizer(str(REFACTORED)), described, REFACTORED


def planned_model(folder: Path) -> str | None:
    """The dense model a ReadME folder's plan was made from, if it records one."""
    plan = folder / "plan" / "plan.json"
    return json.loads(plan.read_text())["model"] if plan.is_file() else None


def dense_experts(spec: str) -> Path:
    """The dense model as a one-expert ReadME folder, written once per dense model."""
    if planned_model(DENSE_EXPERTS) != spec:
        from readmoe.refactor.pipeline import write_dense_experts

        write_dense_experts(spec, DENSE_EXPERTS)
    return DENSE_EXPERTS


def f32_gguf(spec: str, tokenizer_gguf: Path) -> Path:
    """The dense model as an F32 GGUF, written once per converted folder."""
    folder = resolve_model(spec)
    out = GGUF_DIR / f"{folder.name}-f32.gguf"
    return out if out.is_file() else export_llama_gguf(folder, out, tokenizer_gguf, name=spec)


def prompts(tokenizer, count: int, length: int, corpus_dir: Path) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` tokens, cut from the corpus's documents and
    taken from the domains in turn, so a batch mixes domains (and experts) as real traffic
    does."""
    corpus = load_corpus(corpus_dir)
    per_domain = []
    for domain in corpus.domains:
        windows = []
        for text in corpus.documents(domain)[:16]:
            ids = tokenizer.encode(text)
            windows += [ids[i:i + length] for i in range(0, len(ids) - length, length)][:4]
        per_domain.append(windows)
    out = [w for group in zip(*per_domain, strict=False) for w in group]
    if len(out) < count:
        raise SystemExit("the corpus has too little text for the prompts")
    return out[:count]


READ_STREAMS = (1, 2, 4, 8, 16)


def read_bandwidth(device: torch.device, threads: list[int]) -> dict[int, dict]:
    """GB/s the machine reads a 512 MiB tensor at each thread count, the best of 5 timed
    reads: by torch's sum (one stream a thread) and, on a CPU with the fused ops, by
    ``read_streams`` in 1-16 neighbouring streams a thread, as the panel products read
    (``csrc/read_probe.cpp``). ``best`` is the roofline's bandwidth: one core here reads 3-4
    streams faster than one, and a roofline below what the engine reaches says nothing."""
    x = torch.ones(128 * 1024 * 1024, device=device)
    ops = cpu_ops.load() if device.type == "cpu" else None
    out = {}
    for count in threads:
        if device.type == "cpu":
            torch.set_num_threads(count)
        reads = {"sum": x.sum}
        if ops is not None:
            reads |= {f"{s} streams": functools.partial(ops.read_streams, x, s)
                      for s in READ_STREAMS}
        gbs = {}
        for name, read in reads.items():
            read()
            gbs[name] = x.numel() * 4 / min(timed(read) for _ in range(5)) / 1e9
        out[count] = {**gbs, "best": max(gbs.values())}
    return out


def hf_time(model, batch: list[list[int]], new: int) -> float:
    ids = torch.tensor(batch, device=model.device)
    with torch.inference_mode():
        return timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=new, min_new_tokens=new,
                                             do_sample=False))


def bf16_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``--quantize bf16`` serves a model on ``device`` in ``dtype`` here (the engine's
    own check: a float32 CPU model, bf16 panels built)."""
    try:
        check_quantization("bf16", device, dtype)
    except ReadmoeError:
        return False
    return True


def warm_engine(model, tokenizer, batch: list[list[int]], new: int, quantize: str = "none",
                fused: bool = True, kv_dtype: str = "auto", cuda_graphs: bool = True) -> Engine:
    """The engine every timing of ``batch`` runs on: built once and run once untimed on the
    same batch, as a server's engine is warm (HF's model and llama.cpp's context are reused
    warm too), so no timing pays for building, packing or first-call set-up."""
    blocks = len(batch) * -(-(len(batch[0]) + new) // 16)
    engine = Engine(model, tokenizer, "fcfs", Budget(max_tokens=4096, max_seqs=len(batch)),
                    kv_blocks=blocks, block_size=16, quantize=quantize, fused_ops=fused,
                    kv_dtype=kv_dtype, cuda_graphs=cuda_graphs)
    engine_time(engine, batch, new)
    return engine


def engine_time(engine: Engine, batch: list[list[int]], new: int) -> float:
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    return timed(lambda: engine.generate(batch, params))


def decode_seconds(run, batch: list[list[int]], args: argparse.Namespace) -> float:
    """Seconds of the decode steps alone: the best time of ``new`` tokens minus the best of 1."""
    return (min(run(batch, args.new_tokens) for _ in range(args.repeats))
            - min(run(batch, 1) for _ in range(args.repeats)))


def engine_timings(engine: Engine, batch: list[list[int]], routings: list[tuple[int, ...]],
                   args: argparse.Namespace, probe: ReadProbe) -> tuple[float, tuple[float, float]]:
    """(decode seconds, matmul floor) of a warm engine, a read sampled before each timed run."""
    return (decode_seconds(probe.before(functools.partial(engine_time, engine)), batch, args),
            matmul_floor(engine, len(batch), routings, args.repeats, args.new_tokens - 1, probe))


@torch.inference_mode()
def matmul_floor(engine: Engine, batch: int, routings: list[tuple[int, ...]], repeats: int,
                 steps: int, probe: ReadProbe | None = None) -> tuple[float, float]:
    """Seconds of one decode step's packed matrix products alone (module docstring), timed as
    the engine's decode is: the best of ``repeats`` runs of ``steps`` steps in a row, per step;
    and the best single step of as many (a lower estimate on a noisy machine: the engine's
    time is a whole run's, never its luckiest step). Step i routes its rows as ``routings[i]``
    (each row's expert; the engine's own decode steps, replayed in turn)."""
    runner = engine.runner
    config = engine.model.config
    where = {"dtype": engine.model.dtype, "device": engine.model.device}
    x = torch.randn(batch, config.hidden_size, **where)
    attn = torch.randn(batch, runner.heads * runner.head_dim, **where)
    routings = [r for r in routings if len(r) == batch] or [(0,) * batch]

    def expert(weights: PackedExpert, inputs: torch.Tensor) -> None:
        gate_up = weights.gate_up(inputs)
        weights.down(gate_up[:, :gate_up.shape[1] // 2])

    def per_call(routing: tuple[int, ...]) -> None:
        counts = Counter(routing)
        for packed in runner.packed:
            packed.qkv(x)
            packed.o(attn)
            if packed.shared is not None:
                expert(packed.shared, x)
            for e, count in sorted(counts.items()) if packed.experts is not None else ():
                expert(packed.experts[e], x[:count])
        runner.lm_head(x)

    decoder = runner.decoder
    one_step = (one_region_products(runner, x) if decoder is not None
                and decoder.team_runs(batch) else per_call)
    each = [replayed(functools.partial(one_step, routing), x.device) for routing in routings]

    def run() -> None:
        for i in range(steps):
            each[i % len(each)]()

    each[0]()
    timed_run = timed if probe is None else probe.before(timed)
    per_run = min(timed_run(run) for _ in range(repeats)) / steps
    return per_run, min(timed(each[i % len(each)])
                        for i in range(max(FLOOR_REPEATS, repeats)))


def replayed(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """On CUDA, ``step`` captured once as a CUDA graph and replayed, as the engine replays its
    decode steps: launched eagerly, a step's ~200 small products wait on the CPU, and the
    floor sat below the engine (134-152% of it on an H100, 2026-12-06). Elsewhere, or where
    capture fails (warned), ``step`` itself."""
    if device.type != "cuda":
        return step
    try:
        graph = capture_graph(step)
    except RuntimeError as error:
        warnings.warn(f"the matmul floor runs eagerly: capturing its CUDA graph failed "
                      f"({error})", RuntimeWarning, stacklevel=2)
        return step
    return graph.replay


def one_region_products(runner, x: torch.Tensor) -> Callable[[tuple[int, ...]], None]:
    """A step of the products alone as the engine's one-region step runs them (its decoder's
    ``products_only``: the same phases, chunks and buffers, every other op skipped), the rows
    routed as given, then the LM head."""
    decoder = runner.decoder
    batch = x.shape[0]
    routed = any(packed.experts is not None for packed in runner.packed)
    contexts = [torch.zeros(1, dtype=torch.long)] * batch
    rope = torch.zeros(1, runner.head_dim, dtype=x.dtype)

    def step(routing: tuple[int, ...]) -> None:
        decoder.products_only = True
        try:
            decoder.step([0] * batch, contexts, rope, rope, [0] * batch,
                         list(routing) if routed else [])
        finally:
            decoder.products_only = False
        runner.lm_head(x)

    return step


def packed_step_bytes(engine: Engine, distinct: float) -> float:
    """Weight bytes one decode step of the engine's own packed (int8) matrices reads: every
    matrix once, ``distinct`` routed experts per layer."""
    runner = engine.runner
    total = float(runner.lm_head.nbytes)
    for packed in runner.packed:
        total += packed.qkv.nbytes + packed.o.nbytes
        if packed.shared is not None:
            total += packed.shared.gate_up.nbytes + packed.shared.down.nbytes
        if packed.experts:
            each = sum(e.gate_up.nbytes + e.down.nbytes for e in packed.experts)
            total += each * distinct / len(packed.experts)
    return total


def served_quality(model, tokenizer, corpus, weights: str, quantize: str,
                   precision: str, kv_dtype: str = "auto") -> dict:
    """Held-out perplexity of the weights as the engine serves them (``serve.scoring``)."""
    ppl = {}
    for domain in corpus.domains:
        blocks = heldout_blocks(corpus, tokenizer, domain, 256, QUALITY_TOKENS)
        ppl[domain] = served_nll(model, blocks, quantize, kv_dtype=kv_dtype).ppl
    precision = precision if quantize == "none" else quantize
    return {"weights": weights, "precision": kv_label(precision, kv_dtype),
            "ppl": ppl, "mean_ppl": sum(ppl.values()) / len(ppl),
            "tokens_per_domain": QUALITY_TOKENS}


def kv_label(precision: str, kv_dtype: str) -> str:
    return precision if kv_dtype == "auto" else f"{precision}, KV {kv_dtype}"


def weight_step_bytes(model, distinct: float) -> float:
    """Weight bytes one decode step reads: every weight once (the LM head too, also when it
    is tied to the embedding) and ``distinct`` routed experts per layer (the engine's mean)."""
    head = model.lm_head.weight
    total = float(head.numel() * head.element_size())
    for name, param in model.named_parameters():
        if ".router." in name or param is head or name.endswith("embed_tokens.weight"):
            continue  # the router is not the backbone; the embedding reads B rows only
        size = param.numel() * param.element_size()
        total += size * distinct / model.config.num_experts if ".experts." in name else size
    return total


def kv_step_bytes(config, batch: int, context: float, itemsize: int) -> float:
    """Bytes of the batch's KV cache at ``context`` tokens, read once per decode step."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (batch * context * 2 * config.num_hidden_layers * config.num_key_value_heads
            * head_dim * itemsize)


def row(peer: str, threads: int, batch: int, precision: str, weight_bytes: float,
        kv_bytes: float, seconds: float, command: str, gbs: float,
        args: argparse.Namespace) -> dict:
    """One peer at one batch: its decode rate beside what the bytes it reads allow."""
    rate = batch * (args.new_tokens - 1) / seconds
    roof = batch * gbs * 1e9 / (weight_bytes + kv_bytes)
    return {"peer": peer, "weights": "readme" if peer in README_PEERS else "dense",
            "threads": threads, "batch": batch, "precision": precision,
            "weight_bytes_per_step": weight_bytes, "bytes_per_token": weight_bytes / batch,
            "tokens_per_s": rate, "roofline_tokens_per_s": roof,
            "fraction_of_roofline": rate / roof, "command": command}


@contextlib.contextmanager
def panels_off(off: bool) -> Iterator[None]:
    """Runners built inside pack oneDNN's copies instead of the panels (if ``off``)."""
    before = os.environ.get(cpu_ops.PANELS)
    if off:
        os.environ[cpu_ops.PANELS] = "0"
    try:
        yield
    finally:
        if off and before is None:
            del os.environ[cpu_ops.PANELS]
        elif off:
            os.environ[cpu_ops.PANELS] = before


def torch_rows(hf_model, engine_model, tokenizer, names: tuple[str, str],
               pool: list[list[int]], gbs: dict[int, float], threads: list[int],
               args: argparse.Namespace, probe: ReadProbe,
               best_read: Callable[[int], float]) -> list[dict]:
    """HF ``generate`` on ``hf_model`` and the engine on ``engine_model`` (the same weights),
    each row timed as ``contention.quietest`` says (its reads sampled by ``probe``)."""
    hf_name, engine_name = names
    precision = str(engine_model.dtype).removeprefix("torch.")
    context = args.prompt_len + args.new_tokens / 2
    kv_size = engine_model.dtype.itemsize
    rows: list[dict] = []
    for count in threads:
        torch.set_num_threads(count)
        if hf_name in args.peers:
            hf_time(hf_model, pool[:2], 4)  # warm-up
        for b in args.batches:
            batch, before = pool[:b], len(rows)
            warm = warm_engine(engine_model, tokenizer, batch, args.new_tokens)
            decode_steps = [s for s in warm.steps if s.num_tokens == b]
            distinct = sum(s.distinct_experts for s in decode_steps) / max(1, len(decode_steps))
            routings = [s.token_experts for s in decode_steps]
            kv = kv_step_bytes(engine_model.config, b, context, kv_size)
            hf = None
            if hf_name in args.peers:
                hf, quiet = quietest(
                    functools.partial(decode_seconds,
                                      probe.before(functools.partial(hf_time, hf_model)),
                                      batch, args),
                    probe, functools.partial(best_read, count), args.quiet_retries)
                rows.append(row(hf_name, count, b, precision, weight_step_bytes(hf_model, distinct),
                                kv, hf, f"{type(hf_model).__name__}.generate(ids, max_new_tokens="
                                f"{args.new_tokens}, min_new_tokens={args.new_tokens}, "
                                "do_sample=False)", gbs[count], args))
                rows[-1].update(quietness(quiet))
            variants = ((engine_name, "none", True, "auto"),
                        (f"{engine_name}-int8", "int8", True, "auto"),
                        (f"{engine_name}-bf16", "bf16", True, "auto"),
                        (f"{engine_name}-onednn", "none", True, "auto"),
                        (f"{engine_name}-torch-ops", "none", False, "auto"),
                        (f"{engine_name}-kvf16", "none", True, "float16"),
                        (f"{engine_name}-eager", "none", True, "auto"))
            cuda = engine_model.device.type == "cuda"
            for name, quantize, fused, kv_dtype in variants:
                eager = name.endswith("-eager")
                if name not in args.peers or (name != engine_name and cuda != eager):
                    continue  # int8 and the fused ops are CPU kernels (serve/quantized.py,
                    # csrc); graphs are CUDA's (serve/graphs.py)
                onednn = name.endswith("-onednn")
                if onednn and not cpu_ops.panels_apply(cpu_ops.load()):
                    continue  # no panels here: the engine row already multiplies through oneDNN
                if quantize == "bf16" and not bf16_runs(engine_model.device, engine_model.dtype):
                    continue  # not a float32 model on an AVX512-BF16 CPU (said below)
                with panels_off(onednn):
                    engine = warm if name == engine_name else warm_engine(
                        engine_model, tokenizer, batch, args.new_tokens, quantize, fused,
                        kv_dtype, cuda_graphs=not eager)
                (seconds, (floor, best_step)), quiet = quietest(
                    functools.partial(engine_timings, engine, batch, routings, args, probe),
                    probe, functools.partial(best_read, count), args.quiet_retries)
                weights = (weight_step_bytes(engine_model, distinct) if quantize == "none"
                           else packed_step_bytes(engine, distinct))
                label = kv_label(precision if quantize == "none" else quantize, kv_dtype)
                kv_read = kv if kv_dtype == "auto" else kv_step_bytes(
                    engine_model.config, b, context, engine.kv.keys[0].element_size())
                rows.append(row(name, count, b, label, weights, kv_read, seconds,
                                f"Engine(model, 'fcfs', Budget(max_seqs={b}), quantize="
                                f"{quantize!r}, fused_ops={fused}, kv_dtype={kv_dtype!r}, "
                                f"cuda_graphs={not eager})"
                                f".generate(prompts, SamplingParams(max_tokens="
                                f"{args.new_tokens}, ignore_eos=True)), warm", gbs[count],
                                args))
                del engine
                bound = None if hf is None else hf / (args.new_tokens - 1) / floor
                rows[-1].update(matmul_floor_tokens_per_s=b / floor,
                                fraction_of_floor=rows[-1]["tokens_per_s"] * floor / b,
                                matmul_floor_best_step_tokens_per_s=b / best_step,
                                fraction_of_best_step_floor=(rows[-1]["tokens_per_s"]
                                                             * best_step / b),
                                distinct_experts_per_decode_step=distinct, speedup_bound=bound,
                                **quietness(quiet))
            print(*rows[before:], sep="\n", flush=True)
    return rows


def llama_cpp_rows(spec: str, config, pool: list[list[int]], gbs: dict[int, float],
                   threads: list[int], args: argparse.Namespace, missing: list[dict],
                   probe: ReadProbe, best_read: Callable[[int], float]) -> list[dict]:
    """llama.cpp on the dense weights: the F32 GGUF written from them and the GGUF they came
    from, each row timed as ``contention.quietest`` says; a row that cannot run goes to
    ``missing`` with the reason."""
    wanted = [p for p in ("llama.cpp-f32", "llama.cpp-quantized") if p in args.peers]
    reason = llama_cpp_missing()
    source = source_gguf(spec)
    if reason is None and source is None:
        reason = (f"{spec} came from no GGUF file, so there is no llama.cpp tokenizer (nor "
                  "quantized reference) to use; give --dense a built-in name or a .gguf file")
    if reason is not None:
        missing += [{"peer": peer, "reason": reason} for peer in wanted]
        for line in missing:
            print(f"engine_speed: no {line['peer']} rows: {line['reason']}", file=sys.stderr)
        return []
    rows = []
    context = args.prompt_len + args.new_tokens / 2
    for peer in wanted:
        path = source if peer == "llama.cpp-quantized" else f32_gguf(spec, source)
        weights, precision = gguf_step_weight_bytes(path), gguf_precision(path)
        for count in threads:
            torch.set_num_threads(count)
            llm = LlamaCppPeer(path, count, args.prompt_len + args.new_tokens)
            llm.seconds(pool[:1], 4)  # warm-up, both paths
            llm.seconds(pool[:2], 4)
            for b in args.batches:
                seconds, quiet = quietest(
                    functools.partial(decode_seconds, probe.before(llm.seconds), pool[:b], args),
                    probe, functools.partial(best_read, count), args.quiet_retries)
                rows.append(row(peer, count, b, precision, weights,
                                kv_step_bytes(config, b, context, LLAMA_CPP_KV_BYTES), seconds,
                                llm.command(b), gbs[count], args))
                rows[-1].update(quietness(quiet))
                print(rows[-1], flush=True)
            del llm
            gc.collect()
    return rows


def quietness(quiet: Quietness) -> dict:
    """A row's fields for what its timed runs had of the machine."""
    return {"read_gb_per_s": quiet.reads, "stolen_share": quiet.stolen_share,
            "tries": quiet.tries}


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    placement = placement_from_args(args)
    threads = args.threads or [torch.get_num_threads()]
    model, tokenizer, described, folder = load(args.model, placement, args.corpus)
    dense = args.dense or planned_model(folder) or DEFAULT_MODEL
    pool = prompts(tokenizer, max(args.batches), args.prompt_len, args.corpus)
    bandwidth = read_bandwidth(placement.device, threads)
    gbs = {count: read["best"] for count, read in bandwidth.items()}
    probe = ReadProbe(placement.device)

    def best_read(count: int) -> float:
        """The best read at ``count`` threads: the probe's own, or the same reads timed at
        the start (a run contended from its start still measures against them)."""
        start = bandwidth[count].get(f"{PROBE_STREAMS} streams", bandwidth[count]["sum"])
        return max(start, probe.best.get(count, 0.0))

    where = {"dtype": placement.dtype, "device": placement.device}
    rows: list[dict] = []
    missing: list[dict] = []
    quality: list[dict] = []
    precision = str(placement.dtype).removeprefix("torch.")
    corpus = load_corpus(args.corpus)

    def score(served, weights: str, peer: str) -> None:
        for name, quantize, kv_dtype in ((peer, "none", "auto"), (f"{peer}-int8", "int8", "auto"),
                                         (f"{peer}-bf16", "bf16", "auto"),
                                         (f"{peer}-kvf16", "none", "float16")):
            cpu_only = quantize != "none" and placement.device.type != "cpu"
            if quantize == "bf16" and not bf16_runs(served.device, served.dtype):
                continue
            if name == peer or (name in args.peers and not cpu_only):
                quality.append(served_quality(served, tokenizer, corpus, weights,
                                              quantize, precision, kv_dtype))
                print(quality[-1], flush=True)

    if set(README_PEERS) & set(args.peers):
        rows += torch_rows(model, model, tokenizer, ("hf", "engine"), pool, gbs, threads, args,
                           probe, best_read)
        score(model, "readme", "engine")
    del model
    gc.collect()
    if set(DENSE_PEERS) & set(args.peers):
        served = load_model(str(dense_experts(dense)), **where)
        hf_model = load_model(dense, **where) if "hf-dense" in args.peers else served
        rows += torch_rows(hf_model, served, tokenizer, ("hf-dense", "engine-dense"), pool, gbs,
                           threads, args, probe, best_read)
        score(served, "dense", "engine-dense")
        del served, hf_model
        gc.collect()
    rows += llama_cpp_rows(dense, load_config(dense), pool, gbs, threads, args, missing, probe,
                           best_read)
    for r in rows:  # against the best read of the whole run
        r["read_of_best"] = min(r["read_gb_per_s"]) / best_read(r["threads"])
        r["contended"] = contended(r["read_of_best"], r["stolen_share"])
    if not bf16_runs(placement.device, placement.dtype):
        missing += [{"peer": peer, "reason": "--quantize bf16 is for a float32 model on a CPU "
                     "with AVX512-BF16 and the fused ops"}
                    for peer in ("engine-bf16", "engine-dense-bf16") if peer in args.peers]
    result = {"command": command_line(), "model": described,
              "dense_model": dense,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__,
                          "gpu": (torch.cuda.get_device_name(placement.device)
                                  if placement.device.type == "cuda" else None)},
              **placement.to_dict(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "threads": threads, "bandwidth_gb_per_s": gbs, "read_bandwidth": bandwidth,
              "probe_read_gb_per_s": probe.best, "quiet": QUIET, "max_stolen": MAX_STOLEN,
              "fused_cpu_ops": cpu_ops.ops_for(placement.device, placement.dtype) is not None,
              "panels": cpu_ops.panels_apply(cpu_ops.ops_for(placement.device, placement.dtype)),
              "rows": rows,
              "served_quality": quality, "missing": missing}
    write_results(args.results, "engine_speed", result,
                  markdown(result, described, dense, placement, PEERS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
