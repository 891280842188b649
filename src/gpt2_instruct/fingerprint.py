"""What decides the weights a fine-tune learns: a checkpoint resumes only where it all matches.

DVC keeps ``data/checkpoints`` across runs (``persist: true``) and nothing else ties a
checkpoint to the inputs that ``dvc.lock`` records: resumed after the base model or the
data changed, a killed run would export weights trained on the old inputs. So every
checkpoint carries a fingerprint of what decides its weights:

* the content of the training and validation splits and of the base model's files,
  the prompt style and the pad id;
* the model's config (shape, dropout, tied or separate head);
* every ``finetune`` param that changes what is learned.

The speed and placement knobs below change how fast the same updates are computed,
or how they are grouped into sums (to rounding), never what is learned, so a
checkpoint resumes whatever they are. With a constant learning rate, the number of
epochs and ``max_steps`` only decide where the run stops, so a run can be extended;
under a schedule that decays over the run's length they decide every step's rate.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2_instruct.io import sha256_file

if TYPE_CHECKING:  # params imports dpo, which imports resume and so this module
    from gpt2_instruct.params import FinetuneParams

SPEED_KNOBS: tuple[str, ...] = (
    "device",
    "threads",
    "fused_optimizer",
    "optimizer_in_backward",
    "micro_batch_size",  # the full batch's gradient, summed in parts
    "distributed",  # the same batch split over processes, gradients averaged back
    "checkpoint_every",
)
_RUN_LENGTH: tuple[str, ...] = ("epochs", "max_steps")


def learning_params(params: FinetuneParams) -> dict[str, Any]:
    """The ``finetune`` params that decide the weights learned up to any given step."""
    values = {k: v for k, v in dataclasses.asdict(params).items() if k not in SPEED_KNOBS}
    if params.lr_schedule == "constant":
        for name in _RUN_LENGTH:
            values.pop(name)
    return values


def of_run(
    inputs: dict[str, Any], model_config: dict[str, Any], params: FinetuneParams
) -> dict[str, Any]:
    """A run's fingerprint: its inputs (data and base model hashes, prompt style, pad id),
    the model's config and the learning params."""
    return {"inputs": dict(inputs), "model": model_config, "params": learning_params(params)}


def digest_dir(root: Path) -> str:
    """sha256 over every file below ``root``: relative names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(sha256_file(path).encode("ascii"))
    return digest.hexdigest()


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of what differs between two fingerprints (``params.lr``, ``base_model``)."""
    changed: list[str] = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{inner}" for inner in changes(old, new)]
        elif old != new:
            changed.append(key)
    return changed
