"""Serving workloads: synthetic Chatbot-Arena-like requests, or a replayed JSONL trace.

Arrivals follow vLLM's benchmark convention: gaps between requests are Gamma distributed with
shape ``burstiness`` and mean ``1 / request_rate`` (burstiness 1 is a Poisson process; below 1
burstier, above 1 more regular); the first request arrives at time 0; an infinite rate sends
everything at 0.

Lengths follow the paper's Chatbot Arena means (52.3 prompt and 189.5 response tokens). The
paper gives no spread, so we choose lognormals with sigma 1.0 (prompts: heavy-tailed, median
~32) and 0.7 (responses: median ~148), with ``mu = ln(mean) - sigma^2 / 2`` so the unclipped
mean is exact, rounded and clipped to ``[1, max_len]``.

Prompts come from a provider callable ``(length, rng) -> Prompt``: the real engine's gives
tokenised (and routed) text from the domain corpora; ``routed_prompts`` gives expert ids only,
from a routing source, for the simulator.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from readmoe.errors import ReadmoeError
from readmoe.serve.routing_sources import RoutingSource


@dataclass(frozen=True)
class Prompt:
    """A prompt of ``length`` tokens: token ids and/or text for an engine, experts if routed."""

    length: int
    tokens: tuple[int, ...] | None = None
    text: str | None = None
    experts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ReadmoeError("a prompt needs at least one token")
        for name, ids in (("tokens", self.tokens), ("experts", self.experts)):
            if ids is not None and len(ids) != self.length:
                raise ReadmoeError(f"prompt has {len(ids)} {name} for {self.length} tokens")


@dataclass(frozen=True)
class RequestSpec:
    request_id: str
    arrival_time: float
    prompt: Prompt
    max_tokens: int


PromptProvider = Callable[[int, random.Random], Prompt]


@dataclass(frozen=True)
class LengthModel:
    """Lognormal lengths with a given mean, rounded and clipped to ``[1, max_len]``."""

    mean: float
    sigma: float
    max_len: int

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        mu = math.log(self.mean) - self.sigma ** 2 / 2
        lengths = np.rint(rng.lognormal(mu, self.sigma, count))
        return np.clip(lengths, 1, self.max_len).astype(np.int64)


ARENA_PROMPT = LengthModel(mean=52.3, sigma=1.0, max_len=2048)
ARENA_OUTPUT = LengthModel(mean=189.5, sigma=0.7, max_len=2048)


def arrival_times(count: int, request_rate: float, burstiness: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Arrival times in seconds of ``count`` requests (vLLM's Gamma process, module docs)."""
    if request_rate <= 0 or burstiness <= 0:
        raise ReadmoeError("request rate and burstiness must be positive")
    if math.isinf(request_rate):
        return np.zeros(count)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=count)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if count else np.zeros(0)


def routed_prompts(routing: RoutingSource) -> PromptProvider:
    """A provider of expert-only prompts drawn from ``routing`` (for the simulator)."""
    def provide(length: int, rng: random.Random) -> Prompt:
        return Prompt(length=length, experts=tuple(routing.extend((), length, rng)))
    return provide


def synthetic_workload(num_requests: int, request_rate: float, provider: PromptProvider, *,
                       burstiness: float = 1.0, seed: int = 0,
                       prompt_lengths: LengthModel = ARENA_PROMPT,
                       output_lengths: LengthModel = ARENA_OUTPUT) -> list[RequestSpec]:
    """``num_requests`` requests with Gamma arrivals and lognormal lengths, all from ``seed``."""
    rng = np.random.default_rng(seed)
    times = arrival_times(num_requests, request_rate, burstiness, rng)
    prompt_lens = prompt_lengths.sample(rng, num_requests)
    output_lens = output_lengths.sample(rng, num_requests)
    prompt_rng = random.Random(seed)
    return [RequestSpec(request_id=f"req-{i}", arrival_time=float(times[i]),
                        prompt=provider(int(prompt_lens[i]), prompt_rng),
                        max_tokens=int(output_lens[i]))
            for i in range(num_requests)]


_TRACE_FIELDS = {"id", "arrival_time", "prompt", "max_tokens", "experts"}


def _ids(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"'{what}' must be a non-empty list of non-negative integers")
    return tuple(value)


def _trace_record(record: object, line: int,
                  tokenize: Callable[[str], Sequence[int]] | None) -> RequestSpec:
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    unknown = set(record) - _TRACE_FIELDS
    missing = {"arrival_time", "prompt", "max_tokens"} - set(record)
    if unknown or missing:
        raise ValueError(f"unknown fields {sorted(unknown)}, missing fields {sorted(missing)} "
                         f"(allowed: {sorted(_TRACE_FIELDS)})")
    arrival, max_tokens = record["arrival_time"], record["max_tokens"]
    if isinstance(arrival, bool) or not isinstance(arrival, int | float) or not (
            math.isfinite(arrival) and arrival >= 0):
        raise ValueError("'arrival_time' must be a finite number of seconds >= 0")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("'max_tokens' must be an integer >= 1")
    experts = _ids(record["experts"], "experts") if "experts" in record else None
    text, tokens = record["prompt"], None
    if isinstance(text, str):
        if not text:
            raise ValueError("'prompt' is empty")
        if tokenize is not None:
            tokens = tuple(tokenize(text))
        elif experts is None:
            raise ValueError("a text prompt needs a tokenizer or an 'experts' list to know its "
                             "length")
    elif isinstance(text, list):
        tokens, text = _ids(text, "prompt"), None
    else:
        raise ValueError("'prompt' must be text or a list of token ids")
    length = len(tokens) if tokens is not None else len(experts)
    if experts is not None and len(experts) != length:
        raise ValueError(f"'experts' has {len(experts)} ids for a prompt of {length} tokens")
    request_id = record.get("id", f"line-{line}")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("'id' must be a non-empty string")
    return RequestSpec(request_id=request_id, arrival_time=float(arrival),
                       prompt=Prompt(length=length, tokens=tokens, text=text, experts=experts),
                       max_tokens=max_tokens)


def load_trace(path: str | Path,
               tokenize: Callable[[str], Sequence[int]] | None = None) -> list[RequestSpec]:
    """Read a JSONL trace, one request per line, sorted by arrival time.

    Fields: ``arrival_time`` (seconds, >= 0), ``prompt`` (text, or a list of token ids),
    ``max_tokens`` (>= 1), optional ``experts`` (one id per prompt token) and ``id``. A text
    prompt is tokenised with ``tokenize``, or takes its length from ``experts``. Errors name
    the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ReadmoeError(f"cannot read trace {path}: {exc.strerror}") from exc
    specs, seen = [], set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            spec = _trace_record(json.loads(text), number, tokenize)
        except json.JSONDecodeError as exc:
            raise ReadmoeError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        except (ValueError, ReadmoeError) as exc:
            raise ReadmoeError(f"{path}:{number}: {exc}") from exc
        if spec.request_id in seen:
            raise ReadmoeError(f"{path}:{number}: duplicate request id {spec.request_id!r}")
        seen.add(spec.request_id)
        specs.append(spec)
    if not specs:
        raise ReadmoeError(f"{path}: the trace holds no requests")
    return sorted(specs, key=lambda s: s.arrival_time)
