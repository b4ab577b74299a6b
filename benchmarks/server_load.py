"""A bounded load-and-fault run of `readmoe serve` on loopback.

The server (a trained ReadME model, routed experts offloaded to a RAM tier of ``--capacity``
per layer, an API key, ``--max-seqs`` sequences a step, ``--max-queue`` requests allowed to
wait before 503, small enough that the overload meets back-pressure) gets ``--waves``
waves of ``--requests`` requests each, sent faster than it can serve (Poisson arrivals at
``--rate``), over httpx from this process:

- 80% valid: streamed and non-streamed completions and chats, ``ignore_eos`` so each must
  return exactly its ``max_tokens``; a 503 (queue full) is retried after its Retry-After;
- 10% disconnect mid-stream after a few tokens (the server must abort them at once);
- 10% bad: malformed JSON, unsupported or out-of-range fields (400), a wrong or missing key
  (401).

Checked, and written to results/server_load.{json,md}: every valid request completed exactly
once with all its tokens (one finish, one ``[DONE]``); every bad one got its 4xx; the
server's own counters agree (finished by reason, aborts); afterwards no KV block is held or
reserved, no request runs or waits, and the resident experts stay within the fast tier's
slots; the server's resident memory (VmRSS of the pid we started) after each wave; /health
answered throughout (probed every 0.2 s, worst latency reported). Throughput and latency
percentiles are the valid streamed requests'.

    .venv/bin/python benchmarks/server_load.py [--model DIR] [--requests 300] [--waves 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from readmoe.io import command_line, write_results
from readmoe.serve.metrics import summarize
from readmoe.server.process import ServerProcess
from readmoe.train.rounds import final_model_dir

KEY = "sk-load-test"
DEMO_RUN = Path("runs/demo/train-readme")
BAD_BODIES = [  # (a /v1/completions body, or raw bytes; the status it must get)
    (b"{not json", 400),
    ({"prompt": "x", "max_tokens": 4}, 400),  # no model
    ({"model": "readme", "prompt": "x", "max_tokens": 4, "n": 3}, 400),
    ({"model": "readme", "prompt": "x", "max_tokens": 4, "temperature": 9}, 400),
    ({"model": "readme", "prompt": "x", "max_tokens": 4, "logprobs": 1}, 400),
    ({"model": "readme", "prompt": "x", "max_tokens": 100000}, 400),  # beyond the context
]


@dataclass
class Outcome:
    kind: str  # valid | disconnect | bad
    status: int | None = None
    expected_status: int | None = None
    tokens: int = 0
    expected_tokens: int = 0
    finishes: int = 0
    done_events: int = 0
    retries: int = 0
    arrival: float = 0.0
    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.kind == "bad":
            return self.status == self.expected_status
        if self.kind == "disconnect":
            return self.status == 200 and self.error is None
        return (self.status == 200 and self.tokens == self.expected_tokens
                and self.finishes == 1 and self.error is None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"a trained ReadME folder (default: last round of {DEMO_RUN})")
    parser.add_argument("--requests", type=int, default=300, help="requests per wave")
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--rate", type=float, default=40.0, help="arrivals per second")
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=32,
                        help="small enough that the overload meets back-pressure (503)")
    parser.add_argument("--capacity", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, nargs=2, default=[8, 24],
                        help="range of each valid request's output length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="results")
    return parser.parse_args()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def scrape(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


PROMPTS = ["The court held that the contract", "In the beginning of the nineteenth century",
           "def parse_args(argv):\n    parser =", "The patients were randomly assigned to",
           "Shares in the company fell sharply after", "Photosynthesis is the process by which"]


def plan_wave(count: int, rate: float, rng: random.Random, lengths: tuple[int, int]) -> list:
    """(arrival, kind, request details) for one wave."""
    plan, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        roll = rng.random()
        kind = "valid" if roll < 0.8 else "disconnect" if roll < 0.9 else "bad"
        plan.append((t, kind, {"chat": rng.random() < 0.5, "stream": rng.random() < 0.8,
                               "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(*lengths),
                               "cut_after": rng.randint(1, 3), "bad": rng.randrange(8)}))
    return plan


def body_for(detail: dict, stream: bool) -> tuple[str, dict]:
    common = {"model": "readme", "max_tokens": detail["max_tokens"], "temperature": 0,
              "ignore_eos": True, "stream": stream}
    if stream:
        common["stream_options"] = {"include_usage": True}
    if detail["chat"]:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user",
                                                                "content": detail["prompt"]}]}
    return "/v1/completions", {**common, "prompt": detail["prompt"]}


async def run_valid(client: httpx.AsyncClient, url: str, detail: dict, out: Outcome,
                    cut_after: int | None, streams: list[int]) -> None:
    stream = detail["stream"] or cut_after is not None
    path, body = body_for(detail, stream)
    out.expected_tokens = detail["max_tokens"]
    headers = {"Authorization": f"Bearer {KEY}"}
    for _ in range(120):  # bounded retries on 503
        if not stream:
            response = await client.post(url + path, json=body, headers=headers)
            out.status = response.status_code
            if response.status_code == 503:
                out.retries += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            data = response.json()
            out.times.append(time.perf_counter())
            out.tokens = data["usage"]["completion_tokens"]
            out.finishes = int(data["choices"][0]["finish_reason"] == "length")
            return
        async with client.stream("POST", url + path, json=body, headers=headers) as response:
            out.status = response.status_code
            if response.status_code == 503:
                out.retries += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            streams[0] += 1
            streams[1] = max(streams[1], streams[0])
            try:
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        out.done_events += 1
                        continue
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        out.error = event["error"]["message"]
                        continue
                    if not event["choices"]:
                        out.tokens = event["usage"]["completion_tokens"]
                        continue
                    choice = event["choices"][0]
                    if "delta" in choice and "role" in choice["delta"]:
                        continue  # the role event carries no token
                    out.times.append(time.perf_counter())
                    out.finishes += choice["finish_reason"] is not None
                    if cut_after is not None and len(out.times) >= cut_after:
                        return  # leaving the block closes the connection mid-stream
            finally:
                streams[0] -= 1
            if out.done_events != 1:
                out.error = f"{out.done_events} [DONE] events"
            return
    out.error = "still 503 after 120 retries"


async def run_bad(client: httpx.AsyncClient, url: str, detail: dict, out: Outcome) -> None:
    choice = detail["bad"]
    if choice >= len(BAD_BODIES):  # a key problem
        headers = {} if choice % 2 else {"Authorization": "Bearer wrong-key"}
        response = await client.post(url + "/v1/completions", headers=headers,
                                     json={"model": "readme", "prompt": "x", "max_tokens": 2})
        out.expected_status = 401
    else:
        body, out.expected_status = BAD_BODIES[choice]
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await client.post(url + "/v1/completions", content=payload, headers=headers)
    out.status = response.status_code
    error = response.json().get("error", {})
    if not {"message", "type", "param", "code"} <= set(error):
        out.error = f"not an OpenAI error body: {response.text[:200]}"


async def one(client, url, arrival, kind, detail, start, streams) -> Outcome:
    await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
    out = Outcome(kind, arrival=time.perf_counter())
    try:
        if kind == "bad":
            await run_bad(client, url, detail, out)
        else:
            await run_valid(client, url, detail, out,
                            detail["cut_after"] if kind == "disconnect" else None, streams)
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def probe(client: httpx.AsyncClient, url: str, stop: asyncio.Event, log: dict) -> None:
    """/health every 0.2 s and /metrics every 0.5 s while the wave runs."""
    last_metrics = 0.0
    while not stop.is_set():
        started = time.perf_counter()
        try:
            ok = (await client.get(url + "/health", timeout=10)).status_code == 200
        except httpx.HTTPError:
            ok = False
        log["health_probes"] += 1
        log["health_failures"] += not ok
        log["health_worst_s"] = max(log["health_worst_s"], time.perf_counter() - started)
        if time.perf_counter() - last_metrics > 0.5:
            last_metrics = time.perf_counter()
            values = scrape((await client.get(url + "/metrics", timeout=10)).text)
            log["max_running"] = max(log["max_running"], values["readmoe_requests_running"])
            log["max_waiting"] = max(log["max_waiting"], values["readmoe_requests_waiting"])
            log["max_slots_resident"] = max(log["max_slots_resident"],
                                            values["readmoe_expert_slots_resident"])
            log["rss_mib"].append(rss_mib(log["pid"]))
        await asyncio.sleep(0.2)


async def wave(url: str, plan: list, pid: int) -> tuple[list[Outcome], dict, float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(connect=30.0, read=120.0, write=30.0, pool=None)
    log = {"pid": pid, "health_probes": 0, "health_failures": 0, "health_worst_s": 0.0,
           "max_running": 0.0, "max_waiting": 0.0, "max_slots_resident": 0.0, "rss_mib": []}
    streams = [0, 0]  # open now, most at once
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        stop = asyncio.Event()
        prober = asyncio.create_task(probe(client, url, stop, log))
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(one(client, url, a, k, d, start, streams)
                                          for a, k, d in plan))
        elapsed = time.perf_counter() - start
        stop.set()
        await prober
    log["max_open_streams"] = streams[1]
    return outcomes, log, elapsed


def settle(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    """The server's counters once nothing runs or waits (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = scrape(httpx.get(url + "/metrics", timeout=10).text)
        idle = values["readmoe_requests_running"] == 0 and values["readmoe_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            return values


def wave_report(outcomes: list[Outcome], log: dict, elapsed: float, after: dict,
                before: dict, rss: float) -> dict:
    def count(kind: str) -> int:
        return sum(o.kind == kind for o in outcomes)

    valid = [o for o in outcomes if o.kind == "valid"]
    timed = [o for o in valid if len(o.times) > 1]
    tokens = sum(o.tokens for o in valid)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    finished = delta('readmoe_requests_finished_total{reason="length"}')
    return {
        "requests": len(outcomes), "valid": count("valid"), "disconnect": count("disconnect"),
        "bad": count("bad"), "failed_checks": [o.__dict__ for o in outcomes if not o.ok][:5],
        "all_ok": all(o.ok for o in outcomes),
        "valid_completed_exactly_once": sum(o.ok for o in valid),
        "bad_statuses": sorted({o.status for o in outcomes if o.kind == "bad"}),
        "retries_on_503": sum(o.retries for o in outcomes),
        "server_finished_length": finished,
        "server_aborts": delta('readmoe_requests_finished_total{reason="abort"}'),
        "kv_blocks_in_use_after": after["readmoe_kv_blocks_in_use"],
        "kv_blocks_reserved_after": after["readmoe_kv_blocks_reserved"],
        "running_after": after["readmoe_requests_running"],
        "waiting_after": after["readmoe_requests_waiting"],
        "expert_slots": {"max_resident": log["max_slots_resident"],
                         "after": after["readmoe_expert_slots_resident"],
                         "total": after["readmoe_expert_slots_total"]},
        "expert_cache": {k: delta(f"readmoe_expert_cache_{k}_total") for k in ("hits", "misses")},
        "rss_mib_after": rss, "rss_mib_max_during": max(log["rss_mib"], default=rss),
        "health": {k: log[k] for k in ("health_probes", "health_failures", "health_worst_s")},
        "max_open_streams": log["max_open_streams"], "max_running": log["max_running"],
        "max_waiting": log["max_waiting"],
        "duration_s": elapsed, "valid_tokens": tokens,
        "throughput_tokens_per_s": tokens / elapsed,
        "throughput_requests_per_s": len(valid) / elapsed,
        "ttft_s": summarize([o.times[0] - o.arrival for o in timed]),
        "itl_s": summarize([b - a for o in timed for a, b in zip(o.times, o.times[1:],
                                                                 strict=False)]),
        "e2e_s": summarize([o.times[-1] - o.arrival for o in valid if o.times]),
    }


def markdown(result: dict) -> str:
    w = result["waves"]
    lines = ["# readmoe serve under load and faults (loopback)", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}  ",
             f"Server: `{result['server']}`", "",
             "| wave | requests (valid / cut / bad) | all checks | valid exactly once | bad "
             "statuses | 503 retries | server aborts | max open streams | max running | "
             "tokens/s | TTFT p50 / p95 (s) | ITL p50 / p95 (s) | e2e p50 / p99 (s) | KV after "
             "| RSS after (MiB) | /health fails (worst s) |",
             "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---|---|---|---|---:|---|"]
    for i, r in enumerate(w):
        lines.append(
            f"| {i + 1} | {r['requests']} ({r['valid']} / {r['disconnect']} / {r['bad']}) | "
            f"{'pass' if r['all_ok'] else 'FAIL'} | {r['valid_completed_exactly_once']} | "
            f"{r['bad_statuses']} | {r['retries_on_503']} | {r['server_aborts']:.0f} | "
            f"{r['max_open_streams']} | {r['max_running']:.0f} | "
            f"{r['throughput_tokens_per_s']:.1f} | {r['ttft_s']['p50']:.2f} / "
            f"{r['ttft_s']['p95']:.2f} | {r['itl_s']['p50']:.3f} / {r['itl_s']['p95']:.3f} | "
            f"{r['e2e_s']['p50']:.2f} / {r['e2e_s']['p99']:.2f} | "
            f"{r['kv_blocks_in_use_after']:.0f} used, {r['kv_blocks_reserved_after']:.0f} "
            f"reserved | {r['rss_mib_after']:.0f} | {r['health']['health_failures']} of "
            f"{r['health']['health_probes']} ({r['health']['health_worst_s']:.2f}) |")
    lines += ["", f"RSS after warm-up {result['rss_mib_warm']:.0f} MiB; after each wave "
              + ", ".join(f"{r['rss_mib_after']:.0f}" for r in w) + " MiB. Expert slots resident"
              f" at most {max(r['expert_slots']['max_resident'] for r in w):.0f} of "
              f"{w[0]['expert_slots']['total']:.0f}. Load average before / after: "
              f"{result['loadavg'][0]} / {result['loadavg'][1]} (the machine is shared).",
              "", f"Verdict: {'PASS' if result['pass'] else 'FAIL'} ({result['verdict']})."]
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    model = args.model or str(final_model_dir(DEMO_RUN))
    flags = ["--served-model-name", "readme", "--api-key", KEY, "--max-seqs",
             str(args.max_seqs), "--max-queue", str(args.max_queue), "--capacity",
             str(args.capacity), "--tier", "ram", "--scheduler", "expert-aware", "--device",
             "cpu"]
    rng = random.Random(args.seed)
    loadavg = [os.getloadavg()]
    with ServerProcess(model, *flags) as server:
        warm = plan_wave(32, args.rate, rng, tuple(args.max_tokens))
        asyncio.run(wave(server.url, [p for p in warm if p[1] == "valid"], server.pid))
        before = settle(server.url)
        rss_warm = rss_mib(server.pid)
        waves = []
        for _ in range(args.waves):
            plan = plan_wave(args.requests, args.rate, rng, tuple(args.max_tokens))
            outcomes, log, elapsed = asyncio.run(wave(server.url, plan, server.pid))
            after = settle(server.url)
            waves.append(wave_report(outcomes, log, elapsed, after, before, rss_mib(server.pid)))
            print(json.dumps({k: v for k, v in waves[-1].items() if k != "failed_checks"}),
                  flush=True)
            before = after
        status = server.stop()
    loadavg.append(os.getloadavg())
    growth = waves[-1]["rss_mib_after"] - waves[0]["rss_mib_after"]
    checks = {
        "every wave's checks pass": all(w["all_ok"] for w in waves),
        "server counted every valid finish": all(
            w["server_finished_length"] == w["valid"] for w in waves),
        "server aborted every cut stream": all(w["server_aborts"] == w["disconnect"]
                                               for w in waves),
        "nothing held afterwards": all(
            w["kv_blocks_in_use_after"] == w["kv_blocks_reserved_after"] == w["running_after"]
            == w["waiting_after"] == 0 for w in waves),
        "expert slots within the fast tier": all(
            w["expert_slots"]["max_resident"] <= w["expert_slots"]["total"] for w in waves),
        ">= 64 concurrent streams": max(w["max_open_streams"] for w in waves) >= 64,
        "/health always answered": all(w["health"]["health_failures"] == 0 for w in waves),
        "RSS flat (last wave within 5% of the first)": abs(growth) <= 0.05 * waves[0][
            "rss_mib_after"],
        "clean exit on SIGTERM": status == 0,
    }
    failed = [name for name, ok in checks.items() if not ok]
    result = {"command": command_line(), "model": model,
              "machine": f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}",
              "server": "readmoe serve " + " ".join([model, *flags]), "args": vars(args),
              "loadavg": [round(x[0], 2) for x in loadavg], "rss_mib_warm": rss_warm,
              "waves": waves, "checks": checks, "pass": not failed,
              "verdict": "all checks hold" if not failed else "failed: " + ", ".join(failed),
              "rss_growth_mib": growth, "exit_status": status,
              "mean_tokens_per_s": float(np.mean([w["throughput_tokens_per_s"]
                                                  for w in waves]))}
    write_results(args.results, "server_load", result, markdown(result))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
