"""Perplexity of one model on every domain of a corpus, as a table and as JSON."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from readmoe.data.tokens import pack_blocks
from readmoe.eval.perplexity import window_nll

DEFAULT_WINDOW = 512
DEFAULT_TOKENS = 8192


def heldout_blocks(corpus, tokenizer, domain: str, window: int = DEFAULT_WINDOW,
                   max_tokens: int = DEFAULT_TOKENS) -> torch.Tensor:
    """The evaluation windows of one domain: its held-out split packed into `window` blocks."""
    return pack_blocks(tokenizer, corpus.documents(domain, "heldout"), window, max_tokens)


def domain_perplexity(model, tokenizer, corpus, *, model_name: str,
                      window: int = DEFAULT_WINDOW, max_tokens: int = DEFAULT_TOKENS,
                      batch_size: int = 8, domains: list[str] | None = None,
                      routing: Callable[[str, torch.Tensor], dict] | None = None,
                      extra: dict | None = None) -> dict:
    """Evaluate every domain; `routing(domain, batch)` gives extra forward kwargs per batch."""
    results = {}
    for domain in domains or corpus.domains:
        blocks = heldout_blocks(corpus, tokenizer, domain, window, max_tokens)
        kwargs = None
        if routing is not None:
            def kwargs(batch: torch.Tensor, domain: str = domain) -> dict:
                return routing(domain, batch)
        result = window_nll(model, blocks, batch_size, kwargs, desc=f"ppl {domain}")
        results[domain] = result.as_dict()
    report = {"model": model_name, "window": window, "max_tokens": max_tokens,
              "domains": results}
    if extra:
        report.update(extra)
    return report


def format_ppl_table(reports: list[dict]) -> str:
    """A markdown table: one row per domain, one column per report (model)."""
    domains = sorted({d for r in reports for d in r["domains"]})
    names = [r.get("label", r["model"]) for r in reports]
    lines = ["| domain | " + " | ".join(names) + " | tokens |",
             "|---|" + "---:|" * (len(names) + 1)]
    for domain in domains:
        cells = []
        for report in reports:
            entry = report["domains"].get(domain)
            cells.append(f"{entry['ppl']:.2f}" if entry else "-")
        tokens = next(r["domains"][domain]["tokens"] for r in reports if domain in r["domains"])
        lines.append(f"| {domain} | " + " | ".join(cells) + f" | {tokens} |")
    return "\n".join(lines)


def evaluate_model(spec: str, label: str, tokenizer, corpus, *, max_tokens: int = DEFAULT_TOKENS,
                   routing: str = "router") -> dict:
    """Load `spec` and score every domain under `routing`; prints a one-line summary."""
    from readmoe.eval.routing_modes import make_routing
    from readmoe.models import load_model

    model = load_model(str(spec))
    report = domain_perplexity(model, tokenizer, corpus, model_name=str(spec),
                               max_tokens=max_tokens,
                               routing=make_routing(model, routing, model_dir=spec),
                               extra={"label": label, "routing": routing})
    print(f"{label}: " + ", ".join(f"{d} {v['ppl']:.1f}" for d, v in report["domains"].items()),
          flush=True)
    return report


def domain_wins(reports: list[dict], a: str, b: str) -> dict:
    """On which domains the report labelled `a` has lower perplexity than the one labelled `b`."""
    by_label = {r["label"]: r["domains"] for r in reports}
    wins = sorted(d for d in by_label[a] if by_label[a][d]["ppl"] < by_label[b][d]["ppl"])
    return {"domains": wins, "count": len(wins), "of": len(by_label[a])}


def log_gap(report: dict, reference: dict) -> float:
    """Mean over ``reference``'s domains of log(ppl / reference ppl): how far a refactored
    model is from the dense one, every domain weighted alike (the quality issue's measure)."""
    domains = reference["domains"]
    return sum(math.log(report["domains"][d]["ppl"] / domains[d]["ppl"])
               for d in domains) / len(domains)
