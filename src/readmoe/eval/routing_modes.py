"""How a ReadME model's tokens are routed during evaluation.

- ``router``: the model's own router (no expert_ids passed);
- ``domain``: every token of a text goes to the expert named after the text's domain;
- ``oracle``: each token's best-overlap expert from the dense model's activations (an upper
  bound; needs the dense model the ReadME model was carved from).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from readmoe.errors import ReadmoeError

ROUTINGS = ("router", "domain", "oracle")


def is_readme(model) -> bool:
    return getattr(model.config, "model_type", None) == "readme"


def make_routing(model, routing: str, model_dir: str | Path | None = None,
                 dense: str | None = None) -> Callable[[str, torch.Tensor], dict] | None:
    """Forward kwargs per (domain, batch) for `routing`; None for dense models."""
    if not is_readme(model):
        return None
    if routing not in ROUTINGS:
        raise ReadmoeError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
    if routing == "router":
        config = model.config
        if config.router_type == "none" and config.needs_routing:
            raise ReadmoeError("this ReadME model has no router yet; use --routing domain or "
                               "--routing oracle, or train one with `readmoe train`")
        return None
    names = list(model.config.expert_names)
    if routing == "domain":
        def by_domain(domain: str, batch: torch.Tensor) -> dict:
            if domain not in names:
                raise ReadmoeError(f"domain routing needs an expert named {domain!r}; this "
                                   f"model's experts are {', '.join(names)} (use --routing "
                                   "oracle)")
            return {"expert_ids": torch.full((batch.shape[0],), names.index(domain),
                                             dtype=torch.long, device=batch.device)}
        return by_domain
    router = oracle_for(model_dir, dense, like=model)

    def by_oracle(domain: str, batch: torch.Tensor) -> dict:
        return {"expert_ids": router.expert_ids(batch)}
    return by_oracle


@contextlib.contextmanager
def oracle_forward(model, model_dir: str | Path, dense: str | None = None) -> Iterator[None]:
    """Route every whole-sequence ``model(input_ids)`` call by the oracle while inside.

    Why: callers that only call the model (lm-eval's HFLM) cannot pass ``expert_ids``, so a
    forward pre-hook adds the oracle's for the ids it is given. The oracle reads the dense
    model's activations over the whole sequence, so a call that continues a KV cache (only the
    new tokens in ``input_ids``) is refused rather than routed without its context.
    """
    if not is_readme(model):
        raise ReadmoeError("oracle routing applies to ReadME models only")
    router = oracle_for(model_dir, dense, like=model)

    def add_expert_ids(_module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("past_key_values") is not None:
            raise ReadmoeError("oracle routing scores whole sequences; this call continues a "
                               "KV cache (generation): use the model's own router there")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and kwargs.get("expert_ids") is None:
            kwargs = {**kwargs, "expert_ids": router.expert_ids(ids)}
        return args, kwargs

    handle = model.register_forward_pre_hook(add_expert_ids, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def oracle_for(model_dir: str | Path | None, dense: str | None, like=None):
    """The oracle router of a saved ReadME folder, from its plan and its dense source model
    (loaded on the device and in the dtype of the model ``like``, else CPU fp32)."""
    from readmoe.models import load_model, resolve_model
    from readmoe.refactor.fingerprint import model_fingerprint
    from readmoe.refactor.oracle import OracleRouter
    from readmoe.refactor.plan import ExpertPlan

    if model_dir is None:
        raise ReadmoeError("oracle routing needs the ReadME model folder (it holds the plan)")
    plan_dir = Path(model_dir) / "plan"
    if not plan_dir.is_dir():
        raise ReadmoeError(f"{model_dir} has no plan/ folder, so its experts' channels are "
                           "unknown; oracle routing needs a folder written by `readmoe refactor`")
    plan = ExpertPlan.load(plan_dir)
    source = dense or plan.model
    expected = plan.meta.get("fingerprint")
    if expected and model_fingerprint(resolve_model(source)) != expected:
        raise ReadmoeError(f"{source} is not the dense model {model_dir} was carved from "
                           f"({plan.model}); pass the right one with --dense")
    where = {} if like is None else {"dtype": like.dtype, "device": like.device}
    return OracleRouter(load_model(source, **where), plan)
