"""Projected wall-clock time of the default ``dvc repro`` from a few measured steps.

Measures, with random weights of the chosen shape (default gpt2-medium) and
the recipe of the repository's ``params.yaml`` (``--params``; the dataclass
defaults if it cannot be read), apart from the options given:

* train step: N real steps through ``Trainer.train`` (max_steps=N, eval every
  5 steps as the recipe does, no checkpoints, no progress bar). Steps are timed
  from the start of one forward pass to the next and every ``Trainer.evaluate``
  call is timed, so evaluation time is taken out of the step times. The first step
  (first-touch allocations, first epoch shuffle) is reported but left out of
  the mean when N >= 2;
* evaluation: the in-loop evaluations plus ``--eval-repeats`` extra
  ``trainer.evaluate()`` calls (5 train + 5 validation batches each);
* checkpoint: one ``Trainer.save_checkpoint`` (model + AdamW state) to a temp dir;
* generation: K test prompts in one batch of min(K, 16) (generate.batch_size),
  greedy, once with max_new_tokens=1 (prefill) and once with 256;
* model load (``load_model``), save (``save_model``), and the start-up of one
  stage process (``python -c "import gpt2_instruct.pipeline"``).

Then projects: 2 epochs x 116 batches = 232 steps; ceil(232 / 5) = 47 in-loop
evaluations + 1 final one in ``finetune``; checkpoints every 50 steps and at
each epoch end, none after the last step (5); 110 test answers; the evaluate
stage's forward passes over the test split (14 batches of 8, priced as an
evaluation batch); 5 model loads (fetch_gpt2 x2, finetune, generate, evaluate),
1 save, and one process start-up per DVC stage. Downloads and DVC's own hashing are not included.

Beside the projection it prints the run's compute floor: its useful FLOPs divided by a
matmul peak measured at the end, in the recipe's precision (``compute_floor_flops``).

    python bench/pipeline.py --model gpt2-medium --steps 4 --gen-prompts 16
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import (
    REPO_ROOT,
    BenchData,
    base_parser,
    build_model,
    load_data,
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
    sync,
    timed,
)

from gpt2_instruct.generation import SamplingConfig, generate
from gpt2_instruct.params import FinetuneParams, Params, ParamsError, load_params
from gpt2_instruct.training import Trainer
from gpt2_instruct.weights import load_model, save_model

MODEL_LOADS = 5  # fetch_gpt2 (2: check + vocabulary check), finetune, generate, evaluate
MODEL_SAVES = 1  # finetune's data/model (fetch_gpt2 writes downloaded files: not timed)


def dvc_stage_count() -> int:
    try:
        return len(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return 7


def stage_startup_s() -> float:
    """Seconds for a fresh interpreter to import what a stage imports."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gpt2_instruct.pipeline"], check=True)
    return time.perf_counter() - started


def evaluations_in(total_steps: int, eval_every: int) -> int:
    """In-loop evaluations: the trainer evaluates after steps 1, 1 + eval_every, ..."""
    return sum(1 for step in range(1, total_steps + 1) if (step - 1) % eval_every == 0)


def checkpoints_in(total_steps: int, every: int, epochs: int) -> int:
    """As ``Trainer`` writes them: every ``every`` steps and at each epoch end, none after
    the last step."""
    periodic = (total_steps - 1) // every if every else 0
    return periodic + epochs - 1


def compute_floor_flops(
    *,
    body_per_token: int,
    head_per_token: int,
    data: BenchData,
    recipe: FinetuneParams,
    total_steps: int,
    n_evals: int,
    n_test: int,
) -> dict[str, float]:
    """Useful FLOPs of the projected run, by part: what no code can do with less arithmetic.

    A token costs 6 FLOPs a parameter (blocks and head) in training, 2 forward (the
    definitions of ``bench/README.md``). Training and the train half of each
    evaluation use the mean training example; the validation half is the first
    ``eval_batches`` batches, as ``Trainer`` takes them; the evaluate stage runs the test
    examples forward. Generation: each prompt and answer token through the blocks once,
    the head once per generated token (the reference answer and its EOS).
    """
    per_token = body_per_token + head_per_token
    train_mean = float(data.train.lengths.double().mean())
    val_counted = int(data.val.lengths[: recipe.eval_batches * recipe.batch_size].sum())
    eval_tokens = recipe.eval_batches * recipe.batch_size * train_mean + val_counted
    prompts = data.test_prompts[:n_test]
    answers = data.test_answer_lengths[:n_test]
    body_tokens = sum(len(p) for p in prompts) + sum(answers)
    head_tokens = sum(a + 1 for a in answers)
    return {
        "train_steps": 6.0 * per_token * total_steps * recipe.batch_size * train_mean,
        "evaluations": 2.0 * per_token * n_evals * eval_tokens,
        "evaluate_stage": 2.0 * per_token * int(data.test.lengths[:n_test].sum()),
        "generation": 2.0 * (body_per_token * body_tokens + head_per_token * head_tokens),
    }


def time_training(trainer: Trainer, device: torch.device) -> dict[str, Any]:
    """Run ``trainer.train()``; per-step seconds without evaluation, and evaluation seconds.

    A step runs from the start of its forward pass to the start of the next one (the
    last to the end of training), less the evaluations in between: the optimizer's
    update is inside it whether it runs during the backward pass or after it.
    """
    starts: list[float] = []
    evals: list[tuple[float, float]] = []
    forward_backward = trainer._forward_backward

    def stamped_forward_backward(indices: list[int]) -> tuple[float, int, int]:
        sync(device)
        starts.append(time.perf_counter())
        return forward_backward(indices)

    original = trainer.evaluate

    def timed_evaluate() -> tuple[float, float]:
        sync(device)
        start = time.perf_counter()
        result = original()
        sync(device)
        evals.append((start, time.perf_counter()))
        return result

    trainer._forward_backward = stamped_forward_backward  # type: ignore[method-assign]
    trainer.evaluate = timed_evaluate  # type: ignore[method-assign]
    sync(device)
    started = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer._forward_backward = forward_backward  # type: ignore[method-assign]
        trainer.evaluate = original  # type: ignore[method-assign]
    sync(device)
    ended = time.perf_counter()
    total = ended - started
    bounds = [*starts, ended]
    steps = []
    for begin, end in itertools.pairwise(bounds):
        inside = sum(b - a for a, b in evals if begin <= a and b <= end)
        steps.append(end - begin - inside)
    return {
        "train_wall_s": total,
        "step_times": steps,
        "eval_times": [b - a for a, b in evals],
    }


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0], default_model="gpt2-medium")
    parser.add_argument("--steps", type=int, default=4, help="measured training steps")
    parser.add_argument(
        "--params", type=Path, default=REPO_ROOT / "params.yaml", help="the recipe to project"
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "tf32", "bf16"), default=None, help="default: params.yaml's"
    )
    parser.add_argument(
        "--eval-train", choices=("reference", "fixed"), default=None, help="default: params.yaml's"
    )
    parser.add_argument(
        "--batch-order",
        choices=("reference", "length_grouped"),
        default=None,
        help="default: params.yaml's",
    )
    parser.add_argument(
        "--eval-repeats", type=int, default=0, help="extra evaluate() calls after training"
    )
    parser.add_argument(
        "--gen-prompts", type=int, default=16, help="test prompts timed (one batch of <= 16)"
    )
    parser.add_argument(
        "--gen-max-new-tokens", type=int, default=None, help="default: params.yaml's"
    )
    parser.add_argument(
        "--answer-slack",
        type=int,
        default=3,
        help="tokens added to each reference answer length for the realistic projection",
    )
    parser.add_argument(
        "--no-checkpoint", action="store_true", help="do not time a checkpoint save"
    )
    args = parser.parse_args()
    if args.steps < 1 or args.gen_prompts < 1 or args.eval_repeats < 0:
        parser.error("--steps and --gen-prompts must be >= 1, --eval-repeats >= 0")

    device = resolve_device(args.device)
    threads = set_threads(args.threads)
    data = load_data(args.data_dir, synthetic=args.synthetic)
    try:
        config = load_params(args.params)
    except ParamsError as err:
        log(f"params: {err}; using the dataclass defaults")
        config = Params()
    recipe = dataclasses.replace(  # the run projected: params.yaml + the options given
        config.finetune,
        precision=args.dtype or config.finetune.precision,
        eval_train=args.eval_train or config.finetune.eval_train,
        batch_order=args.batch_order or config.finetune.batch_order,
    )
    malloc = set_malloc(args.system_malloc, recipe.precision, device)
    params = dataclasses.replace(  # the run measured: N steps, no checkpoints
        recipe, max_steps=args.steps, device=str(device), checkpoint_every=0
    )
    parts: dict[str, float] = {}
    measured: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        base = Path(tmp) / "base"
        model = build_model(args.model, args.seed)
        measured["model_save_s"], _ = timed(lambda: save_model(model, base), device)
        del model
        measured["model_load_s"], model = timed(lambda: load_model(base), device)
        log(f"save {measured['model_save_s']:.2f} s, load {measured['model_load_s']:.2f} s")

        measured["trainer_setup_s"], trainer = timed(
            lambda: Trainer(
                model,
                data.train,
                data.val,
                params,
                pad_id=data.pad_id,
                device=device,
                checkpoint_dir=None,
                progress=False,
            ),
            device,
        )
        log(f"train: {args.steps} steps ({params.eval_every=}, {params.eval_train=})")
        run = time_training(trainer, device)
        steps = run["step_times"]
        step_s = mean(steps[1:]) if len(steps) > 1 else steps[0]
        evals = list(run["eval_times"])
        for i in range(args.eval_repeats):
            log(f"evaluate: extra call {i + 1}/{args.eval_repeats}")
            evals.append(timed(trainer.evaluate, device)[0])
        # The first evaluation pays first-touch allocations, as the first step does.
        eval_s = mean(evals[1:]) if len(evals) > 1 else evals[0]
        log(f"train: {step_s:.2f} s/step, {eval_s:.2f} s/evaluation")

        checkpoint_s = None
        if not args.no_checkpoint:
            trainer.checkpoint_dir = Path(tmp) / "checkpoints"
            checkpoint_s, _ = timed(trainer.save_checkpoint, device)
            trainer.remove_checkpoint()
            trainer.checkpoint_dir = None
            log(f"checkpoint: {checkpoint_s:.2f} s")

        # ---------------------------------------------------------- generation
        gen_batch = min(args.gen_prompts, config.generate.batch_size, len(data.test_prompts))
        prompts = data.test_prompts[:gen_batch]
        model = trainer.model
        max_new = args.gen_max_new_tokens or config.generate.max_new_tokens
        # No stop token, so every row decodes every step: a model trained a few steps from
        # random weights may put EOS on top at once, or not, as rounding decides, and a run
        # whose rows stop at once would time no decoding at all.
        eos = -1
        generate(model, prompts[:1], eos_id=eos, sampling=SamplingConfig(max_new_tokens=2))
        prefill_s, _ = timed(
            lambda: generate(model, prompts, eos_id=eos, sampling=SamplingConfig(max_new_tokens=1)),
            device,
        )
        log(f"generate: {len(prompts)} prompts x {max_new} new tokens")
        full_s, outputs = timed(
            lambda: generate(
                model, prompts, eos_id=eos, sampling=SamplingConfig(max_new_tokens=max_new)
            ),
            device,
        )
        decode_step_s = (full_s - prefill_s) / max(1, max_new - 1)
        longest = max(len(o) for o in outputs)
        log(f"generate: prefill {prefill_s:.2f} s, {full_s:.2f} s for {longest} tokens")
        body_per_token = non_embedding_params(model)
        head_per_token = model.config.n_embd * model.config.vocab_size

    peak_dtype = torch.float32 if recipe.precision == "fp32" else torch.bfloat16
    log(f"peak: timing square matmuls ({recipe.precision})")
    peak_gflops, peak_size = matmul_peak(peak_dtype, device)

    # -------------------------------------------------------------- projection
    epochs = recipe.epochs
    batches_per_epoch = len(data.train) // recipe.batch_size
    total_steps = epochs * batches_per_epoch
    if recipe.max_steps:
        total_steps = min(total_steps, recipe.max_steps)
    n_evals = evaluations_in(total_steps, recipe.eval_every) + 1  # + finetune's final one
    n_checkpoints = checkpoints_in(total_steps, recipe.checkpoint_every, epochs)
    n_test = len(data.test_prompts)
    if config.generate.limit:
        n_test = min(n_test, config.generate.limit)
    gen_batches = math.ceil(n_test / gen_batch)
    # Realistic: the test prompts sorted by length in batches, each decoding until its
    # longest answer (reference answer length + slack + EOS) is done.
    order = sorted(range(n_test), key=lambda i: len(data.test_prompts[i]))
    steps_per_batch = [
        min(
            max_new,
            max(data.test_answer_lengths[i] for i in order[s : s + gen_batch])
            + 1
            + args.answer_slack,
        )
        for s in range(0, n_test, gen_batch)
    ]
    startup_s = stage_startup_s()
    n_stages = dvc_stage_count()
    eval_batches = 2 * recipe.eval_batches
    test_batches = math.ceil(n_test / config.evaluate.batch_size)

    # The first step and evaluation as measured, the rest at the steady-state mean.
    parts["train_steps_s"] = steps[0] + (total_steps - 1) * step_s
    parts["evaluations_s"] = evals[0] + (n_evals - 1) * eval_s
    parts["checkpoints_s"] = n_checkpoints * checkpoint_s if checkpoint_s is not None else 0.0
    parts["generation_upper_bound_s"] = gen_batches * full_s
    parts["evaluate_stage_s"] = test_batches * eval_s / eval_batches
    parts["model_io_s"] = (
        MODEL_LOADS * measured["model_load_s"] + MODEL_SAVES * measured["model_save_s"]
    )
    parts["stage_startup_s"] = n_stages * startup_s
    parts["trainer_setup_s"] = measured["trainer_setup_s"]
    generation_real_s = sum(prefill_s + n * decode_step_s for n in steps_per_batch)
    total_upper = sum(parts.values())
    total_real = total_upper - parts["generation_upper_bound_s"] + generation_real_s
    floor_flops = compute_floor_flops(
        body_per_token=body_per_token,
        head_per_token=head_per_token,
        data=data,
        recipe=recipe,
        total_steps=total_steps,
        n_evals=n_evals,
        n_test=n_test,
    )
    floor_parts = {k: v / (peak_gflops * 1e9) for k, v in floor_flops.items()}
    floor_s = sum(floor_parts.values())

    method = (
        f"{total_steps} steps ({epochs} epochs x {batches_per_epoch} batches) x measured "
        f"s/step (the first step as measured, the others at the mean of steps 2..N of "
        f"{len(steps)}, evaluation time removed) + {n_evals} evaluations ({n_evals - 1} "
        f"in-loop every {recipe.eval_every} steps + 1 final; the first as measured, the "
        f"others at the mean of the later ones, {len(evals)} measured) + {n_checkpoints} "
        f"checkpoint saves + generation of {n_test} answers as {gen_batches} batches of "
        f"{gen_batch} x the measured time of one batch "
        f"decoding all {max_new} tokens (random weights never emit EOS: upper bound; "
        "'projected_total_real_answers_s' uses per-batch prefill + decode steps for the "
        f"longest reference answer + {args.answer_slack} tokens) + evaluate stage forward "
        f"({test_batches} batches, priced as 1/{eval_batches} evaluation) + {MODEL_LOADS} model "
        f"loads + {MODEL_SAVES} save + {n_stages} stage start-ups. Downloads and DVC hashing "
        "excluded; with fewer than 16 timed prompts generation is priced at a smaller batch."
    )
    result: dict[str, Any] = {
        "benchmark": "pipeline",
        "projected_total_s": total_upper,
        "projected_total_real_answers_s": total_real,
        "projected_total_h": total_upper / 3600,
        # At 100% of the matmul peak measured here: the run's useful FLOPs alone.
        "compute_floor_s": floor_s,
        "compute_floor_parts_s": floor_parts,
        "floor_over_projection": floor_s / total_real,
        "useful_flops": sum(floor_flops.values()),
        f"peak_{recipe.precision}_gflops": peak_gflops,
        "peak_matmul_size": peak_size,
        "parts": parts,
        "generation_real_answers_s": generation_real_s,
        "step_s": step_s,
        "first_step_s": steps[0],
        "step_times_s": steps,
        "eval_s": eval_s,
        "eval_times_s": evals,
        "checkpoint_s": checkpoint_s,
        "gen_prefill_s": prefill_s,
        "gen_batch_s": full_s,
        "gen_decode_step_s": decode_step_s,
        "gen_batch_size": gen_batch,
        "gen_max_new_tokens": max_new,
        "gen_longest_answer_tokens": longest,
        "answer_tokens_mean": mean(data.test_answer_lengths),
        "answer_steps_per_batch": steps_per_batch,
        "model_load_s": measured["model_load_s"],
        "model_save_s": measured["model_save_s"],
        "stage_startup_s": startup_s,
        "train_wall_s": run["train_wall_s"],
        "counts": {
            "train_steps": total_steps,
            "evaluations": n_evals,
            "checkpoints": n_checkpoints,
            "generation_batches": gen_batches,
            "evaluate_batches": test_batches,
            "model_loads": MODEL_LOADS,
            "model_saves": MODEL_SAVES,
            "stages": n_stages,
        },
        "peak_rss_gb": peak_rss_gb(),
        "method": method,
        "model": args.model,
        "dtype": params.precision,
        "steps": args.steps,
        "eval_train": params.eval_train,
        "batch_order": params.batch_order,
        "params_file": str(args.params),
        "recipe": dataclasses.asdict(recipe),
        "gen_prompts": args.gen_prompts,
        "data": data.source,
        "threads": threads,
        **machine_info(device),
        "malloc": malloc,
    }
    print_result(result)


if __name__ == "__main__":
    main()
