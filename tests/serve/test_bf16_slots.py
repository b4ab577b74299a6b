"""Expert stores in bf16 (``--quantize bf16``, ``serve/experts/slots.py``): every tier's slots
hold the runner's bf16 panels of the model's weights bitwise, at about half the bytes a
float32 expert moves; an offloaded bf16 engine and a streamed bf16 dense model decode the
tokens of their resident bf16 engines; a store of the other precision is refused."""

from __future__ import annotations

import pytest
import torch

from readmoe.errors import ReadmoeError
from readmoe.serve import cpu_ops
from readmoe.serve.engine import Engine
from readmoe.serve.experts.store import ExpertStore
from readmoe.serve.experts.stream import DenseStream
from readmoe.serve.packed import to_bf16_panels
from readmoe.serve.placement import place_for_offload
from readmoe.serve.sampling import SamplingParams
from tests.conftest import char_tokenizer
from tests.model.test_modeling_readme import NUM_EXPERTS
from tests.serve.test_engine_store import BUDGET, served  # noqa: F401 (a fixture)
from tests.serve.test_store import ROUTED, _run, _steps, saved  # noqa: F401 (a fixture)
from tests.serve.test_stream import dense_folder  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not cpu_ops.bf16_applies(cpu_ops.load()),
                                reason="bf16 slots need the fused ops and AVX512-BF16, or AVX2 "
                                "and FMA")
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("tier", ["file", "ram", "state_dict"])
def test_every_tier_holds_the_runners_bf16_panels_bitwise(saved, tier):  # noqa: F811
    model, folder = saved
    source = model.state_dict() if tier == "state_dict" else folder
    checked = []

    def check(layer, expert, weights):
        ref = model.model.layers[layer].mlp.experts
        gate_up = to_bf16_panels(torch.cat([ref.gate_proj[expert], ref.up_proj[expert]]))
        checked.append(weights.gate_up.bf16 and torch.equal(weights.gate_up.blocked, gate_up)
                       and torch.equal(weights.down.blocked, to_bf16_panels(ref.down_proj[expert]))
                       and weights.gate_up.weight.is_meta)
    with ExpertStore(source, capacity=2, policy="lru", tier="file" if tier == "file" else "ram",
                     quantize="bf16") as store:
        assert store.routed_layers == list(ROUTED) and "bf16 panels" in store.describe()
        for layer in ROUTED:  # what a load moves: the panels, padding included
            ref = model.model.layers[layer].mlp.experts
            panels = (to_bf16_panels(torch.cat([ref.gate_proj[0], ref.up_proj[0]])),
                      to_bf16_panels(ref.down_proj[0]))
            assert store.expert_bytes[layer] == sum(p.nbytes for p in panels)
        for prefetch in (True, False):
            _run(store, _steps(3, 12, NUM_EXPERTS), prefetch, check)
    assert checked and all(checked)


@pytest.mark.parametrize("prefetch", [False, True])
def test_an_offloaded_bf16_engine_decodes_like_the_resident_bf16_one(served, prefetch):  # noqa: F811
    model, folder, prompts = served

    def generate(store=None):
        engine = Engine(model, char_tokenizer(), "expert-aware", BUDGET, kv_blocks=40,
                        block_size=4, expert_store=store, prefetch=prefetch, quantize="bf16")
        return [o.token_ids for o in engine.generate(prompts, PARAMS)]
    resident = generate()
    with ExpertStore(folder, capacity=1, policy="belady", quantize="bf16") as store:
        assert generate(store) == resident
        assert store.stats.misses > 0


def test_a_store_of_the_other_precision_is_refused(served):  # noqa: F811
    model, folder, _ = served
    with ExpertStore(folder, capacity=1, tier="ram") as store, pytest.raises(
            ReadmoeError, match="quantize='bf16'"):
        Engine(model, char_tokenizer(), expert_store=store, quantize="bf16")
    with ExpertStore(folder, capacity=1, tier="ram", quantize="bf16") as store, pytest.raises(
            ReadmoeError, match="quantize='none'"):
        Engine(model, char_tokenizer(), expert_store=store)


def test_a_bf16_dense_stream_decodes_like_the_resident_bf16_model(dense_folder):  # noqa: F811
    from readmoe.models import load_model

    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    resident = Engine(load_model(str(dense_folder)), char_tokenizer(), quantize="bf16"
                      ).generate(prompts, PARAMS)
    model = load_model(str(dense_folder))
    mlp = model.model.layers[0].mlp.experts
    layer_bytes = sum(to_bf16_panels(w).nbytes for w in (
        torch.cat([mlp.gate_proj[0], mlp.up_proj[0]]), mlp.down_proj[0]))
    place_for_offload(model)
    with DenseStream(dense_folder, 3 * layer_bytes, quantize="bf16") as stream:
        assert stream.streamed == [0, 2, 3] and "bf16 panels" in stream.describe()
        got = Engine(model, char_tokenizer(), expert_store=stream, quantize="bf16"
                     ).generate(prompts, PARAMS)
        assert stream.stats.bytes_moved == stream.stats.misses * layer_bytes
    assert [o.token_ids for o in got] == [o.token_ids for o in resident]
