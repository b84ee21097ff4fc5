"""An ablation study's results -> its table (mean +- standard deviation over seeds, the difference to the
baseline arm with a 95% interval) and its plot (AP over wall-clock time per arm, mean with a band).

The interval is Student's t: paired by seed when the arm and the baseline ran the same seeds (the
differences d_i = arm_i - baseline_i: mean(d) +- t(0.975, n-1) * sd(d) / sqrt(n)), else Welch's (means
of each, standard error sqrt(s1^2/n1 + s2^2/n2), Welch-Satterthwaite degrees of freedom). Standard
deviations are the sample ones (n - 1). With fewer than two runs on a side there is no interval.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy.stats import t as student_t

__all__ = ["Difference", "difference", "mean_std", "study_table", "plot_study", "METRICS"]

METRICS = ("AP", "AP50", "AP_small", "steps", "minutes")  # the table's columns, mean +- std each
COMPARED = ("AP", "AP50")  # the columns with a difference to the baseline


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


@dataclass(frozen=True)
class Difference:
    """arm - baseline: the mean difference and its 95% interval (NaN without one), how it was formed."""

    mean: float
    low: float
    high: float
    kind: str  # "paired" (n seeds in both) or "Welch"
    df: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.low):
            return f"{self.mean:+.{digits}f} (no interval: one run)"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def difference(arm: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> Difference:
    """``arm`` and ``baseline``: seed -> value. Paired when both hold the same seeds, else Welch."""
    q = 0.5 + level / 2
    if set(arm) == set(baseline):
        d = [arm[s] - baseline[s] for s in sorted(arm)]
        mean, sd = mean_std(d)
        n = len(d)
        if n < 2:
            return Difference(mean, math.nan, math.nan, "paired", 0)
        half = float(student_t.ppf(q, n - 1)) * sd / math.sqrt(n)
        return Difference(mean, mean - half, mean + half, "paired", n - 1)
    (m1, s1), (m2, s2) = mean_std(list(arm.values())), mean_std(list(baseline.values()))
    n1, n2 = len(arm), len(baseline)
    if n1 < 2 or n2 < 2:
        return Difference(m1 - m2, math.nan, math.nan, "Welch", 0)
    v1, v2 = s1**2 / n1, s2**2 / n2
    se = math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1)) if se > 0 else n1 + n2 - 2
    half = float(student_t.ppf(q, df)) * se
    return Difference(m1 - m2, m1 - m2 - half, m1 - m2 + half, "Welch", df)


def _by_arm(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    arms: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        arms.setdefault(r["arm"], {})[int(r["seed"])] = r
    return arms


def study_table(records: list[dict[str, Any]], arms: Sequence[str], baseline: str) -> str:
    """The markdown table: one row per arm (in ``arms`` order, those with results), mean +- std of each
    metric over its seeds, and the AP / AP50 differences to ``baseline`` with their 95% intervals."""
    runs = _by_arm(records)
    head = (["arm", "seeds"] + [f"{m}" for m in METRICS]
            + [f"{m} - {baseline} [95% CI]" for m in COMPARED])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    kinds = set()
    for name in arms:
        if name not in runs:
            shown = name + (" (baseline)" if name == baseline else "")
            lines.append(f"| {shown} | — | not yet run | " + " | ".join("—" for _ in head[3:]) + " |")
            continue
        seeds = runs[name]
        cells = [name + (" (baseline)" if name == baseline else ""), ",".join(str(s) for s in sorted(seeds))]
        for metric in METRICS:
            mean, std = mean_std([float(r[metric]) for r in seeds.values()])
            digits = 0 if metric == "steps" else 1 if metric == "minutes" else 3
            cells.append(f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}"))
        for metric in COMPARED:
            if name == baseline or baseline not in runs:
                cells.append("—")
                continue
            diff = difference({s: float(r[metric]) for s, r in seeds.items()},
                              {s: float(r[metric]) for s, r in runs[baseline].items()})
            kinds.add(diff.kind)
            cells.append(diff.text() + (" *" if diff.excludes_zero() else ""))
        lines.append("| " + " | ".join(cells) + " |")
    how = {"paired": "paired by seed", "Welch": "Welch's unpaired (the seeds differ)"}
    note = ("Intervals: Student's t, " + " and ".join(how[k] for k in sorted(kinds))
            + "; * where the interval excludes zero." if kinds else "")
    return "\n".join(lines) + ("\n\n" + note if note else "")


def _interpolate(points: list[tuple[float, float]], grid: list[float]) -> list[float]:
    """A run's AP at each time of ``grid`` (linear between its evaluations; ``grid`` lies inside them)."""
    out = []
    for x in grid:
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            if x0 <= x <= x1:
                out.append(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
                break
        else:
            out.append(points[-1][1] if x >= points[-1][0] else points[0][1])
    return out


def plot_study(records: list[dict[str, Any]], arms: Sequence[str], title: str, out: Path) -> Path:
    """PNG: validation AP against wall-clock minutes since each run started, per arm the mean over its
    seeds with a band of +- one standard deviation, over the time every seed of the arm covers; each run's
    own evaluations as faint dots."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    palette = colormaps["tab10"]
    runs = _by_arm(records)
    for i, name in enumerate(a for a in arms if a in runs):
        colour = palette(i % 10)
        curves = [sorted((t / 60, ap) for t, ap in r["curve"]) for r in runs[name].values() if r["curve"]]
        if not curves:
            continue
        for curve in curves:
            ax.plot([p[0] for p in curve], [p[1] for p in curve], "o", color=colour, alpha=0.3, markersize=3)
        label = f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
        if end <= start:  # the seeds' evaluations share no stretch of time: their last ones, mean +- std
            last = [c[-1] for c in curves]
            ap_mean, ap_std = mean_std([p[1] for p in last])
            ax.errorbar([sum(p[0] for p in last) / len(last)], [ap_mean],
                        yerr=[0.0 if len(last) < 2 else ap_std], color=colour, marker="o", capsize=4,
                        label=label)
            continue
        grid = [start + (end - start) * k / 50 for k in range(51)]
        values = [_interpolate(c, grid) for c in curves]
        mean = [sum(col) / len(col) for col in zip(*values, strict=True)]
        std = [mean_std(list(col))[1] if len(col) > 1 else 0.0 for col in zip(*values, strict=True)]
        ax.plot(grid, mean, color=colour, label=label)
        ax.fill_between(grid, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("wall-clock minutes since the run started")
    ax.set_ylabel("validation AP (0.5:0.95)")
    ax.set_ylim(bottom=0.0)
    budgets = sorted({f"{r['budget_s'] / 60:.3g}" for r in records if "budget_s" in r})
    budget = f"\n(budget {', '.join(budgets)} min per run)" if budgets else ""
    # a study's title is a sentence: unwrapped, the longer ones run off the figure
    ax.set_title(textwrap.fill(title, 90) + budget, fontsize="medium")
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    return out
