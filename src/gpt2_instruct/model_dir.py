"""A fine-tuned model directory: GPT-2 weights, BPE files and the prompt style it learned.

The finetune stage writes one (``data/model``); generate, evaluate and the command line
read it back through ``load_instruct_model``, which checks every file before loading.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2_instruct.data import PROMPT_STYLES
from gpt2_instruct.model import GPTModel
from gpt2_instruct.safe_json import JSONError, read_json
from gpt2_instruct.tokenizer import ENCODER_JSON, VOCAB_BPE, Tokenizer, load_tokenizer
from gpt2_instruct.weights import (
    CONFIG_KEY,
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    WeightsError,
    load_model,
)

DEFAULT_STYLE = "alpaca"
MODEL_FILES: tuple[str, ...] = (WEIGHTS_NAME, CONFIG_NAME, ENCODER_JSON, VOCAB_BPE)


class ModelDirError(ValueError):
    """A model directory that cannot be used; the message names the directory and file."""


def _prompt_style(model_dir: Path) -> str:
    """The prompt style recorded at training time; models saved without one used alpaca."""
    path = model_dir / CONFIG_NAME
    try:
        config = read_json(path, max_bytes=MAX_CONFIG_BYTES, duplicates="error")
    except JSONError as err:
        raise ModelDirError(f"model directory {model_dir}: {err}") from err
    extra = config.get(CONFIG_KEY, {}) if isinstance(config, dict) else {}
    if not isinstance(extra, dict):
        raise ModelDirError(f"{path}: {CONFIG_KEY!r} must be a JSON object")
    style = extra.get("prompt_style", DEFAULT_STYLE)
    if style not in PROMPT_STYLES:
        valid = ", ".join(repr(s) for s in PROMPT_STYLES)
        raise ModelDirError(
            f"{path}: unknown {CONFIG_KEY}.prompt_style {style!r}; valid styles: {valid}"
        )
    return style


def load_instruct_model(
    model_dir: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[GPTModel, Tokenizer, str]:
    """Model (in eval mode on ``device``), tokenizer and prompt style from a model directory.

    All four files are checked up front so a half-copied directory fails with one message
    naming the directory and every missing file, not with a deep loader traceback.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir}: not found or not a directory")
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ModelDirError(
            f"model directory {model_dir}: missing {', '.join(missing)} "
            f"(expected {', '.join(MODEL_FILES)})"
        )
    style = _prompt_style(model_dir)
    try:
        tokenizer = load_tokenizer(model_dir)
    except ValueError as err:
        raise ModelDirError(f"model directory {model_dir}: bad tokenizer files: {err}") from err
    try:
        model = load_model(model_dir)
    except WeightsError as err:
        raise ModelDirError(f"model directory {model_dir}: {err}") from err
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ModelDirError(
            f"model directory {model_dir}: the model has {model.config.vocab_size} token "
            f"embeddings but the tokenizer has {tokenizer.vocab_size} tokens"
        )
    model.to(device).eval()
    return model, tokenizer, style
