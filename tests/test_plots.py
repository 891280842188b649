"""Tests for the PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest

from gpt2_instruct.plots import (
    DPI,
    FIGSIZE,
    plot_losses,
    plot_per_entry_scores,
    plot_score_histogram,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def log_rows(n: int) -> list[dict]:
    """A plausible training log: loss falls, val every other step, 640 tokens per step."""
    return [
        {
            "step": step,
            "epoch": step / 10,
            "tokens_seen": 640 * step,
            "train_loss": 3.0 * math.exp(-step / 8) + 0.5,
            "val_loss": (3.2 * math.exp(-step / 9) + 0.6) if step % 2 == 0 else None,
        }
        for step in range(1, n + 1)
    ]


def assert_png(path: Path) -> None:
    """``path`` is a complete PNG of the configured size, and nothing else is in its folder."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))
    assert image.min() < image.max()  # something was drawn
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files


@pytest.mark.parametrize("n", [1, 2, 25, 200])
def test_plot_losses(tmp_path: Path, n: int) -> None:
    dest = tmp_path / "plots" / "losses.png"
    plot_losses(log_rows(n), dest, title="Loss")
    assert_png(dest)


def test_plot_losses_single_row_at_epoch_zero(tmp_path: Path) -> None:
    dest = tmp_path / "loss.png"
    row = {"step": 0, "epoch": 0.0, "tokens_seen": 0, "train_loss": 4.0, "val_loss": 4.1}
    plot_losses([row], dest)
    assert_png(dest)


def test_plot_losses_overwrites(tmp_path: Path) -> None:
    dest = tmp_path / "loss.png"
    dest.write_bytes(b"old")
    plot_losses(log_rows(3), dest)
    assert_png(dest)


def test_plot_losses_errors(tmp_path: Path) -> None:
    dest = tmp_path / "loss.png"
    with pytest.raises(ValueError, match="at least one training-log row"):
        plot_losses([], dest)
    rows = log_rows(3)
    del rows[1]["tokens_seen"]
    with pytest.raises(ValueError, match="row 1 has no 'tokens_seen'"):
        plot_losses(rows, dest)
    rows = log_rows(3)
    rows[2]["train_loss"] = "high"
    with pytest.raises(ValueError, match="row 2 'train_loss' is a str"):
        plot_losses(rows, dest)
    assert list(tmp_path.iterdir()) == []


def test_plot_score_histogram(tmp_path: Path) -> None:
    dest = tmp_path / "hist.png"
    plot_score_histogram([0.1, 0.5, 0.5, 0.9, 1.0, 0.0], dest, label="ROUGE-L F1", bins=10)
    assert_png(dest)


def test_plot_score_histogram_single_value(tmp_path: Path) -> None:
    dest = tmp_path / "hist.png"
    plot_score_histogram([42.0], dest, label="chrF")
    assert_png(dest)


def test_plot_per_entry_scores(tmp_path: Path) -> None:
    dest = tmp_path / "per_entry.png"
    plot_per_entry_scores([i % 7 / 7 for i in range(110)], dest, label="ROUGE-L F1")
    assert_png(dest)


@pytest.mark.parametrize("func", [plot_score_histogram, plot_per_entry_scores])
def test_score_plots_reject_empty_and_non_finite(tmp_path: Path, func) -> None:
    dest = tmp_path / "scores.png"
    with pytest.raises(ValueError, match="at least one score"):
        func([], dest, label="x")
    with pytest.raises(ValueError, match="score 1 is not finite"):
        func([0.5, math.nan], dest, label="x")
    with pytest.raises(ValueError, match="score 0 is a str"):
        func(["0.5"], dest, label="x")
    assert list(tmp_path.iterdir()) == []


def test_histogram_rejects_bad_bins(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bins must be"):
        plot_score_histogram([0.5], tmp_path / "h.png", label="x", bins=0)


def test_no_pyplot_figures_left_open(tmp_path: Path) -> None:
    before = plt.get_fignums()
    for i in range(2):
        plot_losses(log_rows(5), tmp_path / f"l{i}.png")
        plot_score_histogram([0.1, 0.2], tmp_path / f"h{i}.png", label="x")
        plot_per_entry_scores([0.1, 0.2], tmp_path / f"p{i}.png", label="x")
    assert plt.get_fignums() == before
