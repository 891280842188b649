"""Typed, validated views of ``params.yaml``: one dataclass per pipeline stage.

A stage reads only its own section. Unknown keys, wrong types and values out of
range fail before any work starts, naming ``params.yaml``, the section and the
key, so a typo in ``dvc exp run -S finetune.lerning_rate=...`` cannot silently
run the default recipe.

Each knob is defined once, here, with its default and its checks: the decoder takes
:class:`SamplingParams` (which :class:`GenerateParams` extends), the judge takes
:class:`JudgeParams`, and the command line's defaults are ``GenerateParams()``'s. The
choices of a ``Literal`` key are the owning module's type (``data.PromptStyle``,
``optim.Schedule``...), whose tuple of names derives from it.

Every value is bounded, not only typed: numbers must be finite, integers fit 64 bits,
counts have sane caps (batch sizes <= 65536, epochs <= 10,000, steps <= 10**9, seeds in
0..2**63-1, the random model at most GPT-2 XL's 48 layers and width 1600), strings hold no
NUL. Cross-section limits are checked in ``Params.__post_init__``: ``generate.max_new_tokens``
below the model's context and ``finetune.lora.rank`` at most its width, where
``fetch_gpt2`` tells them (hub and random models; a local model is checked by finetune and
generate when they load it), and every ``device`` must exist on this machine. The file
itself is bounded: at most 1 MiB, nesting at most 32 deep and at most 100,000 values once
YAML aliases are expanded (an "alias bomb" of 1 KB expands to 387 million), and a value
quoted in a message is cut to 80 characters.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import torch
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent

from gpt2_instruct.batching import BatchOrderMode
from gpt2_instruct.data import PromptStyle, ResponseExtraction
from gpt2_instruct.deadline import redact
from gpt2_instruct.devices import Precision, resolve_device
from gpt2_instruct.download import MAX_RETRIES
from gpt2_instruct.dpo import DPO_LOSSES, DpoLoss
from gpt2_instruct.lora import LORA_TARGETS
from gpt2_instruct.model import GPT2_CONFIGS
from gpt2_instruct.optim import Schedule

PARAMS_FILE = "params.yaml"

MAX_FILE_BYTES = 1 << 20  # a params file is a few KB
MAX_YAML_DEPTH = 32  # nested mappings/lists
MAX_YAML_VALUES = 100_000  # values (scalars and collections) with aliases expanded
MAX_INT = 2**63 - 1  # every integer param fits a signed 64-bit integer
MAX_SEED = 2**63 - 1  # torch.manual_seed and random.Random take 0..2**63-1 (and more)
MAX_BATCH = 65536  # examples in one batch (any batch size)
MAX_EPOCHS = 10_000
MAX_STEPS = 10**9  # steps, step intervals, limits
MAX_LIST_ITEMS = 100  # a list param (lora.targets)
# The random model: at most GPT-2 XL's shape, the largest published GPT-2.
MAX_RANDOM_LAYERS = 48
MAX_RANDOM_WIDTH = 1600
MAX_CONTEXT = 1024  # every GPT-2's context; GPTConfig.context_length of every model here
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,4})?")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # an environment variable's name


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
    size: int | None = None  # the exact size in bytes (null: unknown; max_bytes caps it)
    max_bytes: int = 64 << 20  # largest body accepted, counted after gzip decoding
    timeout: float = 60.0  # seconds per connect and per read
    deadline_s: float = 600.0  # seconds for the whole download, retries included
    retries: int = 3

    def __post_init__(self) -> None:
        _check_network_limits(self.timeout, self.deadline_s, self.retries)
        if self.sha256 is not None:
            pin = self.sha256.strip().lower()
            _check(
                SHA256_PATTERN.fullmatch(pin) is not None,
                f"sha256 must be 64 hex digits or null, got {_short(self.sha256)}",
            )
            object.__setattr__(self, "sha256", pin)  # as sha256sum prints it
        _check(self.max_bytes > 0, "max_bytes must be > 0")
        _check(
            self.size is None or 0 < self.size <= self.max_bytes,
            f"size must be > 0 and at most max_bytes ({self.max_bytes}), or null",
        )


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
        _check_seed(self.seed)


@dataclass(frozen=True)
class TokenizeParams:
    prompt_style: PromptStyle = "alpaca"  # data.PROMPT_STYLES


@dataclass(frozen=True)
class RandomModelParams:
    """Shape of a randomly initialised model: smoke tests and CI, never real answers."""

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    context_length: int = 1024
    seed: int = 123

    def __post_init__(self) -> None:
        xl = " (GPT-2 XL's shape caps a random model)"
        _check_int(self.n_layer, "n_layer", 1, MAX_RANDOM_LAYERS, xl)
        _check_int(self.n_embd, "n_embd", 1, MAX_RANDOM_WIDTH, xl)
        _check_int(self.n_head, "n_head", 1, self.n_embd, " (at most n_embd)")
        _check(self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head")
        _check(0 < self.context_length <= MAX_CONTEXT, "context_length must be in 1..1024")
        _check_seed(self.seed)


@dataclass(frozen=True)
class FetchParams:
    """Pre-trained weights (Hugging Face safetensors) and GPT-2's BPE files.

    ``source: hub`` goes through huggingface_hub, so its environment applies: HF_TOKEN,
    HF_HOME / HF_HUB_CACHE (a cached model is not downloaded again), HF_HUB_OFFLINE and,
    while ``hub_url`` is null, HF_ENDPOINT. ``revision`` is a branch, tag or commit sha;
    the commit it resolved to is recorded in the output's ``source.json``.
    """

    source: Literal["hub", "local", "random"] = "hub"
    model: str = "gpt2-medium"
    revision: str = "main"
    hub_url: str | None = None  # null: $HF_ENDPOINT, else huggingface_hub's default endpoint
    local_dir: str | None = None
    bpe_source: str = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
    timeout: float = 60.0  # seconds per connect and per read
    deadline_s: float = 3600.0  # seconds for each file's download, retries included
    retries: int = 3
    max_bytes: int | None = None  # cap on model.safetensors (null: from the model's size)
    random: RandomModelParams = field(default_factory=RandomModelParams)

    def __post_init__(self) -> None:
        _check(
            self.model in GPT2_CONFIGS,
            f"model must be one of {sorted(GPT2_CONFIGS)}, got {_short(self.model)}",
        )
        _check(
            self.source != "local" or bool(self.local_dir),
            "source 'local' needs local_dir (a directory with model.safetensors + config.json)",
        )
        _check(
            bool(self.revision) and not any(ch.isspace() for ch in self.revision),
            f"revision must be a branch, tag or commit sha without blanks, got "
            f"{_short(self.revision)}",
        )
        if self.hub_url is not None:
            shown = _short(redact(self.hub_url))
            parts = urlsplit(self.hub_url)
            _check(
                parts.scheme in ("http", "https") and bool(parts.hostname),
                f"hub_url must be an http(s) URL with a host (or null: HF_ENDPOINT), got {shown}",
            )
            _check(
                not (parts.query or parts.fragment or any(ch.isspace() for ch in self.hub_url)),
                f"hub_url must not have a query, fragment or blanks, got {shown}",
            )
        _check_network_limits(self.timeout, self.deadline_s, self.retries)
        _check(self.max_bytes is None or self.max_bytes > 0, "max_bytes must be > 0 or null")


@dataclass(frozen=True)
class LoRAParams:
    """Low-rank adapters; rank 0 trains every weight (the reference). Update = alpha/rank * BA."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("attn_qkv", "attn_out", "ff_fc", "ff_proj")

    def __post_init__(self) -> None:
        _check_int(self.rank, "rank", 0, MAX_RANDOM_WIDTH, " (0: no LoRA; at most the width)")
        _check(self.alpha > 0, "alpha must be > 0")
        _check(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        _check(bool(self.targets), "targets must not be empty")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        _check(not unknown, f"unknown targets {_short(unknown)}; valid: {list(LORA_TARGETS)}")


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
        _check_int(self.nproc_per_node, "nproc_per_node", 1, 1024, " (1: a single process)")
        _check(0 < self.timeout_s <= 7 * 86400, "timeout_s must be in (0, 604800] (a week)")


@dataclass(frozen=True)
class FinetuneParams:
    """The reference recipe by default (Raschka, ch. 7); every deviation is a knob here."""

    seed: int = 123
    epochs: int = 2
    batch_size: int = 8
    micro_batch_size: int | None = None
    tie_embeddings: bool = False
    lr: float = 5.0e-5
    weight_decay: float = 0.1
    decay_norms_and_biases: bool = True
    lr_schedule: Schedule = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    max_length: int = 1024
    dropout: float = 0.0
    eval_every: int = 5
    eval_batches: int = 5
    eval_train: Literal["reference", "fixed"] = "reference"
    batch_order: BatchOrderMode = "reference"
    mask_prompt: bool = False
    precision: Precision = "fp32"
    fused_optimizer: bool = True
    optimizer_in_backward: bool | Literal["auto"] = "auto"
    max_steps: int | None = None
    checkpoint_every: int = 50
    device: str = "auto"
    threads: int | None = None
    lora: LoRAParams = field(default_factory=LoRAParams)
    distributed: DistributedParams = field(default_factory=DistributedParams)

    def __post_init__(self) -> None:
        _check_seed(self.seed)
        _check_int(self.epochs, "epochs", 1, MAX_EPOCHS)
        _check_int(self.batch_size, "batch_size", 1, MAX_BATCH)
        _check_device_name(self.device)
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
        _check_int(self.warmup_steps, "warmup_steps", 0, MAX_STEPS)
        _check(
            self.max_steps is None or self.warmup_steps <= self.max_steps,
            f"warmup_steps ({self.warmup_steps}) must be at most max_steps ({self.max_steps})",
        )
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or null")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check_int(self.max_length, "max_length", 2, 1 << 20, " (cut to the model's context)")
        _check(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        _check_int(self.eval_every, "eval_every", 1, MAX_STEPS)
        _check_int(self.eval_batches, "eval_batches", 1, 10_000)
        if self.max_steps is not None:
            _check_int(self.max_steps, "max_steps", 1, MAX_STEPS, " or null")
        _check_int(self.checkpoint_every, "checkpoint_every", 0, MAX_STEPS, " (0: epoch ends)")
        if self.threads is not None:
            _check_int(self.threads, "threads", 1, 1024, " or null")
        if nproc > 1:
            _check(
                not self.device.startswith("cuda:"),
                f"device {self.device!r} pins one GPU for every rank; with "
                "distributed.nproc_per_node > 1 use auto or cuda (each rank takes its own)",
            )
            _check(
                self.distributed.backend != "nccl" or self.device != "cpu",
                "distributed.backend nccl needs CUDA, but device is cpu (use gloo or auto)",
            )


@dataclass(frozen=True)
class SamplingParams:
    """How an answer is decoded: greedy when ``temperature`` is 0 (the reference), else
    temperature / top-k / top-p sampling seeded by ``seed``.

    The sampling knobs of ``generate`` (:class:`GenerateParams` extends this), and what
    ``gpt2_instruct.generation.generate`` and the command line take: one set of defaults
    and checks for all three.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123

    def __post_init__(self) -> None:
        _check_int(
            self.max_new_tokens, "max_new_tokens", 1, MAX_CONTEXT - 1, " (below the context)"
        )
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None:
            _check(self.top_k >= 1, f"top_k must be >= 1 or null, got {self.top_k}")
        if self.top_p is not None:
            _check(0 < self.top_p <= 1, f"top_p must be in (0, 1] or null, got {self.top_p}")
        _check_seed(self.seed)


# The pipeline's model folders: the instruction fine-tune's, and the DPO stage's.
ModelFolder = Literal["data/model", "data/dpo/model"]


@dataclass(frozen=True)
class GenerateParams(SamplingParams):
    """Answers for the test split; greedy by default, like the reference.

    The sampling knobs (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``)
    are :class:`SamplingParams`'; these params are passed to the decoder as they are.
    """

    # The model folder answered with (and evaluate scores): dvc.yaml's ``${generate.model}``.
    model: ModelFolder = "data/model"
    batch_size: int = 32
    response_header_in_prompt: bool = False
    # data.RESPONSE_EXTRACTIONS; "reference": the reference's replace-all of the header
    response_extraction: ResponseExtraction = "reference"
    limit: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int(self.batch_size, "batch_size", 1, MAX_BATCH)
        _check(self.limit is None or self.limit > 0, "limit must be > 0 or null")
        _check_device_name(self.device)


JudgeBackend = Literal["none", "ollama", "openai"]
JudgeRubric = Literal["reference", "politeness"]
JUDGE_BACKENDS: tuple[str, ...] = typing.get_args(JudgeBackend)

#: The values a judge template may name: ``{prompt}`` is the reference's
#: ``format_input(entry)`` (the Alpaca prompt without the response header).
JUDGE_TEMPLATE_FIELDS: tuple[str, ...] = ("prompt", "output", "response", "instruction", "input")


@dataclass(frozen=True)
class JudgeParams:
    """The optional LLM judge: the judge stage's section (``gpt2_instruct.judge`` takes these).

    ``url`` None means the backend's default (``judge.DEFAULT_URLS``): Ollama's server
    root, or the base URL of an OpenAI-compatible API *including* its ``/v1``
    (``/chat/completions`` is appended). The API key is never a parameter: it is read at
    call time from the environment variable named by ``api_key_env``, so it stays out of
    params.yaml, DVC lock files and metrics. ``timeout`` bounds each whole request (not
    only each read), ``deadline_s`` the whole run: entries not judged by then are marked
    ``deadline``. ``retries`` counts extra attempts after the first; attempt ``k`` waits
    ``backoff * 2**k`` seconds (at most 60) before retrying. ``template`` None means the
    built-in prompt of ``rubric``: ``reference``, the reference's prompt
    (``judge.DEFAULT_TEMPLATE``), or ``politeness``, ours, which scores the tone of the
    answer alone (for comparing a DPO run with the fine-tune). ``temperature``, ``seed`` and
    ``num_ctx`` (Ollama's context) are sent with each request.

    ``min_scored_fraction``: the judge stage fails (exit 1, so DVC caches nothing) when it
    scored fewer than this share of the entries, and always when it scored none. 0.9, not
    1.0: at temperature 0 with a fixed seed a judge model that answers "Score: 85" for an
    entry answers so on every rerun, so demanding every entry would fail the stage for good
    over one sloppy reply; a tenth unscored still leaves ``judge_mean`` over most entries,
    and the metrics count every failure by reason.

    Checked here, before any stage work: the URL (http(s), a host, a valid port, no
    query, no blanks), the limits, the template's fields and the API key variable's
    name. Types are checked too, so a judge built in Python gets the same messages.
    """

    backend: JudgeBackend = "none"
    model: str = "llama3"
    url: str | None = None
    timeout: float = 60.0
    retries: int = 2
    rubric: JudgeRubric = "reference"  # judge.RUBRICS: the template when template is null
    template: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    deadline_s: float = 1800.0
    backoff: float = 1.0
    temperature: float = 0.0
    seed: int = 123
    num_ctx: int = 2048
    min_scored_fraction: float = 0.9

    # Said when a key that is no field of this section is given (see _build).
    UNKNOWN_KEY_HINTS: ClassVar[dict[str, str]] = {
        "api_key": "never put a key in params.yaml: put it in an environment variable and "
        "name that with api_key_env",
    }

    def __post_init__(self) -> None:
        _check(
            self.backend in JUDGE_BACKENDS,
            f"backend must be one of {list(JUDGE_BACKENDS)}, got {_short(self.backend)}",
        )
        _check(
            isinstance(self.model, str) and bool(self.model.strip()),
            f"model must be a non-empty string, got {_short(self.model)}",
        )
        if self.url is not None:
            _check_judge_url(self.url)
        for name in ("timeout", "deadline_s", "backoff", "temperature", "min_scored_fraction"):
            value = getattr(self, name)
            _check(_is_real(value), f"{name} must be a finite number, got {_short(value)}")
            object.__setattr__(self, name, float(value))
        _check(
            0 < self.min_scored_fraction <= 1,
            f"min_scored_fraction must be in (0, 1], got {self.min_scored_fraction}",
        )
        _check(self.timeout > 0, f"timeout must be > 0 seconds, got {self.timeout}")
        _check(self.deadline_s > 0, f"deadline_s must be > 0 seconds, got {self.deadline_s}")
        _check(self.backoff >= 0, f"backoff must be >= 0 seconds, got {self.backoff}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(
            _is_int(self.retries) and self.retries >= 0,
            f"retries must be an integer >= 0, got {_short(self.retries)}",
        )
        _check(
            _is_int(self.seed) and 0 <= self.seed <= MAX_SEED,
            f"seed must be an integer in 0..{MAX_SEED}, got {_short(self.seed)}",
        )
        _check(
            _is_int(self.num_ctx) and self.num_ctx > 0,
            f"num_ctx must be an integer > 0, got {_short(self.num_ctx)}",
        )
        _check(
            isinstance(self.api_key_env, str) and ENV_NAME_PATTERN.fullmatch(self.api_key_env),
            "api_key_env must name an environment variable (letters, digits, _), "
            f"got {_short(self.api_key_env)}",
        )
        if self.template is not None:
            _check(
                isinstance(self.template, str),
                f"template must be a string or null, got {_short(self.template)}",
            )
            _check_judge_template(self.template)

    @property
    def enabled(self) -> bool:
        """Whether a server will be contacted at all."""
        return self.backend != "none"


@dataclass(frozen=True)
class EvaluateParams:
    """The offline scores of the answers; the LLM judge is its own stage (``judge:``)."""

    batch_size: int = 8
    device: str = "auto"

    # Said when a key that is no field of this section is given (see _build).
    UNKNOWN_KEY_HINTS: ClassVar[dict[str, str]] = {
        "judge": "moved to judge: a top-level section of its own, for the judge stage",
    }

    def __post_init__(self) -> None:
        _check_int(self.batch_size, "batch_size", 1, MAX_BATCH)
        _check_device_name(self.device)


@dataclass(frozen=True)
class DpoParams:
    """Preference tuning (DPO) of the instruction-fine-tuned model: the dpo stage's section.

    Off unless ``enabled`` (the stage then writes "not run" outputs in a moment), so
    ``dvc repro`` stays the reference instruction run; ``dvc exp run -S dpo.enabled=true``
    runs it. The defaults are the reference recipe (Raschka, ch07 bonus
    04_preference-tuning-with-dpo). ``data_url`` is an http(s) URL, a file:// URL or a local
    path, checked against ``data_sha256`` (null: no check). ``loss``: ``sigmoid`` (DPO),
    ``ipo`` or ``simpo`` (``simpo_gamma`` is its target margin), see ``gpt2_instruct.dpo``.
    ``max_length`` is the reference's ``allowed_max_length``, cut to the model's context.
    ``checkpoint_every``: steps between resumable checkpoints (0: only at epoch ends).
    """

    enabled: bool = False
    data_url: str = (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
        "04_preference-tuning-with-dpo/instruction-data-with-preference.json"
    )
    data_sha256: str | None = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
    loss: DpoLoss = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    lr: float = 5.0e-6
    weight_decay: float = 0.01
    epochs: int = 1
    batch_size: int = 8
    eval_every: int = 5
    eval_batches: int = 5
    mask_prompt: bool = True
    max_length: int = 1024
    seed: int = 123
    max_steps: int | None = None
    checkpoint_every: int = 50
    device: str = "auto"
    lora: LoRAParams = field(default_factory=LoRAParams)

    def __post_init__(self) -> None:
        _check(
            bool(self.data_url) and not any(ch.isspace() for ch in self.data_url),
            f"data_url must be a URL or path without blanks, got {_short(redact(self.data_url))}",
        )
        if self.data_sha256 is not None:
            pin = self.data_sha256.strip().lower()
            _check(
                SHA256_PATTERN.fullmatch(pin) is not None,
                f"data_sha256 must be 64 hex digits or null, got {_short(self.data_sha256)}",
            )
            object.__setattr__(self, "data_sha256", pin)
        _check(self.loss in DPO_LOSSES, f"loss must be one of {list(DPO_LOSSES)}")
        _check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _check(self.simpo_gamma >= 0, f"simpo_gamma must be >= 0, got {self.simpo_gamma}")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.weight_decay >= 0, "weight_decay must be >= 0")
        _check_int(self.epochs, "epochs", 1, MAX_EPOCHS)
        _check_int(self.batch_size, "batch_size", 1, MAX_BATCH)
        _check_int(self.eval_every, "eval_every", 1, MAX_STEPS)
        _check_int(self.eval_batches, "eval_batches", 1, 10_000)
        _check_int(self.max_length, "max_length", 2, 1 << 20, " (cut to the model's context)")
        _check_seed(self.seed)
        if self.max_steps is not None:
            _check_int(self.max_steps, "max_steps", 1, MAX_STEPS, " or null")
        _check_int(self.checkpoint_every, "checkpoint_every", 0, MAX_STEPS, " (0: epoch ends)")
        _check_device_name(self.device)


@dataclass(frozen=True)
class Params:
    download: DownloadParams = field(default_factory=DownloadParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    tokenize: TokenizeParams = field(default_factory=TokenizeParams)
    fetch_gpt2: FetchParams = field(default_factory=FetchParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    generate: GenerateParams = field(default_factory=GenerateParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    judge: JudgeParams = field(default_factory=JudgeParams)
    dpo: DpoParams = field(default_factory=DpoParams)

    def __post_init__(self) -> None:
        """Limits across sections: the model's shape (when known here) and the devices."""
        fetch = self.fetch_gpt2
        shape = {"hub": GPT2_CONFIGS[fetch.model], "random": fetch.random}.get(fetch.source)
        if shape is not None:  # a local model is checked when finetune and generate load it
            hub = fetch.source == "hub"
            what = f"fetch_gpt2.model {fetch.model}" if hub else "fetch_gpt2.random"
            context = shape.context_length
            _check(
                self.generate.max_new_tokens < context,
                f"generate.max_new_tokens ({self.generate.max_new_tokens}) must be below the "
                f"context length of {what} ({context})",
            )
            rank, width = self.finetune.lora.rank, shape.n_embd
            _check(
                rank <= width,
                f"finetune.lora.rank ({rank}) must be at most the width (n_embd {width}) of "
                f"{what}: a higher rank adds parameters, not capacity",
            )
        for section in ("finetune", "generate", "evaluate", "dpo"):
            name = getattr(self, section).device
            problem = device_problem(name)
            _check(problem is None, f"{section}.device: {name!r}: {problem}")
        _check(
            self.generate.model != "data/dpo/model" or self.dpo.enabled,
            "generate.model data/dpo/model needs the dpo stage: set dpo.enabled true",
        )
        finetune = self.finetune
        if finetune.precision == "tf32":  # the device exists here (checked just above)
            on = resolve_device(finetune.device).type
            _check(
                on == "cuda",
                f"finetune.precision tf32 is a CUDA matmul mode, but finetune.device "
                f"{finetune.device!r} is {on} here: use fp32 (exact) or bf16",
            )
        nproc = finetune.distributed.nproc_per_node
        if nproc > 1 and finetune.device in ("auto", "cuda") and torch.cuda.is_available():
            count = torch.cuda.device_count()
            _check(
                nproc <= count,
                f"finetune.distributed.nproc_per_node ({nproc}) is more than the {count} "
                "CUDA device(s) of this machine",
            )


class _CheckFailed(ValueError):
    pass


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise _CheckFailed(message)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message, never longer than ``limit`` (nor slow on huge values)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_int(value: int, name: str, low: int, high: int, note: str = "") -> None:
    """``low <= value <= high``, else a message naming the key and the allowed range."""
    _check(low <= value <= high, f"{name} must be in {low}..{high}{note}, got {value}")


def _check_seed(value: int, name: str = "seed") -> None:
    _check_int(value, name, 0, MAX_SEED)


def _check_device_name(value: str, name: str = "device") -> None:
    _check(
        DEVICE_PATTERN.fullmatch(value) is not None,
        f"{name} must be auto, cpu, cuda, cuda:N or mps, got {_short(value)}",
    )


def _check_network_limits(timeout: float, deadline_s: float, retries: int) -> None:
    """A download's limits (download, fetch_gpt2): what ``download.fetch`` accepts."""
    _check(0 < timeout < float("inf"), "timeout must be a finite number > 0 (seconds)")
    _check(0 < deadline_s < float("inf"), "deadline_s must be a finite number > 0 (seconds)")
    _check(0 <= retries <= MAX_RETRIES, f"retries must be in 0..{MAX_RETRIES}")


def _is_real(value: Any) -> bool:
    """A finite int or float, but not a bool (True would silently mean 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_judge_url(url: Any) -> None:
    """An http(s) URL with a host (and a valid port), no query, fragment or blanks.

    Messages show the URL without its credentials (``deadline.redact``).
    """
    _check(isinstance(url, str), f"url must be a string (an http(s) URL), got {_short(url)}")
    shown = _short(redact(url))
    _check(
        not any(ch.isspace() or not ch.isprintable() for ch in url),
        f"url must not contain blanks or control characters, got {shown}",
    )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise _CheckFailed(f"url is not a valid URL ({exc}), got {shown}") from None
    _check(parts.scheme in ("http", "https"), f"url must be an http(s) URL, got {shown}")
    _check(bool(parts.hostname), f"url must name a host, got {shown}")
    _check(
        not (parts.query or parts.fragment or url.endswith(("?", "#"))),
        f"url must not have a query or fragment, got {shown}",
    )


# --- the judge's prompt template ----------------------------------------------------------


@dataclass(frozen=True)
class TemplateField:
    """One replacement field of a judge template: which value, and how it is formatted."""

    name: str
    conversion: str | None
    spec: str


TemplatePart = tuple[str, TemplateField | None]  # literal text, then a field or None


def parse_judge_template(template: str) -> list[TemplatePart]:
    """Split a judge template into (literal text, field) parts, or raise a ValueError.

    Only the template itself is parsed, never text that already contains entry data, so
    braces in instructions, outputs or responses can never be interpreted as fields.
    Fields may only name :data:`JUDGE_TEMPLATE_FIELDS`. Messages start with "template".
    """
    try:
        raw = list(Formatter().parse(template))
    except ValueError as exc:
        raise _CheckFailed(f"template is not a valid format string: {exc}") from None
    allowed = ", ".join("{" + name + "}" for name in JUDGE_TEMPLATE_FIELDS)
    parts: list[TemplatePart] = []
    for literal, name, spec, conversion in raw:
        if name is None:
            parts.append((literal, None))
            continue
        if name not in JUDGE_TEMPLATE_FIELDS:
            shown = "{" + name + "}" if name else "{} (a positional field)"
            raise _CheckFailed(f"template has unknown field {shown}; allowed: {allowed}")
        if spec and ("{" in spec or "}" in spec):
            raise _CheckFailed(
                f"template field {{{name}}} has a nested field in its format spec "
                f"{spec!r}; nested fields are not supported"
            )
        parts.append((literal, TemplateField(name, conversion, spec or "")))
    return parts


def render_judge_template(parts: Sequence[TemplatePart], values: Mapping[str, str]) -> str:
    """Substitute each field once; the values are inserted as-is, never re-parsed."""
    formatter = Formatter()
    out: list[str] = []
    for literal, fld in parts:
        out.append(literal)
        if fld is not None:
            value = formatter.convert_field(values[fld.name], fld.conversion)
            out.append(formatter.format_field(value, fld.spec))
    return "".join(out)


def _check_judge_template(template: str) -> None:
    """Reject templates that could not score anything or would fail on the first entry."""
    parts = parse_judge_template(template)
    _check(
        any(fld is not None and fld.name == "response" for _, fld in parts),
        "template must contain {response} (the answer to score)",
    )
    try:
        render_judge_template(parts, dict.fromkeys(JUDGE_TEMPLATE_FIELDS, "x"))
    except ValueError as exc:  # bad conversion or format spec, e.g. "{response:d}"
        raise _CheckFailed(f"template cannot be formatted: {exc}") from None


def device_problem(name: str) -> str | None:
    """Why the torch device ``name`` (already well-formed) cannot be used here, or None."""
    if name in ("auto", "cpu"):
        return None
    if name == "mps":
        if not torch.backends.mps.is_available():
            return "the MPS backend is not available on this machine"
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine (torch.cuda.is_available() is false)"
    index = name.partition(":")[2]
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        return f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    return None


T = TypeVar("T")


def _describe_type(hint: Any) -> str:
    """A type hint in a user's words (``true or false``, ``one of ['auto']``...)."""
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(hint, str(hint))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint; ints are accepted for floats.

    Floats must be finite, ints fit 64 bits, strings hold no NUL; values quoted in a
    message are cut short (``_short``).
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        if len(options) == 1:  # X | None: X's own message says what is wrong
            try:
                return _coerce(value, options[0], where)
            except ParamsError as err:
                raise ParamsError(f"{err} (or null)") from None
        for option in options:
            try:
                return _coerce(value, option, where)
            except ParamsError:
                continue
        wanted = " or ".join(_describe_type(option) for option in options)
        raise ParamsError(f"{where}: expected {wanted}, got {_short(value)}")
    if origin is tuple:  # tuple[X, ...]: a YAML list
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where}: expected a list, got {_short(value)}")
        if len(value) > MAX_LIST_ITEMS:
            raise ParamsError(f"{where}: at most {MAX_LIST_ITEMS} items, got {len(value)}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if isinstance(value, list | dict) or value not in typing.get_args(hint):
            raise ParamsError(
                f"{where}: {_short(value)} is not one of {list(typing.get_args(hint))}"
            )
        return value
    if dataclasses.is_dataclass(hint):
        if value is None:  # a section whose keys are all commented out: the defaults
            value = {}
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where}: expected a number, got {_short(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):
            raise ParamsError(f"{where}: expected a finite number, got {_short(value)}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {_short(value)}")
        if not -MAX_INT <= value <= MAX_INT:
            raise ParamsError(f"{where}: {_short(value)} is out of range (a 64-bit integer)")
    if hint is bool and not isinstance(value, bool):
        raise ParamsError(f"{where}: expected true or false, got {_short(value)}")
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {_short(value)}")
        if "\0" in value:
            raise ParamsError(f"{where}: contains a NUL character: {_short(value)}")
    return value


def _build(cls: type[T], raw: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(_short(key, 40) for key in raw if key not in names)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if unknown[10:] else "")
        hints = getattr(cls, "UNKNOWN_KEY_HINTS", {})
        said = "".join(f" ({key}: {hints[key]})" for key in sorted(hints) if key in raw)
        raise ParamsError(
            f"{where or 'top level'}: unknown key(s) [{shown}]{said}; valid keys: {sorted(names)}"
        )
    values = {
        key: _coerce(value, hints[key], f"{where}.{key}" if where else key)
        for key, value in raw.items()
    }
    try:
        return cls(**values)
    except _CheckFailed as err:
        raise ParamsError(f"{where}: {err}" if where else str(err)) from None


def _check_yaml_size(text: str, path: Path) -> None:
    """Reject deep nesting and alias bombs from the parser's events, before building anything.

    Each anchor's expanded size is remembered, so an alias costs what it expands to
    without being expanded: a 1 KB file of nine levels of nine aliases fails at once.
    """
    sizes: dict[str, int] = {}  # anchor: values it stands for, aliases expanded
    stack: list[list[Any]] = []  # open collections: [anchor, values so far]
    for event in YAML(typ="safe", pure=True).parse(text):
        if isinstance(event, CollectionStartEvent):
            stack.append([event.anchor, 1])
            if len(stack) > MAX_YAML_DEPTH:
                raise ParamsError(f"{path}: nested more than {MAX_YAML_DEPTH} levels deep")
            continue
        if isinstance(event, CollectionEndEvent):
            anchor, count = stack.pop()
        elif isinstance(event, AliasEvent):
            anchor, count = None, sizes.get(event.anchor, 1)  # unknown: load() reports it
        elif isinstance(event, ScalarEvent):
            anchor, count = event.anchor, 1
        else:
            continue
        if anchor is not None:
            sizes[anchor] = count
        if stack:
            stack[-1][1] += count
        if count > MAX_YAML_VALUES or (stack and stack[-1][1] > MAX_YAML_VALUES):
            raise ParamsError(
                f"{path}: more than {MAX_YAML_VALUES:,} values once YAML aliases are "
                "expanded (an alias bomb?); write the values out instead"
            )


def _read_yaml(path: Path) -> Any:
    """The parsed file, or a one-line ParamsError (never a traceback, never a hang)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: not found (run from the repository root)") from err
    except OSError as err:
        raise ParamsError(f"{path}: cannot read ({err.strerror or err})") from err
    if len(data) > MAX_FILE_BYTES:
        raise ParamsError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes: not a params file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParamsError(
            f"{path}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None
    try:
        _check_yaml_size(text, path)
        # YAML 1.2, as DVC writes params (`dvc exp run -S finetune.lr=5e-5` saves 5e-05,
        # which a YAML 1.1 reader such as PyYAML would hand back as a string).
        with warnings.catch_warnings():  # ruamel warns (several lines) of a reused anchor
            warnings.simplefilter("ignore")
            return YAML(typ="safe", pure=True).load(text)
    except RecursionError:
        raise ParamsError(f"{path}: nested too deeply") from None
    except (YAMLError, ValueError, TypeError, LookupError, AttributeError) as err:
        if isinstance(err, ParamsError):  # from _check_yaml_size
            raise
        # YAMLError, or what ruamel's constructors raise on values they cannot build: an int
        # over 4300 digits, month 13, an empty !!float (IndexError)
        problem = " ".join(str(err).split()) or type(err).__name__  # one line
        problem = problem.split(" To suppress this check")[0]  # ruamel's duplicate-key hint
        if len(problem) > 300:
            problem = problem[:300] + "..."
        raise ParamsError(f"{path}: not valid YAML ({problem})") from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate the whole params file: every section, then the limits across them."""
    path = Path(path)
    raw = _read_yaml(path)
    if raw is None:
        raw = {}
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
