"""Batches as training and evaluation read them: collated onto the device, under the precision.

Shared by the training step (``strategy``), the evaluation schedule (``eval_schedule``) and
the trainer, so each pads a batch, splits it into micro-batches and runs under autocast the
same way.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from gpt2_instruct.batching import TokenizedSplit, collate
from gpt2_instruct.devices import Platform, Precision
from gpt2_instruct.model import IGNORE_INDEX
from gpt2_instruct.params import FinetuneParams

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets)


def autocast(
    device: torch.device, precision: Precision, *, cache: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """Autocast where the device seam says so (``Platform.autocast_dtype``: bf16); fp32 and
    tf32 run as written (tf32 rounds products through the matmul setting instead).

    ``cache``: keep one bf16 cast of each weight for the whole region (autocast's
    default) instead of casting it again at every use.
    """
    dtype = Platform(device, precision).autocast_dtype
    if dtype is not None:
        return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)
    return contextlib.nullcontext()


def counted_targets(targets: torch.Tensor) -> int:
    """The positions whose target counts in the loss."""
    return int((targets != IGNORE_INDEX).sum())


def micro_batch_size(size: int | None, examples: int) -> int | None:
    """The micro-batch size a batch of ``examples`` is split by; None: it runs whole."""
    return size if size is not None and size < examples else None


class Collator:
    """One split's batches, padded (and prompt-masked) as the recipe asks, on the device."""

    def __init__(
        self, split: TokenizedSplit, params: FinetuneParams, *, pad_id: int, device: torch.device
    ) -> None:
        self.split = split
        self.pad_id = pad_id
        self.max_length = params.max_length
        self.mask_prompt = params.mask_prompt
        self.device = device

    def __call__(self, indices: list[int]) -> Batch:
        split = self.split
        examples = [split[i] for i in indices]
        prompt_lengths = (
            [int(split.prompt_lengths[i]) for i in indices] if self.mask_prompt else None
        )
        inputs, targets = collate(
            examples, pad_id=self.pad_id, max_length=self.max_length, prompt_lengths=prompt_lengths
        )
        return inputs.to(self.device), targets.to(self.device)

    def many(self, batches: list[list[int]]) -> list[Batch]:
        """Each list of indices collated as a batch of its own."""
        return [self(indices) for indices in batches]

    def micro_batches(self, indices: list[int], size: int) -> list[Batch]:
        """Consecutive micro-batches of ``size`` examples, each padded on its own."""
        return self.many([indices[i : i + size] for i in range(0, len(indices), size)])
