"""`readmoe model ...`: inspect dense and ReadME checkpoints."""

from __future__ import annotations

import argparse
import json

MODEL_HELP = "a Hugging Face model folder, a .gguf file, or a built-in name (smollm2-135m)"


def register(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="inspect models")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    info = sub.add_parser("info", help="print a JSON summary of a model")
    info.add_argument("model", help=MODEL_HELP)
    info.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from readmoe.models import model_info

    print(json.dumps(model_info(args.model), indent=2))
    return 0
