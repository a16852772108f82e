"""The plots of `python -m benchmarks` (matplotlib, Agg backend: no display needed). Each function
takes rows of one section (the dicts the benchmarks write) and a path, draws one small PNG and
returns the path, or None when the rows hold nothing to draw."""
from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 90  # small files: the CPU plots are committed
SIZE = (7.0, 4.0)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def speedups(bars: list, path: str, title: str):
    """bars: [(label, ratio, baseline name)]: a horizontal bar per measured comparison,
    ratio = baseline time / ours (> 1: ours is faster), log scale, 1× marked."""
    bars = [b for b in bars if b[1] and b[1] > 0]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(SIZE[0] + 1, 1.2 + 0.32 * len(bars)))
    colors = {"eager": "tab:blue", "compile": "tab:orange", "sdpa": "tab:green", "reference": "tab:blue"}
    labels = [f"{label} (vs {base})" for label, _, base in bars]
    values = [ratio for _, ratio, _ in bars]
    ax.barh(range(len(bars)), values, color=[colors.get(base, "tab:gray") for _, _, base in bars])
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}×", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlim(min(0.5, min(values) / 1.5), max(values) * 4)
    ax.set_xlabel("baseline time / our time (log; > 1: ours is faster)")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def lines(series: dict, path: str, title: str, xlabel: str, ylabel: str = "ms (median)", logx=True, logy=True,
          slopes: tuple = (), ideal: dict = None):
    """series: {name: [(x, y)]}; `slopes` draws dotted guides y ∝ x^k through each series'
    first point (the growth a cost should have); `ideal`: {name: [(x, y)]} drawn dashed."""
    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    for name, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", ms=4, label=name)
    for name, points in (ideal or {}).items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, ls="--", color="gray", lw=1, label=name)
    first = next(iter(series.values()))
    for k in slopes:
        x0, y0 = first[0]
        x1 = first[-1][0]
        ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** k], ls=":", color="gray", lw=1, label=f"∝ x^{k}")
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grouped_bars(groups: dict, path: str, title: str, ylabel: str, log=True):
    """groups: {group label: {series name: value}}: one cluster of bars per group."""
    groups = {g: {k: v for k, v in s.items() if v} for g, s in groups.items()}
    groups = {g: s for g, s in groups.items() if s}
    if not groups:
        return None
    names = []
    for s in groups.values():
        names += [n for n in s if n not in names]
    fig, ax = plt.subplots(figsize=SIZE)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [s.get(name, 0) for s in groups.values()], width, label=name)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8, rotation=20, ha="right")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def by(rows: list, key, value, series) -> dict:
    """{series(row): [(key(row), value(row))]} over rows where all three are defined."""
    out = defaultdict(list)
    for r in rows:
        k, v, s = key(r), value(r), series(r)
        if k is not None and v is not None and s is not None:
            out[s].append((k, v))
    return dict(out)
