"""The figures of ``readmoe analyze``, drawn from the analysis dict alone (never from raw
choices), so each PNG shows exactly the numbers in ``analysis.json``.

Figures are built on bare ``matplotlib.figure.Figure`` objects rendered by Agg: no pyplot, no
global state, no display needed. Each PNG is rendered in memory and written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from readmoe.analysis.information import row_shares
from readmoe.io import atomic_write_bytes

FIGURES = ("transitions.png", "mi_per_layer.png", "reuse_distance.png", "domain_expert.png")
ROUTER_NAMES = {"pregating": "pre-gating", "layerwise": "layer-wise gates", "oracle": "oracle"}
LOCALITY_SERIES = (("pregating", "pre-gating"), ("layerwise", "layer-wise (mean of layers)"),
                   ("oracle", "oracle (summed)"))


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def _heatmap(fig: Figure, ax, matrix: np.ndarray, rows: list[str], cols: list[str],
             title: str) -> None:
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    if matrix.size <= 100:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if value < 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def _empty(path: Path, message: str) -> None:
    fig = Figure(figsize=(4, 2))
    fig.text(0.5, 0.5, message, ha="center", va="center")
    _save(fig, path)


def representative_pairs(count: int) -> list[int]:
    """Indices of the first, middle and last consecutive layer pairs (2-3 of them)."""
    return sorted({0, count // 2, count - 1}) if count else []


def plot_transitions(analysis: dict, path: Path) -> None:
    """P(expert at the next routed layer | expert at this one), for representative pairs."""
    redundancy = analysis["layer_redundancy"]
    picks = representative_pairs(len(redundancy["oracle"]["pairs"]))
    if not picks:
        _empty(path, "no consecutive routed layers")
        return
    experts = analysis["expert_names"]
    fig = Figure(figsize=(4.2 * len(picks), 3.6 * len(redundancy)))
    axes = fig.subplots(len(redundancy), len(picks), squeeze=False)
    for row, (name, block) in enumerate(redundancy.items()):
        for col, index in enumerate(picks):
            pair = block["pairs"][index]
            shares = row_shares(np.asarray(pair["counts"]))
            low, high = pair["layers"]
            title = f"{ROUTER_NAMES[name]}: layer {low} -> {high}"
            _heatmap(fig, axes[row][col], shares, experts, experts,
                     f"{title} (norm. MI {pair['normalised_mi']:.2f})")
            axes[row][col].set_xlabel(f"expert at layer {high}", fontsize=8)
            axes[row][col].set_ylabel(f"expert at layer {low}", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_mi_per_layer(analysis: dict, path: Path) -> None:
    """MI and normalised MI of every consecutive routed pair, per router."""
    redundancy = analysis["layer_redundancy"]
    if not redundancy["oracle"]["pairs"]:
        _empty(path, "no consecutive routed layers")
        return
    fig = Figure(figsize=(8, 3.4))
    mi_ax, nmi_ax = fig.subplots(1, 2)
    for name, block in redundancy.items():
        x = [pair["layers"][0] for pair in block["pairs"]]
        label = ROUTER_NAMES[name]
        mi_ax.plot(x, [pair["mi_bits"] for pair in block["pairs"]], marker="o", label=label)
        nmi_ax.plot(x, [pair["normalised_mi"] for pair in block["pairs"]], marker="o",
                    label=label)
        mi_ax.set_xticks(x)
        nmi_ax.set_xticks(x)
    mi_ax.axhline(redundancy["oracle"]["independence_bias_bits"], color="grey", ls="--",
                  lw=0.8, label="independent (bias)")
    mi_ax.set(xlabel="layer l (pair l -> next routed layer)", ylabel="MI (bits)",
              title="mutual information")
    nmi_ax.set(xlabel="layer l (pair l -> next routed layer)", ylabel="I / H(next)",
               title="normalised MI", ylim=(0.0, 1.05))
    mi_ax.legend(fontsize=7)
    nmi_ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_reuse_distance(analysis: dict, path: Path) -> None:
    """Share of tokens per reuse distance: mass at distance 1 is temporal locality."""
    locality = analysis["temporal_locality"]
    series = [(key, label) for key, label in LOCALITY_SERIES if key in locality]
    buckets = list(locality["oracle"]["reuse_distance"])
    fig = Figure(figsize=(9, 3.4))
    ax = fig.subplots()
    width = 0.8 / len(series)
    positions = np.arange(len(buckets))
    for i, (key, label) in enumerate(series):
        shares = [locality[key]["reuse_distance"][b] for b in buckets]
        ax.bar(positions + (i - (len(series) - 1) / 2) * width, shares, width,
               label=f"{label} (reuse {100 * locality[key]['reuse_share']:.1f}%)")
    ax.set_xticks(positions, buckets, fontsize=7)
    ax.set(xlabel="reuse distance (tokens back to the same expert)", ylabel="share of tokens",
           title="reuse distance (paper: Read-ME reuses 71.3%, Mixtral 20.8%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_domain_expert(analysis: dict, path: Path) -> None:
    """Rows: domains; columns: experts; each row the shares of that domain's tokens."""
    blocks = analysis["domain_expert"]
    fig = Figure(figsize=(4.6 * len(blocks), 3.6))
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    for ax, (name, block) in zip(axes, blocks.items(), strict=True):
        _heatmap(fig, ax, np.asarray(block["shares"]), block["rows"], block["columns"],
                 ROUTER_NAMES[name])
        ax.set(xlabel="expert", ylabel="domain")
    fig.tight_layout()
    _save(fig, path)


def write_figures(analysis: dict, out: Path) -> None:
    """Write every PNG of FIGURES into ``out``."""
    plot_transitions(analysis, out / FIGURES[0])
    plot_mi_per_layer(analysis, out / FIGURES[1])
    plot_reuse_distance(analysis, out / FIGURES[2])
    plot_domain_expert(analysis, out / FIGURES[3])
