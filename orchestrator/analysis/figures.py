"""The report's figures as PNG bytes (matplotlib, Agg): learning curves and rliable plots.

Figures are returned as bytes keyed by file name, so the same images go to `--out DIR` and,
base64-encoded, into the self-contained HTML report.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from orchestrator.analysis.aggregates import METRICS, TAUS, Aggregates
from orchestrator.analysis.curves import Curve

#: One colour per attention type, the same in every figure.
COLOURS = {"NA": "#4d4d4d", "SWA": "#1f77b4", "CWRA": "#2ca02c", "CWCA": "#d62728",
           "CWRCA": "#9467bd"}
DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a login node
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _millions(timesteps: np.ndarray) -> np.ndarray:
    return np.asarray(timesteps, dtype=np.float64) / 1e6


def _draw_curves(ax: Any, curves: list[Curve], *, legend: bool) -> None:
    for c in curves:
        x = _millions(c.timesteps)
        colour = COLOURS.get(c.attn)
        ax.plot(x, c.mean, color=colour, linewidth=1.4, label=f"{c.attn} (n={c.n_seeds})")
        ax.fill_between(x, c.lower, c.upper, color=colour, alpha=0.2, linewidth=0)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc="best")


def learning_curve_png(game: str, curves: list[Curve]) -> bytes:
    """One game: every type's smoothed mean over seeds with its band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_curves(ax, curves, legend=True)
    ax.set_title(f"{game}: evaluation score (debiased EMA 0.98, band: +- s.e. over seeds)",
                 fontsize=9)
    ax.set_xlabel("agent steps (millions)")
    ax.set_ylabel("mean evaluation score")
    return _png(fig)


def learning_curves_grid_png(curves: dict[str, list[Curve]]) -> bytes:
    """All games in one overview, one small panel each, one shared legend."""
    plt = _pyplot()
    games = list(curves)
    columns = min(7, max(1, len(games)))
    rows = math.ceil(len(games) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.0 * rows), squeeze=False)
    for ax, game in zip(axes.flat, games, strict=False):
        _draw_curves(ax, curves[game], legend=False)
        ax.set_title(game, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(games):]:
        ax.axis("off")
    attns = [c.attn for c in max(curves.values(), key=len)] if curves else []
    handles = [plt.Line2D([], [], color=COLOURS.get(a), label=a) for a in attns]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9,
               bbox_to_anchor=(0.5, 1.0 + 0.15 / rows))
    fig.tight_layout()
    return _png(fig)


def aggregates_png(agg: Aggregates) -> bytes:
    """Median, IQM, Mean, Optimality Gap per type with 95% bootstrap CIs."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 0.45 * len(agg.attns)
                                                          + 1.2), squeeze=False)
    for k, (ax, metric) in enumerate(zip(axes[0], METRICS, strict=True)):
        for row, attn in enumerate(agg.attns):
            low, high = agg.ci[attn][0][k], agg.ci[attn][1][k]
            ax.barh(row, high - low, left=low, height=0.6, color=COLOURS.get(attn), alpha=0.75)
            ax.vlines(agg.point[attn][k], row - 0.3, row + 0.3, color="black", linewidth=1.5)
        ax.set_yticks(range(len(agg.attns)), agg.attns if k == 0 else [""] * len(agg.attns))
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.supxlabel(f"human-normalised score ({len(agg.games)} games, 95% stratified-bootstrap CI, "
                  f"{agg.reps} reps)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def probability_of_improvement_png(agg: Aggregates) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(agg.poi) + 1.2))
    for row, attn in enumerate(agg.poi):
        low, high = agg.poi_ci[attn]
        ax.barh(row, high - low, left=low, height=0.6, color=COLOURS.get(attn), alpha=0.75)
        ax.vlines(agg.poi[attn], row - 0.3, row + 0.3, color="black", linewidth=1.5)
    ax.set_yticks(range(len(agg.poi)), [f"P({a} > rest)" for a in agg.poi])
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("probability of improvement (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def performance_profiles_png(agg: Aggregates) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for attn in agg.attns:
        colour = COLOURS.get(attn)
        ax.plot(TAUS, agg.profiles[attn], color=colour, label=attn, linewidth=1.5)
        ax.fill_between(TAUS, agg.profile_ci[attn][0], agg.profile_ci[attn][1], color=colour,
                        alpha=0.2, linewidth=0)
    ax.set_xlabel(r"human-normalised score $\tau$")
    ax.set_ylabel(r"fraction of runs with score $> \tau$")
    ax.set_xlim(TAUS[0], TAUS[-1])
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Performance profiles ({len(agg.games)} games)", fontsize=10)
    return _png(fig)


def sample_efficiency_png(agg: Aggregates) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = _millions(np.array(agg.eval_timesteps))
    for attn in agg.attns:
        colour = COLOURS.get(attn)
        ax.plot(x, agg.efficiency[attn], color=colour, marker="o", markersize=3, label=attn)
        ax.fill_between(x, agg.efficiency_ci[attn][0], agg.efficiency_ci[attn][1],
                        color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("agent steps (millions)")
    ax.set_ylabel("IQM human-normalised score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Sample efficiency (IQM, 95% CI)", fontsize=10)
    return _png(fig)
