"""Helpers shared by the benchmark scripts in ``bench/``.

Every script prints human-readable lines first and exactly one JSON object as
its last line of standard output, so a driver can run it and parse
``stdout.splitlines()[-1]``. Progress messages go to standard error.

Data: the reference data set and GPT-2's BPE files from ``../shared/data``
(relative to the repository root) when present, split and tokenized exactly as
the pipeline does (reference split, alpaca prompts); otherwise synthetic token
sequences with the same length distribution (reported as ``"data":
"synthetic"``). Weights are always randomly initialised: no pre-trained
checkpoint is available offline, and speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2_instruct.batching import BatchOrder, TokenizedSplit, collate
from gpt2_instruct.devices import configure, per_thread_cache_off
from gpt2_instruct.model import GPT2_CONFIGS, GPTModel

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DATA_FILE = "instruction-data.json"
ENCODING_DIR = "gpt2-encoding"
EOS_ID = 50256  # GPT-2's <|endoftext|>: end of text and padding
VOCAB_SIZE = 50257
BATCH_SEED = 123  # FinetuneParams().seed: the reference's torch.manual_seed(123)
GIB = 1024**3


# --------------------------------------------------------------------- logging
def log(message: str) -> None:
    """A progress line on standard error (standard output is kept for results)."""
    print(message, file=sys.stderr, flush=True)


def print_result(result: dict[str, Any]) -> None:
    """Human-readable ``key: value`` lines, then the whole result as ONE JSON line, last."""
    width = max((len(k) for k in result), default=0)
    for key, value in result.items():
        if isinstance(value, float):
            shown = f"{value:.6g}"
        elif isinstance(value, dict | list):
            shown = json.dumps(value)
        else:
            shown = str(value)
        print(f"{key:<{width}}  {shown}")
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------- arguments
# The reference book and issue 3 call the 124M model "gpt2-small"; the hub calls it "gpt2".
MODEL_ALIASES = {"gpt2-small": "gpt2"}


def model_name(name: str) -> str:
    """The GPT2_CONFIGS name of a --model value (``gpt2-small`` is ``gpt2``)."""
    name = MODEL_ALIASES.get(name, name)
    if name not in GPT2_CONFIGS:
        known = sorted([*GPT2_CONFIGS, *MODEL_ALIASES])
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from {known}")
    return name


def base_parser(description: str, *, default_model: str = "gpt2") -> argparse.ArgumentParser:
    """Options every script shares: model shape, device, threads, seed, data location."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=default_model,
        type=model_name,
        help=f"GPT-2 shape: one of {sorted(GPT2_CONFIGS)} (gpt2-small is gpt2)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    parser.add_argument("--seed", type=int, default=123, help="seed of the random weights")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc settings (the stages keep freed memory for reuse)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=SHARED_DATA,
        help=f"directory with {DATA_FILE} and {ENCODING_DIR}/",
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="use synthetic tokens even if the data exists"
    )
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads when asked; returns the number in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def set_malloc(system: bool, precision: str = "fp32", device: str | torch.device = "cpu") -> str:
    """The device seam as the finetune stage applies it (``devices.configure``), with the
    host-memory part left at glibc's defaults when ``system``: on the CPU, freed memory is
    kept (fp32 at once; bf16 after restarting with glibc's per-thread cache off).

    Applies to both models of a comparison alike (one process). Returns the mode in use.
    """
    if system:  # FSDP's choice: glibc's defaults; the rest as the stage's
        configure(device, precision, "fsdp")  # type: ignore[arg-type]
        return "system"
    chosen = configure(device, precision, "ddp", relaunch=True)  # type: ignore[arg-type]
    if not chosen.keeps_freed_memory:
        return "system"
    return "reuse, per-thread cache off" if per_thread_cache_off() else "reuse"


# -------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on CUDA before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def time_steps(
    step: Callable[[int], Any], *, warmup: int, steps: int, device: torch.device
) -> tuple[list[float], list[Any]]:
    """Run ``step(i)`` for i in 0..warmup+steps-1; time only the last ``steps`` calls.

    Returns the per-step seconds of the timed calls and the results of all calls.
    """
    results = [step(i) for i in range(warmup)]
    times: list[float] = []
    for i in range(warmup, warmup + steps):
        seconds, result = timed(lambda i=i: step(i), device)
        times.append(seconds)
        results.append(result)
    return times, results


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def matmul_peak(
    dtype: torch.dtype,
    device: torch.device,
    *,
    size: int = 2048,
    repeats: int = 5,
    max_seconds: float = 5.0,
) -> tuple[float, int]:
    """(best achieved GFLOP/s, size used) of square matmuls, 2 * size**3 FLOPs each.

    A 512 x 512 probe first: where one ``size`` product would take longer than
    ``max_seconds`` (bf16 on a CPU without bf16 instructions runs at ~1 GFLOP/s)
    the size is halved until it would not. Then two warm-up products and
    ``repeats`` timed rounds; a round runs enough products to last ~50 ms and
    the best round counts, the usual "achievable peak" reading.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        return a, b

    probe = min(size, 512)
    a, b = operands(probe)
    estimate = min(timed(lambda: a @ b, device)[0] for _ in range(3)) * (size / probe) ** 3
    while size > probe and estimate > max_seconds:
        size //= 2
        estimate /= 8
    a, b = operands(size)
    single = min(timed(lambda: a @ b, device)[0] for _ in range(2))
    inner = max(1, math.ceil(0.05 / max(single, 1e-9)))
    if single > 1.0:  # slow products: two rounds are enough to take the best of
        repeats = min(repeats, 2)
    best = float("inf")
    for _ in range(repeats):

        def run() -> None:
            for _ in range(inner):
                a @ b

        best = min(best, timed(run, device)[0] / inner)
    return 2.0 * size**3 / best / 1e9, size


def matmul_peak_gflops(
    dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5
) -> float:
    """Best achieved GFLOP/s of square matmuls (see ``matmul_peak``)."""
    return matmul_peak(dtype, device, size=size, repeats=repeats)[0]


# ---------------------------------------------------------------- machine info
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures were taken: CPU, threads, load, versions, device name."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return rss * scale / GIB


# ------------------------------------------------------------------------ data
@dataclass
class BenchData:
    """Tokenized splits and test prompts, from the reference data or synthetic."""

    source: str  # "reference" | "synthetic"
    train: TokenizedSplit
    val: TokenizedSplit
    test: TokenizedSplit
    test_prompts: list[list[int]]  # generation prompts of the test split
    test_answer_lengths: list[int]  # tokens of the reference answers of the test split
    pad_id: int = EOS_ID


def _reference_data(data_dir: Path) -> BenchData:
    from gpt2_instruct.data import load_entries, split_entries
    from gpt2_instruct.pipeline import generation_prompt, tokenize_entries
    from gpt2_instruct.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_dir / ENCODING_DIR)
    split = split_entries(load_entries(data_dir / DATA_FILE))
    splits = {}
    for name in ("train", "val", "test"):
        examples, prompt_lengths = tokenize_entries(getattr(split, name), tokenizer, "alpaca")
        splits[name] = TokenizedSplit.from_lists(examples, prompt_lengths)
    return BenchData(
        source="reference",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        test_prompts=[tokenizer.encode(generation_prompt(e, "alpaca", False)) for e in split.test],
        test_answer_lengths=[len(tokenizer.encode(e.output)) for e in split.test],
        pad_id=tokenizer.eot_id,
    )


def _clipped_exponential(
    n: int, low: int, high: int, mean_excess: float, gen: torch.Generator
) -> list[int]:
    draws = torch.empty(n).exponential_(1.0 / mean_excess, generator=gen)
    return [min(high, low + round(x)) for x in draws.tolist()]


def _synthetic_split(n: int, gen: torch.Generator) -> TokenizedSplit:
    # Reference: 40..91 tokens per example (41..92 with the EOS collate adds), mean ~56.4;
    # prompts ~44 tokens, the answer the rest.
    lengths = _clipped_exponential(n, 40, 91, 17.0, gen)
    answers = _clipped_exponential(n, 2, 46, 10.0, gen)
    examples = [torch.randint(0, EOS_ID, (k,), generator=gen).tolist() for k in lengths]
    prompt_lengths = [max(1, min(k - 1, k - a)) for k, a in zip(lengths, answers, strict=True)]
    return TokenizedSplit.from_lists(examples, prompt_lengths)


def _synthetic_data(seed: int = 0) -> BenchData:
    """Random token ids shaped like the reference split (935 / 55 / 110 examples)."""
    gen = torch.Generator().manual_seed(seed)
    train, val, test = (_synthetic_split(n, gen) for n in (935, 55, 110))
    prompt_lengths = _clipped_exponential(110, 30, 56, 8.0, gen)  # reference: 30..56, mean 37.7
    return BenchData(
        source="synthetic",
        train=train,
        val=val,
        test=test,
        test_prompts=[
            torch.randint(0, EOS_ID, (k,), generator=gen).tolist() for k in prompt_lengths
        ],
        test_answer_lengths=_clipped_exponential(110, 2, 46, 10.0, gen),  # reference mean 12.2
    )


def load_data(data_dir: Path = SHARED_DATA, *, synthetic: bool = False) -> BenchData:
    """The reference data when ``data_dir`` holds it (and not ``synthetic``), else synthetic."""
    have = (data_dir / DATA_FILE).is_file() and (data_dir / ENCODING_DIR).is_dir()
    if have and not synthetic:
        data = _reference_data(data_dir)
        log(f"data: reference split from {data_dir}")
    else:
        data = _synthetic_data()
        why = "--synthetic" if synthetic else f"no {DATA_FILE} + {ENCODING_DIR}/ in {data_dir}"
        log(f"data: SYNTHETIC token sequences ({why})")
    return data


def first_batches(
    train: TokenizedSplit, count: int, *, batch_size: int = 8, mode: str = "reference"
) -> list[list[int]]:
    """The first ``count`` training batches of the recipe (more epochs when needed)."""
    order = BatchOrder(train.lengths, batch_size, seed=BATCH_SEED, mode=mode)
    batches: list[list[int]] = []
    while len(batches) < count:
        batches.extend(order.epoch())
    return batches[:count]


def collate_batches(
    split: TokenizedSplit,
    batches: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    max_length: int = 1024,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of each batch with the pipeline's ``collate``, moved to ``device``."""
    out = []
    for indices in batches:
        x, y = collate([split[i] for i in indices], pad_id=pad_id, max_length=max_length)
        out.append((x.to(device), y.to(device)))
    return out


# ---------------------------------------------------------------------- models
def build_model(name: str, seed: int) -> GPTModel:
    """Our model with GPT-2 ``name``'s shape and random weights (seeded)."""
    torch.manual_seed(seed)
    return GPTModel(GPT2_CONFIGS[name])


def non_embedding_params(model: GPTModel) -> int:
    """Parameters outside the token and position embeddings and the output head (its
    products are counted apart, whether it is tied to the embedding or not)."""
    embedding = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    if model.out_head is not None:
        embedding += model.out_head.weight.numel()
    return model.num_parameters() - embedding


def load_hf_model(model_dir: Path, device: torch.device, *, training: bool) -> Any:
    """Hugging Face ``GPT2LMHeadModel`` from a directory that ``save_model`` wrote (fp32, SDPA)."""
    from transformers import GPT2LMHeadModel

    try:
        model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="sdpa")
    except (ValueError, ImportError, TypeError) as err:
        log(f"hf: attn_implementation='sdpa' refused ({err}); using the default")
        model = GPT2LMHeadModel.from_pretrained(model_dir)
    model = model.float().to(device)
    model.config.use_cache = not training
    model.train(training)
    return model


def hf_attn_implementation(model: Any) -> str | None:
    return getattr(model.config, "_attn_implementation", None)
