"""What the router's foresight buys: co-designed batching, caching and prefetch against the
systems a user would otherwise run, at equal fast-memory budget, on the real engine and in the
simulator's A100 projection.

Systems (``readmoe.serve.systems``): readme-codesign, readme-codesign-on-demand, readme-lru,
layerwise-lru, dense-stream; the all-resident ReadME run (FCFS) is the reference. Budgets: a
share of the routed-expert bytes (33/50/67/100%: 2, 3, 4, 6 of 6 experts per layer).

Engine settings (CPU): ``ram`` (the slow tier is RAM, copies are memcpy) and ``link`` (the RAM
tier behind an emulated link whose bandwidth makes loading one expert of one layer take one
layer's compute, measured from the resident run: emulated, labelled so). Workloads: the
synthetic Arena-like one (held-out corpus text, Poisson arrivals) and a JSONL trace replay (a
trace written from held-out text with bursty arrivals, read back through ``load_trace``: no
public request trace can be fetched offline here). Each cell runs ``--repeats`` times, systems
interleaved within a repeat so drift hits all alike; reported: median and spread.

Also measured: the next-expert predictor's accuracy on held-out routing; the copy engine's
interference with compute; the offline optimum and the ceiling on each run's realised accesses;
hit ratios at the paper's per-token grain (labelled); the engine-vs-simulator cross-check.

Writes results/codesign.{json,md,png}. Needs ``make demo`` first (its trained ReadME model and
corpus); trains the layer-wise router on the same experts and writes the dense-as-one-expert
folder under runs/codesign/ on first use.

    .venv/bin/python benchmarks/codesign.py [--repeats 3] [--requests 16] [--rate 1.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from readmoe.errors import ReadmoeError
from readmoe.eval.significance import sign_test
from readmoe.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    command_line,
    write_results,
)
from readmoe.models import load_model, load_tokenizer
from readmoe.refactor.fingerprint import tensors_fingerprint
from readmoe.serve.cost import get_profile
from readmoe.serve.crosscheck import engine_vs_simulator
from readmoe.serve.engine import Engine
from readmoe.serve.experts.link import EmulatedLink
from readmoe.serve.experts.loader import ThreadCopyEngine
from readmoe.serve.experts.optimum import bounds, token_grain_hits
from readmoe.serve.experts.predict import NextExpertPredictor, accuracy
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.metrics import aggregate
from readmoe.serve.placement import place_for_offload, routed_expert_bytes
from readmoe.serve.sampling import SamplingParams
from readmoe.serve.sim import simulate
from readmoe.serve.systems import (
    SYSTEMS,
    Setting,
    calibrate,
    capacity_for,
    make_settings,
    make_system,
    run_engine,
    sim_config,
)
from readmoe.serve.traces import ReplayRouting, route_corpus
from readmoe.serve.types import Budget
from readmoe.serve.workload import load_trace, synthetic_workload

RUN = Path("runs/codesign")
DEMO = Path("runs/demo")
BUDGETS = (0.33, 0.5, 0.67, 1.0)
ENGINE_BUDGET = Budget(max_tokens=128, max_seqs=32)
SIM_BUDGET = Budget(max_tokens=256, max_seqs=64)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="trained ReadME folder (default: the "
                        "demo's last round)")
    parser.add_argument("--corpus", default=str(DEMO / "corpus"))
    parser.add_argument("--layerwise", default=None, help="layer-wise-router folder on the same "
                        "experts (default: trained into runs/codesign/layerwise)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1.5, help="requests per second")
    parser.add_argument("--max-output", type=int, default=32)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--settings", nargs="+", default=["link", "ram"],
                        choices=["link", "ram"])
    parser.add_argument("--workloads", nargs="+", default=["synthetic", "trace"],
                        choices=["synthetic", "trace"])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--sim-requests", type=int, default=200)
    parser.add_argument("--skip-engine", action="store_true",
                        help="rerun the simulator parts only, keeping the engine side of the "
                        "last full run in --out (the engine grid takes over an hour here)")
    parser.add_argument("--engine-only", action="store_true", help="only the engine cells asked "
                        "for (no cross-check, no simulator), e.g. more --repeats of undecided "
                        "cells: kept runs are reused, the calibration is the kept one; write "
                        "them under another --name")
    parser.add_argument("--cross-check-only", action="store_true", help="rerun only the "
                        "engine-vs-simulator cross-check (--repeats times) into the kept "
                        "results/<NAME>.json, under the link setting that run calibrated; the "
                        "rest of the file is kept as it was")
    parser.add_argument("--fresh", action="store_true", help="discard the engine runs kept "
                        "under runs/codesign/cells from an earlier, killed run")
    parser.add_argument("--out", default="results")
    parser.add_argument("--name", default="codesign", help="results/<NAME>.{json,md,png}")
    return parser.parse_args()


# ---- models -----------------------------------------------------------------------------------

def readme_folder(arg: str | None) -> Path:
    from readmoe.train.rounds import final_model_dir

    if arg:
        return Path(arg)
    if not (DEMO / "train-readme").is_dir():
        raise ReadmoeError("no trained ReadME model: run `make demo` first (or pass --model)")
    return final_model_dir(DEMO / "train-readme")


def layerwise_folder(arg: str | None, readme: Path, corpus: str) -> Path:
    """The layer-wise-router MoE on exactly the trained ReadME experts: its router replaced by
    per-layer gates, trained by router distillation only (expert steps 0)."""
    from readmoe.refactor.plan import ExpertPlan
    from readmoe.refactor.slicing import save_readme
    from readmoe.train.config import TrainConfig
    from readmoe.train.rounds import Trainer, final_model_dir

    if arg:
        return Path(arg)
    out = RUN / "train-layerwise"
    source = RUN / "layerwise-source"
    stamp = RUN / "layerwise-derived-from.json"
    origin = {"readme": str(readme), "weights": tensors_fingerprint(readme)}
    derived = json.loads(stamp.read_text()) if stamp.is_file() else None
    if derived == origin and (out / "state.json").is_file() and list(out.glob("round-*")):
        return final_model_dir(out)
    if out.exists() or source.exists():
        print(f"{out} was not derived from the current {readme}: rebuilding it", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
    model = load_model(str(readme))
    model.attach_router("none")
    save_readme(model, source, load_tokenizer(str(readme)), ExpertPlan.load(readme / "plan"))
    config = TrainConfig(rounds=2, router_steps=30, expert_steps=0, batch_size=4,
                         block_size=256, lr_router=2e-3, router_type="layerwise",
                         eval_tokens=512)
    Trainer(source, corpus, out, config).run()
    atomic_write_json(stamp, origin)
    return final_model_dir(out)


def dense_folder(readme: Path) -> Path:
    from readmoe.refactor.pipeline import write_dense_experts

    out = RUN / "dense-experts"
    if not (out / "model.safetensors").is_file():
        plan = json.loads((readme / "plan" / "plan.json").read_text())
        write_dense_experts(plan["model"], out)
    return out


# ---- workloads --------------------------------------------------------------------------------

def add_engine_cell_args(parser: argparse.ArgumentParser, cells: list[str]) -> None:
    """The options of a benchmark that reruns engine cells on the synthetic workload
    (``decodes_first.py``, ``offload_precision.py``)."""
    parser.add_argument("--model", default=None)
    parser.add_argument("--corpus", default=str(DEMO / "corpus"))
    parser.add_argument("--cells", nargs="+", default=cells,
                        help="SETTING:BUDGET pairs (settings: ram, link; budget: share of the "
                        "routed experts in fast memory)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--max-output", type=int, default=32)
    parser.add_argument("--out", default="results")


def engine_cell_inputs(args: argparse.Namespace) -> tuple:
    """(folder, tokenizer, resident model, model placed for offload, synthetic specs) for
    ``add_engine_cell_args``'s options."""
    readme = readme_folder(args.model)
    tokenizer = load_tokenizer(str(readme))
    resident = load_model(str(readme))
    offloaded = load_model(str(readme))
    place_for_offload(offloaded)
    args.workloads = ["synthetic"]
    return readme, tokenizer, resident, offloaded, workloads(tokenizer, args.corpus, args)[
        "synthetic"]


def workloads(tokenizer, corpus: str, args: argparse.Namespace) -> dict:
    from readmoe.cli.bench_cmds import corpus_prompts

    provider = corpus_prompts(tokenizer, corpus, split="heldout")
    specs = synthetic_workload(args.requests, args.rate, provider, seed=1)
    specs = [replace(s, max_tokens=min(s.max_tokens, args.max_output)) for s in specs]
    result = {"synthetic": specs}
    if "trace" in args.workloads:
        path = RUN / "trace.jsonl"
        bursty = synthetic_workload(args.requests, args.rate, provider, burstiness=0.5, seed=2)
        lines = [json.dumps({"id": s.request_id, "arrival_time": round(s.arrival_time, 4),
                             "prompt": tokenizer.decode(list(s.prompt.tokens)),
                             "max_tokens": min(s.max_tokens, args.max_output)})
                 for s in bursty]
        atomic_write_text(path, "\n".join(lines) + "\n")
        result["trace"] = load_trace(path, tokenizer.encode)
    return result


# ---- measurements -----------------------------------------------------------------------------

def summarize_run(metrics: dict, capacity: int | None) -> dict:
    cache = metrics.get("cache") or {}
    row = {"norm_latency_mean_s": metrics["normalized_latency_s"]["mean"],
           "norm_latency_p95_s": metrics["normalized_latency_s"]["p95"],
           "ttft_p50_s": metrics["ttft_s"]["p50"],
           "tokens_per_s": metrics["throughput_tokens_per_s"],
           "distinct_experts_per_step": metrics["distinct_experts_per_step"],
           "waited_steps_per_request": metrics.get("waited_steps_per_request"),
           "steps": metrics["steps"], "hit_ratio": cache.get("hit_ratio"),
           "load_ratio": cache.get("load_ratio"), "bytes_moved": cache.get("bytes_moved"),
           "load_hidden": metrics["load_hidden_fraction"],
           "fast_tier_bytes": metrics.get("fast_tier_bytes")}
    detail = metrics.get("steps_detail")
    if detail and capacity is not None:
        one_layer = [(0, step["experts"]) for step in detail]  # every layer sees the same sets
        row.update(bounds(one_layer, capacity).to_dict())
        tokens = [step["tokens"] for step in detail]
        row["token_grain"] = {p: token_grain_hits(tokens, capacity, p)["hit_ratio"]
                              for p in ("random", "lru", "belady")}
    return row


def median_cell(rows: list[dict]) -> dict:
    """Median over repeats of every number, with its spread as [min, max]."""
    cell = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            cell[key] = statistics.median(values)
            cell[f"{key}_spread"] = [min(values), max(values)]
        elif all(isinstance(v, dict) for v in values):
            cell[key] = {k: statistics.median([v[k] for v in values]) for k in values[0]}
        elif all(v is None for v in values):
            cell[key] = None
    cell["repeats"] = len(rows)
    cell["per_repeat_norm_latency_mean_s"] = [r["norm_latency_mean_s"] for r in rows]
    return cell


def prefetch_pairs(engine_settings: dict) -> list[dict]:
    """Prefetch against on-demand loading, paired by repeat: within a repeat the two ran next
    to each other (systems interleaved), so drift of the shared machine cancels in their ratio.
    A cell is called slower or faster only when the exact sign test says so (p < 0.05): the
    spread between identical real-time replays here is wider than most differences."""
    pairs = []
    for key, cells in engine_settings.items():
        for budget, systems in cells.items():
            ahead = systems.get("readme-codesign")
            demand = systems.get("readme-codesign-on-demand")
            if not ahead or not demand:
                continue
            a = ahead["per_repeat_norm_latency_mean_s"]
            b = demand["per_repeat_norm_latency_mean_s"]
            ratios = [x / y for x, y in zip(a, b, strict=True)]
            p = sign_test([r - 1 for r in ratios])
            median = statistics.median(ratios)
            verdict = ("no difference shown" if p >= 0.05 else
                       "prefetch slower" if median > 1 else "prefetch faster")
            pairs.append({"cell": f"{key}/{budget}", "ratios": ratios, "median_ratio": median,
                          "slower_in": sum(r > 1 for r in ratios), "repeats": len(ratios),
                          "sign_test_p": p, "verdict": verdict})
    return pairs


def predictor_accuracy(model, tokenizer, corpus) -> dict:
    """Next-expert rules on held-out routing; the router's runner-up of the previous token."""
    trace = route_corpus(model, tokenizer, corpus, 120, seed=3)
    sequences = [(r.prompt_len, r.experts) for r in trace.requests]
    rules = [accuracy(NextExpertPredictor(w), sequences) for w in (1, 3, 5, 9)]
    right_second = right_top2 = total = 0
    with torch.no_grad():
        for r in trace.requests:
            logits = model.route(torch.tensor([r.tokens]))[1][0]  # [T, E]
            top2 = logits.topk(2, dim=-1).indices.tolist()
            for t in range(max(r.prompt_len, 1), len(r.experts)):
                total += 1
                right_second += top2[t - 1][1] == r.experts[t]
                right_top2 += r.experts[t] in top2[t - 1]
    best = max(rules, key=lambda r: r["accuracy"])["predictor"]
    return {"rules": rules, "chosen": best, "runner_up_accuracy": right_second / total,
            "top2_contains_next": right_top2 / total, "predictions": total}


def interference(model, tokenizer, folder: Path, cal: dict) -> dict:
    """Resident decode step time with the copy engine idle vs busy (RAM memcpy alone, and
    behind the link), alternated so drift hits both."""
    engine = Engine(model, tokenizer, "fcfs", ENGINE_BUDGET, kv_blocks=2048)
    for i in range(8):
        engine.add_request([100 + i] * 16, SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(3):
        engine.step()

    def steps(count: int = 12) -> float:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    with ExpertStore(folder, capacity=1, tier="ram") as store:
        source = store.read(store.routed_layers[0], 0)
    slot = [torch.empty_like(t) for t in source]

    def copy() -> None:
        for dst, src in zip(slot, source, strict=True):
            dst.copy_(src)
    result = {}
    for label, link in (("ram", None), ("link", EmulatedLink(cal["link_bandwidth"]))):
        per_load = cal["ram_copy_s"] + (cal["expert_bytes"] / link.bandwidth if link else 0.0)
        idle, busy = [], []
        for _ in range(3):
            idle.append(steps())
            copier = ThreadCopyEngine(link)
            for _ in range(int(12 * cal["step_s"] * 1.5 / per_load)):  # busy all along
                copier.submit(copy, cal["expert_bytes"])
            busy.append(steps())
            copier.close()
        result[label] = {"idle_step_s": statistics.median(idle),
                         "busy_step_s": statistics.median(busy),
                         "slowdown": statistics.median(busy) / statistics.median(idle) - 1}
    return result


# ---- engine grid ------------------------------------------------------------------------------

class CellStore:
    """Each finished engine run as its own JSON file under runs/codesign/cells, so a killed run
    resumes where it stopped. The cells are valid only with the prelude they were measured
    under (workload, calibration, models): a different prelude clears them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.stamp = folder / "prelude.json"

    def prelude(self) -> dict:
        """The prelude the kept cells were measured under ({} when none are kept)."""
        return json.loads(self.stamp.read_text()) if self.stamp.is_file() else {}

    def start(self, prelude: dict) -> None:
        """Keep the cells if they were measured under ``prelude``, else discard them."""
        if prelude != self.prelude():
            for old in self.folder.glob("*.json"):
                old.unlink()
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.stamp, prelude)

    def _path(self, key: tuple) -> Path:
        return self.folder / ("cell-" + "-".join(f"{k:g}" if isinstance(k, float) else str(k)
                                                  for k in key) + ".json")

    def get(self, key: tuple) -> dict | None:
        path = self._path(key)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: tuple, row: dict) -> None:
        atomic_write_json(self._path(key), row)


def engine_grid(args, folders, models, tokenizer, specs_by_workload, setting_by_name, routed,
                predictor, cells: CellStore):
    raw: dict = {}
    per_repeat = len(specs_by_workload) * (1 + len(setting_by_name) * len(args.budgets)
                                           * len(args.systems))
    progress = tqdm(total=args.repeats * per_repeat, desc="engine runs")

    def measure(key: tuple, run) -> None:
        row = cells.get(key)
        if row is None:
            started = time.time()
            row = run()
            cells.put(key, row)
            progress.write(f"repeat {key[0]} {key[1]} {key[2]} {key[3]:.2f} {key[4]}: "
                           f"{1e3 * row['norm_latency_mean_s']:.0f} ms/token "
                           f"({time.time() - started:.0f} s)")
        raw.setdefault(key[1:], []).append(row)
        progress.update()

    for repeat in range(args.repeats):
        for workload, specs in specs_by_workload.items():
            measure((repeat, "all", workload, 1.0, "resident"), lambda specs=specs: summarize_run(
                Engine(models["resident"], tokenizer, "fcfs", ENGINE_BUDGET,
                       kv_blocks=2048).run_workload(specs), None))
            for name, setting in setting_by_name.items():
                for share in args.budgets:
                    order = list(args.systems)
                    random.Random(repeat).shuffle(order)
                    slots = capacity_for(share, 6)
                    for system_name in order:
                        system = make_system(system_name, setting, predictor, slots, 6)
                        capacity = slots if system.model == "readme" else None

                        def run(system=system, specs=specs, share=share, setting=setting,
                                capacity=capacity) -> dict:
                            metrics = run_engine(system, models[system.model], tokenizer,
                                                 str(folders[system.model]), specs=specs,
                                                 share=share, setting=setting,
                                                 routed_bytes=routed, budget=ENGINE_BUDGET,
                                                 kv_blocks=2048)
                            return summarize_run(metrics, capacity)
                        measure((repeat, name, workload, share, system_name), run)
    progress.close()
    grid: dict = {}
    for (name, workload, share, system), rows in raw.items():
        grid.setdefault(f"{name}/{workload}", {}).setdefault(
            f"budget_{share:g}", {})[system] = median_cell(rows)
    return grid


def cross_checks(model, tokenizer, folder, specs, setting_by_name, predictor,
                 repeats: int) -> list[dict]:
    """Engine vs simulator on the same requests, all arriving at once (crosscheck.py), each
    system ``repeats`` times (the engine's clock varies between identical runs here): every
    repeat kept, errors summarised as median and spread."""
    results = []
    setting = setting_by_name.get("link") or next(iter(setting_by_name.values()))
    few = [replace(s, max_tokens=min(s.max_tokens, 24)) for s in specs[:8]]
    for system_name in ("readme-codesign", "readme-lru"):
        system = make_system(system_name, setting, predictor, 3, model.config.num_experts)
        runs = [engine_vs_simulator(
            model, tokenizer, few,
            lambda s=system: ExpertStore(folder, capacity=3, policy=s.policy, tier="ram",
                                         bandwidth=setting.bandwidth),
            scheduler=system.scheduler, scheduler_options=system.scheduler_options,
            budget=ENGINE_BUDGET, prefetch=system.prefetch, codesign=system.codesign,
            kv_blocks=2048, threads=1) for _ in tqdm(range(repeats), desc=f"cross-check "
                                                      f"{system_name}")]
        summary = {"system": system_name, "setting": setting.label, "runs": runs,
                   "hits_agree": all(r["hits_agree"] for r in runs),
                   "schedules_agree": all(r["schedules_agree"] for r in runs)}
        for key in ("mean_latency_error", "mean_latency_error_resident_fit_only",
                    "makespan_error", "store_overhead_s"):
            values = [r[key] for r in runs]
            summary[key] = statistics.median(values)
            summary[f"{key}_spread"] = [min(values), max(values)]
        results.append(summary)
    return results


# ---- simulator projection ---------------------------------------------------------------------

def sim_grid(args, pregating, layerwise, routed_sim_bytes, predictor) -> dict:
    cost, dense_cost = get_profile("a100-llama2-7b"), get_profile("a100-llama2-7b-dense")
    specs = pregating.specs(2.0, seed=5)
    step_s = 1.2e-3 + 32 * (cost.layer_fixed_s + 64 * cost.token_s + 4 * cost.expert_s)
    ratio = 32 * cost.load_time(0, 1) / step_s
    setting = Setting("a100", load_ratio=round(ratio, 3), prefetch_rate=round(1 / ratio, 3))
    layer_index = layerwise.requests[0].layers.shape[1] // 2
    grid = {"profile": "a100-llama2-7b", "setting": vars(setting), "requests": len(specs)}
    for share in args.budgets:
        cells = {}
        for system_name in SYSTEMS:
            system = make_system(system_name, setting, predictor,
                                 capacity_for(share, pregating.num_experts), pregating.num_experts)
            use_cost = dense_cost if system.model == "dense" else cost
            config = sim_config(system, share, setting, use_cost, pregating.num_experts,
                                SIM_BUDGET, routed_sim_bytes)
            if system.model == "layerwise":
                result = simulate(layerwise.specs(2.0, seed=5, layer=layer_index),
                                  layerwise.routing(layer_index), config,
                                  {r.request_id: r.layers for r in layerwise.requests})
            elif system.model == "dense":
                zero = [replace(s, prompt=replace(s.prompt, experts=(0,) * s.prompt.length))
                        for s in specs]
                routing = ReplayRouting([(s.prompt.length, [0] * (s.prompt.length + s.max_tokens))
                                         for s in zero])
                result = simulate(zero, routing, config)
            else:
                result = simulate(specs, pregating.routing(), config)
            metrics = aggregate(result.requests, result.steps, result.cache)
            row = summarize_run(metrics, None)
            if system.model == "readme":
                capacity = capacity_for(share, pregating.num_experts)
                row.update(bounds([(0, s.experts) for s in result.steps], capacity).to_dict())
                row["token_grain"] = {p: token_grain_hits([s.token_experts for s in result.steps],
                                                          capacity, p)["hit_ratio"]
                                      for p in ("random", "lru", "belady")}
            cells[system_name] = row
        grid[f"budget_{share:g}"] = cells
    resident = simulate(specs, pregating.routing(), sim_config(
        make_system("readme-lru", setting), 1.0, setting, cost, pregating.num_experts,
        SIM_BUDGET, routed_sim_bytes))
    grid["resident"] = summarize_run(aggregate(resident.requests, resident.steps), None)
    return grid


def sim_tradeoff(args, pregating, predictor) -> dict:
    """What the cache-aware scheduler trades, isolated in the A100 projection: the same
    predictor, Belady and prefetch under FCFS, the capped expert-aware scheduler and the
    cache-aware one: loads per access saved against steps waited per request."""
    cost = get_profile("a100-llama2-7b")
    specs = pregating.specs(2.0, seed=5)
    step_s = 1.2e-3 + 32 * (cost.layer_fixed_s + 64 * cost.token_s + 4 * cost.expert_s)
    ratio = 32 * cost.load_time(0, 1) / step_s
    setting = Setting("a100", load_ratio=round(ratio, 3), prefetch_rate=round(1 / ratio, 3))
    result = {}
    for share in args.budgets:
        capacity = capacity_for(share, pregating.num_experts)
        codesign = make_system("readme-codesign", setting, predictor, capacity,
                               pregating.num_experts)
        cells = {}
        for label, scheduler, options in (
                ("fcfs", "fcfs", {}),
                ("expert-aware, capped", "expert-aware", {"max_experts": capacity}),
                ("cache-aware", "cache-aware", codesign.scheduler_options)):
            config = replace(sim_config(codesign, share, setting, cost, pregating.num_experts,
                                        SIM_BUDGET, 0), scheduler=scheduler,
                             scheduler_options=options)
            run = simulate(specs, pregating.routing(), config)
            metrics = aggregate(run.requests, run.steps, run.cache)
            cells[label] = summarize_run(metrics, None)
        result[f"budget_{share:g}"] = cells
    return result


# ---- report -----------------------------------------------------------------------------------

def _ms(value) -> str:
    return "-" if value is None else f"{1e3 * value:.0f}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table(cells: dict, resident: dict | None, title: str) -> list[str]:
    lines = [f"### {title}", "",
             "| budget | system | norm. latency mean (ms) [spread] | p95 (ms) | TTFT p50 (ms) | "
             "tokens/s | hit ratio | optimum / ceiling | loads per access | load hidden |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [("-", "resident (all experts)", resident)] if resident else []
    rows += [(budget[7:], name, c) for budget, systems in cells.items()
             for name, c in systems.items()]
    for budget, name, c in rows:
        spread = c.get("norm_latency_mean_s_spread")
        spread = f" [{_ms(spread[0])}-{_ms(spread[1])}]" if spread else ""
        bound = (f"{_pct(c['optimum_hit_ratio'])} / {_pct(c['ceiling'])}"
                 if c.get("optimum_hit_ratio") is not None else "-")
        lines.append(f"| {budget} | {name} | {_ms(c['norm_latency_mean_s'])}{spread} | "
                     f"{_ms(c['norm_latency_p95_s'])} | {_ms(c['ttft_p50_s'])} | "
                     f"{c['tokens_per_s']:.1f} | {_pct(c.get('hit_ratio'))} | {bound} | "
                     f"{_num(c.get('load_ratio'))} | {_pct(c.get('load_hidden'))} |")
    return lines + [""]


def extra_tables(result: dict) -> list[str]:
    """Predictor accuracy, copy interference, token-grain hit ratios, the trade-off and the
    cross-check, each as a small markdown table."""
    pred = result["predictor"]
    lines = ["### Next-expert prediction on held-out routing", "",
             "| rule | accuracy |", "|---|---:|"]
    lines += [f"| {r['predictor']} | {_pct(r['accuracy'])} |" for r in pred["rules"]]
    lines += [f"| router's runner-up of the previous token | {_pct(pred['runner_up_accuracy'])}"
              " |", f"| next in the previous token's top 2 (not a single guess) | "
              f"{_pct(pred['top2_contains_next'])} |", "",
              f"{pred['predictions']} predictions; the co-design uses `{pred['chosen']}`.", "",
              "### The copy engine beside compute (resident decode step, batch 8)", "",
              "| copies | step idle (ms) | step with the copy engine busy (ms) | slowdown |",
              "|---|---:|---:|---:|"]
    for label, row in result["interference"].items():
        lines.append(f"| {label} | {_ms(row['idle_step_s'])} | {_ms(row['busy_step_s'])} | "
                     f"{_pct(row['slowdown'])} |")
    lines += ["", "Busy = the copy engine loading back to back the whole time (its worst "
              "case); a memcpy contends with compute for memory bandwidth, not for the "
              "interpreter.", ""]
    if result.get("prefetch_vs_on_demand"):
        lines += ["### Prefetch against on-demand loading, paired by repeat", "",
                  "| cell | prefetch / on-demand, per repeat | median | slower in | sign test p |"
                  " verdict |", "|---|---|---:|---:|---:|---|"]
        for row in result["prefetch_vs_on_demand"]:
            ratios = ", ".join(f"{r:.2f}" for r in row["ratios"])
            lines.append(f"| {row['cell']} | {ratios} | {row['median_ratio']:.2f} | "
                         f"{row['slower_in']} of {row['repeats']} | {row['sign_test_p']:.3f} | "
                         f"{row['verdict']} |")
        lines += ["", "Ratio of normalized latency means of the two runs of one repeat (run "
                  "next to each other); a verdict needs the exact sign test at p < 0.05, which "
                  "takes at least 6 repeats that agree.", ""]
    grain = [(key, budget, name, c) for key, cells in result.get("engine_settings", {}).items()
             for budget, systems in cells.items() for name, c in systems.items()
             if "token_grain" in c and key.endswith("/synthetic")]
    if grain:
        lines += ["### Hit ratios at the paper's per-token grain (labelled; one access per "
                  "token, batch order, Belady told the realised sequence), beside ours", "",
                  "| setting | budget | system | ours (per step and layer) | token grain: "
                  "random | LRU | Belady |", "|---|---|---|---:|---:|---:|---:|"]
        for key, budget, name, c in grain:
            g = c["token_grain"]
            lines.append(f"| {key} | {budget[7:]} | {name} | {_pct(c['hit_ratio'])} | "
                         f"{_pct(g['random'])} | {_pct(g['lru'])} | {_pct(g['belady'])} |")
        lines.append("")
    if result.get("tradeoff"):
        lines += ["### What the cache-aware scheduler trades (simulator, A100 projection; "
                  "same predictor, Belady and prefetch)", "",
                  "| budget | scheduler | loads per access | steps waited per request | "
                  "norm. latency mean (ms) | distinct experts / step |",
                  "|---|---|---:|---:|---:|---:|"]
        for budget, cells in result["tradeoff"].items():
            for name, c in cells.items():
                lines.append(f"| {budget[7:]} | {name} | {_num(c['load_ratio'])} | "
                             f"{_num(c['waited_steps_per_request'])} | "
                             f"{_ms(c['norm_latency_mean_s'])} | "
                             f"{_num(c['distinct_experts_per_step'])} |")
        lines.append("")
    if result.get("cross_check"):
        lines += ["### Engine against simulator (same requests, all at time 0; median [spread] "
                  f"of {len(result['cross_check'][0]['runs'])} repeats)", ""]
        if result.get("cross_check_command"):
            lines += [f"Rerun apart from the tables above: `{result['cross_check_command']}`.", ""]
        lines += ["| system | hits, misses, prefetches equal | per-step expert sets equal | "
                  "mean latency error | makespan error | error, resident fit alone | "
                  "store overhead per step (ms) |", "|---|---|---|---:|---:|---:|---:|"]

        def spread(row: dict, key: str, fmt) -> str:
            low, high = row[f"{key}_spread"]
            return f"{fmt(row[key])} [{fmt(low)} to {fmt(high)}]"
        for row in result["cross_check"]:
            lines.append(f"| {row['system']} ({row['setting']}) | {row['hits_agree']} | "
                         f"{row['schedules_agree']} | {spread(row, 'mean_latency_error', _pct)}"
                         f" | {spread(row, 'makespan_error', _pct)} | "
                         f"{spread(row, 'mean_latency_error_resident_fit_only', _pct)} | "
                         f"{spread(row, 'store_overhead_s', _ms)} |")
        lines += ["", "The simulator's compute costs are a least-squares fit of resident runs "
                  "of the same requests (the checked scheduler, FCFS and one expert per step, "
                  "pooled); its copy bandwidth is the offloaded run's; the store path's host "
                  "work per step (planning, slot bookkeeping) is measured on the offloaded run "
                  "as its stall-free step time less the fit (`crosscheck.py`). The column "
                  "'resident fit alone' leaves that overhead out.", ""]
    return lines


def plot(path: Path, grid: dict, resident: dict, title: str) -> None:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    budgets = sorted(grid, key=lambda b: float(b[7:]))
    for system in SYSTEMS:
        xs = [100 * float(b[7:]) for b in budgets if system in grid[b]]
        ys = [1e3 * grid[b][system]["norm_latency_mean_s"] for b in budgets if system in grid[b]]
        if xs:
            ax.plot(xs, ys, marker="o", label=system)
    if resident:
        ax.axhline(1e3 * resident["norm_latency_mean_s"], color="grey", linestyle="--",
                   label="resident (all experts)")
    ax.set_xlabel("fast-memory budget (% of routed-expert bytes)")
    ax.set_ylabel("normalized latency, mean (ms / token)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def rerun_cross_check(args: argparse.Namespace, threads: int) -> int:
    """The cross-check alone, into the kept result: it takes minutes, the engine grid hours."""
    previous = Path(args.out) / f"{args.name}.json"
    if not previous.is_file():
        raise ReadmoeError(f"--cross-check-only updates {previous}, which does not exist: run "
                           f"the benchmark once without it (same --name)")
    result = json.loads(previous.read_text())
    readme = readme_folder(args.model)
    if str(readme) != result["model"]:
        raise ReadmoeError(f"{previous} was measured on {result['model']}, not {readme}: pass "
                           f"--model {result['model']} or rerun the whole benchmark")
    tokenizer = load_tokenizer(str(readme))
    model = load_model(str(readme))
    settings = {k: Setting(**v) for k, v in result["settings"].items()}
    specs = workloads(tokenizer, args.corpus, args)["synthetic"]
    result["cross_check"] = cross_checks(model, tokenizer, readme, specs, settings,
                                         result["predictor"]["chosen"], args.repeats)
    result["cross_check_command"] = command_line()
    write_results(args.out, args.name, result, report(result, threads))
    return 0


def main() -> int:
    args = parse_args()
    threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    if args.cross_check_only:
        return rerun_cross_check(args, threads)
    readme = readme_folder(args.model)
    from readmoe.data.corpus import load_corpus
    corpus = load_corpus(args.corpus)
    layerwise = layerwise_folder(args.layerwise, readme, args.corpus)
    dense = dense_folder(readme)
    tokenizer = load_tokenizer(str(readme))
    folders = {"readme": readme, "layerwise": layerwise, "dense": dense}
    models = {"resident": load_model(str(readme)), "layerwise-full": load_model(str(layerwise))}
    routed = routed_expert_bytes(models["resident"])
    for name, folder in folders.items():
        models[name] = load_model(str(folder))
        place_for_offload(models[name])
    result = {"command": command_line(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "threads": threads, "model": str(readme), "layerwise_model": str(layerwise),
              "dense_model": str(dense), "routed_expert_bytes": routed}
    previous = Path(args.out) / f"{args.name}.json"
    if args.skip_engine and previous.is_file():  # keep the engine side of the last full run
        kept = json.loads(previous.read_text())
        result.update({k: kept[k] for k in ("calibration", "settings", "predictor",
                                            "interference", "workload", "engine",
                                            "engine_settings", "engine_resident",
                                            "cross_check") if k in kept})
    else:
        specs = workloads(tokenizer, args.corpus, args)
        # the repeat count is not part of it: kept runs are per repeat, so more repeats add runs
        workload = {"requests": args.requests, "rate": args.rate, "max_output": args.max_output,
                    "engine_budget": vars(ENGINE_BUDGET)}
        models_used = {k: str(v) for k, v in folders.items()}
        models_used["readme_weights"] = tensors_fingerprint(readme)
        # serving settings live in config.json too (the routing hysteresis)
        models_used["readme_config"] = json.loads((readme / "config.json").read_text())
        cells = CellStore(RUN / "cells")
        kept = {} if args.fresh else cells.prelude()
        if kept.get("workload") == workload and kept.get("models") == models_used:
            prelude = kept  # resuming: the cells were measured under this calibration
        else:
            cal = calibrate(models["resident"], tokenizer, readme, specs["synthetic"],
                            ENGINE_BUDGET)
            prelude = {"workload": workload, "models": models_used, "calibration": cal,
                       "predictor": predictor_accuracy(models["resident"], tokenizer, corpus),
                       "interference": interference(models["resident"], tokenizer, readme,
                                                    cal)}
        cells.start(prelude)
        setting_by_name = make_settings(prelude["calibration"], args.settings)
        result.update({k: prelude[k] for k in ("workload", "calibration", "predictor",
                                               "interference")})
        result["settings"] = {k: vars(v) for k, v in setting_by_name.items()}
        print(json.dumps({k: result[k] for k in ("calibration", "settings", "predictor",
                                                 "interference")}, indent=2), flush=True)
    if not args.skip_engine:
        grid = engine_grid(args, folders, models, tokenizer, specs, setting_by_name, routed,
                           result["predictor"]["chosen"], cells)
        resident = {w: grid[f"all/{w}"]["budget_1"]["resident"] for w in specs}
        result["engine_settings"] = {k: v for k, v in grid.items() if not k.startswith("all/")}
        result["engine_resident"] = resident
        headline = f"{args.settings[0]}/synthetic"
        result["engine"] = grid.get(headline, {})
        result["prefetch_vs_on_demand"] = prefetch_pairs(result["engine_settings"])
        result["workload"] = {**result["workload"], "repeats": args.repeats}
    if args.engine_only:
        write_results(args.out, args.name, result, report(result, threads))
        return 0
    if not args.skip_engine:
        result["cross_check"] = cross_checks(models["resident"], tokenizer, readme,
                                             specs["synthetic"], setting_by_name,
                                             result["predictor"]["chosen"], args.repeats)
    sim_routed = 32 * 6 * get_profile("a100-llama2-7b").expert_bytes[0]
    pregating = route_corpus(models["resident"], tokenizer, corpus, args.sim_requests, seed=5)
    layerwise_trace = route_corpus(models["layerwise-full"], tokenizer, corpus,
                                   args.sim_requests, seed=5)
    chosen = result["predictor"]["chosen"]
    result["sim"] = sim_grid(args, pregating, layerwise_trace, sim_routed, chosen)
    result["tradeoff"] = sim_tradeoff(args, pregating, chosen)
    write_results(args.out, args.name, result, report(result, threads))
    if result.get("engine"):
        plot(Path(args.out) / f"{args.name}.png", result["engine"],
             result["engine_resident"]["synthetic"],
             f"engine ({args.settings[0]} setting, synthetic workload), median of "
             f"{result['workload']['repeats']} runs")
    return 0


def report(result: dict, threads: int) -> str:
    lines = ["# Co-design at equal memory: what the router's foresight buys", "",
             f"Command: `{result['command']}` on "
             f"{result['machine']}, torch threads {threads} (the copy engine has its own core). "
             "Engine cells: median of the repeats, [min-max]; the link setting is **emulated** "
             f"({result['settings'].get('link', {}).get('bandwidth', 0) / 1e9:.2f} GB/s: one "
             "expert of one layer loads in one layer's compute, measured).", ""]
    for key, cells in result.get("engine_settings", {}).items():
        setting, workload = key.split("/")
        lines += table(cells, result["engine_resident"].get(workload),
                       f"engine, {setting} setting, {workload} workload")
    if "sim" in result:
        lines += table({k: v for k, v in result["sim"].items() if k.startswith("budget_")},
                       result["sim"]["resident"], "simulator, A100 projection (all experts "
                       "resident: capacity 6 after a cold start)")
    return "\n".join(lines + extra_tables(result))

if __name__ == "__main__":
    raise SystemExit(main())
