"""Cut a dense Llama-family model into a ReadME model along an expert plan, and save it.

The plan names FFN intermediate channels. A channel c of a gated MLP is row c of gate_proj and
up_proj and column c of down_proj, so an expert is those rows and columns index-selected. With
the shared set plus expert e's channels, a token computes exactly the dense FFN restricted to
those channels (the paper's mask): slicing adds no approximation beyond the mask itself.
"""

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from readmoe.errors import ReadmoeError
from readmoe.model import ReadMEConfig, ReadMEForCausalLM
from readmoe.model.configuration_readme import BACKBONE_TYPES
from readmoe.refactor.plan import ExpertPlan

PLAN_DIR = "plan"
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _check_dense(dense_model: PreTrainedModel, plan: ExpertPlan) -> None:
    """Refuse, in one line each, models the channel slicing would not reproduce."""
    config = dense_model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in BACKBONE_TYPES:
        raise ReadmoeError(f"dense model type {model_type!r} is not supported: slicing needs a "
                           f"gated-MLP Llama-family model ({', '.join(BACKBONE_TYPES)})")
    if getattr(config, "mlp_bias", False):
        raise ReadmoeError("dense model has MLP biases (mlp_bias=True), which slicing does not "
                           "support; use a model without them")
    backbone = getattr(dense_model, "model", None)
    if backbone is None or not hasattr(backbone, "layers") or not hasattr(dense_model, "lm_head"):
        raise ReadmoeError(f"{type(dense_model).__name__} is not a causal LM with .model.layers "
                           "and .lm_head; load the dense model with AutoModelForCausalLM")
    if len(backbone.layers) != plan.num_layers:
        raise ReadmoeError(f"the plan has {plan.num_layers} layers but the dense model has "
                           f"{len(backbone.layers)}: the plan was made for another model")
    if config.intermediate_size != plan.intermediate_size:
        raise ReadmoeError(f"the plan is for FFN width {plan.intermediate_size} but the dense "
                           f"model's is {config.intermediate_size}: the plan was made for "
                           "another model")
    for index, layer in enumerate(backbone.layers):
        mlp = layer.mlp
        for name in _MLP_PROJECTIONS:
            proj = getattr(mlp, name, None)
            if not isinstance(proj, torch.nn.Linear) or proj.bias is not None:
                raise ReadmoeError(f"layer {index}: the MLP has no bias-free linear {name}; "
                                   "slicing needs a gated (SwiGLU) MLP")


def _sliced_mlp_tensors(prefix: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                        shared: torch.Tensor, experts: torch.Tensor,
                        refit: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """State-dict entries of one ReadMEMoE from the dense gate/up [D, H] and down [H, D];
    ``refit`` replaces the sliced down columns (shared [H, S], experts [E, H, R])."""
    tensors = {}
    if shared.numel():
        index = shared.to(gate.device)  # [S]
        tensors[f"{prefix}shared.gate_proj.weight"] = gate.index_select(0, index)  # [S, H]
        tensors[f"{prefix}shared.up_proj.weight"] = up.index_select(0, index)  # [S, H]
        tensors[f"{prefix}shared.down_proj.weight"] = down.index_select(1, index)  # [H, S]
    num_experts, size = experts.shape
    if size:
        index = experts.reshape(-1).to(gate.device)  # [E * R]
        hidden = gate.shape[1]
        tensors[f"{prefix}experts.gate_proj"] = gate.index_select(0, index).view(
            num_experts, size, hidden)  # [E, R, H]
        tensors[f"{prefix}experts.up_proj"] = up.index_select(0, index).view(
            num_experts, size, hidden)  # [E, R, H]
        tensors[f"{prefix}experts.down_proj"] = (
            down.index_select(1, index).view(hidden, num_experts, size)
            .permute(1, 0, 2).contiguous())  # [H, E*R] -> [E, H, R]
    if refit is not None:
        for name, value in zip(("shared.down_proj.weight", "experts.down_proj"), refit,
                               strict=True):
            key = prefix + name
            if key in tensors:
                if value.shape != tensors[key].shape:
                    raise ReadmoeError(f"{key}: refitted columns {tuple(value.shape)}, the "
                                       f"slice is {tuple(tensors[key].shape)}")
                tensors[key] = value.to(device=down.device, dtype=down.dtype).contiguous()
    return tensors


@torch.no_grad()
def slice_dense(dense_model: PreTrainedModel, plan: ExpertPlan,
                compensation: list[torch.Tensor] | None = None,
                down: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> ReadMEForCausalLM:
    """A ReadME model holding the dense model's attention, norms and embeddings, and the plan's
    shared expert and routed experts cut from each FFN (same dtype and device as the dense one);
    with ``compensation`` (per layer ``[E, H]`` or ``[1, H]``, see refactor.compensation)
    every FFN adds its bias for the channels it dropped; ``down`` (per layer, see
    refactor.refit) replaces the sliced down_proj columns."""
    plan.validate()
    _check_dense(dense_model, plan)
    if down is not None and len(down) != plan.num_layers:
        raise ReadmoeError(f"{len(down)} refitted layers for a plan of {plan.num_layers}")
    config = ReadMEConfig.from_dense_config(
        dense_model.config,
        shared_intermediate_sizes=[lp.shared_size for lp in plan.layers],
        expert_intermediate_sizes=[lp.expert_size for lp in plan.layers],
        expert_names=plan.expert_names,
        compensation=compensation is not None,
    )
    dense_state = dense_model.state_dict()
    state = {name: tensor for name, tensor in dense_state.items() if ".mlp." not in name}
    for index, lp in enumerate(plan.layers):
        dense_prefix = f"model.layers.{index}.mlp."
        gate, up, dense_down = (dense_state[f"{dense_prefix}{name}.weight"]
                                  for name in _MLP_PROJECTIONS)
        state.update(_sliced_mlp_tensors(dense_prefix, gate, up, dense_down, lp.shared,
                                         lp.experts, None if down is None else down[index]))
        if compensation is not None:
            state[f"{dense_prefix}compensation"] = compensation[index].to(gate.device)

    # Every weight is overwritten below, so skip the random initialisation (slow on 7B models).
    with no_init_weights():
        model = ReadMEForCausalLM._from_config(
            config, dtype=dense_model.dtype,
            attn_implementation=dense_model.config._attn_implementation)
    model.tie_weights()  # no_init_weights skipped the tying that post_init would do
    model.load_state_dict(state, strict=True)
    model.to(dense_model.device)
    model.generation_config = copy.deepcopy(dense_model.generation_config)
    model.eval()
    return model


def _is_replaceable(folder: Path) -> bool:
    """An existing output folder may be replaced only if it is empty or a ReadME model folder."""
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    config_file = folder / "config.json"
    try:
        return json.loads(config_file.read_text()).get("model_type") == ReadMEConfig.model_type
    except (OSError, ValueError):
        return False


def _make_readable(folder: Path) -> None:
    """mkdtemp and the atomic writers create owner-only entries; a model folder is for sharing."""
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def save_readme(model: ReadMEForCausalLM, out_dir: str | Path,
                tokenizer: PreTrainedTokenizerBase | None = None,
                plan: ExpertPlan | None = None) -> Path:
    """Write a self-contained HF model folder (safetensors, config with auto_map, the modeling
    code, the tokenizer and the plan when given) as a whole: it is built in a temporary sibling
    folder and renamed into place, so readers never see a half-written model.

    An existing ``out_dir`` is replaced only if it is empty or holds a ReadME model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not _is_replaceable(out_dir):
        raise ReadmoeError(f"{out_dir} exists and is not a ReadME model folder; choose another "
                           "output folder or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / PLAN_DIR)
        pickled = sorted(path.name for path in tmp.glob("*.bin"))
        if pickled:
            raise ReadmoeError(f"refusing to write pickled weights {pickled}: safetensors only")
        _make_readable(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old",
                                        dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            try:
                os.replace(tmp, out_dir)
            except OSError:
                os.replace(old / out_dir.name, out_dir)  # put the previous model back
                raise
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir
