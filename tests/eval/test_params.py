from __future__ import annotations

from readmoe.eval.params import parameter_counts
from tests.conftest import tiny_model
from tests.model.test_modeling_readme import tiny_readme


def test_dense_model_is_all_active():
    model = tiny_model()
    counts = parameter_counts(model)
    assert counts["total"] == counts["active"] == sum(p.numel() for p in model.parameters())


def test_readme_active_counts_one_routed_expert_per_layer():
    model = tiny_readme(seed=0)
    counts = parameter_counts(model)
    routed = sum(p.numel() for layer in model.model.layers
                 if getattr(layer.mlp, "experts", None) is not None
                 for p in layer.mlp.experts.parameters())
    e = model.config.num_experts
    assert counts["total"] - counts["active"] == routed - routed // e
    assert counts["router"] == 0
