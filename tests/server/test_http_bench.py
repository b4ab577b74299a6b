"""`bench serve --endpoint`: the workload sent over HTTP to a running server is measured like
the in-process one (same requests, same tokens), and bad endpoints are refused clearly."""

from __future__ import annotations

import json

import pytest

from readmoe.cli import main
from readmoe.errors import ReadmoeError
from readmoe.server.http_bench import base_url

TRACE = [{"arrival_time": 0.02 * i, "prompt": [5 + i, 17, 33, 42], "max_tokens": 3 + i}
         for i in range(5)]


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRACE))
    return path


def test_endpoint_and_in_process_runs_measure_the_same_requests(server, model_dir, trace,
                                                                 tmp_path):
    http_json, local_json = tmp_path / "http.json", tmp_path / "local.json"
    assert main(["bench", "serve", str(model_dir), "--trace", str(trace), "--endpoint",
                 server.url + "/v1", "--served-model-name", "tiny", "--json",
                 str(http_json)]) == 0
    assert main(["bench", "serve", str(model_dir), "--trace", str(trace), "--json",
                 str(local_json), "--device", "cpu"]) == 0
    http, local = json.loads(http_json.read_text()), json.loads(local_json.read_text())
    expected = sum(r["max_tokens"] for r in TRACE)
    assert http["failed"] == 0 and http["token_count_mismatches"] == 0
    assert http["requests"] == local["requests"] == len(TRACE)
    assert http["output_tokens"] == local["output_tokens"] == expected
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "normalized_latency_s"):
        assert http[key]["p50"] > 0 and local[key]["p50"] > 0
    assert http["throughput_tokens_per_s"] > 0 and http["cache"] is None


def test_bad_endpoints_and_flags(model_dir, trace, capsys):
    assert base_url("http://h:1/v1/completions/") == base_url("http://h:1") == "http://h:1"
    with pytest.raises(ReadmoeError, match="not an http"):
        base_url("localhost:8000")
    assert main(["bench", "serve", str(model_dir), "--trace", str(trace), "--endpoint",
                 "http://127.0.0.1:1"]) == 2
    assert "no server answers" in capsys.readouterr().err
    assert main(["bench", "serve", str(model_dir), "--trace", str(trace), "--endpoint",
                 "http://127.0.0.1:1", "--capacity", "2"]) == 2
    assert "readmoe serve" in capsys.readouterr().err
