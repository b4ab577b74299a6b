"""The ReadME model: a dense Llama-family backbone with shared + routed experts per FFN.

Importing this package registers the model with transformers' Auto classes, so a saved model
folder loads in-process without ``trust_remote_code`` (the folder also carries its own copy of
the code, for loading anywhere with ``trust_remote_code=True``).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from readmoe.model.configuration_readme import ROUTER_DIMS, ROUTER_TYPES, ReadMEConfig
from readmoe.model.experts import ExpertGroups, ReadMEExperts, ReadMEMoE, ReadMESharedExpert
from readmoe.model.modeling_readme import ReadMEForCausalLM, ReadMEModel, ReadMEPreTrainedModel
from readmoe.model.pregating import PreGatingRouter, RouterCache, default_router_dim
from readmoe.model.routing import ReadMECausalLMOutputWithPast, ReadMEModelOutputWithPast

AutoConfig.register(ReadMEConfig.model_type, ReadMEConfig, exist_ok=True)
AutoModel.register(ReadMEConfig, ReadMEModel, exist_ok=True)
AutoModelForCausalLM.register(ReadMEConfig, ReadMEForCausalLM, exist_ok=True)

__all__ = [
    "ROUTER_DIMS",
    "ROUTER_TYPES",
    "ExpertGroups",
    "PreGatingRouter",
    "ReadMECausalLMOutputWithPast",
    "ReadMEConfig",
    "ReadMEExperts",
    "ReadMEForCausalLM",
    "ReadMEMoE",
    "ReadMEModel",
    "ReadMEModelOutputWithPast",
    "ReadMEPreTrainedModel",
    "ReadMESharedExpert",
    "RouterCache",
    "default_router_dim",
]
