"""The dpo stage's PNG: DPO loss and reward margins against steps, like the reference's.

The reference (ch07 ``dpo-from-scratch.ipynb``, "Analyzing the results") draws two figures,
train/val loss and train/val reward margins; here they are two panels of one PNG. Built
with :class:`matplotlib.figure.Figure` (no pyplot state), written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from gpt2_instruct.io import atomic_path

FIGSIZE: tuple[float, float] = (11.0, 4.5)
DPI: int = 150
MARKER_MAX_POINTS: int = 40  # point markers only up to this many evaluations


def _save(fig: Figure, dest: str | os.PathLike[str]) -> None:
    try:
        with atomic_path(dest) as tmp:  # no Software tag: bytes independent of the version
            fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        fig.clear()


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    values = []
    for index, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"DPO log row {index} has no number {key!r}: {value!r}")
        values.append(float(value))
    return values


def plot_dpo(rows: Sequence[Mapping[str, Any]], dest: str | os.PathLike[str]) -> None:
    """Train/val DPO loss (left) and reward margin (right) against the optimizer step."""
    if not rows:
        raise ValueError("plot_dpo needs at least one DPO log row, got none")
    steps = _column(rows, "step")
    marker = "o" if len(rows) <= MARKER_MAX_POINTS else None
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    panels = (("loss", "DPO loss"), ("reward_margin", "Reward margin (chosen - rejected)"))
    for position, (figure, label) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, position)
        for split, name, style in (("train", "Training", "-"), ("val", "Validation", "-.")):
            values = _column(rows, f"{split}_{figure}")
            kept = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
            ax.plot(
                [s for s, _ in kept], [v for _, v in kept],
                linestyle=style, marker=marker, ms=4, label=f"{name} {figure.replace('_', ' ')}",
            )  # fmt: skip
        ax.ticklabel_format(axis="y", useOffset=False)  # 0.6931, not 1e-5 + 6.931e-1
        ax.set_xlabel("Step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle("Preference tuning (DPO)")
    _save(fig, dest)


def plot_not_run(dest: str | os.PathLike[str], message: str) -> None:
    """A small PNG that says why there is no curve (the output must exist for DVC)."""
    fig = Figure(figsize=(5.0, 1.5), layout="constrained")
    fig.text(0.5, 0.5, message, ha="center", va="center")
    _save(fig, dest)
