"""Training configuration (defaults from the paper, section 4, scaled to a step budget)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from readmoe.errors import ReadmoeError
from readmoe.train.losses import RouterLossConfig

EXPERT_PARAMS = ("ffn", "all")
ROUTER_TYPES = ("pregating", "layerwise")
# optimizer steps between checkpoints inside a phase (not part of the config: it changes
# where a kill resumes, never the result): minutes of CPU work on the default model, seconds
# on a GPU, against a second or two to write a checkpoint
DEFAULT_CHECKPOINT_EVERY = 50


@dataclass(frozen=True)
class Recipe:
    """Learning rates, their decay and distillation, the settings whose best values depend on
    scale."""

    lr_router: float
    lr_experts: float
    kd_weight: float
    decay: float  # both learning rates are multiplied by this after every round
    final_router_steps: int  # router steps once the last expert phase is done (TrainConfig)


RECIPES = {
    # Read-ME section 4: set for a 7B model tuned on about a billion tokens
    "paper": Recipe(lr_router=5e-4, lr_experts=5e-5, kd_weight=0.0, decay=0.8,
                    final_router_steps=0),
    # models under SMALL_MODEL_PARAMS tuned on 1e4-1e5 tokens (results/recovery_sweep.md:
    # 4x the paper's rates and KD from the dense logits recover several times more per token;
    # results/quality_curve-nodecay.md: without the per-round decay every budget from 2 rounds up
    # recovers more, the late rounds are not starved; results/router_budget.md: 640 router
    # steps after the last round lift code routing from 77% to 82% of the oracle's choices and
    # win code over prune, for 33 s of router training)
    "small": Recipe(lr_router=2e-3, lr_experts=2e-4, kd_weight=1.0, decay=1.0,
                    final_router_steps=640),
}
SMALL_MODEL_PARAMS = 1e9


def dense_parameters(config) -> float:
    """The dense source's parameter count from a refactored model's config (embeddings once:
    tied or not, the head is one more matrix of the same size only when untied)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    attention = 2 * hidden * head_dim * (config.num_attention_heads
                                         + config.num_key_value_heads)
    ffn = 3 * hidden * config.dense_intermediate_size
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return float(layers * (attention + ffn) + embeddings)


def recipe_for(name: str, config) -> tuple[str, Recipe]:
    """``name`` "auto" picks "small" below ``SMALL_MODEL_PARAMS`` dense parameters, else
    "paper"; returns the chosen name and its recipe."""
    if name == "auto":
        name = "small" if dense_parameters(config) < SMALL_MODEL_PARAMS else "paper"
    if name not in RECIPES:
        raise ReadmoeError(f"unknown recipe {name!r}; choose auto, {', '.join(RECIPES)}")
    return name, RECIPES[name]


@dataclass
class TrainConfig:
    rounds: int = 8
    router_steps: int = 100
    expert_steps: int = 200
    lr_router: float = 5e-4
    lr_experts: float = 5e-5
    decay: float = 0.8  # both learning rates are multiplied by this after every round
    weight_decay: float = 0.01
    batch_size: int = 8  # sequences per optimizer step (over all processes)
    block_size: int = 512
    router_type: str = "pregating"
    expert_params: str = "ffn"  # "ffn": shared + routed experts; "all": every backbone weight
    kd_weight: float = 0.0  # weight of KL(dense || ReadME) added to the LM loss in expert tuning
    # a last router phase after the last round's expert phase, experts fixed: the router's
    # targets come from the dense model, not the experts, so it keeps learning once the
    # experts stop moving, at the cost of router steps only (a one-block transformer)
    final_router_steps: int = 0
    eval_tokens: int = 2048  # held-out tokens per domain for the per-round perplexity
    # routing hysteresis candidates (pre-gating only): the trained model ships with the one of
    # lowest perplexity on unseen train text (train/hysteresis.py); [0]: no hysteresis
    hysteresis_margins: list[float] = field(
        default_factory=lambda: [0.0, 0.125, 0.25, 0.5, 1.0])
    hysteresis_tokens: int = 2048  # unseen train tokens per domain each margin is scored on
    seed: int = 0
    router_loss: RouterLossConfig = field(default_factory=RouterLossConfig)

    def validate(self) -> None:
        if self.rounds < 1:
            raise ReadmoeError(f"--rounds must be at least 1, got {self.rounds}")
        if min(self.router_steps, self.expert_steps, self.final_router_steps) < 0:
            raise ReadmoeError("--router-steps, --expert-steps and --final-router-steps must "
                               "be >= 0")
        if self.router_type not in ROUTER_TYPES:
            raise ReadmoeError(f"--router-type must be one of {', '.join(ROUTER_TYPES)}")
        if self.expert_params not in EXPERT_PARAMS:
            raise ReadmoeError(f"--expert-params must be one of {', '.join(EXPERT_PARAMS)}")
        if not 0.0 < self.decay <= 1.0:
            raise ReadmoeError(f"--decay must be in (0, 1], got {self.decay}")
        if not self.hysteresis_margins or min(self.hysteresis_margins) < 0:
            raise ReadmoeError("--hysteresis-margins needs one or more margins >= 0 (router "
                               f"logit units), got {self.hysteresis_margins}")
        if self.hysteresis_tokens < 1:
            raise ReadmoeError(f"--hysteresis-tokens must be >= 1, got {self.hysteresis_tokens}")
        if self.batch_size < 1 or self.block_size < 8:
            raise ReadmoeError("--batch-size must be >= 1 and --block-size >= 8")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        if "hysteresis_margins" in data:
            data["hysteresis_margins"] = list(data["hysteresis_margins"])
        loss = RouterLossConfig(**data.pop("router_loss", {}))
        return cls(**data, router_loss=loss)
