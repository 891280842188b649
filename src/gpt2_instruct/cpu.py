"""CPU-only shaping of GPT-2's work: the same numbers, arranged for the CPU's kernels.

Nothing here changes what the model computes (values are the plain ops' up to rounding);
each piece makes the CPU faster or steadier, with the measurement in its docstring:

* ``settle_vector_math``: MKL's vector math picks an accurate code path in every process.
* ``linear`` / ``Linear``: products run weight-first at decoding's row counts, and bf16
  products see row counts that repeat, so oneDNN stops compiling a kernel per batch.
* ``attention_backend``: SDPA's math kernel for bf16 training, where its backward is faster.

Whether a tensor gets the CPU's shaping is the device seam's choice
(``devices.shapes_products``): on other devices ``linear`` is ``F.linear`` and
``attention_backend`` chooses nothing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2_instruct.devices import shapes_products

# Row counts at which a CPU product with grad mode off runs as W @ x^T (see ``linear``).
_WEIGHT_FIRST_ROWS = range(8, 33)
# bf16 products on the CPU have their row count rounded up to a multiple of this
# (see ``linear``).
_BF16_ROW_MULTIPLE = 32


def settle_vector_math() -> None:
    """Make MKL's vector math pick its code path on this thread alone, before any parallel use.

    On the CPU, ``torch.exp``, ``torch.tanh`` and friends call MKL's vector math
    library (VML), which chooses its implementation on first use. When that first
    use is split across two threads after MKL has run a threaded matrix product, one
    thread can be left on a less accurate path for the rest of the process: relative
    errors of 1.5e-4 instead of 1.2e-7 for ``exp`` (up to 9e-5 for ``tanh``) on the
    half of the tensor that thread computes. On the 2-vCPU Xeon measured that hit 9
    of 70 processes running a bare ``mm`` then ``exp`` (8 of 60 with ``tanh``), and
    the fine-tuning step itself (``loss``'s backward takes ``exp_`` of the
    log-probabilities): about 1 process in 7 (bf16) and 1 in 16 (fp32) got other
    gradients from the same weights and batch, so the same recipe did not repeat to
    the bit. One call on one element, on this thread, settles the choice: none of
    130 such bare runs and none of 68 fine-tuning processes differed since.

    The device seam (``devices.configure``) calls it for every CPU process, before its
    first product; calling it again is harmless.
    """
    torch.exp(torch.zeros(1))


def pads_bf16_rows(rows: int, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of ``rows`` rows of ``x`` by ``weight`` gets zero rows (``linear``):
    over 32 rows and no multiple of 32, in bf16 (autocast or dtype) on the CPU."""
    if rows <= _BF16_ROW_MULTIPLE or rows % _BF16_ROW_MULTIPLE == 0:
        return False
    if not shapes_products(x.device):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == weight.dtype == torch.bfloat16


def pad_bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """(M, K) -> (M', K): zero rows appended up to a multiple of ``_BF16_ROW_MULTIPLE``."""
    extra = -x.shape[0] % _BF16_ROW_MULTIPLE
    return x if extra == 0 else torch.cat([x, x.new_zeros(extra, x.shape[1])])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, shaped for the CPU's fastest kernels.

    * **Grad mode off, 8..32 rows: W @ x^T.** Decoding multiplies a batch of a few
      rows by every weight. At 8 to 32 rows MKL (fp32) and oneDNN (bf16) run that
      product with the weight as the left operand up to 1.8x faster on the 2-vCPU Xeon
      measured (gpt2-medium's blocks 1.2-1.8x, gpt2's 1.0-1.4x; gpt2-medium decodes
      1.2x faster: ``bench/README.md``). Below 8 rows, and from 33 on for gpt2's
      shapes (49 on for gpt2-medium's), that order is slower. The result is copied
      back to row-major: left as a transposed view, it slows the attention and
      element-wise work after it by as much as it saves.
    * **bf16, over 32 rows: zero rows appended up to a multiple of 32.** oneDNN
      compiles a kernel for every new shape of a bf16 product (~5 ms each here) and
      keeps it, with its code pages, in a cache of 1,024. Training and evaluation
      batches have a new number of real positions nearly every step, so without this
      every step compiled ~12 kernels and the process grew by ~25 MB a step; rounded,
      the shapes repeat after the first few steps. gpt2 bf16 steps 0.74-0.78 ->
      0.62-0.64 s, gpt2-medium 1.88 -> 1.69 s; the gpt2-medium bf16 finetune stage
      peaks at 6.49 GiB of RSS instead of 7.37 (``bench/README.md``). The zero rows
      add nothing to a weight's gradient and are sliced off the result; autograd
      carries the slice, so gradients flow as before.

    The values are F.linear's up to rounding (sums accumulated in another order).
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not shapes_products(x.device):
        return F.linear(x, weight, bias)
    if rows in _WEIGHT_FIRST_ROWS and not torch.is_grad_enabled():
        columns = x.reshape(rows, x.shape[-1]).t()  # (K, M)
        out = (  # (N, M)
            torch.mm(weight, columns)
            if bias is None
            else torch.addmm(bias[:, None], weight, columns)
        )
        return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])  # (..., N)
    if pads_bf16_rows(rows, x, weight):
        padded = pad_bf16_rows(x.reshape(rows, x.shape[-1]).to(torch.bfloat16))  # (M', K)
        out = F.linear(padded, weight, bias)[:rows]  # (M, N)
        return out.view(*x.shape[:-1], weight.shape[0])  # (..., N)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def attention_backend(q: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """SDPA's math kernel for bf16 training on CPU, the default choice otherwise.

    On CPU the flash kernel's bf16 backward is ~3x slower than the math kernel's at
    GPT-2 fine-tuning lengths (8 x 12 heads x 70 positions, forward + backward: 13.4 ms
    against 4.3 ms; ``bench/attention.py``). In fp32 flash is the faster (3.8 against
    5.3 ms) and stays, so fp32 results do not move. Inference keeps flash too.
    """
    if shapes_products(q.device) and q.dtype == torch.bfloat16 and q.requires_grad:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()
