"""A killed fine-tune resumes only from a checkpoint made from the same inputs.

Each story goes through the finetune stage as ``dvc repro`` runs it: a run dies after
its step-3 checkpoint (``data/checkpoints`` persists, as DVC keeps it), something
changes, and the stage runs again. Where the change decides what is learned (the base
model, the data, a learning param) the stale checkpoint is deleted with one line and
the model must be exactly what a run from scratch with the new inputs exports. Where it
only decides speed (threads, the fused optimizer, updates in backward) the run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file
from test_pipeline import MERGES, _raw_entries

from gpt2_instruct import pipeline, training
from gpt2_instruct.params import (
    DownloadParams,
    FetchParams,
    FinetuneParams,
    PrepareParams,
    RandomModelParams,
    TokenizeParams,
)
from gpt2_instruct.stages import fetch_gpt2 as fetch_gpt2_stage
from gpt2_instruct.tokenizer import ENCODER_JSON, VOCAB_BPE
from gpt2_instruct.training import CHECKPOINT_NAME

RECIPE = FinetuneParams(
    max_steps=6, batch_size=4, eval_every=2, eval_batches=2, checkpoint_every=1, device="cpu"
)
KILLED_AFTER = 3  # the step whose checkpoint survives the kill


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, write_bpe) -> SimpleNamespace:
    """Prepared data, two random base models and two tokenized data sets."""
    root = tmp_path_factory.mktemp("resume")
    bpe = write_bpe(root / "bpe", MERGES)
    source = root / "source.json"
    source.write_text(json.dumps(_raw_entries()), encoding="utf-8")
    p = SimpleNamespace(root=root, encoding=root / "encoding")
    pins = {name: _sha256(bpe / name) for name in (ENCODER_JSON, VOCAB_BPE)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch_gpt2_stage, "BPE_SHA256", pins)
        pipeline.download(DownloadParams(url=str(source)), root / "raw.json")
        pipeline.prepare(PrepareParams(), root / "raw.json", root / "prepared", root / "p.json")
        for name, seed in (("base_a", 1), ("base_b", 2)):
            shape = RandomModelParams(n_layer=1, n_head=2, n_embd=16, context_length=256)
            random = dataclasses.replace(shape, seed=seed)
            fetch = FetchParams(source="random", bpe_source=str(bpe), random=random)
            pipeline.fetch_gpt2(fetch, p.encoding, root / name)
            setattr(p, name, root / name)
    p.data_a = root / "tokenized_a"
    pipeline.tokenize(TokenizeParams(), root / "prepared", p.encoding, p.data_a, root / "t.json")
    # The same data set less its last training examples (a smaller download, say).
    p.data_b = root / "tokenized_b"
    p.data_b.mkdir()
    for name in ("val.safetensors", "test.safetensors", "meta.json"):
        (p.data_b / name).write_bytes((p.data_a / name).read_bytes())
    train = load_file(p.data_a / "train.safetensors")
    keep = len(train["prompt_lengths"]) - 6
    save_file(
        {
            "ids": train["ids"][: int(train["offsets"][keep])].contiguous(),
            "offsets": train["offsets"][: keep + 1].contiguous(),
            "prompt_lengths": train["prompt_lengths"][:keep].contiguous(),
        },
        p.data_b / "train.safetensors",
    )
    return p


class _Killed(Exception):
    """Stands for SIGKILL in the middle of a step: nothing after the last checkpoint is kept."""


def _finetune(
    run_dir: Path,
    params: FinetuneParams,
    data: Path,
    base: Path,
    *,
    kill_in_step: int | None = None,
) -> bytes:
    """The finetune stage with its outputs under ``run_dir``; the exported weights' bytes."""
    original = training.Trainer._forward_backward

    def step(trainer: training.Trainer, indices: list[int]) -> tuple[float, int, int]:
        if trainer.state.step + 1 == kill_in_step:
            raise _Killed
        return original(trainer, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training.Trainer, "_forward_backward", step)
        pipeline.finetune(
            params,
            data,
            base,
            data.parent / "encoding",
            run_dir / "model",
            run_dir / "checkpoints",
            run_dir / "train.json",
            run_dir / "train_log.tsv",
            run_dir / "loss.png",
            run_dir / "dvclive",
        )
    return (run_dir / "model" / "model.safetensors").read_bytes()


def _killed_run(run_dir: Path, inputs: SimpleNamespace) -> None:
    with pytest.raises(_Killed):
        _finetune(run_dir, RECIPE, inputs.data_a, inputs.base_a, kill_in_step=KILLED_AFTER + 1)
    saved = (run_dir / "checkpoints" / CHECKPOINT_NAME).is_file()
    assert saved and not (run_dir / "model").exists()


@pytest.mark.parametrize(
    ("story", "changed"),
    [
        ("base model", "inputs.base_model"),
        ("data", "inputs.train_data"),
        ("learning rate", "params.lr"),
        ("tied head", "model.tie_embeddings, params.tie_embeddings"),
    ],
)
def test_a_checkpoint_from_other_inputs_is_deleted_and_training_starts_afresh(
    inputs: SimpleNamespace, tmp_path: Path, capsys, story: str, changed: str
) -> None:
    params, data, base = RECIPE, inputs.data_a, inputs.base_a
    if story == "base model":
        base = inputs.base_b
    elif story == "data":
        data = inputs.data_b
    elif story == "learning rate":
        params = dataclasses.replace(RECIPE, lr=1e-4)
    else:
        params = dataclasses.replace(RECIPE, tie_embeddings=True)
    _killed_run(tmp_path / "run", inputs)
    capsys.readouterr()
    resumed = _finetune(tmp_path / "run", params, data, base)
    out, err = capsys.readouterr()
    assert "resumed" not in err
    (line,) = [line for line in out.splitlines() if CHECKPOINT_NAME in line]
    assert f"made from other inputs (changed: {changed})" in line
    assert line.endswith("deleting it and starting from step 0")
    assert resumed == _finetune(tmp_path / "scratch", params, data, base)
    metrics = json.loads((tmp_path / "run" / "train.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == RECIPE.max_steps


@pytest.mark.parametrize(
    "knob",
    [
        {"threads": 1},
        {"fused_optimizer": False},
        {"optimizer_in_backward": False},
        {"checkpoint_every": 2},
        {"max_steps": 8},  # a constant rate does not depend on the run's length
    ],
    ids=lambda knob: next(iter(knob)),
)
def test_a_speed_knob_changed_resumes_the_checkpoint(
    inputs: SimpleNamespace, tmp_path: Path, capsys, knob: dict
) -> None:
    _killed_run(tmp_path / "run", inputs)
    capsys.readouterr()
    params = dataclasses.replace(RECIPE, **knob)
    _finetune(tmp_path / "run", params, inputs.data_a, inputs.base_a)
    out, err = capsys.readouterr()
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at step {KILLED_AFTER}" in err
    assert CHECKPOINT_NAME not in out
    metrics = json.loads((tmp_path / "run" / "train.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == params.max_steps


def test_resuming_the_same_inputs_exports_the_uninterrupted_model(
    inputs: SimpleNamespace, tmp_path: Path
) -> None:
    _killed_run(tmp_path / "run", inputs)
    resumed = _finetune(tmp_path / "run", RECIPE, inputs.data_a, inputs.base_a)
    assert resumed == _finetune(tmp_path / "scratch", RECIPE, inputs.data_a, inputs.base_a)


def test_a_checkpoint_past_the_new_last_step_is_stale(
    inputs: SimpleNamespace, tmp_path: Path, capsys
) -> None:
    _killed_run(tmp_path / "run", inputs)
    shorter = dataclasses.replace(RECIPE, max_steps=KILLED_AFTER - 1)
    capsys.readouterr()
    _finetune(tmp_path / "run", shorter, inputs.data_a, inputs.base_a)
    assert f"at step {KILLED_AFTER}, past this run's last step" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "train.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == KILLED_AFTER - 1
