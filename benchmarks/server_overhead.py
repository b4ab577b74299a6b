"""What the HTTP server costs: `bench serve --endpoint` against `readmoe serve` vs the same
workload through an engine in this process, side by side in one run.

Both sides serve the same model with the same engine options (defaults: fcfs, 32 sequences,
256 tokens a step, every expert resident, CPU fp32) and replay the very same requests (the
synthetic Chatbot-Arena-like workload, prompts cut from the corpus, outputs capped at
``--max-output``, ``ignore_eos``). Two workloads: all requests at once (capacity-bound: the
throughput comparison) and ``--rate`` requests/s (latency-bound: the TTFT comparison). All at
once, TTFT differs by design, not by overhead: in process every request is queued before the
first step, while over HTTP the first request to arrive starts a step alone and the burst
behind it (parsed a few milliseconds later) waits for that step, one prefill step (~0.1-0.2 s
here) that no front end over a blocking step can avoid. Runs
alternate HTTP, in process, HTTP, in process, ... (``--repeats`` each) after a warm-up on both,
and the medians are compared. The server process is idle (blocked on its command queue)
while the in-process engine runs, and vice versa; the HTTP client shares the cores with the
server, as a real client on the same machine would. Targets: throughput within 10%, TTFT
p50 within 20 ms.

Writes results/server_overhead.{json,md}.

    .venv/bin/python benchmarks/server_overhead.py [--model DIR] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch

from readmoe.cli.bench_cmds import workload_specs
from readmoe.io import command_line, write_results
from readmoe.models.device import resolve_placement
from readmoe.serve.launch import EngineOptions, open_engine
from readmoe.server.http_bench import replay_http
from readmoe.server.process import ServerProcess
from readmoe.train.rounds import final_model_dir

DEMO_RUN = Path("runs/demo/train-readme")
DEMO_CORPUS = Path("runs/demo/corpus")
NAME = "readme"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"a trained ReadME folder (default: last round of {DEMO_RUN})")
    parser.add_argument("--corpus", default=str(DEMO_CORPUS))
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=1.5,
                        help="arrivals per second of the latency-bound workload (about half "
                        "what one core serves here, so queueing stays small)")
    parser.add_argument("--max-output", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides (1 leaves the second core of a 2-core "
                        "machine to the event loop and the client, and avoids OpenMP stalls "
                        "when the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="results")
    return parser.parse_args()


def server_latency(url: str) -> dict[str, float]:
    """The server's own TTFT and inter-token histograms' sums and counts (from submission,
    after parsing: what the engine loop saw)."""
    wanted = {f"readmoe_{name}_seconds_{part}" for name in ("time_to_first_token",
                                                            "inter_token_latency")
              for part in ("sum", "count")}
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def server_means(before: dict, after: dict) -> dict:
    def mean(name: str) -> float:
        count = after[f"readmoe_{name}_seconds_count"] - before[f"readmoe_{name}_seconds_count"]
        total = after[f"readmoe_{name}_seconds_sum"] - before[f"readmoe_{name}_seconds_sum"]
        return total / count

    return {"server_ttft_mean_s": mean("time_to_first_token"),
            "server_itl_mean_s": mean("inter_token_latency")}


def cpu_s(pid: int, tid: int | None = None) -> float:
    """CPU seconds (user + system) of process ``pid``, or of its thread ``tid``. The server's
    main thread (tid = pid) runs the event loop: HTTP, parsing, detokenising, SSE; the
    engine runs in its own thread."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(run: dict) -> dict:
    cpu = {f"{key[:-6]}_cpu_ms_per_token": 1e3 * run[key] / run["output_tokens"]
           for key in ("loop_cpu_s", "client_cpu_s", "engine_cpu_s", "server_engine_cpu_s")
           if key in run}
    return {**cpu, "ttft_mean_s": run["ttft_s"]["mean"], "itl_mean_s": run["itl_s"]["mean"],
            "throughput_tokens_per_s": run["throughput_tokens_per_s"],
            "ttft_p50_s": run["ttft_s"]["p50"], "ttft_p95_s": run["ttft_s"]["p95"],
            "tpot_mean_s": run["tpot_s"]["mean"], "itl_p50_s": run["itl_s"]["p50"],
            "e2e_p50_s": run["e2e_s"]["p50"], "normalized_mean_s":
                run["normalized_latency_s"]["mean"], "requests": run["requests"],
            "output_tokens": run["output_tokens"]}


def compare(name: str, rate: float, http: list[dict], local: list[dict]) -> dict:
    def median(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    ratio = median(http, "throughput_tokens_per_s") / median(local, "throughput_tokens_per_s")
    ttft_ms = 1e3 * (median(http, "ttft_p50_s") - median(local, "ttft_p50_s"))
    front_end = [r["ttft_mean_s"] - r["server_ttft_mean_s"] for r in http]
    return {"server_loop_cpu_ms_per_token": median(http, "loop_cpu_ms_per_token"),
            "client_cpu_ms_per_token": median(http, "client_cpu_ms_per_token"),
            "engine_cpu_ms_per_token": median(local, "engine_cpu_ms_per_token"),
            "server_engine_cpu_ms_per_token": median(http, "server_engine_cpu_ms_per_token"),
            "workload": name, "rate": rate, "http": http,
            "in_process": local,
            "throughput_ratio": ratio, "ttft_p50_diff_ms": ttft_ms,
            "front_end_ttft_ms": 1e3 * statistics.median(front_end),
            "front_end_itl_ms": 1e3 * statistics.median(
                r["itl_mean_s"] - r["server_itl_mean_s"] for r in http),
            "throughput_within_10pct": abs(ratio - 1) <= 0.10,
            "ttft_within_20ms": abs(ttft_ms) <= 20.0}


def main() -> int:
    args = parse_args()
    model = args.model or str(final_model_dir(DEMO_RUN))
    cpu = resolve_placement("cpu", "float32")
    workloads = {"all at once": float("inf"), f"{args.rate:g} requests/s": args.rate}
    load_before = os.getloadavg()[0]
    rows = []
    torch.set_num_threads(args.threads)
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with (ServerProcess(model, "--served-model-name", NAME, "--device", "cpu",
                        env=threads) as server,
          open_engine(model, EngineOptions(), cpu) as served):
        def specs(rate: float, requests: int, tag: str) -> list:
            made = workload_specs(served.tokenizer, args.corpus, None, requests=requests,
                                  rate=rate, seed=args.seed, max_output=args.max_output)
            return [replace(s, request_id=f"{tag}-{s.request_id}") for s in made]

        def http(rate: float, requests: int) -> dict:
            work = specs(rate, requests, "http")
            before = server_latency(server.url)
            loop_cpu, total_cpu = cpu_s(server.pid, server.pid), cpu_s(server.pid)
            client_cpu = time.process_time()
            result = replay_http(server.url, NAME, work)
            loop = cpu_s(server.pid, server.pid) - loop_cpu
            return {**result, **server_means(before, server_latency(server.url)),
                    "loop_cpu_s": loop, "client_cpu_s": time.process_time() - client_cpu,
                    "server_engine_cpu_s": cpu_s(server.pid) - total_cpu - loop}

        def local(rate: float, requests: int) -> dict:
            work = specs(rate, requests, str(len(served.engine.steps)))  # ids new to it
            started = time.process_time()
            result = served.engine.run_workload(work)
            return {**result, "engine_cpu_s": time.process_time() - started}

        http(float("inf"), 8)  # warm-up: first-call costs on both sides
        local(float("inf"), 8)
        for name, rate in workloads.items():
            runs: dict[str, list[dict]] = {"http": [], "local": []}
            for _ in range(args.repeats):
                for side, run in (("http", http), ("local", local)):
                    result = run(rate, args.requests)
                    if side == "http" and result["failed"]:
                        raise SystemExit(f"{result['failed']} HTTP requests failed: "
                                         f"{result['errors']}")
                    runs[side].append(summary(result))
                    if side == "http":
                        runs[side][-1].update({k: result[k] for k in ("server_ttft_mean_s",
                                                                      "server_itl_mean_s")})
                    print(name, side, runs[side][-1], flush=True)
            rows.append(compare(name, rate, runs["http"], runs["local"]))
        status = server.stop()
    result = {"command": command_line(), "model": model,
              "corpus": args.corpus, "requests": args.requests, "max_output": args.max_output,
              "repeats": args.repeats, "threads": args.threads,
              "machine": f"{os.cpu_count()} CPUs",
              "loadavg_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "placement": cpu.to_dict(), "server_exit_status": status, "rows": rows}
    lines = ["# HTTP server overhead: bench serve --endpoint vs the engine in process", "",
             f"Model: {model}; CPU fp32, {args.threads} torch thread(s) on both sides; "
             f"{args.requests} synthetic requests (outputs <= "
             f"{args.max_output} tokens); medians of {args.repeats} alternating runs per side."
             "  ", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}; load average before / after "
             f"{result['loadavg_before_after'][0]} / {result['loadavg_before_after'][1]} (shared)",
             "", "| workload | side | tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | TPOT mean (ms) | "
             "e2e p50 (s) |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        for side in ("http", "in_process"):
            median = {key: statistics.median(r[key] for r in row[side])
                      for key in row[side][0]}
            lines.append(f"| {row['workload']} | {side.replace('_', ' ')} | "
                         f"{median['throughput_tokens_per_s']:.1f} | "
                         f"{1e3 * median['ttft_p50_s']:.0f} | {1e3 * median['ttft_p95_s']:.0f} | "
                         f"{1e3 * median['tpot_mean_s']:.0f} | {median['e2e_p50_s']:.2f} |")
    lines += ["", "| workload | throughput HTTP / in process | within 10% | TTFT p50 HTTP - in "
              "process (ms) | within 20 ms | front end's own TTFT / ITL (ms) | CPU ms / token: "
              "engine in process / engine in the server / server event loop / client |",
              "|---|---:|---|---:|---|---|---|"]
    lines += [f"| {r['workload']} | {r['throughput_ratio']:.3f} | "
              f"{'yes' if r['throughput_within_10pct'] else 'NO'} | {r['ttft_p50_diff_ms']:+.1f} | "
              f"{'yes' if r['ttft_within_20ms'] else 'NO'} | {r['front_end_ttft_ms']:.1f} / "
              f"{r['front_end_itl_ms']:.2f} | {r['engine_cpu_ms_per_token']:.1f} / "
              f"{r['server_engine_cpu_ms_per_token']:.1f} / "
              f"{r['server_loop_cpu_ms_per_token']:.2f} / {r['client_cpu_ms_per_token']:.2f} |"
              for r in rows]
    lines += ["", "Front end's own share: the client's mean TTFT (ITL) minus the server's, "
              "measured by the engine loop from submission: HTTP, parsing, the thread hop and "
              "delivery. CPU per token: the engine in process and in the server, the server's "
              "event-loop thread "
              "(HTTP, parsing, detokenising, SSE; the engine has its own thread) and the "
              "client, measured per thread, so they hold whatever else the machine runs. The "
              "rest of any HTTP - in-process difference in time is contention (on a shared "
              "2-core machine the event loop's and the client's CPU compete with the engine's "
              "thread) and run-to-run noise (the medians alternate sides)."]
    write_results(args.results, "server_overhead", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
