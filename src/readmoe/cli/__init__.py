"""The one `readmoe` command; each stage registers its subcommands from its own module.

A `ReadmoeError` ends the command with one line on stderr and exit status 2: bad input is
explained, never dumped as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from readmoe import __version__
from readmoe.errors import ReadmoeError


def build_parser() -> argparse.ArgumentParser:
    from readmoe.cli import (
        analyze_cmds,
        bench_cmds,
        data_cmds,
        eval_cmds,
        model_cmds,
        refactor_cmds,
        server_cmds,
        train_cmds,
    )

    parser = argparse.ArgumentParser(
        prog="readmoe",
        description="Refactor a dense LLM into a router-decoupled mixture of experts "
        "(Read-ME) and serve it.")
    parser.add_argument("--version", action="version", version=f"readmoe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (model_cmds, data_cmds, refactor_cmds, train_cmds, eval_cmds, analyze_cmds,
                   bench_cmds, server_cmds):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    # Only `serve --backend vllm` takes arguments it does not know: vLLM's, passed through.
    if unknown and getattr(args, "backend", None) != "vllm":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv
    try:
        return int(args.handler(args) or 0)
    except ReadmoeError as exc:
        print(f"readmoe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("readmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
