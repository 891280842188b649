"""What the CPU suite checks, on a CUDA GPU (issue 21): run with ``pytest -m cuda``.

* our logits and loss equal Hugging Face's ``GPT2LMHeadModel`` on the same weights;
* a few training steps in every precision ``finetune.precision`` accepts (fp32, tf32,
  bf16) give finite losses, and fp32 on the GPU learns what fp32 on the CPU learns;
* batched, cached greedy decoding equals plain greedy decoding (``generate_uncached``);
* a run interrupted after a checkpoint resumes to the uninterrupted run's weights, bit for
  bit, in PyTorch's deterministic mode (in a fresh process, so that
  ``CUBLAS_WORKSPACE_CONFIG`` is read before cuBLAS starts);
* with two GPUs, two ranks (NCCL, under torchrun as the finetune stage starts them) learn
  what one process learns, with DDP and with FSDP.

Without CUDA every test here is skipped (``pytestmark``), so the CPU-only suite stays
green; ``bench/gpu_check.py`` runs this file on a GPU machine. The tiny cases come from
``test_training.py`` (the same splits and model), as ``test_distributed.py`` takes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training import PAD, RECIPE, TRAIN, VAL, fresh_model

from gpt2_instruct import devices
from gpt2_instruct.generation import SamplingConfig, generate, generate_uncached
from gpt2_instruct.model import GPTConfig, GPTModel
from gpt2_instruct.params import DistributedParams, FinetuneParams, ParamsError, load_params
from gpt2_instruct.training import Trainer
from gpt2_instruct.weights import load_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="CUDA is not available on this machine (bench/gpu_check.py runs these on a GPU)",
    ),
]

CUDA = torch.device("cuda")
PRECISIONS = ("fp32", "tf32", "bf16")
WORLD = 2
# A GPU sums in other orders than the CPU (other kernels, other blockings): fp32 losses
# agree to ~1e-6 per step; after 6 AdamW steps at lr 1e-3 well inside these.
LOSS_ATOL = 1e-4
# Weights: AdamW's update is ~lr * sign(gradient) for tiny gradients, so a rounding can
# move one element by up to 2 * lr; the whole update, though, must be the same.
UPDATE_RTOL = 1e-2


@pytest.fixture(autouse=True)
def _restore_matmul_settings():
    """A tf32 run must not leave TF32 on for the fp32 tests after it (nor anything else)."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def _accepted(precision: str, tmp_path: Path, **overrides: Any) -> FinetuneParams:
    """The recipe in ``precision`` on CUDA, validated as ``params.yaml`` would be: a
    precision this version does not accept yet skips the test with the reason."""
    path = tmp_path / "precision.yaml"
    path.write_text(f"finetune:\n  precision: {precision}\n  device: cuda\n", encoding="utf-8")
    try:
        load_params(path)
        return dataclasses.replace(
            RECIPE, precision=precision, device="cuda", fused_optimizer=True, **overrides
        )
    except ParamsError as err:
        pytest.skip(f"finetune.precision {precision!r} is not accepted here yet: {err}")


def _strip_seconds(log: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in log]


# ------------------------------------------------------------------- the model
def _hf_checkpoint(path: Path, **config: int) -> Any:
    """A random GPT2LMHeadModel (biases and LayerNorms perturbed) saved to ``path``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize(
    "shape",
    [
        {"vocab_size": 97, "n_positions": 32, "n_embd": 24, "n_layer": 3, "n_head": 4},
        {"n_embd": 768, "n_layer": 12, "n_head": 12},  # gpt2-small, 124M
    ],
    ids=["tiny", "gpt2-small"],
)
def test_logits_and_loss_match_hugging_face_on_cuda(tmp_path: Path, shape: dict) -> None:
    hf = _hf_checkpoint(tmp_path, **shape).to(CUDA)
    ours = load_model(tmp_path).to(CUDA).eval()
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (3, 32), generator=gen).to(CUDA)
    targets = torch.randint(0, vocab, (3, 32), generator=gen).to(CUDA)
    targets[0, 20:] = -100  # right padding
    targets[1, :5] = -100  # a masked prompt
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
        assert got.device.type == "cuda" and got.dtype == torch.float32
        assert (got - expected).abs().max().item() <= 1e-4
        full = torch.nn.functional.cross_entropy(expected.flatten(0, 1), targets.flatten())
        torch.testing.assert_close(ours.loss(idx, targets), full, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- training
def _train(params: FinetuneParams, device: torch.device, model: GPTModel | None = None) -> Trainer:
    devices.configure(device, params.precision)  # as the stage's frame does: TF32 on or off
    trainer = Trainer(
        model or fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False, device=device
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_steps_give_finite_losses_in_every_precision(
    tmp_path: Path, precision: str
) -> None:
    params = _accepted(precision, tmp_path, max_steps=6, eval_every=1)
    trainer = _train(params, CUDA)
    assert trainer.state.step == 6 and len(trainer.state.log) == 6
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    for row in trainer.state.log:
        for key in ("train_loss", "val_loss", "batch_loss"):
            assert math.isfinite(row[key]), (precision, row)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    if precision != "fp32":  # rounded products, the same training: close to fp32 on the GPU
        exact = _train(dataclasses.replace(params, precision="fp32"), CUDA)
        tolerance = 5e-2 if precision == "bf16" else 1e-2
        assert trainer.state.log[-1]["val_loss"] == pytest.approx(
            exact.state.log[-1]["val_loss"], abs=tolerance
        )


WIDE = GPTConfig(vocab_size=50257, context_length=64, n_embd=768, n_layer=2, n_head=12)


@pytest.mark.parametrize("shape", ["tiny", "gpt2-width"])
def test_fp32_training_on_cuda_learns_what_the_cpu_learns(tmp_path: Path, shape: str) -> None:
    """The same recipe (fused AdamW; updates in backward on the CPU only, the dense loss on
    CUDA, as ``devices`` decides) on both devices: the same loss log to rounding, and the
    same update of the weights."""
    params = _accepted("fp32", tmp_path, max_steps=6, eval_every=1)

    def model() -> GPTModel:
        torch.manual_seed(0)
        return GPTModel(WIDE) if shape == "gpt2-width" else fresh_model()

    initial = {k: v.clone() for k, v in model().state_dict().items()}
    initial["out_head.weight"] = initial["tok_emb.weight"]  # the untied head starts as wte
    cpu = _train(dataclasses.replace(params, device="cpu"), torch.device("cpu"), model())
    gpu = _train(params, CUDA, model())
    for a, b in zip(cpu.state.log, gpu.state.log, strict=True):
        for key in ("train_loss", "val_loss", "batch_loss"):
            assert b[key] == pytest.approx(a[key], abs=LOSS_ATOL), (key, a["step"])
    for name, want in cpu.model.state_dict().items():
        got = gpu.model.state_dict()[name].cpu()
        update = (want - initial[name]).norm()
        assert (got - want).norm() <= UPDATE_RTOL * update + 1e-7, name


def test_finetune_stage_on_cuda_exports_what_the_cpu_stage_exports(
    tmp_path: Path, write_bpe: Any
) -> None:
    """The stage as ``dvc repro`` runs it (checkpoints, export, metrics), on each device."""
    pytest.importorskip("dvclive")
    from test_distributed import _tiny_stage_inputs

    from gpt2_instruct import pipeline

    params = _accepted(
        "fp32", tmp_path, max_steps=6, eval_every=2, eval_batches=2, checkpoint_every=2
    )
    reports, models = {}, {}
    for device in ("cpu", "cuda"):
        paths = _tiny_stage_inputs(tmp_path / device, write_bpe)
        order = ("tokenized", "base-model", "encoding", "out", "checkpoints", "metrics", "log")
        reports[device] = pipeline.finetune(
            dataclasses.replace(params, device=device),
            *(paths[k] for k in order), paths["plot"], paths["live"],
        )  # fmt: skip
        models[device] = load_model(paths["out"]).state_dict()
        assert not any(paths["checkpoints"].iterdir())  # removed once the model is saved
    for key in ("train_loss", "val_loss"):
        assert math.isfinite(reports["cuda"][key])
        assert reports["cuda"][key] == pytest.approx(reports["cpu"][key], abs=LOSS_ATOL)
    for name, tensor in models["cpu"].items():
        assert models["cuda"][name].device.type == "cpu"  # exported from the GPU to the file
        torch.testing.assert_close(models["cuda"][name], tensor, rtol=0, atol=1e-3, msg=name)


# ------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def sharp_model() -> GPTModel:
    """test_generation.py's model: sharp logits, varied greedy paths, on the GPU."""
    torch.manual_seed(3)
    model = GPTModel(GPTConfig(vocab_size=53, context_length=40, n_embd=24, n_layer=2, n_head=3))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "emb" not in name:
                param.mul_(30)
        model.pos_emb.weight.mul_(10)
    return model.to(CUDA).eval()


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16, 17]]


def test_batched_cached_greedy_equals_uncached_on_cuda(sharp_model: GPTModel) -> None:
    prompts = [[(t * 7 + shift) % 50 for t in p] for shift in range(3) for p in PROMPTS]
    free = generate(sharp_model, prompts, eos_id=-1, sampling=SamplingConfig(max_new_tokens=12))
    eos = free[0][3]  # some rows stop early: the batch shrinks on the way
    batched = generate(sharp_model, prompts, eos_id=eos, sampling=SamplingConfig(max_new_tokens=12))
    assert sum(len(row) < 12 for row in batched) >= 1
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == generate_uncached(sharp_model, prompt, eos_id=eos, max_new_tokens=12)


def test_greedy_decoding_of_a_large_vocabulary_equals_uncached_on_cuda() -> None:
    torch.manual_seed(5)
    big = GPTModel(GPTConfig(vocab_size=3000, context_length=40, n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():
        for name, param in big.named_parameters():
            if param.dim() == 2 and "emb" not in name:
                param.mul_(20)
    big = big.to(CUDA).eval()
    prompts = [[(17 * i + 5 * j) % 3000 for j in range(2 + i % 5)] for i in range(16)]
    batched = generate(big, prompts, eos_id=-1, sampling=SamplingConfig(max_new_tokens=10))
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == generate_uncached(big, prompt, eos_id=-1, max_new_tokens=10)


# ---------------------------------------------------------------------- resume
RESUME_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys, torch
    sys.path.insert(0, {tests!r})
    torch.use_deterministic_algorithms(True)
    from test_training import CONFIG, PAD, RECIPE, TRAIN, VAL
    from gpt2_instruct.model import GPTModel
    from gpt2_instruct.training import Trainer

    out = sys.argv[1]
    cuda = torch.device("cuda")
    # Dropout on: its draws come from the CUDA generator, which the checkpoint must carry.
    config = dataclasses.replace(CONFIG, dropout=0.1)
    params = dataclasses.replace(
        RECIPE, device="cuda", fused_optimizer=True, checkpoint_every=2, dropout=0.1
    )

    class Killed(Exception):
        pass

    def trainer(checkpoints, kill_at=None):
        torch.manual_seed(0)
        t = Trainer(GPTModel(config), TRAIN, VAL, params, pad_id=PAD, progress=False,
                    device=cuda, checkpoint_dir=checkpoints)
        original = t._forward_backward
        def step(*a, **k):
            if t.state.step + 1 == kill_at:
                raise Killed  # as SIGKILL: nothing after the step-6 checkpoint survives
            return original(*a, **k)
        t._forward_backward = step
        return t

    def result(t):
        log = [{{k: v for k, v in r.items() if k != "seconds"}} for r in t.state.log]
        return {{"log": log, "model": {{k: v.cpu() for k, v in t.model.state_dict().items()}}}}

    try:
        results = {{}}
        for name in ("straight", "again"):
            t = trainer(f"{{out}}/ckpt-{{name}}")
            t.train()
            results[name] = result(t)
        try:
            trainer(f"{{out}}/ckpt-resumed", kill_at=7).train()
            raise AssertionError("not killed")
        except Killed:
            pass
        t = trainer(f"{{out}}/ckpt-resumed")
        assert t.load_checkpoint(), "no checkpoint to resume"
        results["resumed_from"] = t.state.step
        t.train()
        results["resumed"] = result(t)
    except RuntimeError as err:
        if "deterministic" not in str(err):
            raise
        with open(f"{{out}}/nondeterministic.json", "w") as f:
            json.dump({{"error": " ".join(str(err).split())}}, f)
        sys.exit(3)
    torch.save(results, f"{{out}}/results.pt")
    """
)


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    if a["log"] != b["log"]:
        return "the loss logs differ"
    for name, tensor in a["model"].items():
        if not torch.equal(tensor, b["model"][name]):
            diff = (tensor - b["model"][name]).abs().max().item()
            return f"{name} differs (max |diff| {diff:.3g})"
    return None


def test_resume_on_cuda_is_bit_identical_in_deterministic_mode(tmp_path: Path) -> None:
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)), encoding="utf-8")
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env, timeout=300, check=False, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode == 3:
        error = json.loads((tmp_path / "nondeterministic.json").read_text(encoding="utf-8"))
        pytest.xfail(f"training on CUDA is not deterministic today: {error['error'][:300]}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    assert results["resumed_from"] == 6
    # Two uninterrupted runs first: if they differ, some kernel is not deterministic even
    # in deterministic mode, and resuming cannot be judged bit for bit.
    unrepeatable = _first_difference(results["straight"], results["again"])
    if unrepeatable:
        pytest.xfail(f"two identical CUDA runs differ in deterministic mode: {unrepeatable}")
    assert _first_difference(results["straight"], results["resumed"]) is None


# ----------------------------------------------------------------- two GPUs, NCCL
def _worker(strategy: str, out: Path) -> None:
    """A torchrun rank: the recipe over 2 GPUs with NCCL; rank 0 saves what it learned."""
    from gpt2_instruct import distributed

    dist_params = DistributedParams(nproc_per_node=WORLD, timeout_s=60, strategy=strategy)
    with distributed.process_group(dist_params, "cuda") as world:
        assert world.size == WORLD
        params = dataclasses.replace(
            RECIPE, device="cuda", fused_optimizer=True, distributed=dist_params
        )
        trainer = Trainer(fresh_model(), TRAIN, VAL, params, pad_id=PAD, progress=False,
                          world=world)  # fmt: skip
        assert trainer.device == torch.device("cuda", world.local_rank)
        state = trainer.train()
        trainer.release_distributed()  # FSDP: rank 0 now holds the gathered model
        if world.is_main:
            torch.save(
                {"log": _strip_seconds(state.log), "model": trainer.model.state_dict()},
                out / f"{strategy}.pt",
            )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_over_nccl_learn_what_one_gpu_learns(tmp_path: Path, strategy: str) -> None:
    code = (
        "import sys; from gpt2_instruct.distributed import maybe_relaunch; "
        f"sys.exit(maybe_relaunch({WORLD}, sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, __file__, strategy, str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=240, check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend nccl" in done.stderr
    got = torch.load(tmp_path / f"{strategy}.pt", weights_only=True)
    single = _train(dataclasses.replace(RECIPE, device="cuda", fused_optimizer=True), CUDA)
    log = single.state.log
    assert len(got["log"]) == len(log)
    for a, b in zip(log, got["log"], strict=True):
        for key in ("train_loss", "val_loss", "batch_loss"):
            assert b[key] == pytest.approx(a[key], abs=LOSS_ATOL), (key, a["step"])
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(got["model"][name].to(CUDA), tensor, rtol=0, atol=1e-4)


if __name__ == "__main__":  # a torchrun worker: STRATEGY OUT
    _worker(sys.argv[1], Path(sys.argv[2]))
