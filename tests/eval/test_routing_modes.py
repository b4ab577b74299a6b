from __future__ import annotations

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.eval.routing_modes import oracle_for, oracle_forward
from readmoe.models import load_model
from tests.conftest import refactor_tiny, write_alphabet_corpus


def test_oracle_forward_equals_passing_the_oracle_expert_ids(tmp_path, tiny_llama_dir):
    corpus = write_alphabet_corpus(tmp_path / "corpus", docs=24, length=400)
    moe = refactor_tiny(tmp_path, tiny_llama_dir, corpus)
    model = load_model(str(moe))
    ids = torch.randint(3, 60, (2, 12))
    expected = model(ids, expert_ids=oracle_for(moe, None, like=model).expert_ids(ids)).logits
    with torch.no_grad(), oracle_forward(model, moe):
        hooked = model(ids).logits
        with pytest.raises(ReadmoeError, match="continues a KV cache"):
            model(ids[:, -1:], past_key_values=model(ids, use_cache=True).past_key_values)
    assert torch.equal(hooked, expected.detach())
    with pytest.raises(ValueError, match="no router"):  # the hook is gone with the context
        model(ids)
