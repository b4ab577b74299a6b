"""`bench serve --endpoint URL`: replay a workload against a running server over HTTP.

vLLM's `bench serve` conventions: every request is sent at its arrival time (no client-side
concurrency cap), streamed from /v1/completions with ``ignore_eos`` so it produces exactly
its ``max_tokens``, greedy. A request's arrival is when it was due to be sent, so time the
client spent waiting counts against the server, as in process. Each streamed event carries
one token (the server sends one per engine step), so its receive time is that token's output
time, and the same ``serve.metrics.aggregate`` computes TTFT / TPOT / ITL / end-to-end /
normalized latency and throughput as the in-process `bench serve` does. The server's
expert-cache counters over the run come from scraping /metrics before and after.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter

import httpx

from readmoe.errors import ReadmoeError
from readmoe.serve.metrics import aggregate
from readmoe.serve.types import UNKNOWN_EXPERT, Request
from readmoe.serve.workload import RequestSpec

CACHE_METRICS = {"hits": "readmoe_expert_cache_hits_total",
                 "misses": "readmoe_expert_cache_misses_total",
                 "bytes_moved": "readmoe_expert_bytes_loaded_total"}


@dataclass
class _Result:
    spec: RequestSpec
    arrival: float
    prompt_len: int
    times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    error: str | None = None


def base_url(endpoint: str) -> str:
    """The server's root URL from what a user may paste: root, /v1, or /v1/completions."""
    url = endpoint.rstrip("/")
    for suffix in ("/v1/completions", "/v1/chat/completions", "/v1"):
        url = url.removesuffix(suffix)
    if not url.startswith(("http://", "https://")):
        raise ReadmoeError(f"--endpoint {endpoint!r} is not an http(s) URL; give the server's "
                           "address, e.g. http://127.0.0.1:8000")
    return url


async def _send(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec,
                due: float, headers: dict) -> _Result:
    await asyncio.sleep(max(0.0, due - perf_counter()))
    prompt = list(spec.prompt.tokens) if spec.prompt.tokens is not None else spec.prompt.text
    body = {"model": model, "prompt": prompt, "max_tokens": spec.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result = _Result(spec, due, len(prompt) if spec.prompt.tokens is not None
                     else spec.prompt.length)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body,
                                 headers=headers) as response:
            if response.status_code != 200:
                result.error = f"{response.status_code} {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    result.error = event["error"].get("message", "error event")
                elif event.get("choices"):
                    result.times.append(perf_counter())
                elif event.get("usage"):
                    result.completion_tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _scrape(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    response = await client.get(f"{url}/metrics")
    values = {}
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        if name in CACHE_METRICS.values():
            values[name] = float(value)
    return values


async def _replay(url: str, model: str, specs: Sequence[RequestSpec], api_key: str | None
                  ) -> tuple[list[_Result], float, dict]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(connect=30.0, read=None, write=30.0, pool=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        try:
            health = await client.get(f"{url}/health")
        except httpx.HTTPError as exc:
            raise ReadmoeError(f"no server answers at {url} ({exc}); start one with "
                               "`readmoe serve MODEL`") from None
        if health.status_code != 200:
            raise ReadmoeError(f"the server at {url} is not healthy: {health.text}")
        before = await _scrape(client, url)
        start = perf_counter()
        results = await asyncio.gather(*(_send(client, url, model, spec,
                                               start + spec.arrival_time, headers)
                                         for spec in specs))
        after = await _scrape(client, url)
    cache = {key: int(after.get(name, 0) - before.get(name, 0))
             for key, name in CACHE_METRICS.items()}
    return results, start, cache


def replay_http(endpoint: str, model: str, specs: Sequence[RequestSpec],
                api_key: str | None = None) -> dict:
    """Replay ``specs`` against the server at ``endpoint``; the same metrics as in process,
    plus the failed requests and the server's expert-cache counters over the run."""
    url = base_url(endpoint)
    results, start, cache = asyncio.run(_replay(url, model, specs, api_key))
    done, failed = [], []
    for r in results:
        if r.error is not None or not r.times:
            failed.append({"request_id": r.spec.request_id, "error": r.error or "no tokens"})
            continue
        request = Request(r.spec.request_id, r.arrival - start, [UNKNOWN_EXPERT] * r.prompt_len,
                          r.spec.max_tokens)
        request.output_times = [t - start for t in r.times]
        done.append(request)
    metrics = aggregate(done, [])
    metrics.update(steps=None, tokens_per_step=None, distinct_experts_per_step=None,
                   load_s=None, stall_s=None, load_hidden_fraction=None)
    accesses = cache["hits"] + cache["misses"]
    metrics["cache"] = ({**cache, "hit_ratio": cache["hits"] / accesses} if accesses else None)
    short = sum(1 for r in results if r.error is None and r.completion_tokens is not None
                and r.completion_tokens != len(r.times))
    return {"endpoint": url, **metrics, "failed": len(failed), "errors": failed[:10],
            "token_count_mismatches": short}
