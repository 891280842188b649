"""A training run's checkpoint file, whatever the loop writes it, and Ctrl-C between steps.

Two loops resume through it: the fine-tune's trainer (``checkpointing.Checkpointer``,
under any strategy) and the dpo stage's (``dpo_checkpoint``). A checkpoint is one file,
``last.pt``, holding tensors and plain values only: the weights, the optimizer's state,
the batch order's generator, torch's RNG states (dropout draws from them), the train
state with its log, the params, and the fingerprint of what decides the weights learned.
It is written atomically and read with ``torch.load(weights_only=True)``: nothing that
is not a tensor or a plain container is ever unpickled. Only a checkpoint whose
fingerprint equals the run's, and not past the run's last step, is resumed
(``stale_because``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.serialization import config as torch_serialization_config

from gpt2_instruct import fingerprint as fingerprints
from gpt2_instruct.io import atomic_path

CHECKPOINT_NAME = "last.pt"


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


@contextlib.contextmanager
def deferred_sigint() -> Iterator[list[bool]]:
    """Turn SIGINT into a flag checked between steps (main thread only; elsewhere a no-op).

    The loop finishes the step in flight, writes a checkpoint and raises
    ``KeyboardInterrupt`` itself, so the run resumes exactly where it stopped.
    """
    flag: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
