"""`readmoe train`: alternating router distillation and expert tuning."""

from __future__ import annotations

import argparse
import json

from readmoe.models.device import add_placement_args, placement_from_args
from readmoe.train.config import (
    DEFAULT_CHECKPOINT_EVERY,
    EXPERT_PARAMS,
    RECIPES,
    ROUTER_TYPES,
    TrainConfig,
    recipe_for,
)


def register(commands: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    train = commands.add_parser(
        "train", help="train the router and tune the experts of a refactored model",
        description="Alternating rounds (Read-ME section 4): router distillation from the "
        "dense model's activations with the backbone frozen, then expert tuning with the "
        "router frozen. Resumable: rerun the same command after a kill.")
    train.add_argument("model", metavar="MOE_DIR", help="a folder written by `readmoe refactor`")
    train.add_argument("--corpus", required=True, help="a folder of <domain>.jsonl files")
    train.add_argument("--out", required=True, help="run folder (round-<r>/ per round)")
    train.add_argument("--rounds", type=int, default=d.rounds)
    train.add_argument("--router-steps", type=int, default=d.router_steps)
    train.add_argument("--expert-steps", type=int, default=d.expert_steps)
    train.add_argument("--final-router-steps", type=int, default=None,
                       help="router steps after the last round, experts fixed (default: the "
                       "recipe's: 640 small, 0 paper)")
    train.add_argument("--recipe", default="auto", choices=["auto", *RECIPES],
                       help="learning rates, their decay and KD: 'paper' (Read-ME's, for 7B "
                       "models and a billion tokens), 'small' (measured best per token on "
                       "small models), 'auto' (default: small below 1B dense parameters); "
                       "--lr-router, --lr-experts, --decay and --kd-weight override it")
    train.add_argument("--lr-router", type=float, default=None)
    train.add_argument("--lr-experts", type=float, default=None)
    train.add_argument("--decay", type=float, default=None,
                       help="learning-rate factor applied after every round (default: the "
                       "recipe's)")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--batch-size", type=int, default=d.batch_size,
                       help="sequences per step, over all processes")
    train.add_argument("--block-size", type=int, default=d.block_size)
    train.add_argument("--router-type", default=d.router_type, choices=ROUTER_TYPES,
                       help="pregating (the paper's) or layerwise (the baseline)")
    train.add_argument("--expert-params", default=d.expert_params, choices=EXPERT_PARAMS,
                       help="tune the FFN experts only, or every backbone weight")
    train.add_argument("--kd-weight", type=float, default=None,
                       help="weight of KL to the dense model's logits during expert tuning")
    train.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                       help="held-out tokens per domain scored after every round")
    train.add_argument("--hysteresis-margins", type=float, nargs="+",
                       default=d.hysteresis_margins, metavar="M",
                       help="routing hysteresis candidates (router logit units, pre-gating "
                       "only): the model ships with the one of lowest perplexity on train text "
                       "no step used (default: %(default)s; 0 alone: none)")
    train.add_argument("--hysteresis-tokens", type=int, default=d.hysteresis_tokens,
                       help="unseen train tokens per domain each margin is scored on")
    train.add_argument("--hard-weight", type=float, default=d.router_loss.hard_weight)
    train.add_argument("--soft-weight", type=float, default=d.router_loss.soft_weight)
    train.add_argument("--label-smoothing", type=float, default=d.router_loss.label_smoothing)
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--dense", help="the dense source model (default: the one in the plan)")
    train.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                       metavar="N", help="also checkpoint every N optimizer steps inside a "
                       f"phase (default {DEFAULT_CHECKPOINT_EVERY}; 0: at phase ends only); "
                       "a resumed run ends with the same weights whatever N")
    add_placement_args(train)
    train.set_defaults(handler=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from readmoe.models import load_config
    from readmoe.train.losses import RouterLossConfig

    name, recipe = recipe_for(args.recipe, load_config(args.model))
    print(f"recipe: {name} (lr router {recipe.lr_router:g}, lr experts {recipe.lr_experts:g}, "
          f"decay {recipe.decay:g} a round, KD weight {recipe.kd_weight:g}, "
          f"{recipe.final_router_steps} final router steps; flags given override it)", flush=True)

    def pick(value: float | None, default: float) -> float:
        return default if value is None else value

    return TrainConfig(
        rounds=args.rounds, router_steps=args.router_steps, expert_steps=args.expert_steps,
        final_router_steps=int(pick(args.final_router_steps, recipe.final_router_steps)),
        lr_router=pick(args.lr_router, recipe.lr_router),
        lr_experts=pick(args.lr_experts, recipe.lr_experts),
        decay=pick(args.decay, recipe.decay),
        weight_decay=args.weight_decay, batch_size=args.batch_size, block_size=args.block_size,
        router_type=args.router_type, expert_params=args.expert_params,
        kd_weight=pick(args.kd_weight, recipe.kd_weight), eval_tokens=args.eval_tokens,
        hysteresis_margins=list(args.hysteresis_margins),
        hysteresis_tokens=args.hysteresis_tokens,
        seed=args.seed,
        router_loss=RouterLossConfig(hard_weight=args.hard_weight, soft_weight=args.soft_weight,
                                     label_smoothing=args.label_smoothing))


def run_train(args: argparse.Namespace) -> int:
    from readmoe.train.rounds import Trainer, final_model_dir

    placement = placement_from_args(args)  # first: a bad --device is refused before any work
    trainer = Trainer(args.model, args.corpus, args.out, config_from_args(args), args.dense,
                      placement, args.checkpoint_every)
    state = trainer.run()
    if trainer.dist.is_main:
        last = state["rounds"][str(max(int(k) for k in state["rounds"]))]
        print(json.dumps({"model": str(final_model_dir(args.out)),
                          "router_accuracy": last.get("router_accuracy", {}).get("mean"),
                          "router_hysteresis": last.get("hysteresis", {}).get("chosen"),
                          "heldout_ppl": {d: v["ppl"] for d, v in last["heldout"].items()}},
                         indent=2))
    return 0
