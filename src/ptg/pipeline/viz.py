"""Figures for reports and tracking: token-level guidance rewards as heatmaps, and PTG vs MLE by round.

Pure of MLflow: each function returns HTML or writes a PNG, and the caller decides whether to log it
(``ptg.tracking.log_stage(..., artifacts=[png])``). PNGs are drawn on bare ``matplotlib.figure.Figure`` objects,
which render with the Agg backend: no display, no pyplot global state, nothing changed for an interactive caller.

- ``reward_heatmap_html(tokens, rewards, titles)``: a self-contained HTML page, each token shaded by its reward
  (hover shows the value), one block per response.
- ``reward_heatmap_png(tokens, rewards, titles, path)``: the same as a PNG, tokens laid out in fixed-width cells.
- ``metrics_by_round_png(eval_by_round_csv, path)``: one panel per metric present as ``ptg_<m>`` and ``mle_<m>``
  columns of the report's eval_by_round.csv, PTG and MLE against the round.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

CMAP = "viridis"
CELL_CHARS = 10   # a PNG cell shows at most this many characters of a token
CELLS_PER_LINE = 12


def _check(tokens: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]], titles: Sequence[str]) -> None:
    if not len(tokens) == len(rewards) == len(titles):
        raise ValueError(f"tokens, rewards and titles need one entry per response; got {len(tokens)}, "
                         f"{len(rewards)}, {len(titles)}")
    for i, (toks, rews) in enumerate(zip(tokens, rewards, strict=True)):
        if len(toks) != len(rews):
            raise ValueError(f"response {i} ({titles[i]!r}): {len(toks)} tokens but {len(rews)} rewards")


def _range(rewards: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The finite min and max over all responses (a shared scale), widened when they coincide."""
    values = [float(r) for rews in rewards for r in rews if math.isfinite(float(r))]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo, hi)


def _colors(rewards: Sequence[Sequence[float]]) -> tuple[list[list[tuple[float, float, float, float]]], float, float]:
    import matplotlib

    cmap = matplotlib.colormaps[CMAP]
    lo, hi = _range(rewards)
    return [[cmap((float(r) - lo) / (hi - lo)) if math.isfinite(float(r)) else (0.8, 0.8, 0.8, 1.0) for r in rews]
            for rews in rewards], lo, hi


def _text_color(rgba: tuple[float, float, float, float]) -> str:
    luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
    return "#000" if luminance > 0.5 else "#fff"


def _hex(rgba: tuple[float, float, float, float]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def reward_heatmap_html(tokens: list[list[str]], rewards: list[list[float]], titles: list[str]) -> str:
    """A self-contained HTML page: per response, its tokens shaded by guidance reward on one shared scale."""
    _check(tokens, rewards, titles)
    colors, lo, hi = _colors(rewards)
    blocks = []
    for toks, rews, cols, title in zip(tokens, rewards, colors, titles, strict=True):
        spans = "".join(
            f'<span class="t" style="background:{_hex(c)};color:{_text_color(c)}" title="{float(r):.4f}">'
            f"{html.escape(t).replace(' ', '&nbsp;').replace(chr(10), '&#8629;<br>')}</span>"
            for t, r, c in zip(toks, rews, cols, strict=True))
        finite = [float(r) for r in rews if math.isfinite(float(r))]
        mean = f"mean reward {sum(finite) / len(finite):.4f}" if finite else "no rewards"
        blocks.append(f"<section><h3>{html.escape(title)}</h3><p class=\"m\">{mean}, {len(toks)} tokens</p>"
                      f"<div>{spans}</div></section>")
    gradient = ", ".join(_hex(c) for c in _colors([[lo + (hi - lo) * i / 8 for i in range(9)]])[0][0])
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Token-level guidance rewards</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.t {{ font-family: monospace; padding: 1px 0; line-height: 1.9; }}
.m {{ color: #555; font-size: 0.9em; margin: 0.2em 0 0.5em; }}
.legend {{ display: inline-block; width: 16em; height: 0.9em; vertical-align: middle;
           background: linear-gradient(to right, {gradient}); }}
</style></head><body>
<h2>Token-level guidance rewards</h2>
<p>{lo:.4f} <span class="legend"></span> {hi:.4f} (hover a token for its reward)</p>
{''.join(blocks)}
</body></html>
"""


def reward_heatmap_png(tokens: list[list[str]], rewards: list[list[float]], titles: list[str],
                       path: str | Path) -> Path:
    """The heatmap as a PNG: tokens in fixed-width cells, ``CELLS_PER_LINE`` per line, one shared colour scale."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    _check(tokens, rewards, titles)
    colors, lo, hi = _colors(rewards)
    lines = [max(1, math.ceil(len(toks) / CELLS_PER_LINE)) for toks in tokens]
    height = sum(n + 1.2 for n in lines)  # each response: a title line and its token lines
    fig = Figure(figsize=(CELLS_PER_LINE * 0.95, max(1.5, 0.32 * height + 0.8)))
    ax = fig.add_subplot()
    ax.set_xlim(0, CELLS_PER_LINE)
    ax.set_ylim(height, 0)
    ax.axis("off")
    y = 0.0
    for toks, cols, title, n in zip(tokens, colors, titles, lines, strict=True):
        ax.text(0, y + 0.8, title, fontsize=9, fontweight="bold", va="bottom")
        y += 1.2
        for i, (tok, col) in enumerate(zip(toks, cols, strict=True)):
            row, column = divmod(i, CELLS_PER_LINE)
            ax.add_patch(Rectangle((column, y + row), 0.97, 0.92, color=col))
            shown = tok.replace("\n", "\\n")
            shown = shown if len(shown) <= CELL_CHARS else shown[:CELL_CHARS - 1] + "…"
            ax.text(column + 0.485, y + row + 0.5, shown, ha="center", va="center", fontsize=7,
                    family="monospace", color=_text_color(col))
        y += n
    fig.colorbar(ScalarMappable(cmap=CMAP, norm=Normalize(lo, hi)), ax=ax, fraction=0.02, pad=0.01,
                 label="token reward")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def metrics_by_round_png(eval_by_round_csv: str | Path, path: str | Path) -> Path:
    """PTG vs MLE against the round, one panel per metric with both ``ptg_<m>`` and ``mle_<m>`` columns."""
    from matplotlib.figure import Figure

    table = pd.read_csv(eval_by_round_csv).sort_values("round")
    metrics = [c.removeprefix("ptg_") for c in table.columns
               if c.startswith("ptg_") and f"mle_{c.removeprefix('ptg_')}" in table.columns]
    if not metrics:
        raise ValueError(f"{eval_by_round_csv}: no metric has both ptg_<m> and mle_<m> columns")
    fig = Figure(figsize=(3.2 * len(metrics), 3.0), layout="tight")
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.plot(table["round"], table[f"ptg_{metric}"], marker="o", label="PTG")
        ax.plot(table["round"], table[f"mle_{metric}"], marker="s", linestyle="--", label="MLE")
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.set_xticks(table["round"].tolist())
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
