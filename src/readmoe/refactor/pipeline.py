"""The refactor stage end to end: statistics (cached) -> plan -> sliced ReadME model folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from readmoe.errors import ReadmoeError
from readmoe.models.device import Placement, resolve_placement
from readmoe.paths import cache_dir
from readmoe.refactor.fingerprint import model_fingerprint
from readmoe.refactor.plan import ExpertPlan
from readmoe.refactor.planners import make_planner
from readmoe.refactor.stats import STATS_JSON, ActivationStats, compute_stats

DEFAULT_STATS_TOKENS = 16384


def default_stats_folder(fingerprint: str, corpus_fingerprint: str, tokens: int,
                         block_size: int) -> Path:
    """Where statistics live when no --stats is given: keyed by everything they depend on."""
    key = f"{fingerprint}:{corpus_fingerprint}:{tokens}:{block_size}"
    return cache_dir() / "stats" / hashlib.sha256(key.encode()).hexdigest()[:20]


def run_stats(model_spec: str, corpus_spec: str, out: str | Path | None = None, *,
              tokens: int = DEFAULT_STATS_TOKENS, block_size: int = 512,
              batch_size: int = 4, placement: Placement | None = None
              ) -> tuple[ActivationStats, Path]:
    """Compute (or resume, or reuse) the activation statistics of a dense model, on
    ``placement`` (default: the machine's; sums accumulate in fp64 whatever the dtype)."""
    from readmoe.data.corpus import load_corpus
    from readmoe.models import load_model, load_tokenizer, resolve_model

    folder = resolve_model(model_spec)
    fingerprint = model_fingerprint(folder)
    corpus = load_corpus(corpus_spec)
    if len(corpus.domains) < 2:
        raise ReadmoeError(f"corpus {corpus_spec} has {len(corpus.domains)} domain(s); "
                           "refactoring needs at least 2")
    out = Path(out) if out else default_stats_folder(fingerprint, corpus.fingerprint(),
                                                     tokens, block_size)
    if (out / STATS_JSON).is_file():
        stats = ActivationStats.load(out)
        if set(stats.domains) >= set(corpus.domains) and stats.fingerprint == fingerprint:
            return stats, out
    placement = placement or resolve_placement()
    model = load_model(model_spec, dtype=placement.dtype, device=placement.device)
    tokenizer = load_tokenizer(model_spec)
    stats = compute_stats(model, tokenizer, corpus, out, model_name=model_spec,
                          fingerprint=fingerprint, tokens_per_domain=tokens,
                          block_size=block_size, batch_size=batch_size)
    return stats, out


def run_refactor(model_spec: str, corpus_spec: str, out: str | Path, *, method: str = "readme",
                 keep: float = 0.5, stats_dir: str | Path | None = None, seed: int = 0,
                 tokens: int = DEFAULT_STATS_TOKENS, placement: Placement | None = None
                 ) -> ExpertPlan:
    """Plan experts from statistics and write the sliced ReadME model folder to `out`.

    ``placement`` is where statistics are computed; the folder always gets the dense
    model's weights sliced in fp32 (training and serving choose their own dtype later)."""
    from readmoe.models import load_model, load_tokenizer, resolve_model
    from readmoe.refactor.slicing import save_readme, slice_dense

    planner = make_planner(method, seed)
    folder = resolve_model(model_spec)
    fingerprint = model_fingerprint(folder)
    if stats_dir is not None:
        stats = ActivationStats.load(stats_dir)
        stats.check_model(fingerprint, model_spec)
    else:
        stats, _ = run_stats(model_spec, corpus_spec, tokens=tokens, placement=placement)
    plan = planner.plan(stats, keep=keep)
    dense = load_model(model_spec)
    model = slice_dense(dense, plan)
    save_readme(model, out, tokenizer=load_tokenizer(model_spec), plan=plan)
    return plan


def write_dense_experts(model_spec: str, out: str | Path) -> ExpertPlan:
    """Write the dense model as a one-expert ReadME folder (``plan.dense_plan``): the same
    weights and logits, servable by the engine and streamable by ``DenseStream``."""
    from readmoe.models import load_model, load_tokenizer
    from readmoe.refactor.plan import dense_plan
    from readmoe.refactor.slicing import save_readme, slice_dense

    dense = load_model(model_spec)
    config = dense.config
    plan = dense_plan(model_spec, config.intermediate_size, config.num_hidden_layers)
    save_readme(slice_dense(dense, plan), out, tokenizer=load_tokenizer(model_spec), plan=plan)
    return plan
