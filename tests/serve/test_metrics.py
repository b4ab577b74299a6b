import json

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.experts import CacheStats
from readmoe.serve.metrics import (
    aggregate,
    plot_hit_ratio,
    plot_latency_cdf,
    request_metrics,
    summarize,
    write_json,
)
from readmoe.serve.types import Request, StepReport


def _request(request_id, arrival, times):
    request = Request(request_id, arrival, [0, 1], max_tokens=max(1, len(times)))
    request.output_times = list(times)
    return request


def test_request_metrics():
    m = request_metrics(_request("a", 1.0, [2.0, 2.5, 3.5]))
    assert (m.ttft, m.tpot, m.itl, m.e2e) == (1.0, 0.75, (0.5, 1.0), 2.5)
    assert m.normalized == pytest.approx(2.5 / 3)
    assert request_metrics(_request("b", 0.0, [4.0])).tpot is None
    with pytest.raises(ReadmoeError, match="no output"):
        request_metrics(_request("c", 0.0, []))


def test_summarize():
    assert summarize([]) == {"mean": None, "p50": None, "p95": None, "p99": None}
    stats = summarize(list(range(101)))
    assert stats == {"mean": 50.0, "p50": 50.0, "p95": 95.0, "p99": 99.0}


def test_aggregate_is_json_ready():
    requests = [_request("a", 1.0, [2.0, 2.5, 3.5]), _request("b", 0.0, [4.0])]
    steps = [StepReport(0, 0.0, 1.0, 10, 2, 3, load_s=0.4, stall_s=0.1),
             StepReport(1, 1.0, 2.0, 6, 2, 1, load_s=0.0, stall_s=0.0)]
    result = aggregate(requests, steps, CacheStats(hits=3, misses=1, evictions=0,
                                                   bytes_moved=10))
    json.dumps(result)
    assert result["output_tokens"] == 4 and result["duration_s"] == 4.0
    assert result["throughput_tokens_per_s"] == 1.0
    assert result["distinct_experts_per_step"] == 2.0
    assert result["cache"]["hit_ratio"] == 0.75
    assert result["load_hidden_fraction"] == pytest.approx(0.75)
    assert result["tpot_s"]["mean"] == 0.75  # only requests with two or more outputs
    assert aggregate([], [])["load_hidden_fraction"] is None


def test_files_are_written_whole(tmp_path):
    write_json(tmp_path / "run.json", {"x": 1})
    assert json.loads((tmp_path / "run.json").read_text()) == {"x": 1}
    pytest.importorskip("matplotlib")
    plot_latency_cdf(tmp_path / "cdf.png", {"fcfs": [0.1, 0.3, 0.2], "expert-aware": [0.1]})
    plot_hit_ratio(tmp_path / "hit.png", {"lru": {2: 0.3, 3: 0.5}, "belady": {2: 0.4, 3: 0.6}})
    for name in ("cdf.png", "hit.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdf.png", "hit.png", "run.json"]
