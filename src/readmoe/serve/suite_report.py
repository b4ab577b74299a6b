"""The serving suite's report: markdown tables beside the paper's numbers, JSON and plots.

Why apart from ``suite.py``: that module runs the experiments; this one only presents a result
dict, so a saved result can be re-reported without re-running anything.
"""

from __future__ import annotations

from pathlib import Path

from readmoe.serve.suite import (
    LATENCY_TOLERANCE,
    ORACLE_BELADY,
    PAPER_PREFETCH,
    PAPER_SCHEDULERS,
    PAPER_TABLE4,
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.1f}"


def report_markdown(result: dict, command: str, machine: str, differences: str) -> str:
    """The tables, side by side with the paper's numbers."""
    lines = ["# Serving suite (the paper's Section 6)", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Routing (pre-gating): {result['pregating_source']}  ",
             f"Routing (layer-wise baseline): {result['layerwise_source']}  ",
             f"Clock: simulator with the `{result['profile']}` cost profile: a **projection** of "
             "one A100 serving Llama-2-7B-sized experts over PCIe, not a measurement. "
             f"{result['num_experts']} routed experts.", "",
             "## (a) Schedulers (capacity "
             f"{result['config']['scheduler_capacity']}, Belady, prefetch)", "",
             "| rate (req/s) | scheduler | distinct experts / step | paper | "
             "norm. latency mean (ms) | p95 (ms) |", "|---:|---|---:|---:|---:|---:|"]
    paper = PAPER_SCHEDULERS["distinct_experts"]
    for rate, runs in result["schedulers"].items():
        for name, run in runs.items():
            lat = run["normalized_latency_s"]
            lines.append(f"| {rate} | {name} | {run['distinct_experts_per_step']:.2f} | "
                         f"{paper.get(name, '-')} | {_ms(lat['mean'])} | {_ms(lat['p95'])} |")
    lines += ["", "`expert-aware, max K experts` is our extension (schedulers/expert_aware.py): "
              "the paper's rule stops adding experts only when the token budget is full, so "
              "under this load it schedules nearly every expert; the cap stops at the cache's "
              "capacity K (aged requests excepted, so the aging bound holds).", "",
              f"Paper: expert-aware vs the others, mean latency "
              f"{PAPER_SCHEDULERS['mean_latency_change']}, p95 "
              f"{PAPER_SCHEDULERS['p95_latency_change']}.", "",
              f"## (b) Hit ratio per policy (rate {result['config']['rates'][-1]} req/s, "
              "expert-aware, prefetch; ours / paper Table 4)", ""]
    policies = list(result["cache"])
    lines += ["| capacity | " + " | ".join(policies) + " |",
              "|---:|" + "---:|" * len(policies)]
    for c in result["prefetch"]:
        cells = [f"{_pct(result['cache'][p][c]['hit_ratio'])} / "
                 f"{_pct(PAPER_TABLE4.get(int(c), {}).get(p))}" for p in policies]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Online Belady knows the step's tokens and the queued prompts; a decoding "
              "request's next expert is revealed only after the step that samples it, so while "
              "every request decodes the known future is nearly empty and Belady falls back to "
              f"LRU. `{ORACLE_BELADY}` is told every request's whole routing (what the paper's "
              "\"pre-computed routing\" suggests): the bound a known future can reach. When a "
              "step needs more experts than the capacity (most steps here, with "
              f"{result['num_experts']} experts), the layer cycles through its slots whatever "
              "the policy, so the policies differ little.", ""]
    capped = result.get("capped_cache")
    if capped:
        names = list(capped)
        lines += ["With the capped expert-aware scheduler (at most `capacity` experts per step, "
                  "aged requests excepted) each step fits the cache, but the scheduler fills it: "
                  "a step of exactly `capacity` experts evicts every resident expert it does not "
                  "need, so the policies tie. A policy only has a choice when steps use fewer "
                  "experts than the slots hold:", "",
                  "| capacity | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        lines += [f"| {c} | " + " | ".join(_pct(capped[p][c]["hit_ratio"]) for p in names)
                  + " |" for c in result["prefetch"]]
        lines += [""]
    lines += [
              "## (c) Prefetch vs on-demand (Belady, expert-aware)", "",
              "| capacity | prefetch mean (ms) | on-demand mean (ms) | reduction | "
              "load hidden |", "|---:|---:|---:|---:|---:|"]
    for c, row in result["prefetch"].items():
        lines.append(f"| {c} | {_ms(row['prefetch_mean_s'])} | {_ms(row['on_demand_mean_s'])}"
                     f" | {_pct(row['reduction'])} | {_pct(row['hidden_fraction'])} |")
    policies = list(result["layerwise"])
    lines += ["", f"Paper: {PAPER_PREFETCH}.", "",
              "## (d) Layer-wise baseline (blind: no prefetch, Belady sees no future)", "",
              "| capacity | " + " | ".join(f"{p} hit" for p in policies)
              + " | LRU latency mean (ms) | ReadME (Belady+prefetch) mean (ms) |",
              "|---:|" + "---:|" * (len(policies) + 2)]
    for c in result["prefetch"]:
        cells = [_pct(result["layerwise"][p][c]["hit_ratio"]) for p in policies]
        lines.append(f"| {c} | " + " | ".join(cells) + " | "
                     f"{_ms(result['layerwise']['lru'][c]['normalized_latency_s']['mean'])} | "
                     f"{_ms(result['prefetch'][c]['prefetch_mean_s'])} |")
    check = result.get("engine_cross_check")
    if check:
        first = check["on_demand"]
        lines += ["", "## Cross-check: the real engine against the simulator", "",
                  f"{first['requests']} requests (all at time 0, greedy), {first['scheduler']}, "
                  f"{first['threads']} compute thread(s) (a core left to the copy worker), "
                  f"{first['policy']}, capacity {first['capacity']}; store: {first['store']} "
                  "(**emulated** link). The simulator replays the engine's own routing with a "
                  "cost model fitted to the engine's resident run (measured on this machine). "
                  f"Tolerance on latency: {LATENCY_TOLERANCE:.0%}.", "",
                  "| mode | hits engine / sim | misses engine / sim | schedules equal | "
                  "makespan engine / sim (s) | mean latency error | load hidden (engine) |",
                  "|---|---:|---:|---|---:|---:|---:|"]
        for mode, row in check.items():
            eng, sim = row["engine"], row["simulator"]
            lines.append(f"| {mode} | {eng['cache']['hits']} / {sim['cache']['hits']} | "
                         f"{eng['cache']['misses']} / {sim['cache']['misses']} | "
                         f"{row['schedules_agree']} | {eng['makespan_s']:.2f} / "
                         f"{sim['makespan_s']:.2f} | {_pct(row['mean_latency_error'])} | "
                         f"{_pct(eng['load_hidden_fraction'])} |")
    lines += ["", "## Where we differ and why", "", differences, ""]
    return "\n".join(lines)


def write_results(result: dict, out_dir: str | Path, command: str, machine: str,
                  differences: str, name: str = "serve_suite") -> list[Path]:
    """JSON (per-request latencies dropped), markdown and two PNGs, each written atomically."""
    from readmoe.io import atomic_write_json, atomic_write_text
    from readmoe.serve.metrics import plot_hit_ratio, plot_latency_cdf

    out = Path(out_dir)
    high = str(result["config"]["rates"][-1])
    cdf = {n: run["normalized"] for n, run in result["schedulers"][high].items()}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "normalized"}
        return value

    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}_latency_cdf.png",
             out / f"{name}_hit_ratio.png"]
    atomic_write_json(paths[0], {**strip(result), "command": command, "machine": machine})
    atomic_write_text(paths[1], report_markdown(result, command, machine, differences))
    plot_latency_cdf(paths[2], cdf)
    series = {f"{p} (ours)": {int(c): run["hit_ratio"] for c, run in runs.items()}
              for p, runs in result["cache"].items()}
    for policy in ("random", "lru", "belady"):
        series[f"{policy} (paper)"] = {c: row[policy] for c, row in PAPER_TABLE4.items()}
    plot_hit_ratio(paths[3], series)
    return paths
