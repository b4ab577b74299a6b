import pytest
import torch

from readmoe.eval.perplexity import window_nll
from readmoe.serve.scoring import served_nll
from tests.serve.test_engine import VOCAB, readme


@pytest.mark.parametrize("router,overrides", [("pregating", {}), ("layerwise", {}),
                                              ("none", {"num_experts": 1})])
def test_served_perplexity_equals_the_models_own(router, overrides):
    model = readme(router, **overrides)
    blocks = torch.randint(3, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))
    served = served_nll(model, blocks)
    own = window_nll(model, blocks)
    assert served.tokens == own.tokens == 3 * 12
    assert served.nll_sum == pytest.approx(own.nll_sum, rel=1e-5)
    int8 = served_nll(model, blocks, quantize="int8")
    assert int8.nll_sum != served.nll_sum
    assert int8.ppl == pytest.approx(served.ppl, rel=0.1)
