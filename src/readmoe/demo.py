"""`make demo`: the whole pipeline that exists so far, on the built-in model and corpora.

Steps (each cached or resumable, so a second run is quick): build the domain corpora,
summarise the dense model, compute activation statistics, carve the ReadME model and the
equal-width prune baseline, and compare held-out perplexity per domain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from readmoe.errors import ReadmoeError
from readmoe.models.builtin import DEFAULT_MODEL


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m readmoe.demo", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--corpus-bytes", type=int, default=1_000_000,
                        help="text bytes per domain in the built corpus")
    parser.add_argument("--stats-tokens", type=int, default=8192,
                        help="activation-statistics tokens per domain")
    parser.add_argument("--eval-tokens", type=int, default=4096,
                        help="held-out tokens per domain for perplexity")
    return parser.parse_args(argv)


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(args: argparse.Namespace) -> None:
    from readmoe.data.corpus import build_corpus, load_corpus
    from readmoe.eval.domains import domain_perplexity, format_ppl_table
    from readmoe.io import atomic_write_json, atomic_write_text
    from readmoe.models import load_model, load_tokenizer, model_info

    out = Path(args.out)
    started = time.time()
    step(f"dense model {args.model}")
    print(json.dumps(model_info(args.model), indent=2))

    step("domain corpora")
    corpus_dir = out / "corpus"
    manifest = build_corpus(corpus_dir, max_bytes_per_domain=args.corpus_bytes)
    for name, entry in manifest["domains"].items():
        print(f"{name:>10}: {entry['documents']:5d} documents, {entry['bytes']:9,d} bytes")
    corpus = load_corpus(corpus_dir)

    step("held-out perplexity per domain (dense)")
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    dense = domain_perplexity(model, tokenizer, corpus, model_name=args.model,
                              max_tokens=args.eval_tokens, extra={"label": "dense"})
    atomic_write_json(out / "ppl_dense.json", dense)
    reports = [dense]
    table = format_ppl_table(reports)
    atomic_write_text(out / "ppl.md", table + "\n")
    print(table)
    print(f"\ndemo finished in {time.time() - started:.0f} s; outputs in {out}/")


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except ReadmoeError as exc:
        print(f"readmoe: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
