"""The fine-tune's checkpoint under any strategy: rank 0 writes it, every rank reads it.

A checkpoint holds everything a run needs to continue bit for bit: the weights and
AdamW's state in the single-process layout (whatever the strategy, so it resumes under
any strategy and world size), the batch order's generator, torch's RNG states (dropout
draws from them), the train state with its loss log, the params, and the fingerprint of
what decides the weights learned (``gpt2_instruct.fingerprint``). Only a checkpoint
with this run's fingerprint, not past this run's last step, is resumed. The file itself
(layout, atomic write, safe read, staleness) is ``gpt2_instruct.resume``'s, shared with
the dpo stage; its functions are re-exported here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpt2_instruct.resume import (
    CHECKPOINT_NAME,
    read,
    remove,
    restore_rng,
    stale_because,
    stale_line,
    write,
)

if TYPE_CHECKING:
    from gpt2_instruct.batching import BatchOrder
    from gpt2_instruct.model import GPTModel
    from gpt2_instruct.params import FinetuneParams
    from gpt2_instruct.strategy import SingleProcess

__all__ = [
    "CHECKPOINT_NAME",
    "Checkpointer",
    "read",
    "remove",
    "restore_rng",
    "stale_because",
    "stale_line",
    "write",
]


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
