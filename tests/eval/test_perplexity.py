from __future__ import annotations

import math

import torch

from readmoe.eval.perplexity import window_nll
from tests.conftest import tiny_model


def test_window_nll_matches_naive_per_position_loop():
    model = tiny_model()
    blocks = torch.randint(0, 128, (3, 10))
    result = window_nll(model, blocks, batch_size=2)
    total = 0.0
    with torch.no_grad():
        for row in blocks:
            logits = model(row[None]).logits[0]
            for pos in range(9):
                total -= torch.log_softmax(logits[pos], -1)[row[pos + 1]].item()
    assert result.tokens == 27
    assert math.isclose(result.nll_sum, total, rel_tol=1e-5)
    assert math.isclose(result.ppl, math.exp(total / 27), rel_tol=1e-5)


def test_random_model_perplexity_is_near_vocabulary_size():
    model = tiny_model()
    blocks = torch.randint(0, 128, (4, 32))
    assert 64 < window_nll(model, blocks).ppl < 256


def test_domain_wins_counts_lower_perplexity():
    from readmoe.eval.domains import domain_wins

    reports = [{"label": "a", "domains": {"x": {"ppl": 2.0}, "y": {"ppl": 9.0}}},
               {"label": "b", "domains": {"x": {"ppl": 3.0}, "y": {"ppl": 5.0}}}]
    assert domain_wins(reports, "a", "b") == {"domains": ["x"], "count": 1, "of": 2}


def test_evaluate_model_labels_its_report(tiny_llama_dir, tmp_path):
    import json

    from readmoe.data.corpus import load_corpus
    from readmoe.eval.domains import evaluate_model
    from tests.conftest import char_tokenizer

    folder = tmp_path / "corpus"
    folder.mkdir()
    for domain in ("a", "b"):
        (folder / f"{domain}.jsonl").write_text("".join(
            json.dumps({"text": f"{domain} text number {i} " * 60}) + "\n" for i in range(12)))
    report = evaluate_model(str(tiny_llama_dir), "tiny", char_tokenizer(), load_corpus(folder),
                            max_tokens=512)
    assert report["label"] == "tiny" and set(report["domains"]) == {"a", "b"}
