"""Training-step throughput: our GPTModel vs Hugging Face GPT2LMHeadModel.

Both models start from the same random weights (ours is built, written with
``save_model`` and read back by ``GPT2LMHeadModel.from_pretrained``) and train
on the same batches: the recipe's first shuffled batches, collated once with
the pipeline's ``collate``. One step is zero_grad, forward + loss, backward and
an AdamW step:

* ours: ``model.loss(x, y)`` (vocabulary projection only where the target
  counts) and ``torch.optim.AdamW(..., fused=True)``, as ``Trainer`` does;
* HF: ``F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten())``
  (the same mean over the same targets) and ``torch.optim.AdamW`` with its
  defaults (``fused=None``), as a user of the model would write it
  (``--hf-fused-optimizer`` gives HF the fused kernel too).

bf16 is ``torch.autocast(device_type, dtype=torch.bfloat16)`` around forward
and loss for both. "Real tokens" are positions whose target is not -100 (the
example's tokens plus its EOS target: the non-padding input positions).
Useful FLOPs per step = 6 * (N_nonembedding + n_embd * vocab) * real tokens;
MFU = useful FLOP/s / the best square-matmul FLOP/s measured in this run
(fp32 peak for fp32, bf16 peak for bf16).

    python bench/train_step.py --model gpt2 --steps 10 --warmup 2 --dtype fp32
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    base_parser,
    build_model,
    collate_batches,
    first_batches,
    hf_attn_implementation,
    load_data,
    load_hf_model,
    log,
    machine_info,
    matmul_peak,
    mean,
    non_embedding_params,
    peak_rss_gb,
    print_result,
    resolve_device,
    set_malloc,
    set_threads,
    time_steps,
    timed,
)

from gpt2_instruct.model import IGNORE_INDEX
from gpt2_instruct.params import FinetuneParams
from gpt2_instruct.weights import save_model

LR = FinetuneParams().lr
WEIGHT_DECAY = FinetuneParams().weight_decay
LOSS_TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 5e-2}


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[Any]:
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    dtype: str,
    device: torch.device,
) -> Callable[[int], torch.Tensor]:
    """One full training step on batch ``i``: zero_grad, forward + loss, backward, AdamW."""
    model.train()

    def step(i: int) -> torch.Tensor:
        x, y = batches[i]
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def summarize(name: str, times: list[float], losses: list[torch.Tensor]) -> dict[str, Any]:
    result = {
        "step_s": mean(times),
        "step_s_min": min(times),
        "step_times_s": [round(t, 4) for t in times],
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
    }
    log(f"{name}: {result['step_s']:.3f} s/step, first loss {result['first_loss']:.5f}")
    return result


def run_sequential(
    name: str, step: Callable[[int], torch.Tensor], *, warmup: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """Time ``steps`` steps after ``warmup`` untimed ones (CUDA: with peak memory)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"{name}: {warmup} warm-up + {steps} timed steps")
    times, losses = time_steps(step, warmup=warmup, steps=steps, device=device)
    result = summarize(name, times, losses)
    if device.type == "cuda":
        result["cuda_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return result


def run_interleaved(
    steps_by_name: dict[str, Callable[[int], torch.Tensor]],
    *,
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """Warm up every model, then alternate their timed steps (same batch i for each)."""
    log(f"interleaved: {warmup} warm-up + {steps} timed steps per model")
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in steps_by_name}
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for i in range(warmup):
        for name, step in steps_by_name.items():
            losses[name].append(step(i))
    for i in range(warmup, warmup + steps):
        for name, step in steps_by_name.items():
            seconds, loss = timed(lambda step=step, i=i: step(i), device)
            times[name].append(seconds)
            losses[name].append(loss)
    return {name: summarize(name, times[name], losses[name]) for name in steps_by_name}


def ours_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model.loss(x, y)


def hf_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, labels=None).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument(
        "--dtype", choices=("fp32", "tf32", "bf16"), default="fp32", help="tf32: CUDA only"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--batch-order", choices=("reference", "length_grouped"), default="reference"
    )
    parser.add_argument("--only", choices=("ours", "hf", "both"), default="both")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="hold both models and alternate their timed steps (fairer on a busy machine; "
        "twice the memory)",
    )
    parser.add_argument(
        "--hf-fused-optimizer",
        action="store_true",
        help="give HF torch.optim.AdamW(fused=True) too (default: the plain default AdamW)",
    )
    parser.add_argument(
        "--head",
        choices=("untied", "tied"),
        default="untied",
        help="untied: the reference's separate output head, the finetune default (HF loads it "
        "with tie_word_embeddings: false); tied: GPT-2's own layout, for both models",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    parser.add_argument("--peak-repeats", type=int, default=10)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    device = resolve_device(args.device)
    if args.dtype == "tf32" and device.type != "cuda":
        parser.error("--dtype tf32 is a CUDA matmul mode (TF32 products for both models)")
    threads = set_threads(args.threads)
    malloc = set_malloc(args.system_malloc, args.dtype, device)
    data = load_data(args.data_dir, synthetic=args.synthetic)
    count = args.warmup + args.steps
    indices = first_batches(data.train, count, batch_size=args.batch_size, mode=args.batch_order)
    batches = collate_batches(data.train, indices, pad_id=data.pad_id, device=device)
    timed_batches = batches[args.warmup :]
    real_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in timed_batches)
    padded_tokens = sum(x.numel() for x, _ in timed_batches)

    log("peak: timing square matmuls (fp32, bf16)")
    peak_fp32, size_fp32 = matmul_peak(
        torch.float32, device, size=args.peak_size, repeats=args.peak_repeats
    )
    peak_bf16, size_bf16 = matmul_peak(
        torch.bfloat16, device, size=args.peak_size, repeats=args.peak_repeats
    )
    peak = peak_bf16 if args.dtype == "bf16" else peak_fp32

    model = build_model(args.model, args.seed)
    if args.head == "untied":
        model.untie_embeddings()  # a copy of wte, trained on its own
    config = model.config
    n_params = model.num_parameters()
    n_nonemb = non_embedding_params(model)
    useful_flops = 6.0 * (n_nonemb + config.n_embd * config.vocab_size) * real_tokens

    names = ("ours", "hf") if args.only == "both" else (args.only,)
    steppers: dict[str, Callable[[int], torch.Tensor]] = {}
    results: dict[str, dict[str, Any]] = {}
    hf_attn = None
    step_kw = {"dtype": args.dtype, "device": device}
    timing = {"warmup": args.warmup, "steps": args.steps, "device": device}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        save_model(model, Path(tmp))  # the initial weights, for HF
        if "ours" in names:
            model = model.to(device)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True
            )
            steppers["ours"] = make_step(model, ours_loss, optimizer, batches, **step_kw)
            if not args.interleave:
                results["ours"] = run_sequential("ours", steppers.pop("ours"), **timing)
            del optimizer
        del model
        free(device)
        if "hf" in names:
            hf = load_hf_model(Path(tmp), device, training=True)
            hf_attn = hf_attn_implementation(hf)
            optimizer = torch.optim.AdamW(
                hf.parameters(),
                lr=LR,
                weight_decay=WEIGHT_DECAY,
                fused=True if args.hf_fused_optimizer else None,
            )
            steppers["hf"] = make_step(hf, hf_loss, optimizer, batches, **step_kw)
            if not args.interleave:
                results["hf"] = run_sequential("hf", steppers.pop("hf"), **timing)
            del optimizer, hf
        if args.interleave:
            results = run_interleaved(steppers, **timing)
        steppers.clear()
        free(device)

    out: dict[str, Any] = {"benchmark": "train_step"}
    for name in ("ours", "hf"):
        r = results.get(name)
        step_s = r["step_s"] if r else None
        out[f"{name}_step_s"] = step_s
        out[f"{name}_tokens_per_s"] = real_tokens / args.steps / step_s if r else None
        out[f"{name}_padded_tokens_per_s"] = padded_tokens / args.steps / step_s if r else None
        achieved = useful_flops / args.steps / step_s if r else None
        out[f"{name}_achieved_gflops"] = achieved / 1e9 if r else None
        out[f"mfu_{name}"] = achieved / (peak * 1e9) if r else None
    both = "ours" in results and "hf" in results
    out["ratio_tokens_per_s"] = out["ours_tokens_per_s"] / out["hf_tokens_per_s"] if both else None
    out["peak_fp32_gflops"] = peak_fp32
    out["peak_bf16_gflops"] = peak_bf16
    out["peak_matmul_sizes"] = {"fp32": size_fp32, "bf16": size_bf16}
    out["padding_fraction"] = 1.0 - real_tokens / padded_tokens
    diff = abs(results["ours"]["first_loss"] - results["hf"]["first_loss"]) if both else None
    out["loss_diff_first_batch"] = diff
    out["loss_tolerance"] = LOSS_TOLERANCE[args.dtype]
    out["losses_agree"] = diff < LOSS_TOLERANCE[args.dtype] if both else None
    for name, r in results.items():
        out[f"{name}_first_loss"] = r["first_loss"]
        out[f"{name}_step_s_min"] = r["step_s_min"]
        if "cuda_peak_gb" in r:
            out[f"{name}_cuda_peak_gb"] = r["cuda_peak_gb"]
    out.update(
        {
            "model": args.model,
            "dtype": args.dtype,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "batch_order": args.batch_order,
            "head": args.head,
            "only": args.only,
            "interleave": args.interleave,
            "data": data.source,
            "real_tokens_per_step": real_tokens / args.steps,
            "padded_tokens_per_step": padded_tokens / args.steps,
            "n_params": n_params,
            "n_params_nonembedding": n_nonemb,
            "useful_flops_per_step": useful_flops / args.steps,
            "ours_optimizer": "torch.optim.AdamW(fused=True)",
            "hf_optimizer": "torch.optim.AdamW(fused=True)"
            if args.hf_fused_optimizer
            else "torch.optim.AdamW() defaults (fused=None: not fused)",
            "hf_attn_implementation": hf_attn,
            "threads": threads,
            "peak_rss_gb": peak_rss_gb(),
            "definitions": (
                "real tokens = positions whose target != -100; useful FLOPs = "
                "6*(N_nonemb + n_embd*vocab)*real tokens; mfu = useful FLOP/s / measured "
                "square-matmul peak of the run's dtype (see peak_matmul_sizes)"
            ),
            **machine_info(device),
            "malloc": malloc,
        }
    )
    if both and not out["losses_agree"]:
        log(f"WARNING: first-batch losses differ by {diff:.3g} (> {out['loss_tolerance']})")
    print_result(out)


if __name__ == "__main__":
    main()
