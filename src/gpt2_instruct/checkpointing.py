"""The run's one checkpoint file: what it holds, whether it may be resumed, how it is written.

A checkpoint holds everything a run needs to continue bit for bit: the weights and
AdamW's state in the single-process layout (whatever the strategy, so it resumes under
any strategy and world size), the batch order's generator, torch's RNG states (dropout
draws from them), the train state with its loss log, the params, and the fingerprint of
what decides the weights learned (``gpt2_instruct.fingerprint``). Only a checkpoint
with this run's fingerprint, not past this run's last step, is resumed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.serialization import config as torch_serialization_config

from gpt2_instruct import fingerprint as fingerprints
from gpt2_instruct.io import atomic_path

if TYPE_CHECKING:
    from gpt2_instruct.batching import BatchOrder
    from gpt2_instruct.model import GPTModel
    from gpt2_instruct.params import FinetuneParams
    from gpt2_instruct.strategy import SingleProcess

CHECKPOINT_NAME = "last.pt"


class Checkpointer:
    """Saves and resumes one run's checkpoint: rank 0 writes it, every rank reads it.

    The layout is the single-process one whatever the strategy, so a checkpoint
    resumes under any strategy and world size.
    """

    def __init__(
        self, strategy: SingleProcess, params: FinetuneParams, fingerprint: dict[str, Any]
    ) -> None:
        self.strategy, self.params, self.fingerprint = strategy, params, fingerprint

    def save(
        self,
        directory: Path,
        model: GPTModel,
        optimizer: torch.optim.Optimizer,
        order: BatchOrder,
        train_state: dict[str, Any],
    ) -> None:
        """All ranks call it (FSDP gathers the shards first); rank 0 writes, then all wait."""
        model_state, optimizer_state = self.strategy.full_state(model, optimizer)
        if self.strategy.world.is_main:
            write(
                directory / CHECKPOINT_NAME,
                model=model_state,
                optimizer=optimizer_state,
                order_rng=order.state(),
                train_state=train_state,
                params=dataclasses.asdict(self.params),
                fingerprint=self.fingerprint,
                device=self.strategy.device,
            )
        self.strategy.barrier()

    def load(
        self,
        directory: Path | None,
        model: GPTModel,
        optimizer: torch.optim.Optimizer,
        order: BatchOrder,
        total_steps: int,
    ) -> dict[str, Any] | None:
        """Restore the model, optimizer, batch order and RNGs; the saved train state.

        None when there is nothing to resume. A stale checkpoint (``stale_because``) is
        deleted with one line that says why. Every rank must find the same step: a
        checkpoint directory that not every node shares would split the job.
        """
        train_state = self._load(directory, model, optimizer, order, total_steps)
        step = int(train_state["step"]) if train_state is not None else -1
        if not self.strategy.all_equal(step):
            raise RuntimeError(
                f"ranks disagree on the checkpoint in {directory} (rank "
                f"{self.strategy.world.rank} "
                f"{'resumed at step ' + str(step) if train_state is not None else 'found none'}); "
                "the checkpoint directory must be shared by every node"
            )
        return train_state

    def _load(
        self,
        directory: Path | None,
        model: GPTModel,
        optimizer: torch.optim.Optimizer,
        order: BatchOrder,
        total_steps: int,
    ) -> dict[str, Any] | None:
        if directory is None:
            return None
        path, main = directory / CHECKPOINT_NAME, self.strategy.world.is_main
        # Sharded: every rank maps the full file and keeps its own shards of it.
        state = read(path, map_location=self.strategy.load_location, mmap=self.strategy.sharded)
        if state is None:
            return None
        stale = stale_because(state, self.fingerprint, total_steps)
        if stale:
            if main:
                print(stale_line(path, stale), flush=True)
            del state
            self.strategy.barrier()  # every rank has read it before it goes
            if main:
                path.unlink(missing_ok=True)
            return None
        self.strategy.load_full_state(model, optimizer, state["model"], state["optimizer"])
        order.restore(state["order_rng"])
        restore_rng(state, self.strategy.device)
        return state["train_state"]


def write(
    path: Path,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    order_rng: torch.Tensor,
    train_state: dict[str, Any],
    params: dict[str, Any],
    fingerprint: dict[str, Any],
    device: torch.device,
) -> None:
    """Write a checkpoint to ``path`` atomically, with torch's RNG states as they are now."""
    state = {
        "model": model,
        "optimizer": optimizer,
        "order_rng": order_rng,
        "torch_rng": torch.get_rng_state(),
        "train_state": train_state,
        "params": params,
        "fingerprint": fingerprint,
    }
    if device.type == "cuda":  # dropout draws there
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    # Without the zip's CRC-32s: torch.load never checks them, and computing them
    # (on one thread) made gpt2-medium's 4.3 GB take 11-17 s instead of 6.
    with (
        atomic_path(path) as tmp,
        torch_serialization_config.patch({"save.compute_crc32": False}),
    ):
        torch.save(state, tmp)


def read(path: Path, *, map_location: torch.device | str, mmap: bool) -> dict[str, Any] | None:
    """The checkpoint at ``path``; None if there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def stale_because(state: dict[str, Any], fingerprint: dict[str, Any], total_steps: int) -> str:
    """Why a loaded checkpoint cannot be resumed by this run ("" if it can)."""
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        return "made without an input fingerprint (an older version)"
    changed = fingerprints.changes(saved, fingerprint)
    if changed:
        return f"made from other inputs (changed: {', '.join(changed)})"
    step = int(state["train_state"]["step"])
    if step > total_steps:
        return f"at step {step}, past this run's last step {total_steps}"
    return ""


def stale_line(path: Path, reason: str) -> str:
    """The one line that says a stale checkpoint goes, and why."""
    return f"{path}: {reason}; deleting it and starting from step 0"


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Torch's RNG states as the checkpoint saved them (CUDA's only when training there)."""
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


def remove(directory: Path | None) -> None:
    """Delete the checkpoint in ``directory``, if any."""
    if directory is not None:
        (directory / CHECKPOINT_NAME).unlink(missing_ok=True)
