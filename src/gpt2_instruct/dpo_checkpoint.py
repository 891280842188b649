"""The dpo stage's resumable checkpoint, bound to the inputs it was trained from.

The file is the fine-tune's (``gpt2_instruct.resume``): the policy's weights, AdamW's
state, the batch order's generator, torch's RNG states, the run's state with its log
(``dpo.DpoRun``), the params, and a fingerprint. DVC keeps ``data/dpo/checkpoints``
across runs (``persist: true``), so the fingerprint binds a checkpoint to what decides
the weights learned:

* the policy model folder (``fingerprint.digest_dir``: weights, config, tokenizer);
* the preference data's sha256 and the split params (which entries train);
* each split's reference log-probs key (the stage's cache key: the model's weights, the
  examples' token ids, the pad id, ``max_length`` and ``mask_prompt``);
* every ``dpo`` param that changes what is learned: all but the speed knobs below, the
  data's address (its content is bound above) and the run's length (the learning rate is
  constant, so ``epochs`` and ``max_steps`` only decide where the run stops; a checkpoint
  past the new last step is stale).

A checkpoint made from anything else is deleted with one line naming what changed, and
training starts from step 0. Training is on one device, so one process writes and reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gpt2_instruct import resume
from gpt2_instruct.fingerprint import digest_dir

if TYPE_CHECKING:
    from gpt2_instruct.batching import BatchOrder
    from gpt2_instruct.model import GPTModel
    from gpt2_instruct.params import DpoParams, PrepareParams

SPEED_KNOBS: tuple[str, ...] = ("device", "checkpoint_every")
RUN_LENGTH: tuple[str, ...] = ("epochs", "max_steps")
DATA_ADDRESS: tuple[str, ...] = ("data_url", "data_sha256")  # the content's sha256 is an input


def learning_params(params: DpoParams) -> dict[str, Any]:
    """The ``dpo`` params that decide the weights learned up to any given step."""
    skipped = {*SPEED_KNOBS, *RUN_LENGTH, *DATA_ADDRESS}
    return {k: v for k, v in dataclasses.asdict(params).items() if k not in skipped}


def of_run(inputs: dict[str, Any], params: DpoParams) -> dict[str, Any]:
    """A run's fingerprint: its inputs and its learning params."""
    return {"inputs": dict(inputs), "params": learning_params(params)}


class DpoCheckpoints:
    """Saves, resumes and removes the one checkpoint in ``directory`` (None: no checkpoints)."""

    def __init__(
        self,
        directory: Path | None,
        params: DpoParams,
        fingerprint: dict[str, Any],
        *,
        device: torch.device,
        log: Callable[[str], None] = print,
    ) -> None:
        self.directory, self.params, self.fingerprint = directory, params, fingerprint
        self.device, self.log = device, log

    @classmethod
    def for_stage(
        cls,
        directory: Path | None,
        params: DpoParams,
        *,
        model_dir: Path,
        data_sha256: str,
        split: PrepareParams,
        reference_keys: dict[str, str],
        device: torch.device,
        log: Callable[[str], None] = print,
    ) -> DpoCheckpoints:
        """The stage's checkpoints, fingerprinted by its inputs."""
        inputs = {
            "policy_model": digest_dir(model_dir),
            "data": data_sha256,
            "split": dataclasses.asdict(split),
            "reference_logprobs": dict(reference_keys),
        }
        return cls(directory, params, of_run(inputs, params), device=device, log=log)

    def save(
        self,
        model: GPTModel,
        optimizer: torch.optim.Optimizer,
        order: BatchOrder,
        train_state: dict[str, Any],
    ) -> None:
        """Write the checkpoint (atomically), with torch's RNG states as they are now."""
        if self.directory is None:
            return
        resume.write(
            self.directory / resume.CHECKPOINT_NAME,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            order_rng=order.state(),
            train_state=train_state,
            params=dataclasses.asdict(self.params),
            fingerprint=self.fingerprint,
            device=self.device,
        )

    def load(
        self,
        model: GPTModel,
        optimizer: torch.optim.Optimizer,
        order: BatchOrder,
        total_steps: int,
    ) -> dict[str, Any] | None:
        """Restore the model, optimizer, batch order and RNGs; the saved run state.

        None when there is nothing to resume. A stale checkpoint (``resume.stale_because``:
        other inputs, or past this run's ``total_steps``) is deleted with one line that
        says why.
        """
        if self.directory is None:
            return None
        path = self.directory / resume.CHECKPOINT_NAME
        state = resume.read(path, map_location=self.device, mmap=False)
        if state is None:
            return None
        stale = resume.stale_because(state, self.fingerprint, total_steps)
        if stale:
            self.log(resume.stale_line(path, stale))
            resume.remove(self.directory)
            return None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order.restore(state["order_rng"].cpu())  # a CPU generator; loaded to the device
        resume.restore_rng(state, self.device)
        self.log(f"resumed from {self.directory} at step {state['train_state']['step']}")
        return state["train_state"]

    def remove(self) -> None:
        """Drop the checkpoint once the model is exported: it would only fill the disk."""
        resume.remove(self.directory)
