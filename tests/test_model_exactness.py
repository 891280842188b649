"""Our GPTModel must compute what Hugging Face's GPT2LMHeadModel computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2_instruct.cpu import linear
from gpt2_instruct.model import GPT2_CONFIGS, GPTConfig, GPTModel
from gpt2_instruct.weights import load_model, save_model

transformers = pytest.importorskip("transformers")


def _hf_checkpoint(tmp_path: Path, **config: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**config)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    # Random init leaves biases and LayerNorms at 0/1; perturb them so the mapping is tested.
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(tmp_path)
    return tmp_path, hf


TINY = {"vocab_size": 97, "n_positions": 32, "n_embd": 24, "n_layer": 3, "n_head": 4}


def test_tiny_logits_match_hf(tmp_path: Path) -> None:
    path, hf = _hf_checkpoint(tmp_path, **TINY)
    ours = load_model(path).eval()
    idx = torch.randint(0, 97, (3, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_gpt2_small_shape_logits_match_hf(tmp_path: Path) -> None:
    small = GPT2_CONFIGS["gpt2"]
    path, hf = _hf_checkpoint(
        tmp_path, n_embd=small.n_embd, n_layer=small.n_layer, n_head=small.n_head
    )
    ours = load_model(path).eval()
    assert ours.num_parameters() == 124_439_808  # GPT-2 small, tied head counted once
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert (got - expected).abs().max().item() <= 1e-4


def test_loss_matches_full_cross_entropy(tmp_path: Path) -> None:
    path, _ = _hf_checkpoint(tmp_path, **TINY)
    ours = load_model(path).eval()
    idx = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, 10:] = -100  # right padding: positions 10.. are never computed
    targets[1, :3] = -100  # a masked prompt: computed (context), not counted
    targets[1, 7] = -100
    targets[2, :] = -100  # a row with nothing to count is dropped whole
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(ours(idx).flatten(0, 1), targets.flatten())
        fast = ours.loss(idx, targets)
        per_token = ours.token_losses(idx, targets)
    torch.testing.assert_close(fast, full)
    torch.testing.assert_close(per_token.sum() / (targets != -100).sum(), full)
    assert per_token[0, 10:].eq(0).all() and per_token[2].eq(0).all()
    unpadded = torch.full_like(targets, 5)  # nothing to skip: the unpacked path
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(ours(idx).flatten(0, 1), unpadded.flatten())
        torch.testing.assert_close(ours.loss(idx, unpadded), full)


def test_saved_model_loads_in_hf_with_same_logits(tmp_path: Path) -> None:
    path, _ = _hf_checkpoint(tmp_path / "src", **TINY)
    ours = load_model(path).eval()
    save_model(ours, tmp_path / "out")
    reloaded_hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    reloaded_ours = load_model(tmp_path / "out").eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        base = ours(idx)
        assert (reloaded_hf(idx).logits - base).abs().max().item() <= 1e-4
        assert torch.equal(reloaded_ours(idx), base)


def test_random_model_round_trips(tmp_path: Path) -> None:
    from gpt2_instruct.model import GPTConfig

    torch.manual_seed(1)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=16, n_embd=8, n_layer=2, n_head=2))
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_bf16_training_on_cpu_takes_the_math_attention_kernel_with_the_same_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 + CPU + gradients: SDPA's math kernel (a faster backward there), same numbers."""
    import contextlib

    from gpt2_instruct import model as model_module

    torch.manual_seed(0)
    attn = model_module.MultiHeadAttention(GPTConfig(n_embd=64, n_head=4, n_layer=1))
    x = torch.randn(2, 40, 64)

    def qkv_grad(precision: str) -> torch.Tensor:
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            attn(x).float().square().sum().backward()
        return attn.qkv.weight.grad.clone()

    exact, ours = qkv_grad("fp32"), qkv_grad("bf16")
    monkeypatch.setattr(model_module, "attention_backend", lambda q: contextlib.nullcontext())
    default = qkv_grad("bf16")  # SDPA's own choice: the flash kernel
    assert not torch.equal(ours, default)  # another kernel ran ...
    for bf16 in (ours, default):  # ... and both are bf16 roundings of the same gradient
        torch.testing.assert_close(bf16, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())


class _RecordProducts(torch.overrides.TorchFunctionMode):
    """Which product functions run, and with which left operand."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in ("linear", "addmm", "mm"):
            self.calls.append((name, args[1] if name == "addmm" else args[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_multiplies_weight_first_at_8_to_32_rows_with_grad_mode_off(
    dtype: torch.dtype, with_bias: bool
) -> None:
    torch.manual_seed(0)
    weight = torch.randn(300, 96, dtype=dtype)
    bias = torch.randn(300, dtype=dtype) if with_bias else None
    for rows in (8, 16, 32):
        x = torch.randn(rows // 4, 4, 96, dtype=dtype)  # (B, T, K): a batch of 4 positions
        with torch.no_grad(), _RecordProducts() as record:
            out = linear(x, weight, bias)
        assert [name for name, _ in record.calls] == ["addmm" if with_bias else "mm"]
        assert record.calls[0][1] is weight  # W @ x^T: the weight on the left
        assert out.shape == (rows // 4, 4, 300) and out.is_contiguous()
        expected = torch.nn.functional.linear(x, weight, bias)
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
        torch.testing.assert_close(out, expected, **tolerance)


def test_fp32_linear_is_f_linear_itself_at_other_row_counts_or_with_grad_mode_on() -> None:
    torch.manual_seed(0)
    weight = torch.randn(300, 96, requires_grad=True)
    bias = torch.randn(300)
    few, many, usual = torch.randn(7, 96), torch.randn(33, 96), torch.randn(32, 96)
    for x, grad in [(few, False), (many, False), (usual, True)]:
        with torch.set_grad_enabled(grad), _RecordProducts() as record:
            out = linear(x, weight, bias)
        assert [name for name, _ in record.calls] == ["linear"], (x.shape, grad)
        assert torch.equal(out, torch.nn.functional.linear(x, weight, bias))
        assert out.requires_grad == grad
    out.square().sum().backward()  # autograd goes through F.linear's own backward
    assert weight.grad is not None and weight.grad.abs().sum() > 0


class _RecordProductShapes(TorchDispatchMode):
    """The operand shapes of every matrix product aten runs (backward ones too), by dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[torch.dtype, list[tuple[int, ...]]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2:]
            self.shapes.setdefault(a.dtype, []).extend([tuple(a.shape), tuple(b.shape)])
        return func(*args, **(kwargs or {}))


def _ragged_batch() -> tuple[GPTModel, torch.Tensor, torch.Tensor]:
    """A tiny model and a batch of 23 + 17 + 11 = 51 counted positions (no multiple of 32)."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=100, context_length=64, n_embd=48, n_layer=2, n_head=4))
    x, y = torch.randint(0, 100, (3, 23)), torch.randint(0, 100, (3, 23))
    y[1, 17:] = y[2, 11:] = -100
    return model, x, y


def test_bf16_products_on_cpu_run_on_row_counts_rounded_up_to_32() -> None:
    """oneDNN compiles a kernel per bf16 shape: training, evaluation and LoRA products
    (forward and backward, the tied head too) see 64 rows for the batch's 51."""
    from gpt2_instruct.lora import apply_lora

    model, x, y = _ragged_batch()
    model_dims = {48, 3 * 48, 4 * 48, 100}
    record = _RecordProductShapes()
    with record:
        model.loss(x, y).backward()  # fp32: the products see the 51 rows as they are
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.loss(x, y).backward()
            with torch.no_grad():
                model.loss(x, y)
            apply_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=["attn_qkv", "head"])
            model.loss(x, y).backward()
    fp32_dims = {dim for shape in record.shapes[torch.float32] for dim in shape}
    assert 51 in fp32_dims
    bf16_shapes = record.shapes[torch.bfloat16]
    assert len(bf16_shapes) > 2 * 3 * (2 * 4 + 1)  # 3 passes of 2 blocks' 4 products + head
    bf16_dims = {dim for shape in bf16_shapes for dim in shape}
    assert 64 in bf16_dims
    assert {dim for dim in bf16_dims if dim % 32} <= model_dims | {2}, bf16_shapes


def test_bf16_rows_rounded_up_give_the_same_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The zero rows are sliced off the result and add nothing to a weight's gradient."""
    from gpt2_instruct import cpu

    model, x, y = _ragged_batch()

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(x, y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_loss, padded = loss_and_grads()
    monkeypatch.setattr(cpu, "_BF16_ROW_MULTIPLE", 1)  # every row count is a multiple
    loss, grads = loss_and_grads()
    torch.testing.assert_close(padded_loss, loss)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        scale = grad.abs().max().item()
        torch.testing.assert_close(padded[name], grad, rtol=1e-2, atol=1e-3 * scale, msg=name)


_FIRST_VECTOR_MATH = """
import torch
from gpt2_instruct import devices
devices.configure("cpu")  # as every stage's frame does: settles MKL's vector math
torch.set_num_threads(2)
torch.randn(448, 768) @ torch.randn(768, 3072)  # MKL's threaded product first
x = torch.linspace(-20, 0, 4_000_000)
print(((torch.exp(x) - torch.exp(x.double()).float()).abs() / torch.exp(x.double())).max().item())
"""


def test_vector_math_is_as_accurate_in_every_process() -> None:
    """Without ``devices.configure``'s ``cpu.settle_vector_math`` the first two-thread ``exp``
    after an MKL product was up to 1.5e-4 off in about 1 process in 8 here, for the life of
    the process (this test then fails with probability ~0.75); with it, every process gets
    exp to the last bit."""
    import subprocess
    import sys

    errors = [
        float(
            subprocess.run(
                [sys.executable, "-c", _FIRST_VECTOR_MATH],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for _ in range(10)
    ]
    assert max(errors) < 1e-6, errors


def test_untied_checkpoints_match_hf_both_ways(tmp_path: Path) -> None:
    """The reference's layout: HF's untied GPT-2 loads in ours and ours in HF, same logits."""
    path, hf = _hf_checkpoint(tmp_path / "src", **TINY, tie_word_embeddings=False)
    with torch.no_grad():
        hf.lm_head.weight.add_(torch.randn_like(hf.lm_head.weight) * 0.05)
    hf.save_pretrained(path)
    ours = load_model(path).eval()
    assert not ours.config.tie_embeddings
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        expected = hf(idx).logits
        assert (ours(idx) - expected).abs().max().item() <= 1e-4
    save_model(ours, tmp_path / "out")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert again.lm_head.weight.data_ptr() != again.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(again.lm_head.weight, hf.lm_head.weight)
        assert (again(idx).logits - expected).abs().max().item() <= 1e-4
