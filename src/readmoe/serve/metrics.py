"""Serving metrics from finished requests and step reports: JSON-ready numbers and plots.

Per request (vLLM's definitions): TTFT = first output time - arrival; ITL = gaps between
consecutive outputs; TPOT = (last - first output) / (outputs - 1), for requests with two or
more outputs; end-to-end = last output - arrival; normalized latency = end-to-end / outputs
(the paper's metric). Aggregates: mean, p50, p95, p99 (linear interpolation); throughput over
the span from the first arrival to the last output; the mean number of distinct experts per
step; the mean number of steps a request waited with a token ready (what a scheduler's choices
cost it); the cache counters; and the fraction of expert-load time that prefetching hid from the
compute stream (``1 - stall / load``; 0 on demand, None when nothing was loaded).

Files are written atomically (temporary file, then ``os.replace``), so a reader never sees a
half-written result.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from readmoe.errors import ReadmoeError
from readmoe.serve.experts import CacheStats
from readmoe.serve.types import Request, StepReport


@dataclass(frozen=True)
class RequestMetrics:
    request_id: str
    prompt_len: int
    output_len: int
    ttft: float
    tpot: float | None
    itl: tuple[float, ...]
    e2e: float
    normalized: float


def request_metrics(request: Request) -> RequestMetrics:
    """Latencies of one request from its arrival and output times."""
    times = request.output_times
    if not times:
        raise ReadmoeError(f"request {request.request_id} produced no output to measure")
    e2e = times[-1] - request.arrival_time
    return RequestMetrics(
        request_id=request.request_id, prompt_len=request.prompt_len, output_len=len(times),
        ttft=times[0] - request.arrival_time,
        tpot=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
        itl=tuple(b - a for a, b in zip(times, times[1:], strict=False)),
        e2e=e2e, normalized=e2e / len(times))


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and p50/p95/p99 of ``values`` (all None when there are none)."""
    if not len(values):
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    array = np.asarray(values, dtype=float)
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"mean": float(array.mean()), "p50": float(p50), "p95": float(p95),
            "p99": float(p99)}


def aggregate(requests: Sequence[Request], steps: Sequence[StepReport],
              cache: CacheStats | None = None) -> dict:
    """All serving metrics of a run as a JSON-ready dict."""
    per_request = [request_metrics(r) for r in requests]
    outputs = sum(m.output_len for m in per_request)
    span = (max(r.output_times[-1] for r in requests)
            - min(r.arrival_time for r in requests)) if requests else 0.0
    load = sum(s.load_s for s in steps)
    stall = sum(s.stall_s for s in steps)
    return {
        "requests": len(per_request),
        "output_tokens": outputs,
        "duration_s": span,
        "throughput_tokens_per_s": outputs / span if span > 0 else None,
        "throughput_requests_per_s": len(per_request) / span if span > 0 else None,
        "ttft_s": summarize([m.ttft for m in per_request]),
        "tpot_s": summarize([m.tpot for m in per_request if m.tpot is not None]),
        "itl_s": summarize([gap for m in per_request for gap in m.itl]),
        "e2e_s": summarize([m.e2e for m in per_request]),
        "normalized_latency_s": summarize([m.normalized for m in per_request]),
        "steps": len(steps),
        "waited_steps_per_request": (float(np.mean([r.total_waited for r in requests]))
                                     if requests else None),
        "tokens_per_step": float(np.mean([s.num_tokens for s in steps])) if steps else None,
        "distinct_experts_per_step": (float(np.mean([s.distinct_experts for s in steps]))
                                      if steps else None),
        "cache": cache.to_dict() if cache is not None else None,
        "load_s": load,
        "stall_s": stall,
        "load_hidden_fraction": max(0.0, 1.0 - stall / load) if load > 0 else None,
    }


def write_json(path: str | Path, result: Mapping) -> None:
    """Write ``result`` as JSON, atomically."""
    from readmoe.io import atomic_write_json  # readmoe.io imports torch: only load it to write

    atomic_write_json(path, result)


def _figure():
    try:
        import matplotlib
    except ImportError as exc:
        raise ReadmoeError("plots need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4), dpi=120)


def _save(plt, fig, path: str | Path) -> None:
    from readmoe.io import atomic_write_bytes

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_latency_cdf(path: str | Path, series: Mapping[str, Sequence[float]],
                     xlabel: str = "normalized latency (s / token)") -> None:
    """A PNG with one empirical CDF per named series (e.g. per scheduler or policy)."""
    plt, fig, ax = _figure()
    for name, values in series.items():
        ordered = np.sort(np.asarray(values, dtype=float))
        ax.step(ordered, np.arange(1, len(ordered) + 1) / max(len(ordered), 1), where="post",
                label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path)


def plot_hit_ratio(path: str | Path, series: Mapping[str, Mapping[int, float]]) -> None:
    """A PNG of hit ratio against cache capacity, one line per named policy."""
    plt, fig, ax = _figure()
    for name, by_capacity in series.items():
        capacities = sorted(by_capacity)
        ax.plot(capacities, [by_capacity[c] for c in capacities], marker="o", label=name)
    ax.set_xticks(sorted({c for by_capacity in series.values() for c in by_capacity}))
    ax.set_xlabel("cache capacity (experts per layer)")
    ax.set_ylabel("hit ratio")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path)
