"""What a step costs: the simulator's cost model and its named profiles.

Step time = ``step_overhead_s`` + for each layer: compute + the time compute waited for loads
(``timeline.py`` lays out the compute and copy streams). A layer computes in
``layer_fixed_s + token_s * tokens + expert_s * distinct_experts`` (the paper: latency grows
linearly with the distinct experts of a batch); loading one expert of layer ``l`` takes
``expert_bytes[l] / load_bandwidth + load_latency_s``. Attention's dependence on context length
is left out (it is the same for every scheduler and cache policy compared here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from readmoe.errors import ReadmoeError


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of work, per layer; ``expert_bytes`` is one routed expert's size (0:
    the layer has no routed experts, so nothing of it is cached or loaded)."""

    num_layers: int
    expert_bytes: tuple[int, ...]
    step_overhead_s: float
    layer_fixed_s: float
    token_s: float
    expert_s: float
    load_bandwidth: float  # bytes per second, host to accelerator
    load_latency_s: float = 0.0  # fixed cost of one load (issue, hand-off), measured

    def __post_init__(self) -> None:
        if self.num_layers < 1 or len(self.expert_bytes) != self.num_layers:
            raise ReadmoeError(f"cost model needs one expert size per layer ({self.num_layers})")
        if self.load_bandwidth <= 0 or min(self.step_overhead_s, self.layer_fixed_s,
                                           self.token_s, self.expert_s,
                                           self.load_latency_s) < 0:
            raise ReadmoeError("cost model times must be >= 0 and the bandwidth positive")

    def layer_compute(self, num_tokens: int, distinct_experts: int) -> float:
        return self.layer_fixed_s + self.token_s * num_tokens + self.expert_s * distinct_experts

    def load_time(self, layer: int, num_experts: int) -> float:
        return num_experts * (self.expert_bytes[layer] / self.load_bandwidth
                              + self.load_latency_s)


def _a100_llama2_7b() -> CostModel:
    """Llama-2-7B refactored as ReadME (bf16) on one A100-80GB, experts offloaded over PCIe.

    Llama-2-7B: 32 layers, hidden 4096, FFN 11008. The paper does not give the shared size for
    it, so we take the split measured on the default model: shared 20% of the FFN (2202
    channels), each routed expert 30% (3302): 3 * 4096 * 3302 * 2 B = 81.1 MB per expert per
    layer. Reading weights at an effective 1.6 TB/s of HBM (80% of 2.0 TB/s): attention (4 *
    4096^2) plus the shared expert, 188 MB, is 118 us per layer; each distinct routed expert
    51 us. Per token per layer, 2 * 134.7M active parameters = 269 MFLOP at 156 TFLOP/s (half
    of bf16 peak) is 1.7 us. Step overhead 1.2 ms: LM head read (262 MB, 0.16 ms) plus ~1 ms
    host work (launches, sampling, scheduling) by assumption. Loads: 25 GB/s effective
    PCIe 4.0 x16 from pinned memory, so 3.25 ms per expert per layer.
    """
    hbm = 1.6e12
    expert_bytes = 3 * 4096 * 3302 * 2
    return CostModel(num_layers=32, expert_bytes=(expert_bytes,) * 32, step_overhead_s=1.2e-3,
                     layer_fixed_s=(4 * 4096 * 4096 + 3 * 4096 * 2202) * 2 / hbm,
                     token_s=2 * (4 * 4096 * 4096 + 3 * 4096 * 5504) / 156e12,
                     expert_s=expert_bytes / hbm, load_bandwidth=25e9)


def _a100_llama2_7b_dense() -> CostModel:
    """Dense Llama-2-7B (bf16) on the same A100, its FFN as the one streamable unit per layer
    (the dense baseline, ``experts/stream.py``): 3 * 4096 * 11008 * 2 B = 270.5 MB per layer's
    FFN, read at 1.6 TB/s in 169 us; attention 4 * 4096^2 * 2 B in 84 us; 2 * 202M parameters
    per token per layer at 156 TFLOP/s; the same step overhead and PCIe link."""
    hbm = 1.6e12
    ffn_bytes = 3 * 4096 * 11008 * 2
    return CostModel(num_layers=32, expert_bytes=(ffn_bytes,) * 32, step_overhead_s=1.2e-3,
                     layer_fixed_s=4 * 4096 * 4096 * 2 / hbm,
                     token_s=2 * (4 * 4096 * 4096 + 3 * 4096 * 11008) / 156e12,
                     expert_s=ffn_bytes / hbm, load_bandwidth=25e9)


PROFILES = {"a100-llama2-7b": _a100_llama2_7b(), "a100-llama2-7b-dense": _a100_llama2_7b_dense()}


def get_profile(name: str) -> CostModel:
    if name not in PROFILES:
        raise ReadmoeError(f"unknown cost profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass(frozen=True)
class StepSample:
    """One measured step with every needed expert resident: its size and its seconds."""

    num_tokens: int
    distinct_experts: int
    seconds: float


def fit_cost_model(samples: Sequence[StepSample], *, expert_bytes: Sequence[int],
                   load_bandwidth: float, step_overhead_s: float = 0.0,
                   load_latency_s: float = 0.0) -> CostModel:
    """A profile from measurements: least squares of step seconds on tokens and experts.

    ``seconds ~ a + b * tokens + c * distinct`` over the samples, then per layer:
    ``token_s = b / L``, ``expert_s = c / L``, ``layer_fixed_s = (a - step_overhead_s) / L``
    (the intercept is weight reading spread over the layers, less the measured host overhead).
    ``expert_bytes`` (per layer), ``load_bandwidth`` and ``load_latency_s`` are measured apart
    (the copy engine's loads).
    Coefficients that noise drives below zero are clipped to zero.
    """
    design = np.array([[1.0, s.num_tokens, s.distinct_experts] for s in samples]).reshape(-1, 3)
    if np.linalg.matrix_rank(design) < 3:
        raise ReadmoeError("fitting a cost model needs samples that vary both the token count "
                           "and the number of distinct experts")
    seconds = np.array([s.seconds for s in samples])
    (a, b, c), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    layers = len(expert_bytes)
    return CostModel(num_layers=layers, expert_bytes=tuple(expert_bytes),
                     step_overhead_s=step_overhead_s,
                     layer_fixed_s=max(0.0, float(a) - step_overhead_s) / layers,
                     token_s=max(0.0, float(b)) / layers, expert_s=max(0.0, float(c)) / layers,
                     load_bandwidth=load_bandwidth, load_latency_s=load_latency_s)
