"""A killed or interrupted dpo stage resumes only from a checkpoint made from the same inputs.

Each story runs the dpo stage as ``dvc repro`` does: a run dies after its step-2
checkpoint (``data/dpo/checkpoints`` persists, as DVC keeps it), something changes or
not, and the stage runs again. Resumed with the same inputs, it must export the very
model (the same bytes) and log the same rows as a run never interrupted. Where the change
decides what is learned (beta, lr, the data, the model) the stale checkpoint is deleted
with one line and the model is what a fresh run exports; where it only decides speed or
the run's length, the run resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from test_dpo import MERGES, STAGE_PATHS, _raw, _tiny_inputs, _tiny_model

from gpt2_instruct import dpo as prefs
from gpt2_instruct import dpo_checkpoint, resume
from gpt2_instruct.batching import BatchOrder
from gpt2_instruct.dpo_checkpoint import DpoCheckpoints
from gpt2_instruct.io import sha256_file
from gpt2_instruct.params import DpoParams, LoRAParams, PrepareParams
from gpt2_instruct.stages.dpo import dpo as run_dpo_stage
from gpt2_instruct.tokenizer import load_tokenizer
from gpt2_instruct.weights import CONFIG_KEY, save_model

KILLED_AFTER = 2  # the step whose checkpoint survives the kill
STEPS = 4


class _Killed(Exception):
    """Stands for SIGKILL: nothing after the last checkpoint is kept."""


def _recipe(data: Path, **changes: Any) -> DpoParams:
    params = DpoParams(
        enabled=True, data_url=str(data), data_sha256=None, batch_size=4, max_steps=STEPS,
        eval_every=2, eval_batches=2, lr=1e-3, checkpoint_every=1, device="cpu",
    )  # fmt: skip
    return dataclasses.replace(params, **changes)


def _stage(run_dir: Path, paths: dict[str, Path], params: DpoParams) -> bytes:
    """The dpo stage with its outputs under ``run_dir``; the exported weights' bytes."""
    out = {name: run_dir / path for name, path in STAGE_PATHS.items()}
    run_dpo_stage(
        params, PrepareParams(), paths["model"], out["out"], out["prepared"], out["reference"],
        out["metrics"], out["log"], out["plot"], out["live"],
        checkpoints=run_dir / "data/dpo/checkpoints", max_new_tokens=16,
    )  # fmt: skip
    return (out["out"] / "model.safetensors").read_bytes()


def _killed_run(run_dir: Path, paths: dict[str, Path], params: DpoParams) -> None:
    """A run killed right after its step-``KILLED_AFTER`` checkpoint."""
    original = DpoCheckpoints.save

    def save(self: DpoCheckpoints, *args: Any) -> None:
        original(self, *args)
        if args[-1]["step"] == KILLED_AFTER:
            raise _Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DpoCheckpoints, "save", save)
        with pytest.raises(_Killed):
            _stage(run_dir, paths, params)
    assert (run_dir / "data/dpo/checkpoints" / resume.CHECKPOINT_NAME).is_file()
    assert not (run_dir / "data/dpo/model").exists()


def _log_rows(run_dir: Path) -> list[dict[str, str]]:
    """The stage's log without its wall-clock column."""
    with open(run_dir / "metrics/dpo_log.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _live_values(run_dir: Path, metric: str) -> list[tuple[str, str]]:
    """(step, value) of one DVCLive metric, without its timestamps."""
    path = run_dir / "dvclive_dpo/plots/metrics" / f"{metric}.tsv"
    with open(path, encoding="utf-8") as handle:
        return [(row["step"], row[metric.split("/")[-1]])
                for row in csv.DictReader(handle, delimiter="\t")]  # fmt: skip


def _metrics(run_dir: Path) -> dict[str, Any]:
    report = json.loads((run_dir / "metrics/dpo.json").read_text(encoding="utf-8"))
    for timing in ("train_seconds", "reference_seconds", "reference_logprobs"):
        report.pop(timing)
    return report


def _other_model(root: Path, write_bpe: Any) -> Path:
    """Another instruction-tuned model folder: the same shape, other weights."""
    model_dir = root / "other_model"
    tokenizer = load_tokenizer(write_bpe(model_dir, MERGES))
    model = _tiny_model(tokenizer.vocab_size, seed=14, context=256)
    model.untie_embeddings()
    save_model(model, model_dir, extra_config={CONFIG_KEY: {"prompt_style": "alpaca"}})
    return model_dir


@pytest.fixture
def paths(tmp_path: Path, write_bpe: Any) -> dict[str, Path]:
    return _tiny_inputs(tmp_path / "inputs", write_bpe)


@pytest.mark.parametrize("lora", [0, 2], ids=["full", "lora-with-dropout"])
def test_a_killed_run_resumes_to_the_uninterrupted_model_and_log(
    paths: dict[str, Path], tmp_path: Path, capsys: Any, lora: int
) -> None:
    params = _recipe(paths["data"], lora=LoRAParams(rank=lora))  # dropout 0.05: RNG matters
    _killed_run(tmp_path / "run", paths, params)
    capsys.readouterr()
    resumed = _stage(tmp_path / "run", paths, params)
    err = capsys.readouterr().err
    checkpoints = tmp_path / "run/data/dpo/checkpoints"
    assert f"dpo: resumed from {checkpoints} at step {KILLED_AFTER}" in err
    assert resumed == _stage(tmp_path / "scratch", paths, params)
    assert _log_rows(tmp_path / "run") == _log_rows(tmp_path / "scratch")
    assert [row["step"] for row in _log_rows(tmp_path / "run")] == ["1", "3", "4"]
    for metric in ("val/loss", "train/reward_margin", "tokens_seen"):  # restored rows re-logged
        assert _live_values(tmp_path / "run", metric) == _live_values(tmp_path / "scratch", metric)
    assert _metrics(tmp_path / "run") == _metrics(tmp_path / "scratch")
    assert checkpoints.is_dir() and not any(checkpoints.iterdir())  # gone once exported


def test_a_run_killed_at_an_epoch_end_resumes_into_the_next_epoch(
    paths: dict[str, Path], tmp_path: Path
) -> None:
    """2 steps an epoch (34 training pairs, batches of 16): the step-2 checkpoint is the
    first epoch's end's, and the resumed run draws the second epoch's shuffle."""
    params = _recipe(
        paths["data"], batch_size=16, epochs=3, max_steps=None, checkpoint_every=0, eval_every=3
    )
    _killed_run(tmp_path / "run", paths, params)
    resumed = _stage(tmp_path / "run", paths, params)
    assert resumed == _stage(tmp_path / "scratch", paths, params)
    assert _log_rows(tmp_path / "run") == _log_rows(tmp_path / "scratch")
    assert _metrics(tmp_path / "run")["steps"] == 6


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_the_rerun_resumes_it(
    paths: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    params = _recipe(paths["data"], checkpoint_every=0)  # only epoch ends (none here) and Ctrl-C
    original, steps = prefs._batch_loss, []

    def batch_loss(model: Any, *args: Any) -> prefs.PreferenceLoss:
        if model.training:  # a training step, not an evaluation
            steps.append(1)
            if len(steps) == KILLED_AFTER:
                signal.raise_signal(signal.SIGINT)  # in the middle of the step
        return original(model, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefs, "_batch_loss", batch_loss)
        with pytest.raises(KeyboardInterrupt, match=f"interrupted after step {KILLED_AFTER};"):
            _stage(tmp_path / "run", paths, params)
    state = resume.read(
        tmp_path / "run/data/dpo/checkpoints" / resume.CHECKPOINT_NAME,
        map_location="cpu", mmap=False,
    )  # fmt: skip
    assert state is not None and state["train_state"]["step"] == KILLED_AFTER
    capsys.readouterr()
    resumed = _stage(tmp_path / "run", paths, params)
    assert f"at step {KILLED_AFTER}" in capsys.readouterr().err
    assert resumed == _stage(tmp_path / "scratch", paths, params)
    assert _log_rows(tmp_path / "run") == _log_rows(tmp_path / "scratch")


@pytest.mark.parametrize(
    ("story", "changed"),
    [
        ("beta", "params.beta"),
        ("lr", "params.lr"),
        ("data", "inputs.data"),
        ("model", "inputs.policy_model"),
    ],
)
def test_a_checkpoint_from_other_inputs_is_deleted_and_training_starts_afresh(
    paths: dict[str, Path], tmp_path: Path, write_bpe: Any, capsys: Any, story: str, changed: str
) -> None:
    params = _recipe(paths["data"])
    _killed_run(tmp_path / "run", paths, params)
    new_paths = dict(paths)
    if story == "beta":
        params = dataclasses.replace(params, beta=0.3)
    elif story == "lr":
        params = dataclasses.replace(params, lr=5e-4)
    elif story == "data":  # the same file name, another answer in one entry
        raw = _raw(40)
        raw[0]["chosen"] = "Sure, thanks: something else entirely."
        paths["data"].write_text(json.dumps(raw), encoding="utf-8")
    else:
        new_paths["model"] = _other_model(tmp_path / "inputs", write_bpe)
    capsys.readouterr()
    resumed = _stage(tmp_path / "run", new_paths, params)
    err = capsys.readouterr().err
    assert "resumed" not in err
    (line,) = [line for line in err.splitlines() if resume.CHECKPOINT_NAME in line]
    assert "made from other inputs (changed: " in line and changed in line, line
    assert line.endswith("deleting it and starting from step 0")
    assert resumed == _stage(tmp_path / "scratch", new_paths, params)
    assert _log_rows(tmp_path / "run") == _log_rows(tmp_path / "scratch")


@pytest.mark.parametrize(
    "knob",
    [
        {"checkpoint_every": 3},
        {"device": "auto"},  # the CPU here
        {"max_steps": 6},  # a constant rate: the length decides only where the run stops
        {"epochs": 3},
        {"data_url": "moved"},  # the same content at another address, pinned
    ],
    ids=lambda knob: next(iter(knob)),
)
def test_a_speed_knob_or_a_longer_run_resumes_the_checkpoint(
    paths: dict[str, Path], tmp_path: Path, capsys: Any, knob: dict[str, Any]
) -> None:
    params = _recipe(paths["data"])
    _killed_run(tmp_path / "run", paths, params)
    if "data_url" in knob:
        moved = paths["data"].with_name("moved.json")
        moved.write_bytes(paths["data"].read_bytes())
        knob = {"data_url": str(moved), "data_sha256": sha256_file(moved)}
    params = dataclasses.replace(params, **knob)
    capsys.readouterr()
    resumed = _stage(tmp_path / "run", paths, params)
    out, err = capsys.readouterr()
    assert f"resumed from {tmp_path / 'run/data/dpo/checkpoints'} at step {KILLED_AFTER}" in err
    assert resume.CHECKPOINT_NAME not in out + err
    assert resumed == _stage(tmp_path / "scratch", paths, params)
    assert _metrics(tmp_path / "run")["steps"] == (params.max_steps or STEPS)


def test_a_checkpoint_past_the_new_last_step_is_stale(
    paths: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    params = _recipe(paths["data"])
    _killed_run(tmp_path / "run", paths, params)
    capsys.readouterr()
    shorter = dataclasses.replace(params, max_steps=KILLED_AFTER - 1)
    resumed = _stage(tmp_path / "run", paths, shorter)
    assert f"at step {KILLED_AFTER}, past this run's last step 1" in capsys.readouterr().err
    assert resumed == _stage(tmp_path / "scratch", paths, shorter)


def test_the_fingerprint_holds_the_learning_params_only() -> None:
    learning = dpo_checkpoint.learning_params(DpoParams())
    fields = {f.name for f in dataclasses.fields(DpoParams)}
    knobs = {"device", "checkpoint_every", "epochs", "max_steps", "data_url", "data_sha256"}
    assert set(learning) == fields - knobs
    assert {"beta", "lr", "loss", "seed", "batch_size", "lora", "max_length"} <= set(learning)


def test_a_checkpoint_holding_anything_but_tensors_and_plain_values_is_refused(
    tmp_path: Path,
) -> None:
    """Loaded with weights_only=True: a pickled object of any other class never runs."""
    path = tmp_path / resume.CHECKPOINT_NAME
    torch.save({"train_state": {"step": 1}, "payload": _Killed()}, path)
    model = _tiny_model(60)
    optimizer = torch.optim.AdamW(model.parameters())
    order = BatchOrder(torch.zeros(8), 4, seed=1)
    checkpoints = DpoCheckpoints(tmp_path, DpoParams(), {}, device=torch.device("cpu"))
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        checkpoints.load(model, optimizer, order, total_steps=4)


def test_the_disabled_stage_still_makes_its_checkpoint_directory(tmp_path: Path) -> None:
    names = ("out", "prepared", "reference", "metrics", "log", "plot", "live")
    outs = [tmp_path / name for name in names]
    run_dpo_stage(DpoParams(), PrepareParams(), tmp_path / "missing-model", *outs,
                  checkpoints=tmp_path / "checkpoints")  # fmt: skip
    assert (tmp_path / "checkpoints").is_dir()
