"""Turn routing choices into ``analysis.json``, ``analysis.md`` and the figures.

The JSON is the single source: the markdown tables and the PNGs are drawn from it, so what a
reader sees always matches the numbers on disk. Every file is written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from readmoe.analysis import information as info
from readmoe.analysis.collect import RoutingChoices
from readmoe.io import atomic_write_json, atomic_write_text

# Paper, section 5: of 4096 tokens, how many reuse the previous token's expert.
REFERENCE_REUSE = {"Read-ME": {"reused": 2921, "tokens": 4096},
                   "Mixtral": {"reused": 850, "tokens": 4096}}
MAX_DISTANCE = 16
ROUTER_LABELS = {"pregating": "pre-gating router", "layerwise": "layer-wise gates",
                 "oracle": "oracle (summed-score label)",
                 "oracle_per_layer": "oracle per layer (mean over layers)"}
DEFINITIONS = {
    "mutual_information": "plug-in I(X;Y) in bits of the experts of consecutive routed layers "
                          "(X: layer l, Y: the next routed layer), over all tokens",
    "normalised_mi": "I(X;Y) / H(Y) = 1 - H(Y|X) / H(Y): the share of the next layer's choice "
                     "uncertainty that the previous layer's choice removes; 1 for a constant Y",
    "best_successor_share": "share of tokens whose next-layer expert is the most frequent one "
                            "given their expert at layer l",
    "independence_bias_bits": "expected plug-in MI of independent choices, (E-1)^2/(2N ln 2): "
                              "the noise floor",
    "reuse_share": "among tokens with a predecessor in their sequence, the share routed to the "
                   "predecessor's expert",
    "iid_reuse_share": "sum_e p_e^2: the reuse share of independent draws from the usage",
    "reuse_distance": "positions back to the last token of the same sequence with the same "
                      f"expert; 1..{MAX_DISTANCE}, 'beyond', or 'never' (first use); shares of "
                      "all tokens",
    "domain_expert": "rows: domains, columns: experts, each row the shares of that domain's "
                     "tokens per expert",
}


def _redundancy(per_layer: np.ndarray, layers: list[int], num_experts: int) -> dict:
    flat = per_layer.reshape(-1, per_layer.shape[-1])
    pairs = []
    for i in range(flat.shape[1] - 1):
        x, y = flat[:, i], flat[:, i + 1]
        counts = info.joint_counts(x, y, num_experts, num_experts)
        pairs.append({
            "layers": [layers[i], layers[i + 1]],
            "mi_bits": info.mutual_information(x, y, num_experts, num_experts),
            "normalised_mi": info.normalised_mutual_information(x, y, num_experts, num_experts),
            "entropy_bits": [info.entropy(x, num_experts), info.entropy(y, num_experts)],
            "best_successor_share": info.best_successor_share(x, y, num_experts, num_experts),
            "same_expert_share": float((x == y).mean()),
            "counts": counts.tolist(),
        })

    def mean(key: str) -> float | None:
        return float(np.mean([p[key] for p in pairs])) if pairs else None

    return {"pairs": pairs, "mean_mi_bits": mean("mi_bits"),
            "mean_normalised_mi": mean("normalised_mi"),
            "mean_best_successor_share": mean("best_successor_share"),
            "independence_bias_bits": info.independence_bias_bits(num_experts, num_experts,
                                                                  flat.shape[0])}


def _locality(sequences: np.ndarray, num_experts: int) -> dict:
    return {"reuse_share": info.reuse_share(sequences),
            "iid_reuse_share": info.iid_reuse_share(sequences, num_experts),
            "reuse_distance": info.reuse_distances(sequences, MAX_DISTANCE).shares()}


def _layer_locality(per_layer: np.ndarray, num_experts: int) -> dict:
    """Per-layer locality averaged over routed layers (each layer's gate is its own router)."""
    layers = [_locality(per_layer[..., i], num_experts) for i in range(per_layer.shape[-1])]
    buckets = layers[0]["reuse_distance"]
    return {"reuse_share": float(np.mean([r["reuse_share"] for r in layers])),
            "iid_reuse_share": float(np.mean([r["iid_reuse_share"] for r in layers])),
            "reuse_distance": {key: float(np.mean([r["reuse_distance"][key] for r in layers]))
                               for key in buckets},
            "per_layer_reuse_share": [r["reuse_share"] for r in layers]}


def _usage(labels: np.ndarray, num_experts: int) -> dict:
    return {"shares": info.expert_usage(labels, num_experts).tolist(),
            "entropy_bits": info.entropy(labels, num_experts)}


def _domain_expert(choices: RoutingChoices, labels: np.ndarray) -> dict:
    counts = info.joint_counts(choices.domain, labels, len(choices.domains),
                               choices.num_experts)
    names = choices.expert_names
    own_rows = [d for d, name in enumerate(choices.domains) if name in names]
    total = int(counts[own_rows].sum()) if own_rows else 0
    own = sum(int(counts[d, names.index(choices.domains[d])]) for d in own_rows)
    match = own / total if total else None
    return {"rows": choices.domains, "columns": names, "counts": counts.tolist(),
            "shares": info.row_shares(counts).tolist(), "own_expert_share": match}


def build_analysis(choices: RoutingChoices, meta: dict) -> dict:
    """Everything ``readmoe analyze`` reports, as a JSON-ready dict (layout: see
    ``readmoe.analysis``)."""
    experts, layers = choices.num_experts, choices.routed_layers
    redundancy = {"oracle": _redundancy(choices.oracle_layers, layers, experts)}
    locality: dict = {"reference": {name: {**ref, "share": ref["reused"] / ref["tokens"]}
                                    for name, ref in REFERENCE_REUSE.items()},
                      "oracle": _locality(choices.oracle, experts),
                      "oracle_per_layer": _layer_locality(choices.oracle_layers, experts)}
    usage: dict = {"oracle": _usage(choices.oracle, experts),
                   "oracle_per_layer": [_usage(choices.oracle_layers[..., i], experts)
                                        for i in range(len(layers))]}
    confusion: dict = {}
    if choices.pregating is not None:
        locality["pregating"] = _locality(choices.pregating, experts)
        usage["pregating"] = _usage(choices.pregating, experts)
        confusion["pregating"] = _domain_expert(choices, choices.pregating)
        confusion["pregating"]["oracle_agreement"] = float(
            (choices.pregating == choices.oracle).mean())
    confusion["oracle"] = _domain_expert(choices, choices.oracle)
    if choices.layerwise is not None:
        redundancy["layerwise"] = _redundancy(choices.layerwise, layers, experts)
        locality["layerwise"] = _layer_locality(choices.layerwise, experts)
        usage["layerwise_per_layer"] = [_usage(choices.layerwise[..., i], experts)
                                        for i in range(len(layers))]
    sequences, block = choices.domain.shape
    return {**meta, "tokens": choices.num_tokens, "sequences": sequences, "block_size": block,
            "tokens_per_domain": {name: int((choices.domain == d).sum())
                                  for d, name in enumerate(choices.domains)},
            "expert_names": choices.expert_names, "domains": choices.domains,
            "routed_layers": layers, "definitions": DEFINITIONS,
            "layer_redundancy": redundancy, "temporal_locality": locality,
            "domain_expert": confusion, "expert_usage": usage}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _redundancy_lines(analysis: dict) -> list[str]:
    red = analysis["layer_redundancy"]
    names = list(red)
    shown = {"oracle": "oracle", "layerwise": "layer-wise"}
    head = "| layers | " + " | ".join(
        f"{shown[n]} MI (bits) | {shown[n]} norm. MI | {shown[n]} best successor"
        for n in names) + " |"
    lines = [head, "|---|" + "---:|" * 3 * len(names)]
    for i, pair in enumerate(red["oracle"]["pairs"]):
        cells = []
        for name in names:
            p = red[name]["pairs"][i]
            cells += [_num(p["mi_bits"]), _num(p["normalised_mi"]),
                      _pct(p["best_successor_share"])]
        lines.append(f"| {pair['layers'][0]} -> {pair['layers'][1]} | " + " | ".join(cells) + " |")
    means = []
    for name in names:
        means += [_num(red[name]["mean_mi_bits"]), _num(red[name]["mean_normalised_mi"]),
                  _pct(red[name]["mean_best_successor_share"])]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    nmi = red["oracle"]["mean_normalised_mi"]
    if nmi is None:
        lines.append("\nThe model has a single routed layer: there is no layer pair to compare.")
        return lines
    verdict = ("nearly deterministic: one routing decision per token loses little (the "
               "paper's premise)" if nmi >= 0.7 else
               "dependent but far from deterministic: one decision per token overrides part of "
               "what per-layer routing would pick" if nmi >= 0.3 else
               "weakly dependent: one decision per token overrides much of what per-layer "
               "routing would pick")
    lines.append(f"\nNeighbouring layers' oracle choices are {verdict} (mean normalised MI "
                 f"{_num(nmi)}; independent choices would show about "
                 f"{_num(red['oracle']['independence_bias_bits'], 5)} bits of MI).")
    return lines


def _locality_lines(analysis: dict) -> list[str]:
    loc = analysis["temporal_locality"]
    shown = [k for k in ("pregating", "layerwise", "oracle", "oracle_per_layer") if k in loc]
    dists = ["1", "2", "3", "4", "beyond", "never"]
    lines = ["| router | reuse share | i.i.d. baseline | " + " | ".join(
        f"dist {d}" for d in dists) + " |", "|---|" + "---:|" * (2 + len(dists))]
    for key in shown:
        row = loc[key]
        cells = [_pct(row["reuse_share"]), _pct(row["iid_reuse_share"]),
                 *(_pct(row["reuse_distance"][d]) for d in dists)]
        lines.append(f"| {ROUTER_LABELS[key]} | " + " | ".join(cells) + " |")
    for name, ref in loc["reference"].items():
        lines.append(f"| paper: {name} | {_pct(ref['share'])} ({ref['reused']}/{ref['tokens']})"
                     " | - |" + " - |" * len(dists))
    main = loc.get("pregating", loc["oracle"])
    lines.append(f"\n{'The pre-gating router' if 'pregating' in loc else 'The oracle'} reuses "
                 f"the previous token's expert for {_pct(main['reuse_share'])} of tokens against "
                 f"{_pct(main['iid_reuse_share'])} for independent choices (paper: Read-ME "
                 "71.3%, Mixtral 20.8%): the higher, the more a cache of recent experts hits.")
    return lines


def _matrix_lines(block: dict) -> list[str]:
    lines = ["| domain | " + " | ".join(block["columns"]) + " |",
             "|---|" + "---:|" * len(block["columns"])]
    for name, row in zip(block["rows"], block["shares"], strict=True):
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
    return lines


def render_markdown(analysis: dict) -> str:
    """The report: one table per question, each followed by a one-line reading."""
    experts = analysis["expert_names"]
    lines = [f"# Routing analysis of {analysis['model']}", "",
             f"{analysis['tokens']} held-out tokens ({analysis['sequences']} blocks of "
             f"{analysis['block_size']}) from {', '.join(analysis['domains'])}; "
             f"{len(experts)} experts, routed layers {analysis['routed_layers']}.", "",
             "## Layer-wise redundancy", "", *_redundancy_lines(analysis), "",
             "## Temporal locality", "", *_locality_lines(analysis), "",
             "## Domain x expert", ""]
    for key, block in analysis["domain_expert"].items():
        own = block["own_expert_share"]
        lines += [f"**{ROUTER_LABELS[key]}**", "", *_matrix_lines(block), "",
                  f"{_pct(own)} of tokens go to the expert cut for their domain"
                  + (f"; the router agrees with the oracle on {_pct(block['oracle_agreement'])}."
                     if "oracle_agreement" in block else "."), ""]
    usage = analysis["expert_usage"]
    shown = [k for k in ("pregating", "oracle") if k in usage]
    lines += ["## Expert usage", "",
              "| expert | " + " | ".join(ROUTER_LABELS[k] for k in shown) + " |",
              "|---|" + "---:|" * len(shown)]
    for e, name in enumerate(experts):
        lines.append(f"| {name} | " + " | ".join(_pct(usage[k]["shares"][e]) for k in shown)
                     + " |")
    lines.append("| entropy (bits) | " + " | ".join(_num(usage[k]["entropy_bits"])
                                                    for k in shown) + " |")
    lowest = min(usage[k]["entropy_bits"] for k in shown) / math.log2(len(experts))
    lines.append(f"\nEntropy is at least {_pct(lowest)} of the balanced maximum log2("
                 f"{len(experts)}) = {math.log2(len(experts)):.3f} bits: "
                 + ("the load is close to balanced." if lowest >= 0.9 else
                    "a few experts carry most tokens, so they dominate cache and batch cost."))
    return "\n".join(lines) + "\n"


def write_analysis(choices: RoutingChoices, out_dir: str | Path, meta: dict) -> dict:
    """Write analysis.json, analysis.md and the PNGs into ``out_dir``; return the analysis."""
    from readmoe.analysis import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis = build_analysis(choices, meta)
    plots.write_figures(analysis, out)
    atomic_write_text(out / "analysis.md", render_markdown(analysis))
    atomic_write_json(out / "analysis.json", analysis)
    return analysis
