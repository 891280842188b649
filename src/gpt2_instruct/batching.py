"""Tokenized splits, batch order and collate.

Batch order comes from a dedicated ``torch.Generator`` (never the global RNG),
so it is reproducible, checkpointable and independent of whatever else draws
random numbers. The ``reference`` order reproduces, batch for batch, what the
reference's ``DataLoader(shuffle=True, drop_last=True)`` yields after
``torch.manual_seed(seed)``, including the random draws its periodic
evaluation makes on the training loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2_instruct.io import atomic_path
from gpt2_instruct.model import IGNORE_INDEX
from gpt2_instruct.safe_json import read_json

# How training batches are drawn (``finetune.batch_order``; ``BatchOrder``).
BatchOrderMode = Literal["reference", "length_grouped"]


class SplitError(ValueError):
    """A tokenized split, or its ``meta.json``, that the tokenize stage did not write so."""


META_FIELDS = {"vocab_size": int, "eot_id": int, "prompt_style": str}


def read_meta(path: str | Path) -> dict[str, object]:
    """The tokenize stage's ``meta.json``, with the fields later stages use checked."""
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise SplitError(f"{path}: expected a JSON object")
    for field, kind in META_FIELDS.items():
        if type(meta.get(field)) is not kind:
            raise SplitError(
                f"{path}: field {field!r} must be {kind.__name__}, got {meta.get(field)!r}"
            )
    if not 0 <= meta["eot_id"] < meta["vocab_size"]:  # type: ignore[operator]
        raise SplitError(f"{path}: field 'eot_id' is outside the vocabulary")
    return meta


@dataclass
class TokenizedSplit:
    """Token ids of a split's examples, stored flat with offsets, plus prompt lengths."""

    ids: torch.Tensor  # (total_tokens,) int32
    offsets: torch.Tensor  # (n + 1,) int64
    prompt_lengths: torch.Tensor  # (n,) int32, tokens of the prompt part of each example

    @classmethod
    def from_lists(cls, examples: Sequence[Sequence[int]], prompt_lengths: Sequence[int]):
        if len(examples) != len(prompt_lengths):
            raise ValueError("one prompt length per example is required")
        lengths = torch.tensor([len(e) for e in examples], dtype=torch.int64)
        offsets = torch.zeros(len(examples) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        ids = torch.tensor([t for e in examples for t in e], dtype=torch.int32)
        return cls(ids, offsets, torch.tensor(list(prompt_lengths), dtype=torch.int32))

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[self.offsets[i] : self.offsets[i + 1]].tolist()

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            save_file(
                {"ids": self.ids, "offsets": self.offsets, "prompt_lengths": self.prompt_lengths},
                tmp,
            )

    @classmethod
    def load(cls, path: str | Path, *, vocab_size: int | None = None) -> TokenizedSplit:
        """Read a split written by :meth:`save`, checking every invariant batching relies on.

        A damaged or hand-edited file fails here, naming it, instead of as an
        ``IndexError`` deep in batching or the embedding (ids beyond ``vocab_size``).
        """
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise SplitError(f"{path}: not a readable safetensors file ({err})") from None
        missing = {"ids", "offsets", "prompt_lengths"} - tensors.keys()
        if missing:
            raise SplitError(f"{path}: missing tensors {sorted(missing)}")
        for name in ("ids", "offsets", "prompt_lengths"):
            t = tensors[name]
            if (
                t.dim() != 1
                or t.dtype.is_floating_point
                or t.dtype.is_complex
                or t.dtype == torch.bool
            ):
                raise SplitError(f"{path}: tensor {name!r} must be a 1-D integer tensor")
        split = cls(tensors["ids"], tensors["offsets"].long(), tensors["prompt_lengths"])
        offsets, lengths = split.offsets, split.offsets[1:] - split.offsets[:-1]
        if (
            len(offsets) != len(split.prompt_lengths) + 1
            or len(offsets) == 0
            or offsets[0].item() != 0
            or offsets[-1].item() != len(split.ids)
            or bool((lengths <= 0).any())
        ):
            raise SplitError(f"{path}: offsets do not match ids and prompt_lengths")
        if bool(((split.prompt_lengths < 0) | (split.prompt_lengths > lengths)).any()):
            raise SplitError(f"{path}: a prompt length is negative or longer than its example")
        split.check_ids(path, vocab_size)
        return split

    def check_ids(self, source: str | Path, vocab_size: int | None = None) -> None:
        """Every token id is >= 0 and, given ``vocab_size``, below it; ``source`` names the file."""
        if len(self.ids) and (
            self.ids.min().item() < 0
            or (vocab_size is not None and self.ids.max().item() >= vocab_size)
        ):
            raise SplitError(f"{source}: token ids outside the model's vocabulary of {vocab_size}")


def collate(
    examples: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_length: int,
    prompt_lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for a batch, right-padded with ``pad_id``.

    Each example gets one ``pad_id`` appended as its end-of-text token and that
    first EOS stays a target, so the model learns to stop; every later
    (padding) target is ``IGNORE_INDEX``. Masking is by position, not by token
    id. An example longer than ``max_length`` is cut to ``max_length`` tokens
    and still ends in the EOS target. With ``prompt_lengths`` the targets that
    predict prompt tokens are masked too (loss on the response only).
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    kept = [min(len(e), max_length) for e in examples]
    width = max(kept)  # inputs: the example; targets: the example shifted + EOS
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (example, n) in enumerate(zip(examples, kept, strict=True)):
        if n == 0:
            raise ValueError(f"batch row {row}: empty example")
        tokens = torch.as_tensor(example[:n], dtype=torch.long)
        inputs[row, :n] = tokens
        targets[row, : n - 1] = tokens[1:]
        targets[row, n - 1] = pad_id  # the EOS target
        if prompt_lengths is not None and prompt_lengths[row] > 1:
            # Target j predicts token j + 1: mask those that predict prompt tokens.
            targets[row, : min(prompt_lengths[row], n) - 1] = IGNORE_INDEX
    return inputs, targets


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class BatchOrder:
    """Which examples form each training batch, epoch by epoch.

    ``reference`` shuffles like ``DataLoader(shuffle=True, drop_last=True)``
    seeded by ``torch.manual_seed(seed)``: every new iterator over the loader
    draws a base seed, then the sampler draws the seed of its permutation.
    ``length_grouped`` shuffles, then sorts examples by length inside pools of
    ``pool_size`` batches' worth of examples and shuffles the resulting batches,
    so batches carry little padding while the order stays random and seeded.
    """

    MODES: tuple[str, ...] = get_args(BatchOrderMode)

    def __init__(
        self,
        lengths: torch.Tensor,
        batch_size: int,
        *,
        seed: int,
        mode: BatchOrderMode = "reference",
        pool_batches: int = 32,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"batch order {mode!r} is not one of {self.MODES}")
        if len(lengths) < batch_size:
            raise ValueError(
                f"{len(lengths)} training examples cannot fill one batch of {batch_size}"
            )
        self.lengths = lengths
        self.batch_size = batch_size
        self.mode = mode
        self.pool_batches = pool_batches
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.lengths) // self.batch_size

    def _permutation(self) -> torch.Tensor:
        _draw_seed(self.generator)  # the DataLoader iterator's base seed
        sampler = torch.Generator().manual_seed(_draw_seed(self.generator))
        return torch.randperm(len(self.lengths), generator=sampler)

    def epoch(self) -> list[list[int]]:
        """The batches of the next epoch (the last partial batch is dropped)."""
        perm = self._permutation()
        n = len(self) * self.batch_size
        if self.mode == "reference":
            return perm[:n].view(-1, self.batch_size).tolist()
        pool = self.pool_batches * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, n, pool):
            chunk = perm[start : min(start + pool, n)]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches.extend(chunk.view(-1, self.batch_size).tolist())
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[i] for i in order]

    def sample_batches(self, count: int) -> list[list[int]]:
        """``count`` batches of a fresh shuffle, as the reference's evaluation on train does."""
        perm = self._permutation()
        return perm[: min(count, len(self)) * self.batch_size].view(-1, self.batch_size).tolist()

    def skip_unshuffled_iterator(self) -> None:
        """Consume the draw that iterating an unshuffled DataLoader makes (its base seed).

        The reference's validation loader does not shuffle, yet each pass over it
        still draws from the global RNG and so moves the training shuffle.
        """
        _draw_seed(self.generator)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        """The state ``state()`` gave; a checkpoint loaded onto a GPU holds it there, and a
        CPU generator takes only a CPU ByteTensor."""
        self.generator.set_state(state.cpu())
