"""Losses of the two training phases.

Router distillation (backbone frozen): the router predicts one expert distribution per token
that every layer uses; each layer supplies a target, and the loss is summed over layers.

- soft target of layer l: softmax(scale * (f - mean f)), f_j = overlap of the token's top
  dense channels with expert j divided by the expert's size (a fraction in [0, 1]); the
  authors' code mean-centres and scales by 10 as well (their f comes from 5 thresholds);
- hard target of layer l: argmax_j f_j, with label smoothing.

Defaults from the authors' code: hard weight 0.75 with smoothing 0.5, soft weight 0.25,
scale 10. Expert tuning: next-token cross-entropy under the router's hard routing,
optionally plus KL(dense || ReadME) on the logits, a cheap recovery signal when the token
budget is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RouterLossConfig:
    hard_weight: float = 0.75
    soft_weight: float = 0.25
    label_smoothing: float = 0.5
    scale: float = 10.0


def layer_fractions(scores: torch.Tensor, expert_sizes: list[int]) -> torch.Tensor:
    """Overlap counts `[..., L, E]` -> fractions of each expert's channels; layers without
    routed channels get 0 everywhere (they carry no routing signal)."""
    sizes = torch.tensor(expert_sizes, dtype=torch.float32, device=scores.device)
    return scores.float() / sizes.clamp_min(1.0)[:, None]


def router_distillation_loss(logits: torch.Tensor, scores: torch.Tensor,
                             expert_sizes: list[int],
                             config: RouterLossConfig | None = None) -> torch.Tensor:
    """Mean over tokens of the per-layer losses summed over the routed layers.

    logits: [N, E] (pre-gating: one distribution for every layer) or [N, L, E] (layer-wise
    gates); scores: [N, L, E] overlap counts."""
    config = config or RouterLossConfig()
    fractions = layer_fractions(scores, expert_sizes)  # [N, L, E]
    routed = torch.tensor([s > 0 for s in expert_sizes], device=logits.device)
    fractions = fractions[:, routed]  # [N, L', E]
    log_probs = F.log_softmax(logits.float(), dim=-1)
    log_probs = log_probs[:, None, :] if logits.dim() == 2 else log_probs[:, routed]
    centred = fractions - fractions.mean(dim=-1, keepdim=True)
    soft = F.softmax(config.scale * centred, dim=-1)  # [N, L', E]
    soft_loss = -(soft * log_probs).sum(-1)  # [N, L']
    num_experts = logits.shape[-1]
    hard = F.one_hot(fractions.argmax(-1), num_experts).float()
    hard = hard * (1 - config.label_smoothing) + config.label_smoothing / num_experts
    hard_loss = -(hard * log_probs).sum(-1)  # [N, L']
    per_token = config.hard_weight * hard_loss + config.soft_weight * soft_loss
    return per_token.sum(dim=1).mean()


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; logits [B, T, V], input_ids [B, T]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           input_ids[:, 1:].reshape(-1))


def logit_kl(student: torch.Tensor, teacher: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, averaged; both [B, T, V]."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True,
                    reduction="batchmean") * temperature**2
