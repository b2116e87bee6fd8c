"""The bench's report: markdown tables and plots of the statistics (``ptg.bench.statistics``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def ci(d: dict[str, float], digits: int = 2) -> str:
    """``mean [lo, hi]`` of a paired difference, signed."""
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def format_table(summary: dict[str, Any]) -> str:
    """The README table: per round, both arms and the paired difference with its 95 % CI."""
    lines = ["| round | items x seeds | ROUGE-L PTG / base | ΔROUGE-L [95% CI] | ΔROUGE-2 [95% CI] | ΔMETEOR [95% CI] "
             "| words PTG / base | guidance val acc [95% CI] (pairs) | length heuristic acc | guidance − length |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rounds"]:
        g = row["guidance"]
        acc, length, diff = g["guidance"], g["length"], g["guidance_minus_length"]
        lines.append(
            f"| {row['round']} | {row['items']} x {row['seeds']} | {row['rougeL']['ptg']:.2f} / "
            f"{row['rougeL']['baseline']:.2f} | {ci(row['rougeL'])} | {ci(row['rouge2'])} | {ci(row['meteor'])} "
            f"| {row['words']['ptg']:.1f} / {row['words']['baseline']:.1f} "
            f"| {acc['accuracy']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] ({int(acc['pairs'])}) "
            f"| {length['accuracy']:.3f} | {diff['diff']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}] |")
    if summary.get("arms"):
        lines += ["", "| arm (last round) | against | items x seeds | ROUGE-L arm / other | Δ ROUGE-L [95% CI] |",
                  "|---|---|---|---|---|"]
        lines += [f"| {a['arm']} | {a['vs']} | {a['items']} x {len(a['seeds'])} | {a['arm_score']:.2f} / "
                  f"{a['other']:.2f} | {ci(a)} |" for a in summary["arms"]]
    return "\n".join(lines)


def format_ablations(rows: list[dict[str, Any]]) -> str:
    """The ablations table: each variant's round 1 on validation against the bench config and its baseline."""
    lines = ["| variant | overrides | seeds | val ROUGE-L PTG | Δ vs bench config [95% CI] | Δ vs baseline [95% CI] "
             "| guidance val acc [95% CI] (pairs) | words PTG / base | reward EOS / other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["val_accuracy"]
        lines.append(f"| {r['variant']} | {' '.join(r['overrides']) or '—'} | {','.join(map(str, r['seeds']))} "
                     f"| {r['rougeL_ptg']:.2f} | {ci(r['vs_reference'])} | {ci(r['vs_baseline'])} "
                     f"| {a['accuracy']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] ({int(a['pairs'])}) "
                     f"| {r['words_ptg']:.1f} / {r['words_baseline']:.1f} "
                     f"| {r['reward_eos']:.3f} / {r['reward_other']:.3f} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rounds"]
    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for arm, style in (("ptg", "o-"), ("baseline", "s--")):
        axes[0].plot(rounds, [r["rougeL"][arm] for r in rows], style, label="PTG" if arm == "ptg" else "baseline")
    axes[0].set(xlabel="round", ylabel="ROUGE-L (test)", title="both arms")
    axes[0].legend()
    mean = np.array([r["rougeL"]["mean"] for r in rows])
    err = np.array([[m - r["rougeL"]["lo"], r["rougeL"]["hi"] - m] for m, r in zip(mean, rows, strict=True)]).T
    axes[1].errorbar(rounds, mean, yerr=err, fmt="o-", capsize=4)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(xlabel="round", ylabel="PTG − baseline ROUGE-L", title="paired difference, 95% CI")
    for ax in axes:
        ax.set_xticks(rounds)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, dict[int, list[tuple[int, float]]]], path: Path,
                ylabel: str = "validation ROUGE-L") -> Path:
    """A validation score (``ylabel``) against LM updates, one panel per seed, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({s for by_seed in curves.values() for s in by_seed})
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.4), squeeze=False)
    for ax, s in zip(axes[0], seeds, strict=True):
        for arm, by_seed in curves.items():
            if s in by_seed:
                u, v = zip(*by_seed[s], strict=True)
                ax.plot(u, v, "o-", ms=3, label=arm)
        ax.set(xlabel="LM updates", ylabel=ylabel, title=f"seed {s}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
