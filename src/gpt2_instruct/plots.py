"""PNG plots of training losses and of the distribution of answer scores.

Per-entry scores are no PNG: dvc.yaml plots the evaluate and judge stages' score tables
against the entry index, so ``dvc plots diff`` overlays runs. The learning rate is
dvc.yaml's too (DVCLive's series), drawn with a scientific y-axis template.

Figures are built with :class:`matplotlib.figure.Figure` directly instead of pyplot:
no GUI backend is touched (the Agg canvas renders PNGs), nothing is registered in
pyplot's global figure list, so repeated calls in one process cannot leak figures or
change the backend for a caller that uses pyplot itself. Output goes through
:func:`gpt2_instruct.io.atomic_path`, so a failed render leaves no partial PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from gpt2_instruct.io import atomic_path

FIGSIZE: tuple[float, float] = (7.0, 4.5)
"""Figure size in inches; with :data:`DPI` a 1050 x 675 pixel PNG."""

DPI: int = 150

MARKER_MAX_POINTS: int = 40
"""Draw point markers on loss curves only up to this many points (else they clutter)."""

LOSS_KEYS: tuple[str, ...] = ("epoch", "tokens_seen", "train_loss", "val_loss")


def _save(fig: Figure, dest: str | os.PathLike[str]) -> None:
    """Render ``fig`` as PNG to ``dest`` atomically, then free its artists."""
    try:
        with atomic_path(dest) as tmp:
            # The temp name ends in .tmp, so the format must be explicit; dropping the
            # Software tag keeps bytes independent of the matplotlib version string.
            fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    finally:
        fig.clear()


def _as_float(value: Any, where: str) -> float:
    """A float from a log value; None means 'not logged' and becomes NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{where} is a {type(value).__name__}, not a number")
    return float(value)


def _finite_scores(scores: Sequence[float], what: str) -> np.ndarray:
    """Scores as a float array; empty or non-finite input is an error, not a blank plot."""
    if len(scores) == 0:
        raise ValueError(f"{what} needs at least one score, got an empty list")
    values = np.asarray([_as_float(s, f"score {i}") for i, s in enumerate(scores)], dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(f"{what}: score {int(bad[0])} is not finite ({values[bad[0]]})")
    return values


def plot_losses(
    rows: Sequence[Mapping[str, Any]],
    dest: str | os.PathLike[str],
    *,
    title: str = "Training and validation loss",
) -> None:
    """Plot train and validation loss against epochs, with tokens seen on a top axis.

    ``rows`` are training-log rows with ``epoch`` (fractional), ``tokens_seen``,
    ``train_loss`` and ``val_loss`` (None or NaN where not evaluated). The top axis is
    mapped linearly from the epoch axis (least-squares fit of tokens on epochs), so its
    ticks line up with the curves below.
    """
    if not rows:
        raise ValueError("plot_losses needs at least one training-log row, got none")
    columns: dict[str, np.ndarray] = {}
    for key in LOSS_KEYS:
        values = []
        for index, row in enumerate(rows):
            if key not in row:
                raise ValueError(f"training-log row {index} has no {key!r}")
            values.append(_as_float(row[key], f"training-log row {index} {key!r}"))
        columns[key] = np.asarray(values, dtype=float)
    epochs, tokens = columns["epoch"], columns["tokens_seen"]
    if not np.all(np.isfinite(epochs)) or not np.all(np.isfinite(tokens)):
        raise ValueError("plot_losses needs a finite epoch and tokens_seen in every row")

    marker = "o" if len(rows) <= MARKER_MAX_POINTS else None
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax1 = fig.add_subplot()
    for key, label, style in (
        ("train_loss", "Training loss", "-"),
        ("val_loss", "Validation loss", "-."),
    ):
        losses = columns[key]
        keep = np.isfinite(losses)  # skip rows where this loss was not evaluated
        ax1.plot(epochs[keep], losses[keep], linestyle=style, marker=marker, ms=4, label=label)
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.set_title(title)
    ax1.grid(True, alpha=0.3)
    ax1.legend(loc="best")

    single_epoch = np.unique(epochs).size < 2
    if single_epoch:
        # Autoscaling a single x value gives a +-0.05 window with negative epochs and
        # milli-tokens; show 0..epoch instead (or 0..1 when the only row is at epoch 0).
        width = float(epochs[0]) if epochs[0] > 0 else 1.0
        ax1.set_xlim(-0.05 * width, 1.05 * width)

    ax2 = ax1.twiny()
    # Invisible twin of the train curve: gives the top axis its data range without
    # widening the shared y range.
    ax2.plot(tokens, columns["train_loss"], alpha=0)
    ax2.set_xlabel("Tokens seen")
    formatter = EngFormatter(sep="")
    ax2.xaxis.set_major_formatter(formatter)
    lo, hi = ax1.get_xlim()
    if not single_epoch:
        slope, intercept = np.polyfit(epochs, tokens, 1)
        ax2.set_xlim(intercept + slope * lo, intercept + slope * hi)
    elif epochs[0] > 0:
        tokens_per_epoch = tokens[0] / epochs[0]
        ax2.set_xlim(tokens_per_epoch * lo, tokens_per_epoch * hi)
    else:  # no tokens-per-epoch rate to map with: label only the logged point
        ax2.set_xlim(lo, hi)
        ax2.set_xticks([float(epochs[0])], labels=[formatter(float(tokens[0]))])
    _save(fig, dest)


def plot_score_histogram(
    scores: Sequence[float],
    dest: str | os.PathLike[str],
    *,
    label: str,
    bins: int = 20,
) -> None:
    """Histogram of one score over the test entries, with the mean marked."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values = _finite_scores(scores, "plot_score_histogram")
    mean = float(values.mean())
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.hist(values, bins=bins, color="tab:blue", edgecolor="white")
    ax.axvline(mean, color="tab:red", linestyle="--", label=f"mean = {mean:.3g}")
    ax.set_xlabel(label)
    ax.set_ylabel("Test entries")
    ax.set_title(f"{label}: distribution over {values.size} test entries")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best")
    _save(fig, dest)
