"""The trainer's pieces on their own: checkpoint file, staleness, evaluation schedule, strategy
choice and when updates run in backward. The trainer's tests cover them working together."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import pytest
import torch
from test_training import PAD, RECIPE, TRAIN, VAL

from gpt2_instruct import backward_updates, checkpointing, strategy
from gpt2_instruct.batching import BatchOrder
from gpt2_instruct.distributed import World
from gpt2_instruct.eval_schedule import EvalSchedule, val_eval_indices
from gpt2_instruct.params import DistributedParams, FinetuneParams
from gpt2_instruct.train_batches import Collator

FINGERPRINT = {"inputs": {"data": "a"}, "model": {"n_layer": 2}, "params": {"lr": 1e-3}}


def _saved(fingerprint: object = FINGERPRINT, step: int = 4) -> dict[str, object]:
    return {"fingerprint": fingerprint, "train_state": {"step": step}}


def test_a_checkpoint_is_stale_for_other_inputs_an_older_version_or_a_shorter_run() -> None:
    assert checkpointing.stale_because(_saved(), FINGERPRINT, total_steps=4) == ""
    older = checkpointing.stale_because(_saved(fingerprint=None), FINGERPRINT, total_steps=9)
    assert older == "made without an input fingerprint (an older version)"
    other = {**FINGERPRINT, "params": {"lr": 2e-3}, "inputs": {"data": "b"}}
    assert (
        checkpointing.stale_because(_saved(), other, total_steps=9)
        == "made from other inputs (changed: inputs.data, params.lr)"
    )
    assert (
        checkpointing.stale_because(_saved(step=5), FINGERPRINT, total_steps=4)
        == "at step 5, past this run's last step 4"
    )
    line = checkpointing.stale_line(Path("ckpt/last.pt"), "why")
    assert line == "ckpt/last.pt: why; deleting it and starting from step 0"


def test_a_checkpoint_is_written_whole_without_checksums_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / checkpointing.CHECKPOINT_NAME
    assert checkpointing.read(path, map_location="cpu", mmap=False) is None
    torch.manual_seed(3)
    checkpointing.write(
        path,
        model={"w": torch.arange(4.0)},
        optimizer={"state": {}, "param_groups": []},
        order_rng=torch.Generator().manual_seed(1).get_state(),
        train_state={"step": 2},
        params={"lr": 1e-3},
        fingerprint=FINGERPRINT,
        device=torch.device("cpu"),
    )
    assert [p.name for p in tmp_path.iterdir()] == [checkpointing.CHECKPOINT_NAME]  # no temp
    with zipfile.ZipFile(path) as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
    state = checkpointing.read(path, map_location="cpu", mmap=False)
    assert state is not None
    assert list(state) == [
        "model", "optimizer", "order_rng", "torch_rng", "train_state", "params", "fingerprint",
    ]  # fmt: skip  # the layout older checkpoints have: they still load
    expected = torch.rand(3)
    checkpointing.restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)  # the RNG as it was when written
    checkpointing.remove(None)  # no directory: nothing to do
    checkpointing.remove(tmp_path)
    assert not path.exists()


def test_evaluation_reads_the_first_validation_batches_after_steps_1_and_every_n() -> None:
    assert val_eval_indices(11, 4, 5) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert val_eval_indices(11, 4, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    order = BatchOrder(TRAIN.lengths, RECIPE.batch_size, seed=RECIPE.seed)
    train, val = (Collator(s, RECIPE, pad_id=PAD, device=torch.device("cpu")) for s in (TRAIN, VAL))
    schedule = EvalSchedule(RECIPE, order, train, val, holds_batches=False)
    assert schedule.val_batches == [] and schedule.fixed_train_batches is None
    assert [step for step in range(1, 12) if schedule.due(step)] == [1, 4, 7, 10]
    # The reference's draws: a fresh shuffle's first batches, then its val loader's base seed.
    replay = BatchOrder(TRAIN.lengths, RECIPE.batch_size, seed=RECIPE.seed)
    assert schedule.draw_train_indices() == replay.sample_batches(RECIPE.eval_batches)
    replay.skip_unshuffled_iterator()
    assert torch.equal(order.state(), replay.state())


@pytest.mark.parametrize(
    ("overrides", "world_size", "expected"),
    [
        ({}, 1, True),
        ({"optimizer_in_backward": False}, 1, False),
        ({"grad_clip": 1.0}, 1, False),
        ({"micro_batch_size": 2}, 1, False),
        ({"micro_batch_size": 4}, 1, True),  # the whole batch: no accumulation
        ({}, 2, False),
        ({"optimizer_in_backward": True}, 1, True),
    ],
)
def test_updates_run_in_backward_only_where_no_step_needs_every_gradient(
    overrides: dict, world_size: int, expected: bool
) -> None:
    params = dataclasses.replace(FinetuneParams(batch_size=4), **overrides)
    cpu = torch.device("cpu")
    assert backward_updates.applies(params, world_size=world_size, device=cpu) is expected


def test_the_strategy_follows_the_world_and_the_params() -> None:
    cpu = torch.device("cpu")
    params = FinetuneParams(batch_size=4)
    single = strategy.for_world(World(), cpu, params, None)  # type: ignore[arg-type]
    assert type(single) is strategy.SingleProcess and not single.sharded
    assert single.reduce_step(1.5, 7, True) == (1.5, 7, True)
    assert single.all_equal(3)
    two = World(rank=1, local_rank=1, size=2)
    ddp = strategy.for_world(two, cpu, params, None)  # type: ignore[arg-type]
    assert isinstance(ddp, strategy.DDP) and not ddp.sharded
    assert ddp.full_state(None, None) == ({}, {})  # type: ignore[arg-type]  # rank 1 holds none
    fsdp_params = dataclasses.replace(params, distributed=DistributedParams(strategy="fsdp"))
    fsdp = strategy.for_world(two, cpu, fsdp_params, None)  # type: ignore[arg-type]
    assert isinstance(fsdp, strategy.FSDP) and fsdp.sharded and fsdp.load_location == "cpu"
