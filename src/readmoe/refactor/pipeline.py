"""The refactor stage end to end: statistics (cached) -> plan -> sliced ReadME model folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from readmoe.errors import ReadmoeError
from readmoe.models.device import Placement, resolve_placement
from readmoe.paths import cache_dir
from readmoe.refactor.compensation import compensation_biases
from readmoe.refactor.fingerprint import model_fingerprint
from readmoe.refactor.gram import compute_grams
from readmoe.refactor.importance import DEFAULT_CRITERION, channel_importance, check_criterion
from readmoe.refactor.plan import ExpertPlan
from readmoe.refactor.planners import make_planner
from readmoe.refactor.refit import DEFAULT_DAMP, refit_down_projections
from readmoe.refactor.sequential import check_target, sequential_refit
from readmoe.refactor.stats import STATS_JSON, ActivationStats, clear_stats, compute_stats

DEFAULT_STATS_TOKENS = 16384
DEFAULT_BLOCK_SIZE = 512


def default_stats_folder(fingerprint: str, corpus_fingerprint: str, tokens: int,
                         block_size: int) -> Path:
    """Where statistics live when no --stats is given: keyed by everything they depend on."""
    key = f"{fingerprint}:{corpus_fingerprint}:{tokens}:{block_size}"
    return cache_dir() / "stats" / hashlib.sha256(key.encode()).hexdigest()[:20]


def run_stats(model_spec: str, corpus_spec: str, out: str | Path | None = None, *,
              tokens: int | None = DEFAULT_STATS_TOKENS, block_size: int | None = 512,
              batch_size: int = 4, placement: Placement | None = None,
              recompute: bool = False) -> tuple[ActivationStats, Path]:
    """Compute (or resume, or reuse) the activation statistics of a dense model, on
    ``placement`` (default: the machine's; sums accumulate in fp64 whatever the dtype).

    Statistics already in ``out`` are reused only if they were made from this model and
    corpus with this token count and block size (None: whatever ``out`` holds, else the
    default); otherwise they are refused, before any model is loaded, or with ``recompute``
    deleted and computed afresh."""
    from readmoe.data.corpus import load_corpus
    from readmoe.models import load_model, load_tokenizer, resolve_model

    fingerprint = model_fingerprint(resolve_model(model_spec))
    corpus = load_corpus(corpus_spec)
    if len(corpus.domains) < 2:
        raise ReadmoeError(f"corpus {corpus_spec} has {len(corpus.domains)} domain(s); "
                           "refactoring needs at least 2")
    if out is None:
        tokens, block_size = tokens or DEFAULT_STATS_TOKENS, block_size or DEFAULT_BLOCK_SIZE
        out = default_stats_folder(fingerprint, corpus.fingerprint(), tokens, block_size)
    out = Path(out)
    if recompute:
        clear_stats(out)
    if (out / STATS_JSON).is_file():
        stats = ActivationStats.load(out)
        stats.check_inputs(out, fingerprint=fingerprint, corpus_fingerprint=corpus.fingerprint(),
                           tokens_requested=tokens, block_size=block_size)
        if set(stats.domains) >= set(corpus.domains):
            return stats, out
        tokens, block_size = stats.tokens_requested, stats.block_size  # resume as begun
    placement = placement or resolve_placement()
    model = load_model(model_spec, dtype=placement.dtype, device=placement.device)
    tokenizer = load_tokenizer(model_spec)
    stats = compute_stats(model, tokenizer, corpus, out, model_name=model_spec,
                          fingerprint=fingerprint,
                          tokens_per_domain=tokens or DEFAULT_STATS_TOKENS,
                          block_size=block_size or DEFAULT_BLOCK_SIZE, batch_size=batch_size)
    return stats, out


def run_refactor(model_spec: str, corpus_spec: str, out: str | Path, *, method: str = "readme",
                 keep: float = 0.5, stats_dir: str | Path | None = None, seed: int = 0,
                 tokens: int | None = None, block_size: int | None = None,
                 recompute_stats: bool = False, compensate: bool = False,
                 refit: bool = False, sequential: bool = False, refit_target: str = "ffn",
                 importance: str = DEFAULT_CRITERION,
                 placement: Placement | None = None) -> ExpertPlan:
    """Plan experts from statistics and write the sliced ReadME model folder to `out`.

    Statistics come from ``stats_dir`` (computed there if absent) or the cache, checked by
    ``run_stats`` against this model, corpus, ``tokens`` and ``block_size`` (None: accept
    the folder's own). ``compensate`` folds the mean output of the channels each expert drops
    into a bias (off by default: measured worse, results/carving.md); ``refit`` refits the kept
    channels' down projection by least squares on the statistics' tokens (``refactor/refit.py``;
    their second moments are computed into the statistics folder on first use), with
    ``compensate`` fitting the bias in the same problem; with ``sequential`` each layer is
    refitted on the inputs the carved layers before it give it (``refactor/sequential.py``),
    fitted to ``refit_target``: the dense FFN's output on them (``ffn``) or the dense layer's
    output (``layer``).
    ``importance`` is the
    criterion channels are ranked by (``refactor/importance.py``; default the paper's), checked
    against what the statistics hold before the dense model loads. ``placement`` is where
    statistics are computed; the folder always gets the dense model's weights sliced in fp32
    (training and serving choose their own dtype later)."""
    from readmoe.models import load_model, load_tokenizer
    from readmoe.refactor.slicing import save_readme, slice_dense

    if sequential and not refit:
        raise ReadmoeError("--sequential chooses the inputs a refit is fitted on: add --refit")
    if refit_target != "ffn" and not sequential:
        raise ReadmoeError(f"--refit-target {refit_target} fits a layer to the dense model's "
                           "output from the carved model's inputs: add --sequential")
    check_target(refit_target)
    if sequential and method not in ("readme", "prune"):
        raise ReadmoeError(f"--sequential routes each domain's tokens to the expert named after "
                           f"it; the {method} planner's experts have no domain: use --method "
                           "readme or prune, or refit without --sequential")
    planner = make_planner(method, seed)
    check_criterion(importance)
    stats, stats_folder = run_stats(model_spec, corpus_spec, stats_dir, tokens=tokens,
                                    block_size=block_size, placement=placement,
                                    recompute=recompute_stats)
    check_criterion(importance, stats)
    dense = load_model(model_spec)
    tokenizer = load_tokenizer(model_spec)
    plan = planner.plan(stats, keep=keep, importance=channel_importance(stats, importance, dense))
    down = biases = None
    if refit:
        from readmoe.data.corpus import load_corpus

        corpus = load_corpus(corpus_spec)
        if sequential:
            blocks = {d: stats.blocks(tokenizer, corpus, d) for d in stats.domains}
            down, biases = sequential_refit(dense, plan, blocks, bias=compensate,
                                            target=refit_target)
        else:
            grams = compute_grams(dense, tokenizer, corpus, stats, stats_folder)
            down, biases = refit_down_projections(dense, plan, grams,
                                                  stats=stats if compensate else None)
        plan.meta["down_refit"] = {"damp": DEFAULT_DAMP, "tokens": dict(stats.tokens),
                                   "bias": compensate, "sequential": sequential,
                                   "target": refit_target}
    elif compensate:
        biases = compensation_biases(dense, plan, stats)
    model = slice_dense(dense, plan, biases, down)
    save_readme(model, out, tokenizer=tokenizer, plan=plan)
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
