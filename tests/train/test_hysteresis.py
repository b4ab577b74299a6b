from __future__ import annotations

import json

import pytest
import torch

from readmoe.cli import main
from readmoe.data.corpus import load_corpus
from readmoe.data.tokens import token_stream
from readmoe.errors import ReadmoeError
from readmoe.eval.perplexity import window_nll
from readmoe.models import load_model, load_tokenizer
from readmoe.train.hysteresis import MarginScore, best_margin, score_margins, unseen_train_blocks
from readmoe.train.rounds import Trainer
from tests.train.test_rounds import small_config, weights


def test_unseen_blocks_start_past_the_trained_tokens(tiny_moe_dir, train_corpus_dir):
    corpus, tokenizer = load_corpus(str(train_corpus_dir)), load_tokenizer(str(tiny_moe_dir))
    blocks = unseen_train_blocks(corpus, tokenizer, trained_tokens=100, window=32, tokens=64)
    assert set(blocks) == set(corpus.domains)
    for domain, got in blocks.items():
        stream = token_stream(tokenizer, corpus.documents(domain, "train"))
        # 100 trained tokens round up to 4 whole windows: the blocks begin at token 128
        assert got.shape == (2, 32)
        assert got.flatten().tolist() == stream[128:192]


def test_a_domain_with_no_text_past_the_training_share_is_not_scored(tiny_moe_dir,
                                                                     train_corpus_dir):
    corpus, tokenizer = load_corpus(str(train_corpus_dir)), load_tokenizer(str(tiny_moe_dir))
    assert unseen_train_blocks(corpus, tokenizer, trained_tokens=10**7, window=32,
                               tokens=64) == {}


def test_best_margin_is_the_lowest_mean_perplexity_ties_to_the_larger():
    def score(margin: float, ppl: float) -> MarginScore:
        return MarginScore(margin, ppl, {"a": ppl}, 0.5)

    assert best_margin([score(0, 10.0), score(0.25, 9.0), score(0.5, 9.5)]) == 0.25
    assert best_margin([score(0, 9.0), score(0.25, 9.0), score(0.5, 9.5)]) == 0.25
    with pytest.raises(ReadmoeError):
        best_margin([])


def test_scores_match_a_plain_evaluation_at_each_margin_and_restore_the_config(
        tiny_moe_dir, train_corpus_dir):
    model = load_model(str(tiny_moe_dir))
    model.attach_router("pregating")
    torch.nn.init.normal_(next(model.base_model.router.parameters()), std=0.5)
    blocks = {"x": torch.randint(3, 60, (2, 32))}
    scores = score_margins(model, blocks, [0.5, 0.0, 0.5])
    assert [s.margin for s in scores] == [0.0, 0.5]
    assert model.config.router_hysteresis == 0.0
    for score in scores:
        model.config.router_hysteresis = score.margin
        assert score.ppl["x"] == pytest.approx(window_nll(model, blocks["x"]).ppl, rel=1e-6)
        experts = model.route(blocks["x"])[0]
        reuse = (experts[:, 1:] == experts[:, :-1]).float().mean().item()
        assert score.locality == pytest.approx(reuse)
    assert scores[1].locality >= scores[0].locality


def test_trained_model_ships_the_chosen_margin_scored_with_it(tmp_path, tiny_moe_dir,
                                                               train_corpus_dir):
    out = tmp_path / "run"
    state = Trainer(tiny_moe_dir, str(train_corpus_dir), out, small_config()).run()
    report = state["rounds"]["1"]["hysteresis"]
    assert report["scored_on"].startswith("train split")
    assert [m["margin"] for m in report["margins"]] == [0.0, 0.125, 0.25, 0.5, 1.0]
    assert report["chosen"] == best_margin([MarginScore(**m) for m in report["margins"]])
    config = json.loads((out / "round-1" / "config.json").read_text())
    assert config["router_hysteresis"] == report["chosen"]
    assert "hysteresis" not in state["rounds"]["0"]
    # the last round is scored as shipped: with the chosen margin
    model = load_model(str(out / "round-1"))
    from readmoe.train.evaluate import RoundEvaluator

    evaluator = RoundEvaluator(load_corpus(str(train_corpus_dir)),
                               load_tokenizer(str(tiny_moe_dir)), small_config(), None, None)
    for domain, blocks in evaluator.blocks.items():
        assert state["rounds"]["1"]["heldout"][domain]["ppl"] == pytest.approx(
            window_nll(model, blocks).ppl, rel=1e-6)


def test_a_finished_run_without_the_choice_makes_it_on_rerun_and_trains_nothing(
        tmp_path, tiny_moe_dir, train_corpus_dir):
    """A run finished before the choice existed, or killed while making it, resumes into it
    alone: the weights stay those the phases produced."""
    out = tmp_path / "run"
    first = Trainer(tiny_moe_dir, str(train_corpus_dir), out, small_config()).run()
    before = weights(out / "round-1")
    state = json.loads((out / "state.json").read_text())
    del state["finished"], state["rounds"]["1"]["hysteresis"]
    (out / "state.json").write_text(json.dumps(state))
    again = Trainer(tiny_moe_dir, str(train_corpus_dir), out, small_config()).run()
    assert again["rounds"]["1"]["hysteresis"] == first["rounds"]["1"]["hysteresis"]
    after = weights(out / "round-1")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_margin_zero_alone_skips_the_choice(tmp_path, tiny_moe_dir, train_corpus_dir):
    out = tmp_path / "run"
    state = Trainer(tiny_moe_dir, str(train_corpus_dir), out,
                    small_config(rounds=1, hysteresis_margins=[0.0])).run()
    assert "hysteresis" not in state["rounds"]["0"]
    assert json.loads((out / "round-0" / "config.json").read_text()).get(
        "router_hysteresis", 0.0) == 0.0


def test_negative_margins_are_refused_before_training(tmp_path, tiny_moe_dir, train_corpus_dir,
                                                      capsys):
    assert main(["train", str(tiny_moe_dir), "--corpus", str(train_corpus_dir), "--out",
                 str(tmp_path / "run"), "--hysteresis-margins", "0", "-0.5"]) != 0
    assert "--hysteresis-margins needs one or more margins >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
