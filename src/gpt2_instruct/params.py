"""Typed, validated views of ``params.yaml``: one dataclass per pipeline stage.

A stage reads only its own section. Unknown keys, wrong types and values out of
range fail before any work starts, naming ``params.yaml``, the section and the
key, so a typo in ``dvc exp run -S finetune.lerning_rate=...`` cannot silently
run the default recipe.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ruamel.yaml import YAML, YAMLError

from gpt2_instruct.model import GPT2_CONFIGS

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params.yaml problem; the message names the file, the section and the key."""


@dataclass(frozen=True)
class DownloadParams:
    """Where the instruction data set comes from: http(s) URL, file:// URL or local path."""

    url: str = (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
        "01_main-chapter-code/instruction-data.json"
    )
    sha256: str | None = None
    timeout: float = 60.0
    retries: int = 3

    def __post_init__(self) -> None:
        _check(self.timeout > 0, "timeout must be > 0")
        _check(self.retries >= 0, "retries must be >= 0")


@dataclass(frozen=True)
class PrepareParams:
    """The reference split: 85% train, 10% test, the rest validation, in file order."""

    train_fraction: float = 0.85
    test_fraction: float = 0.10
    shuffle: bool = False
    seed: int = 123

    def __post_init__(self) -> None:
        _check(0 < self.train_fraction < 1, "train_fraction must be in (0, 1)")
        _check(0 < self.test_fraction < 1, "test_fraction must be in (0, 1)")
        _check(self.train_fraction + self.test_fraction < 1, "train + test fractions must be < 1")


@dataclass(frozen=True)
class TokenizeParams:
    prompt_style: Literal["alpaca", "phi3"] = "alpaca"


@dataclass(frozen=True)
class RandomModelParams:
    """Shape of a randomly initialised model: smoke tests and CI, never real answers."""

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    context_length: int = 1024
    seed: int = 123

    def __post_init__(self) -> None:
        _check(self.n_layer > 0 and self.n_head > 0, "n_layer and n_head must be > 0")
        _check(self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head")
        _check(0 < self.context_length <= 1024, "context_length must be in 1..1024")


@dataclass(frozen=True)
class FetchParams:
    """Pre-trained weights (Hugging Face safetensors) and GPT-2's BPE files."""

    source: Literal["hub", "local", "random"] = "hub"
    model: str = "gpt2-medium"
    revision: str = "main"
    hub_url: str = "https://huggingface.co"
    local_dir: str | None = None
    bpe_source: str = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
    timeout: float = 60.0
    retries: int = 3
    random: RandomModelParams = field(default_factory=RandomModelParams)

    def __post_init__(self) -> None:
        _check(
            self.model in GPT2_CONFIGS,
            f"model must be one of {sorted(GPT2_CONFIGS)}, got {self.model!r}",
        )
        _check(
            self.source != "local" or bool(self.local_dir),
            "source 'local' needs local_dir (a directory with model.safetensors + config.json)",
        )
        _check(self.timeout > 0, "timeout must be > 0")
        _check(self.retries >= 0, "retries must be >= 0")


@dataclass(frozen=True)
class LoRAParams:
    """Low-rank adapters; rank 0 trains every weight (the reference). Update = alpha/rank * BA."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("attn_qkv", "attn_out", "ff_fc", "ff_proj")

    def __post_init__(self) -> None:
        valid = ("attn_qkv", "attn_out", "ff_fc", "ff_proj", "head")
        _check(self.rank >= 0, "rank must be >= 0 (0: no LoRA)")
        _check(self.alpha > 0, "alpha must be > 0")
        _check(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        _check(bool(self.targets), "targets must not be empty")
        unknown = [t for t in self.targets if t not in valid]
        _check(not unknown, f"unknown targets {unknown}; valid: {list(valid)}")


@dataclass(frozen=True)
class DistributedParams:
    """Data-parallel training over several processes (DDP or FSDP); 1 is the plain loop.

    ``nproc_per_node > 1`` makes ``stages/finetune.py`` relaunch itself under
    torchrun; ``batch_size`` stays the global batch, split evenly over the ranks.
    ``strategy: fsdp`` shards weights, gradients and AdamW state over the ranks
    (for models whose training state does not fit one GPU): see
    ``gpt2_instruct.distributed``.
    """

    nproc_per_node: int = 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: float = 300.0
    strategy: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        _check(self.nproc_per_node > 0, "nproc_per_node must be > 0 (1: a single process)")
        _check(self.timeout_s > 0, "timeout_s must be > 0")


@dataclass(frozen=True)
class FinetuneParams:
    """The reference recipe by default (Raschka, ch. 7); every deviation is a knob here."""

    seed: int = 123
    epochs: int = 2
    batch_size: int = 8
    micro_batch_size: int | None = None
    lr: float = 5.0e-5
    weight_decay: float = 0.1
    decay_norms_and_biases: bool = True
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    max_length: int = 1024
    dropout: float = 0.0
    eval_every: int = 5
    eval_batches: int = 5
    eval_train: Literal["reference", "fixed"] = "reference"
    batch_order: Literal["reference", "length_grouped"] = "reference"
    mask_prompt: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    fused_optimizer: bool = True
    optimizer_in_backward: bool = True
    max_steps: int | None = None
    checkpoint_every: int = 50
    device: str = "auto"
    threads: int | None = None
    lora: LoRAParams = field(default_factory=LoRAParams)
    distributed: DistributedParams = field(default_factory=DistributedParams)

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "epochs must be > 0")
        _check(self.batch_size > 0, "batch_size must be > 0")
        nproc = self.distributed.nproc_per_node
        _check(
            self.batch_size % nproc == 0,
            f"batch_size ({self.batch_size}) must be divisible by distributed.nproc_per_node "
            f"({nproc}): every process trains on an equal share of each batch",
        )
        _check(
            self.micro_batch_size is None
            or (self.micro_batch_size > 0 and self.batch_size % self.micro_batch_size == 0),
            "micro_batch_size must divide batch_size (or be null: no accumulation)",
        )
        _check(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or null")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check(self.max_length > 1, "max_length must be > 1")
        _check(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        _check(self.eval_every > 0, "eval_every must be > 0")
        _check(self.eval_batches > 0, "eval_batches must be > 0")
        _check(self.max_steps is None or self.max_steps > 0, "max_steps must be > 0 or null")
        _check(self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0: epoch ends only)")
        _check(self.threads is None or self.threads > 0, "threads must be > 0 or null")


@dataclass(frozen=True)
class GenerateParams:
    """Answers for the test split; greedy by default, like the reference."""

    max_new_tokens: int = 256
    batch_size: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123
    response_header_in_prompt: bool = False
    limit: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "max_new_tokens must be > 0")
        _check(self.batch_size > 0, "batch_size must be > 0")
        _check(self.limit is None or self.limit > 0, "limit must be > 0 or null")


@dataclass(frozen=True)
class JudgeParams:
    backend: Literal["none", "ollama", "openai"] = "none"
    model: str = "llama3"
    url: str | None = None
    timeout: float = 60.0
    retries: int = 2
    template: str | None = None
    api_key_env: str = "OPENAI_API_KEY"


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 8
    device: str = "auto"
    judge: JudgeParams = field(default_factory=JudgeParams)

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "batch_size must be > 0")


@dataclass(frozen=True)
class Params:
    download: DownloadParams = field(default_factory=DownloadParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    tokenize: TokenizeParams = field(default_factory=TokenizeParams)
    fetch_gpt2: FetchParams = field(default_factory=FetchParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    generate: GenerateParams = field(default_factory=GenerateParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


class _CheckFailed(ValueError):
    pass


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise _CheckFailed(message)


T = TypeVar("T")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ParamsError:
                continue
        raise ParamsError(f"{where}: {value!r} does not match {hint}")
    if origin is tuple:  # tuple[X, ...]: a YAML list
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ParamsError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if dataclasses.is_dataclass(hint):
        if value is None:  # a section whose keys are all commented out: the defaults
            value = {}
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParamsError(f"{where}: expected an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ParamsError(f"{where}: expected true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ParamsError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], raw: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(map(str, set(raw) - names))
    if unknown:
        raise ParamsError(
            f"{where or 'top level'}: unknown key(s) {unknown}; valid keys: {sorted(names)}"
        )
    values = {
        key: _coerce(value, hints[key], f"{where}.{key}" if where else key)
        for key, value in raw.items()
    }
    try:
        return cls(**values)
    except _CheckFailed as err:
        raise ParamsError(f"{where}: {err}") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate the whole params file."""
    path = Path(path)
    try:
        # YAML 1.2, as DVC writes params (`dvc exp run -S finetune.lr=5e-5` saves 5e-05,
        # which a YAML 1.1 reader such as PyYAML would hand back as a string).
        raw = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: not found (run from the repository root)") from err
    except YAMLError as err:
        problem = " ".join(str(err).split())  # PyYAML's message spans lines; keep one
        raise ParamsError(f"{path}: not valid YAML ({problem})") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    try:
        return _build(Params, raw, "")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def load_section(section: str, path: str | Path = PARAMS_FILE) -> Any:
    """One stage's section; the whole file is still validated so typos anywhere fail."""
    return getattr(load_params(path), section)


def to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)
