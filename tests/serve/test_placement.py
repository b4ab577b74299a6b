"""place_for_offload: routed experts released, the rest kept, and the offloaded model serves
exactly through an expert store (and refuses to serve without one)."""

from __future__ import annotations

import pytest

from readmoe.errors import ReadmoeError
from readmoe.serve.engine import Engine
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.placement import experts_offloaded, place_for_offload, routed_expert_bytes
from readmoe.serve.sampling import SamplingParams
from tests.conftest import char_tokenizer
from tests.serve.test_engine import readme


def test_offloaded_model_serves_the_same_tokens_through_a_store(tmp_path):
    reference = readme()
    reference.save_pretrained(tmp_path)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = [o.token_ids for o in Engine(reference, char_tokenizer()).generate(prompts, params)]

    model = readme()
    total = routed_expert_bytes(model)
    assert total > 0 and not experts_offloaded(model)
    assert place_for_offload(model) == total
    assert routed_expert_bytes(model) == 0 and experts_offloaded(model)
    with pytest.raises(ReadmoeError, match="ExpertStore"):
        Engine(model, char_tokenizer())
    with ExpertStore(tmp_path, capacity=1, policy="lru") as store:
        assert store.fast_tier_bytes == sum(store.expert_bytes)
        engine = Engine(model, char_tokenizer(), expert_store=store)
        got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == expected
