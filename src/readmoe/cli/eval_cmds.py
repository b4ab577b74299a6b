"""`readmoe eval ...`: held-out perplexity per domain."""

from __future__ import annotations

import argparse

from readmoe.cli.model_cmds import MODEL_HELP
from readmoe.cli.tasks_cmds import register_tasks
from readmoe.eval.domains import DEFAULT_TOKENS, DEFAULT_WINDOW
from readmoe.eval.routing_modes import ROUTINGS
from readmoe.models.device import add_placement_args, placement_from_args


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="evaluate models")
    sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="SUBCOMMAND")
    ppl = sub.add_parser("ppl", help="held-out perplexity per domain")
    ppl.add_argument("model", help=MODEL_HELP)
    ppl.add_argument("--corpus", required=True,
                     help="a folder of <domain>.jsonl files (readmoe corpus build)")
    ppl.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                     help=f"tokens per domain at most (default {DEFAULT_TOKENS})")
    ppl.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                     help=f"tokens per scored window (default {DEFAULT_WINDOW})")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--domains", help="comma-separated subset of the corpus's domains")
    ppl.add_argument("--routing", default="router", choices=ROUTINGS,
                     help="ReadME models only: the model's router, the domain's expert, or "
                     "the oracle expert from the dense model (default router)")
    ppl.add_argument("--dense", help="dense source model for --routing oracle (default: the "
                     "one recorded in the ReadME folder's plan)")
    ppl.add_argument("--json", help="write the result as JSON to this file")
    add_placement_args(ppl)
    ppl.set_defaults(handler=run_ppl)
    register_tasks(sub)


def run_ppl(args: argparse.Namespace) -> int:
    from readmoe.data.corpus import load_corpus
    from readmoe.eval.domains import domain_perplexity, format_ppl_table
    from readmoe.eval.routing_modes import is_readme, make_routing
    from readmoe.io import atomic_write_json
    from readmoe.models import load_model, load_tokenizer

    placement = placement_from_args(args)
    corpus = load_corpus(args.corpus)
    domains = _pick_domains(corpus, args.domains)
    model = load_model(args.model, dtype=placement.dtype, device=placement.device)
    tokenizer = load_tokenizer(args.model)
    routing = make_routing(model, args.routing, model_dir=args.model, dense=args.dense)
    extra = {"routing": args.routing} if is_readme(model) else None
    report = domain_perplexity(model, tokenizer, corpus, model_name=args.model,
                               window=args.window, max_tokens=args.tokens,
                               batch_size=args.batch_size, domains=domains, routing=routing,
                               extra=extra)
    print(format_ppl_table([report]))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def _pick_domains(corpus, names: str | None) -> list[str]:
    from readmoe.errors import ReadmoeError

    if not names:
        return corpus.domains
    wanted = names.split(",")
    missing = [d for d in wanted if d not in corpus.domains]
    if missing:
        raise ReadmoeError(f"domains {', '.join(missing)} not in the corpus "
                           f"(it has {', '.join(corpus.domains)})")
    return wanted
