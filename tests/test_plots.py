"""Tests for the PNG plots, and for the plots dvc.yaml draws from the stages' tables."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest
import yaml

from gpt2_instruct import plots
from gpt2_instruct.plots import (
    DPI,
    FIGSIZE,
    plot_losses,
    plot_score_histogram,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

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


def test_score_histogram_rejects_empty_and_non_finite(tmp_path: Path) -> None:
    dest = tmp_path / "scores.png"
    with pytest.raises(ValueError, match="at least one score"):
        plot_score_histogram([], dest, label="x")
    with pytest.raises(ValueError, match="score 1 is not finite"):
        plot_score_histogram([0.5, math.nan], dest, label="x")
    with pytest.raises(ValueError, match="score 0 is a str"):
        plot_score_histogram(["0.5"], dest, label="x")
    assert list(tmp_path.iterdir()) == []


def test_histogram_rejects_bad_bins(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bins must be"):
        plot_score_histogram([0.5], tmp_path / "h.png", label="x", bins=0)


def test_no_pyplot_figures_left_open(tmp_path: Path) -> None:
    before = plt.get_fignums()
    for i in range(2):
        plot_losses(log_rows(5), tmp_path / f"l{i}.png")
        plot_score_histogram([0.1, 0.2], tmp_path / f"h{i}.png", label="x")
    assert plt.get_fignums() == before


def test_per_entry_scores_are_dvc_plots_not_pngs() -> None:
    """Overlaid by `dvc plots diff`; a PNG per run could only be looked at side by side."""
    assert not hasattr(plots, "plot_per_entry_scores")
    drawn = _dvc_plots()
    assert not any(name.endswith("per_entry.png") for name in drawn)
    for name, source, field in [
        ("rougeL_per_entry", "metrics/eval_scores.csv", "rougeL"),
        ("response_loss_per_entry", "metrics/eval_scores.csv", "response_loss"),
        ("judge_score_per_entry", "metrics/judge_scores.csv", "score"),
    ]:
        assert drawn[name]["x"] == "index", name
        assert drawn[name]["y"] == {source: field}, name


def _dvc_plots() -> dict[str, dict]:
    """dvc.yaml's top-level plots by id (a plot given as a bare path has no settings)."""
    items = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    return {
        name: spec or {}
        for item in items
        for name, spec in (item.items() if isinstance(item, dict) else [(item, None)])
    }


# The files the plots below read, as the stages write them (a few rows).
PLOTTED_FILES = {
    "dvclive/plots/metrics/lr.tsv": "timestamp\tstep\tlr\n1\t0\t5e-05\n2\t5\t5e-05\n",
    "metrics/eval_scores.csv": (
        "index,exact_match,rouge1,rouge2,rougeL,chrf,response_loss,response_chars\n"
        "0,0,0.5,0.25,0.4,31.5,1.75,20\n1,1,1.0,1.0,1.0,100.0,0.25,12\n"
    ),
    "metrics/judge_scores.csv": "index,score,reason\n",  # judge.backend none: no rows
}


def test_the_lr_and_per_entry_plots_render_offline_through_dvc(tmp_path: Path) -> None:
    """`dvc plots show` with the repo's own plot definitions and template: no errors, and
    a learning rate of 5e-5 labelled in scientific notation (the linear template's
    default number format rounds it to "0")."""
    ours = [name for name in _dvc_plots() if name.endswith(("per_entry", "lr.tsv"))]
    assert len(ours) == 4
    items = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    kept = [item for item in items if isinstance(item, dict) and next(iter(item)) in ours]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": kept}), encoding="utf-8")
    for name, text in PLOTTED_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    dvc = [sys.executable, "-m", "dvc"]
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run([*dvc, "init", "--no-scm", "-q"], check=True, **run)
    template = REPO_ROOT / ".dvc/plots/scientific_y.json"
    (tmp_path / ".dvc/plots").mkdir(exist_ok=True)
    (tmp_path / ".dvc/plots" / template.name).write_bytes(template.read_bytes())
    shown = subprocess.run([*dvc, "plots", "show", "--json"], check=True, **run)
    result = json.loads(shown.stdout)
    assert not result.get("errors"), result["errors"]
    assert set(result["data"]) == set(ours)
    [lr] = result["data"]["dvclive/plots/metrics/lr.tsv"]
    y = lr["content"]["encoding"]["y"]
    assert (y["field"], y["title"], y["axis"]["format"]) == ("lr", "learning rate", ".2~e")
    assert [row["lr"] for row in lr["content"]["data"]["values"]] == ["5e-05", "5e-05"]
    [rouge] = result["data"]["rougeL_per_entry"]
    assert rouge["content"]["encoding"]["y"]["field"] == "rougeL"
    assert [row["rougeL"] for row in rouge["content"]["data"]["values"]] == ["0.4", "1.0"]
    assert result["data"]["judge_score_per_entry"] == []  # no rows is no error
