"""Run the models once over held-out text and keep every routing choice, in token order.

Three routers are compared on the same tokens:

- the oracle: per routed layer, the expert whose channels best overlap the dense model's own
  top channels for the token (``OracleRouter.layer_scores``), plus the summed-score label the
  oracle routing of ``readmoe eval`` uses;
- the ReadME model's pre-gating router: one expert per token, shared by all layers;
- optionally a layer-wise baseline with the same plan: one gate per routed layer.

Choices stay in ``[S, T]`` blocks (S sequences of T tokens, each domain's blocks in corpus
order), because temporal locality is measured within a sequence; flattening row-major gives
the ``[N]`` / ``[N, L']`` views the layer-wise measures use. Layers without routed channels
(expert size 0) route nothing and are left out: ``routed_layers`` names the kept ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from readmoe.errors import ReadmoeError
from readmoe.models.device import Placement, resolve_placement
from readmoe.refactor.plan import ExpertPlan

PLAN_DIR = "plan"


@dataclass
class RoutingChoices:
    """Every routing choice on the analysed tokens (arrays of int64)."""

    expert_names: list[str]
    domains: list[str]
    routed_layers: list[int]  # model layer index of each column of the per-layer arrays
    domain: np.ndarray  # [S, T] domain index of each token
    oracle_layers: np.ndarray  # [S, T, L'] best-overlap expert per routed layer
    oracle: np.ndarray  # [S, T] argmax of the overlap scores summed over layers
    pregating: np.ndarray | None  # [S, T] the pre-gating router's expert, or None
    layerwise: np.ndarray | None  # [S, T, L'] the layer-wise gates' experts, or None

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def num_tokens(self) -> int:
        return int(self.domain.size)


def load_readme(spec: str | Path, role: str, placement: Placement | None = None):
    """Load a ReadME folder, refusing anything else with the reason and the fix."""
    from readmoe.eval.routing_modes import is_readme
    from readmoe.models import load_model

    placement = placement or resolve_placement()
    model = load_model(str(spec), dtype=placement.dtype, device=placement.device)
    if not is_readme(model):
        raise ReadmoeError(f"{role} {spec} is a dense {model.config.model_type} model, not a "
                           "ReadME folder; analyze needs one written by `readmoe refactor` or "
                           "`readmoe train`")
    return model


def load_plan(model_dir: str | Path) -> ExpertPlan:
    plan_dir = Path(model_dir) / PLAN_DIR
    if not plan_dir.is_dir():
        raise ReadmoeError(f"{model_dir} has no {PLAN_DIR}/ folder, so its experts' channels are "
                           "unknown; analyze needs a folder written by `readmoe refactor`")
    return ExpertPlan.load(plan_dir)


def same_plan(a: ExpertPlan, b: ExpertPlan) -> bool:
    """True when both plans cut the same channels into the same named experts."""
    if a.expert_names != b.expert_names or a.num_layers != b.num_layers:
        return False
    return all(torch.equal(x.shared, y.shared) and torch.equal(x.experts, y.experts)
               for x, y in zip(a.layers, b.layers, strict=True))


def check_layerwise(model, plan: ExpertPlan, model_dir: str | Path, spec: str | Path) -> None:
    """The baseline must be a layer-wise model cut by the very same plan as MODEL, or the
    comparison would mix routers with different experts."""
    if model.config.router_type != "layerwise":
        raise ReadmoeError(f"--layerwise {spec} has router_type {model.config.router_type!r}; "
                           "it must be a ReadME model with a layer-wise router (readmoe train "
                           "--router-type layerwise)")
    if not same_plan(plan, load_plan(spec)):
        raise ReadmoeError(f"--layerwise {spec} was cut by another plan than {model_dir}; "
                           "compare routers over the same experts (refactor once, train both)")


def collect_choices(model_dir: str | Path, corpus_dir: str | Path, *, tokens: int,
                    block_size: int, batch_size: int = 8, layerwise: str | Path | None = None,
                    dense: str | None = None, placement: Placement | None = None
                    ) -> RoutingChoices:
    """Route the held-out blocks of every domain (``tokens`` per domain at most) through the
    oracle, MODEL's pre-gating router (if it has one) and the ``layerwise`` baseline."""
    from readmoe.data.corpus import load_corpus
    from readmoe.eval.domains import heldout_blocks
    from readmoe.eval.routing_modes import oracle_for
    from readmoe.models import load_tokenizer

    if batch_size < 1:
        raise ReadmoeError(f"batch size must be at least 1, got {batch_size}")
    model = load_readme(model_dir, "MODEL", placement)
    router_type = model.config.router_type
    if router_type == "layerwise":
        raise ReadmoeError(f"MODEL {model_dir} has a layer-wise router; give the pre-gating "
                           "model (or an unrouted one) as MODEL and this one with --layerwise")
    plan = load_plan(model_dir)
    baseline = None
    if layerwise is not None:
        baseline = load_readme(layerwise, "--layerwise", placement)
        check_layerwise(baseline, plan, model_dir, layerwise)
    routed = [index for index, lp in enumerate(plan.layers) if lp.expert_size > 0]
    if not routed:
        raise ReadmoeError(f"{model_dir}'s plan has no routed experts in any layer (a pruned "
                           "model): there is no routing to analyse")
    oracle = oracle_for(model_dir, dense, like=model)
    corpus = load_corpus(corpus_dir)
    tokenizer = load_tokenizer(str(model_dir))
    parts: dict[str, list[np.ndarray]] = {key: [] for key in
                                          ("domain", "oracle_layers", "oracle", "pre", "lw")}
    for domain_index, domain in enumerate(corpus.domains):
        blocks = heldout_blocks(corpus, tokenizer, domain, block_size, tokens)
        starts = range(0, blocks.shape[0], batch_size)
        for start in tqdm(starts, desc=f"routing {domain}", unit="batch", leave=False):
            batch = blocks[start:start + batch_size].to(model.device)
            parts["domain"].append(np.full(tuple(batch.shape), domain_index, dtype=np.int64))
            with torch.no_grad():
                scores = oracle.layer_scores(batch).cpu()  # [B, T, L, E]
                parts["oracle_layers"].append(scores[:, :, routed].argmax(-1).numpy())
                parts["oracle"].append(scores.sum(dim=2).argmax(-1).numpy())
                if router_type == "pregating":
                    parts["pre"].append(model.route(batch)[0].cpu().numpy())
                if baseline is not None:
                    out = baseline.model(batch, use_cache=False, output_router_logits=True)
                    parts["lw"].append(out.expert_ids[:, :, routed].cpu().numpy())

    def stacked(key: str) -> np.ndarray | None:
        return np.concatenate(parts[key]).astype(np.int64) if parts[key] else None

    return RoutingChoices(list(plan.expert_names), list(corpus.domains), routed, stacked("domain"),
                          stacked("oracle_layers"), stacked("oracle"), stacked("pre"),
                          stacked("lw"))
