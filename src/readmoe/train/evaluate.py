"""What every training round reports: held-out perplexity per domain under the model's own
routing, and router top-1 accuracy against the oracle label on held-out tokens."""

from __future__ import annotations

import torch

from readmoe.data.tokens import pack_blocks
from readmoe.errors import ReadmoeError
from readmoe.eval.perplexity import window_nll
from readmoe.train.config import TrainConfig


class RoundEvaluator:
    def __init__(self, corpus, tokenizer, config: TrainConfig, dense, plan) -> None:
        self.window = min(512, config.block_size)
        self.blocks = {}
        for domain in corpus.domains:
            try:
                self.blocks[domain] = pack_blocks(tokenizer, corpus.documents(domain, "heldout"),
                                                  self.window, config.eval_tokens)
            except ReadmoeError:
                continue  # a domain with too little held-out text is not scored
        self.dense, self.plan = dense, plan
        self._scores: dict[str, torch.Tensor] = {}

    def oracle_scores(self, domain: str) -> torch.Tensor:
        """Per-layer oracle scores `[N, T, L, E]` of a domain's held-out blocks (cached)."""
        from readmoe.refactor.oracle import OracleRouter

        if domain not in self._scores:
            self._scores[domain] = OracleRouter(self.dense, self.plan).layer_scores(
                self.blocks[domain]).cpu()
        return self._scores[domain]

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        ppl = {d: window_nll(model, b).as_dict() for d, b in self.blocks.items()}
        report = {"heldout": ppl}
        if model.config.needs_routing:
            report["router_accuracy"] = self.router_accuracy(model)
        return report

    @torch.no_grad()
    def router_accuracy(self, model) -> dict:
        """Share of held-out tokens whose router choice equals the oracle's, per domain.

        Pre-gating: one choice per token vs the oracle label (scores summed over layers);
        layer-wise: each routed layer's gate vs that layer's best-overlap expert, averaged."""
        from readmoe.train.phases import router_logits

        routed = torch.tensor([lp.expert_size > 0 for lp in self.plan.layers])
        result = {}
        for domain, blocks in self.blocks.items():
            scores = self.oracle_scores(domain).float()  # [N, T, L, E]
            logits = router_logits(model, blocks.to(model.device)).float().cpu()
            if logits.dim() == 3:  # [N, T, E]
                hits = logits.argmax(-1) == scores[:, :, routed].sum(2).argmax(-1)
            else:  # [N, T, L, E]
                hits = logits[:, :, routed].argmax(-1) == scores[:, :, routed].argmax(-1)
            result[domain] = float(hits.float().mean())
        result["mean"] = sum(result.values()) / len(result)
        return result
