"""Routing traces from a tiny pre-gating model, and the serving suite end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch

from readmoe.data.corpus import load_corpus
from readmoe.refactor.slicing import save_readme
from readmoe.serve.cost import get_profile
from readmoe.serve.experts.optimum import bounds
from readmoe.serve.sim import SimConfig, simulate
from readmoe.serve.suite import (
    ORACLE_BELADY,
    SuiteConfig,
    engine_cross_check,
    run_suite,
    trace_input,
)
from readmoe.serve.suite_report import write_results
from readmoe.serve.traces import ReplayRouting, route_corpus
from readmoe.serve.workload import LengthModel
from tests.conftest import char_tokenizer
from tests.model.test_modeling_readme import NUM_EXPERTS, VOCAB, tiny_readme

SHORT = {"prompt_lengths": LengthModel(8.0, 0.5, 40), "output_lengths": LengthModel(10.0, 0.5, 40)}


class CharTokenizer:
    """Characters to ids in [3, VOCAB): enough for routing real text through a tiny model."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + ord(ch) % (VOCAB - 3) for ch in text] for text in texts]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    rng = random.Random(0)
    words = ["expert", "cache", "router", "token", "layer", "batch", "the", "of", "model"]
    for domain in ("alpha", "beta"):
        lines = [json.dumps({"text": " ".join(rng.choices(words, k=40))}) for _ in range(12)]
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"{domain}.jsonl").write_text("\n".join(lines) + "\n")
    model = tiny_readme(2)
    model.attach_router("pregating", seed=0)
    save_readme(model, root / "model")
    corpus = load_corpus(root / "corpus")
    trace = route_corpus(model, CharTokenizer(), corpus, 8, seed=1, split="all", **SHORT)
    return model, root, trace


def test_trace_lengths_and_real_router_choices(setup):
    model, _, trace = setup
    assert len(trace.requests) == 8 and trace.router_type == "pregating"
    assert {r.domain for r in trace.requests} == {"alpha", "beta"}
    for request in trace.requests:
        assert len(request.tokens) == len(request.experts)
        assert len(request.tokens) == request.prompt_len + request.max_tokens - 1
        expected = model.route(torch.tensor([request.tokens]))[0][0].tolist()
        assert list(request.experts) == expected
        assert all(0 <= e < NUM_EXPERTS for e in request.experts)


def test_specs_and_replay_carry_the_recorded_sequences(setup):
    _, _, trace = setup
    specs = trace.specs(2.0, seed=0)
    assert [s.arrival_time for s in specs] == sorted(s.arrival_time for s in specs)
    assert specs[0].arrival_time == 0.0
    routing = trace.routing()
    for spec, request in zip(specs, trace.requests, strict=True):
        assert spec.prompt.experts == request.experts[:request.prompt_len]
        assert spec.max_tokens == request.max_tokens
        full = routing.extend(spec.prompt.experts, request.prompt_len + request.max_tokens - 1,
                              random.Random(0))
        assert tuple(full) == request.experts


def test_replay_serves_identical_prompts_in_order():
    routing = ReplayRouting([(1, (2, 0, 0)), (1, (2, 1, 1))])
    rng = random.Random(0)
    assert routing.extend((2,), 3, rng) == [2, 0, 0]
    assert routing.extend((2,), 2, rng) == [2, 1]


def test_suite_runs_end_to_end_and_writes_its_files(setup, tmp_path):
    _, root, trace = setup
    config = SuiteConfig(rates=(1.0, 8.0), capacities=(2, 3), policies=("lru", "belady"),
                         schedulers=("fcfs", "expert-aware"), scheduler_capacity=3)
    result = run_suite(trace_input(trace, "tiny trace"), trace_input(trace, "tiny stand-in"),
                       config)
    for policy, future in (("lru", "known"), ("belady", "known"), (ORACLE_BELADY, "oracle")):
        for capacity in (2, 3):  # each cell is the simulator's own count, under its ceiling
            direct = simulate(trace.specs(8.0), trace.routing(), SimConfig(
                policy=policy if future == "known" else "belady", future=future,
                capacity=capacity, budget=config.budget, cost=get_profile(config.profile)))
            cell = result["cache"][policy][str(capacity)]
            assert cell["hit_ratio"] == direct.cache.hit_ratio
            assert cell["hit_ratio"] <= bounds(direct.accesses, capacity).ceiling
    assert set(result["layerwise"]) == {"lru", "belady"}
    assert set(result["capped_cache"]) == {"lru", "belady"}
    assert result["prefetch"]["2"]["prefetch_mean_s"] <= result["prefetch"]["2"][
        "on_demand_mean_s"] + 1e-12
    model = setup[0]
    result["engine_cross_check"] = engine_cross_check(root / "model", trace, requests=4,
                                                      max_tokens=6, bandwidth=1e8, model=model,
                                                      tokenizer=char_tokenizer())
    for mode in ("on_demand", "prefetch"):
        check = result["engine_cross_check"][mode]
        assert check["hits_agree"] and check["schedules_agree"]
    paths = write_results(result, tmp_path, "test", "test machine", "- tiny")
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths)
    saved = json.loads(paths[0].read_text())
    assert saved["pregating_source"] == "tiny trace" and '"normalized":' not in json.dumps(saved)
    markdown = paths[1].read_text()
    assert "Table 4" in markdown and "44.16%" in markdown and "projection" in markdown
    assert "real engine against the simulator" in markdown and ORACLE_BELADY in markdown


def test_markov_fallback_is_labelled(setup, tmp_path):
    from readmoe.cli.serve_suite_cmds import run_serve_suite

    _, root, _ = setup
    paths = run_serve_suite(str(tmp_path / "missing"), str(root / "corpus"), str(tmp_path),
                            requests=4, rates=(1.0, 4.0), cross_check=False)
    assert "MARKOV STAND-IN" in paths[1].read_text()
