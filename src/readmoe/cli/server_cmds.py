"""`readmoe serve` (OpenAI-compatible HTTP server), `readmoe generate` and `readmoe chat`."""

from __future__ import annotations

import argparse
import sys

from readmoe.cli.engine_args import add_engine_args, add_precision_args, engine_options
from readmoe.cli.model_cmds import MODEL_HELP
from readmoe.models.device import add_placement_args, placement_from_args
from readmoe.server.config import API_KEY_ENV, ServerConfig

SERVE_MODEL_HELP = MODEL_HELP + "; a trained ReadME folder, or a dense model served as one expert"
BACKENDS = ("readmoe", "vllm")


def register(commands: argparse._SubParsersAction) -> None:
    d = ServerConfig()
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics)",
        description="Serve MODEL over HTTP with the engine: point the official openai client "
        "at http://HOST:PORT/v1. SIGINT/SIGTERM stop it gracefully.")
    serve.add_argument("model", help=SERVE_MODEL_HELP)
    serve.add_argument("--backend", choices=BACKENDS, default=BACKENDS[0],
                       help="readmoe: this package's engine (default; expert offloading and "
                       "the co-design); vllm: vLLM's OpenAI server with the ReadME plugin (tensor "
                       "and expert parallelism; run from .venv-vllm, see `make vllm`); every "
                       "argument readmoe does not know passes through to `vllm serve`")
    serve.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    serve.add_argument("--port", type=int, default=d.port,
                       help=f"port (default {d.port}; 0 picks a free one and prints it)")
    serve.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} "
                       "if set, else no key)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: MODEL as given)")
    serve.add_argument("--max-queue", type=int, default=d.max_queue,
                       help="requests allowed to wait for the engine; beyond, 503 with "
                       f"Retry-After (default {d.max_queue})")
    serve.add_argument("--grace", type=float, default=d.grace_s,
                       help="seconds a shutdown lets in-flight requests finish before "
                       f"aborting them (default {d.grace_s:g})")
    serve.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                       help="a chat reply's length when the request names no max_tokens")
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    add_engine_args(serve)
    add_placement_args(serve)
    serve.set_defaults(handler=run_serve, engine_only=_engine_only(serve))

    generate = commands.add_parser("generate", help="stream one answer to stdout")
    generate.add_argument("model", help=SERVE_MODEL_HELP)
    generate.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    generate.add_argument("--chat", action="store_true",
                          help="send the prompt as a user message through the chat template")
    generate.add_argument("--system", default=None, help="with --chat: a system message")
    _sampling_args(generate)
    add_precision_args(generate)
    add_placement_args(generate)
    generate.set_defaults(handler=run_generate)

    chat = commands.add_parser(
        "chat", help="interactive chat in the terminal (Ctrl-C ends a reply, Ctrl-D quits)")
    chat.add_argument("model", help=SERVE_MODEL_HELP)
    chat.add_argument("--system", default=None, help="a system message")
    _sampling_args(chat)
    add_precision_args(chat)
    add_placement_args(chat)
    chat.set_defaults(handler=run_chat)


def _engine_only(serve: argparse.ArgumentParser) -> frozenset[str]:
    """The options of `readmoe serve` that mean nothing to `vllm serve` (refused with vllm)."""
    from readmoe.integrations.vllm.serve import BACKEND_OPTION, FORWARDED

    options = {name for action in serve._actions for name in action.option_strings}
    return frozenset(options - set(FORWARDED) - {BACKEND_OPTION, "-h", "--help"})


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _params(args: argparse.Namespace):
    from readmoe.serve.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)


def _terminal_options(args: argparse.Namespace):
    from readmoe.serve.launch import EngineOptions

    return EngineOptions(max_seqs=1, kv_blocks=512, quantize=args.quantize,
                         kv_dtype=args.kv_dtype)


def run_serve(args: argparse.Namespace) -> int:
    if args.backend == "vllm":
        from readmoe.integrations.vllm.serve import exec_vllm_serve

        exec_vllm_serve(args.argv, args.model, args.engine_only)
    from readmoe.server.config import api_key_from
    from readmoe.server.run import run_server

    config = ServerConfig(host=args.host, port=args.port, api_key=api_key_from(args.api_key),
                          served_model_name=args.served_model_name, max_queue=args.max_queue,
                          grace_s=args.grace, default_max_tokens=args.default_max_tokens,
                          access_log=args.access_log)
    return run_server(args.model, config, engine_options(args), placement_from_args(args))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    from readmoe.serve.launch import open_engine
    from readmoe.server.terminal import encode_chat, stream_reply

    params, placement = _params(args), placement_from_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with open_engine(args.model, _terminal_options(args), placement) as served:
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            ids = encode_chat(served, [*system, {"role": "user", "content": prompt}])
        else:
            ids = served.tokenizer.encode(prompt)
        reply = stream_reply(served, ids, params, _write)
    _write("\n")
    return 130 if reply.interrupted else 0


def run_chat(args: argparse.Namespace) -> int:
    from readmoe.serve.launch import open_engine
    from readmoe.server.terminal import ChatSession

    params, placement = _params(args), placement_from_args(args)
    with open_engine(args.model, _terminal_options(args), placement) as served:
        if sys.stdin.isatty():
            print(f"chatting with {args.model} ({placement.describe()}); Ctrl-C ends a reply, "
                  "Ctrl-D quits", flush=True)
        return ChatSession(served, params, args.system).run(input, _write)
