import json
import random

import numpy as np
import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.routing_sources import PAPER_REUSE, MarkovRouting
from readmoe.serve.workload import (
    ARENA_OUTPUT,
    ARENA_PROMPT,
    arrival_times,
    load_trace,
    routed_prompts,
    synthetic_workload,
)


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 3.0])
def test_arrivals_follow_the_rate_and_burstiness(burstiness):
    times = arrival_times(20_000, 5.0, burstiness, np.random.default_rng(0))
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.03)
    # Gamma(shape k): squared coefficient of variation 1 / k (Poisson: 1)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.08)


def test_infinite_rate_sends_everything_at_once():
    assert not arrival_times(5, float("inf"), 1.0, np.random.default_rng(0)).any()


def test_lengths_match_chatbot_arena_means():
    rng = np.random.default_rng(1)
    prompts, outputs = ARENA_PROMPT.sample(rng, 40_000), ARENA_OUTPUT.sample(rng, 40_000)
    assert prompts.mean() == pytest.approx(52.3, rel=0.03)
    assert outputs.mean() == pytest.approx(189.5, rel=0.03)
    assert prompts.min() >= 1 and prompts.max() <= ARENA_PROMPT.max_len


def test_synthetic_workload_is_seeded_and_routed():
    routing = MarkovRouting(8)
    first = synthetic_workload(50, 2.0, routed_prompts(routing), seed=3)
    assert first == synthetic_workload(50, 2.0, routed_prompts(routing), seed=3)
    assert first != synthetic_workload(50, 2.0, routed_prompts(routing), seed=4)
    assert all(len(s.prompt.experts) == s.prompt.length for s in first)
    assert len({s.request_id for s in first}) == 50


def test_markov_routing_reuses_the_previous_expert_at_the_paper_rate():
    experts = MarkovRouting(8).extend([3], 40_000, random.Random(0))
    assert experts[0] == 3
    reuse = np.mean(np.diff(experts) == 0)
    assert reuse == pytest.approx(PAPER_REUSE, abs=0.01)


def _write(tmp_path, records):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records))
    return path


def test_trace_replay(tmp_path):
    path = _write(tmp_path, [
        {"arrival_time": 2.5, "prompt": "hello there", "max_tokens": 4},
        "",
        {"arrival_time": 0.5, "prompt": [5, 6, 7], "max_tokens": 2, "experts": [1, 1, 0],
         "id": "x"},
        {"arrival_time": 1, "prompt": "routed text", "max_tokens": 1, "experts": [2, 2]},
    ])
    specs = load_trace(path, tokenize=lambda text: [len(word) for word in text.split()])
    assert [s.request_id for s in specs] == ["x", "line-4", "line-1"]
    assert specs[0].prompt.experts == (1, 1, 0) and specs[0].prompt.tokens == (5, 6, 7)
    assert specs[2].prompt.tokens == (5, 5) and specs[2].prompt.text == "hello there"
    untokenized = _write(tmp_path, [{"arrival_time": 0, "prompt": "a b c", "max_tokens": 1,
                                     "experts": [0, 1]}])
    assert load_trace(untokenized)[0].prompt.length == 2  # no tokenizer: the experts' length


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "invalid JSON"),
    ({"arrival_time": 0, "prompt": "a"}, "missing fields \\['max_tokens'\\]"),
    ({"arrival_time": 0, "prompt": "a", "max_tokens": 1, "temp": 1}, "unknown fields"),
    ({"arrival_time": -1, "prompt": "a", "max_tokens": 1, "experts": [0]}, "arrival_time"),
    ({"arrival_time": 0, "prompt": "a", "max_tokens": 0, "experts": [0]}, "max_tokens"),
    ({"arrival_time": 0, "prompt": "ab", "max_tokens": 1}, "needs a tokenizer"),
    ({"arrival_time": 0, "prompt": [1, 2], "max_tokens": 1, "experts": [0]}, "'experts' has 1"),
    ({"arrival_time": 0, "prompt": [1, -2], "max_tokens": 1}, "non-negative"),
    ({"arrival_time": 0, "prompt": 7, "max_tokens": 1}, "text or a list"),
    ({"arrival_time": 0, "prompt": "a", "max_tokens": 1, "experts": [0], "id": "line-1"},
     "duplicate request id"),
])
def test_trace_errors_name_the_line(tmp_path, line, message):
    path = _write(tmp_path, [{"arrival_time": 0, "prompt": [1], "max_tokens": 1}, line])
    with pytest.raises(ReadmoeError, match=f"trace.jsonl:2: .*{message}"):
        load_trace(path)


def test_trace_file_errors(tmp_path):
    with pytest.raises(ReadmoeError, match="cannot read trace"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(ReadmoeError, match="no requests"):
        load_trace(_write(tmp_path, ["", "  "]))
