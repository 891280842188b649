"""Hugging Face GPT-2 checkpoints <-> our ``GPTModel``.

The Hub's GPT-2 checkpoints use OpenAI's ``Conv1D`` layers, which store weights
as ``[in, out]`` (the transpose of ``nn.Linear``), fuse q/k/v into ``c_attn``
and tie ``lm_head`` to ``wte``. A model fine-tuned with its own output head (the
reference's layout) is written as Hugging Face writes an untied GPT-2:
``tie_word_embeddings: false`` in ``config.json`` and an ``lm_head.weight``.
Weights are read with safetensors only: nothing downloaded is ever unpickled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gpt2_instruct.io import atomic_path, write_json
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.safe_json import JSONError, read_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 1024 * 1024  # a GPT-2 config.json is under 1 KB
CONFIG_KEY = "gpt2_instruct"
"""Key in ``config.json`` under which training records how the model was fine-tuned."""

# Our parameter name (per block) -> (HF name, transposed?)
_BLOCK_KEYS: dict[str, tuple[str, bool]] = {
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.out_proj.weight": ("attn.c_proj.weight", True),
    "attn.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
    "ff.fc.weight": ("mlp.c_fc.weight", True),
    "ff.fc.bias": ("mlp.c_fc.bias", False),
    "ff.proj.weight": ("mlp.c_proj.weight", True),
    "ff.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP_KEYS: dict[str, str] = {
    "tok_emb.weight": "wte.weight",
    "pos_emb.weight": "wpe.weight",
    "final_norm.weight": "ln_f.weight",
    "final_norm.bias": "ln_f.bias",
}
# Buffers that old checkpoints carry (causal masks); they hold no learned values.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def _key_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    mapping = {ours: (theirs, False) for ours, theirs in _TOP_KEYS.items()}
    for i in range(n_layer):
        for ours, (theirs, transpose) in _BLOCK_KEYS.items():
            mapping[f"blocks.{i}.{ours}"] = (f"h.{i}.{theirs}", transpose)
    return mapping


def config_from_hf(hf: dict[str, Any], source: str = CONFIG_NAME) -> GPTConfig:
    """Translate a Hugging Face ``GPT2Config`` dict into ``GPTConfig``."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'gpt2'")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in {"gelu_new", "gelu_pytorch_tanh"}:
        raise WeightsError(f"{source}: activation_function {activation!r} is not GPT-2's tanh GELU")
    tied = hf.get("tie_word_embeddings", True)  # Hugging Face's default
    if not isinstance(tied, bool):
        raise WeightsError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * hf.get("n_embd", 0)):
        raise WeightsError(f"{source}: n_inner={n_inner} is not 4 * n_embd")

    def integer(key: str) -> int:
        if key not in hf:
            raise WeightsError(f"{source}: missing key {key!r}")
        value = hf[key]
        if type(value) is not int:  # not null, "8", 8.5 or true
            raise WeightsError(f"{source}: {key} must be an integer, got {value!r}")
        return value

    eps = hf.get("layer_norm_epsilon", 1e-5)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise WeightsError(f"{source}: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
    fields = {"vocab_size": "vocab_size", "context_length": "n_positions", "n_embd": "n_embd"}
    fields |= {"n_layer": "n_layer", "n_head": "n_head"}
    try:
        return GPTConfig(
            **{ours: integer(theirs) for ours, theirs in fields.items()},
            layer_norm_eps=float(eps),
            tie_embeddings=tied,
        )
    except ValueError as err:
        if isinstance(err, WeightsError):
            raise
        raise WeightsError(f"{source}: {err}") from err


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """A ``config.json`` that ``transformers.GPT2LMHeadModel.from_pretrained`` accepts."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "bos_token_id": config.vocab_size - 1,
        "eos_token_id": config.vocab_size - 1,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    }


def read_config(model_dir: str | Path) -> GPTConfig:
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: not found")
    try:  # bounded: a config nested 100,000 deep or with 5000-digit numbers is one error
        hf = read_json(path, max_bytes=MAX_CONFIG_BYTES, duplicates="error")
    except JSONError as err:
        raise WeightsError(str(err)) from err
    if not isinstance(hf, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return config_from_hf(hf, str(path))


@contextlib.contextmanager
def _open_tensors(path: Path) -> Iterator[Any]:
    """A safetensors file opened for reading one tensor at a time; errors name the file."""
    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except WeightsError:
        raise  # raised by the reader, already naming the file and the problem
    except FileNotFoundError as err:
        raise WeightsError(f"{path}: not found") from err
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from err


def load_model(
    model_dir: str | Path, *, dropout: float = 0.0, dtype: torch.dtype = torch.float32
) -> GPTModel:
    """Build a ``GPTModel`` from a directory with ``config.json`` + ``model.safetensors``.

    Every expected tensor must be present with exactly the expected shape; a
    tensor we do not know, or one stored under two names (``wte.weight`` and
    ``transformer.wte.weight``), is an error too, so a mismatched config never loads
    silently. With ``tie_word_embeddings: false`` the file must hold ``lm_head.weight``;
    tied, an ``lm_head.weight`` it holds must equal ``wte.weight``. Every tensor is
    copied out of safetensors' memory map: a tensor left as a view would keep the
    whole file mapped, and resident, beside the model (gpt2-medium: 1.3 GB more RSS
    through all of fine-tuning).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if dropout:
        config = GPTConfig(**{**config.to_dict(), "dropout": dropout})
    weights_path = model_dir / WEIGHTS_NAME
    state: dict[str, torch.Tensor] = {}
    with _open_tensors(weights_path) as handle:
        # save_pretrained of GPT2LMHeadModel prefixes "transformer."; the Hub files do not.
        stored: dict[str, str] = {}
        for key in handle.keys():  # noqa: SIM118 (no __iter__)
            name = key.removeprefix("transformer.")
            if name in stored:
                raise WeightsError(
                    f"{weights_path}: tensor {name!r} is stored twice ({stored[name]!r} and "
                    f"{key!r}); which one is meant is ambiguous"
                )
            stored[name] = key
        _check_layer_count(stored, config.n_layer, weights_path)
        with torch.device("meta"):  # shapes only, no memory
            model = GPTModel(config)
        own_shapes = {name: p.shape for name, p in model.state_dict().items()}
        head_key = stored.pop("lm_head.weight", None)
        for ours, (theirs, transpose) in _key_map(config.n_layer).items():
            if theirs not in stored:
                raise WeightsError(f"{weights_path}: missing tensor {theirs!r}")
            key = stored.pop(theirs)
            shape = tuple(handle.get_slice(key).get_shape())
            want = tuple(own_shapes[ours][::-1] if transpose else own_shapes[ours])  # as stored
            if shape != want:
                raise WeightsError(
                    f"{weights_path}: tensor {theirs!r} has shape {shape}, expected "
                    f"{want} for the config in {model_dir / CONFIG_NAME}"
                )
            tensor = handle.get_tensor(key)  # a view of the file, memory-mapped
            state[ours] = (tensor.t() if transpose else tensor).to(
                dtype=dtype, memory_format=torch.contiguous_format, copy=True
            )  # our own memory, so the mapping goes when the file closes
            _check_finite(state[ours], theirs, weights_path)
        unknown = [k for k in stored if not k.endswith(_IGNORED_SUFFIXES)]
        if unknown:
            raise WeightsError(f"{weights_path}: unexpected tensors {sorted(unknown)[:5]}")
        if not config.tie_embeddings:
            state["out_head.weight"] = _read_head(handle, head_key, own_shapes, weights_path, dtype)
            _check_finite(state["out_head.weight"], "lm_head.weight", weights_path)
        elif head_key is not None:
            head = handle.get_tensor(head_key)
            if not torch.equal(head, state["tok_emb.weight"].to(head.dtype)):
                raise WeightsError(
                    f"{weights_path}: lm_head.weight is not tied to wte.weight, but "
                    f"{model_dir / CONFIG_NAME} says tie_word_embeddings: true"
                )
            del head
    model.load_state_dict(state, assign=True)
    return model


def _check_finite(tensor: torch.Tensor, name: str, weights_path: Path) -> None:
    """A NaN or infinite weight makes every answer garbage while each stage exits 0;
    one pass over the weights (a fraction of a second for gpt2-medium) catches it."""
    if not bool(torch.isfinite(tensor).all()):
        raise WeightsError(f"{weights_path}: tensor {name!r} holds NaN or infinite values")


def _check_layer_count(stored: dict[str, str], n_layer: int, weights_path: Path) -> None:
    """A file with fewer blocks than ``n_layer`` fails before any per-layer work, so a
    config that claims a billion layers fails at once (extra blocks are unexpected
    tensors, named later)."""
    found = len({name.split(".")[1] for name in stored if name.startswith("h.")})
    if found < n_layer:
        raise WeightsError(
            f"{weights_path}: holds {found} transformer blocks, but config.json says "
            f"n_layer={n_layer}"
        )


def _read_head(
    handle: Any,
    head_key: str | None,
    own_shapes: dict[str, torch.Size],
    weights_path: Path,
    dtype: torch.dtype,
) -> torch.Tensor:
    """An untied model's ``lm_head.weight``, checked and copied into our own memory."""
    if head_key is None:
        raise WeightsError(
            f"{weights_path}: missing tensor 'lm_head.weight' (config.json says "
            "tie_word_embeddings: false)"
        )
    shape = tuple(handle.get_slice(head_key).get_shape())
    want = tuple(own_shapes["out_head.weight"])
    if shape != want:
        raise WeightsError(
            f"{weights_path}: tensor 'lm_head.weight' has shape {shape}, expected {want}"
        )
    return handle.get_tensor(head_key).to(
        dtype=dtype, memory_format=torch.contiguous_format, copy=True
    )


def save_model(model: GPTModel, model_dir: str | Path, *, extra_config: dict | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` in Hugging Face GPT-2 layout.

    A tied head is left out, as ``save_pretrained`` leaves it out; a separate head is
    written as ``lm_head.weight`` with ``tie_word_embeddings: false``. Files are
    replaced atomically.
    """
    model_dir = Path(model_dir)
    state = model.state_dict()
    tensors = {
        f"transformer.{theirs}": (state[ours].t() if transpose else state[ours])
        .detach()
        .to("cpu", torch.float32)
        .contiguous()
        for ours, (theirs, transpose) in _key_map(model.config.n_layer).items()
    }
    if not model.config.tie_embeddings:
        head = state["out_head.weight"].detach().to("cpu", torch.float32).contiguous()
        tensors["lm_head.weight"] = head
    with atomic_path(model_dir / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    config = config_to_hf(model.config)
    if extra_config:
        config.update(extra_config)
    write_json(model_dir / CONFIG_NAME, config)
