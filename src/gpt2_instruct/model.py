"""GPT-2 in plain PyTorch, computing exactly what OpenAI's GPT-2 computes.

Pre-LayerNorm transformer blocks with learned position embeddings, fused q/k/v
projection, tanh-approximated GELU and an output head that is either tied to the
token embedding (GPT-2's own layout) or a separate weight (the reference's
``out_head``, a trained copy of ``wte``). Attention goes through
``scaled_dot_product_attention`` so the fastest kernel of the device is used; the
optional key/value cache is pre-allocated once per generation call and written in place.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

IGNORE_INDEX = -100


def _settle_vector_math() -> None:
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
    """
    torch.exp(torch.zeros(1))


_settle_vector_math()


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 model; field names follow the paper's notation."""

    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True  # False: a separate output head (``out_head``)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


# The four published GPT-2 sizes (Radford et al., 2019; Hugging Face names).
GPT2_CONFIGS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPTConfig(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPTConfig(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPTConfig(n_embd=1600, n_layer=48, n_head=25),
}


class KVCache:
    """Pre-allocated keys and values of every layer for incremental decoding.

    ``key_valid`` marks which cache slots hold real tokens (left padding in a
    batch of prompts of different lengths is masked out by position).
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_length: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if max_length > config.context_length:
            raise ValueError(
                f"KV cache of {max_length} positions exceeds the context length "
                f"{config.context_length}"
            )
        shape = (config.n_layer, batch_size, config.n_head, max_length, config.head_dim)
        # Not zeroed: a slot is written before attention reads it, and answers that stop
        # early never touch (or page in) the rest of the cache.
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch_size, max_length, device=device, dtype=torch.bool)
        self.length = 0  # positions written so far (same for every row)

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep the rows where ``keep`` (B,) is true, in order, as the first rows of the cache.

        Moves only the positions written so far, within the same buffers: no new cache.
        """
        index = keep.nonzero().squeeze(1)
        n, written = index.numel(), self.length
        for buffer in (self.keys, self.values):
            buffer[:, :n, :, :written] = buffer[:, index, :, :written]
        self.keys, self.values = self.keys[:, :n], self.values[:, :n]
        self.key_valid = self.key_valid[keep]


class Packing:
    """The positions of a (B, T) batch that matter, for computing on those alone.

    With causal attention a position only affects later ones, so every position
    after a row's last counted target can be dropped without changing any
    counted logit: right padding costs nothing. Between blocks activations are
    packed as (N, C); attention unpacks them to (B, T, ...) and packs its output.
    """

    def __init__(self, keep: torch.Tensor) -> None:
        self.batch, self.width = keep.shape
        self.full = bool(keep.all())
        self.index = None if self.full else keep.flatten().nonzero().squeeze(1)  # (N,)

    @classmethod
    def for_targets(cls, targets: torch.Tensor) -> Packing:
        """Keep each row up to and including its last target that is not ignored."""
        T = targets.shape[1]
        steps = torch.arange(1, T + 1, device=targets.device)
        needed = torch.where(targets != IGNORE_INDEX, steps, 0).amax(dim=1)  # (B,)
        return cls(steps[None, :] <= needed[:, None])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        flat = x.flatten(0, 1)
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (B, T, D), zeros where positions were dropped."""
        if self.index is None:
            return x.view(self.batch, self.width, -1)
        out = x.new_zeros(self.batch * self.width, x.shape[-1])
        return out.index_copy(0, self.index, x).view(self.batch, self.width, -1)


class _CrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, targets)`` (mean or sum) whose backward needs no new memory.

    ``F.cross_entropy`` keeps the (K, V) log-probabilities for its backward, which then
    allocates two more (K, V) tensors (the NLL gradient, then the logits' gradient):
    with GPT-2's 50,257 classes that is ~100 MB each for a batch's ~500 counted
    tokens, at the moment every block's activations are held. Here the forward is the
    same two calls (the same loss, bit for bit) and the backward turns the kept
    log-probabilities into the logits' gradient in place, by the formula of torch's
    own kernels: ``softmax * g / K``, less ``g / K`` at each target (``g / 1`` for a
    sum). Saves 2 x (K, V) at the peak of fine-tuning and two passes over them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        reduction: str,
    ) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)  # (K, V)
        ctx.save_for_backward(log_probs, targets)
        ctx.reduction = reduction
        ctx.spent = False
        return F.nll_loss(log_probs, targets, reduction=reduction)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        if ctx.spent:
            raise RuntimeError(
                "GPTModel.loss: a second backward through the same loss is not supported "
                "(the first turned its saved log-probabilities into the gradient); "
                "compute the loss again"
            )
        ctx.spent = True
        log_probs, targets = ctx.saved_tensors
        per_target = grad_loss / targets.numel() if ctx.reduction == "mean" else grad_loss
        grad = log_probs.exp_().mul_(per_target)  # (K, V), in the log-probabilities' memory
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, targets] -= per_target
        return grad, None, None


class _TiedGradient:
    """The tied token-embedding / output-head weight's gradient for one loss, in one buffer.

    Left to autograd, the embedding's backward fills a dense (V, C) tensor of zeros
    to scatter its few rows into, and the engine then adds it to the head's (V, C)
    gradient into a third (V, C) tensor: ~200 MB each for gpt2-medium, every step.
    Here the head's backward leaves its gradient in this ledger and the embedding's
    backward, which autograd always runs later (the head's input depends on the
    embedding), adds its rows into it in place and hands it to autograd as the
    weight's whole gradient. Same sum, grouped differently (to rounding).
    """

    def __init__(self) -> None:
        self.head: torch.Tensor | None = None

    def add(self, grad: torch.Tensor) -> None:
        self.head = grad if self.head is None else self.head.add_(grad)

    def take(self) -> torch.Tensor | None:
        grad, self.head = self.head, None
        return grad


class _TiedHead(torch.autograd.Function):
    """``hidden @ weight.T`` whose weight gradient goes to a ``_TiedGradient``, not autograd.

    Under autocast both operands are cast as autocast casts them for ``F.linear``, and
    the casts are what is kept for backward, as autograd keeps them. bf16 products on
    the CPU get zero rows up to a multiple of 32, as ``linear`` gives them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tied: _TiedGradient,
    ) -> torch.Tensor:
        ctx.dtypes = (hidden.dtype, weight.dtype)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        rows = hidden.shape[0]
        if _pads_rows(rows, hidden, weight):
            hidden = _pad_rows(hidden)  # (K', C): shapes that repeat, as in ``linear``
        ctx.save_for_backward(hidden, weight)
        ctx.tied = tied
        ctx.rows = rows
        return (hidden @ weight.t())[:rows]  # (K, V)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_logits: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None]:
        hidden, weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_logits = grad_logits.to(weight.dtype)
        if hidden.shape[0] != ctx.rows:  # padded rows: zero gradient
            grad_logits = _pad_rows(grad_logits)  # (K', V)
        if ctx.needs_input_grad[1]:
            ctx.tied.add((grad_logits.t() @ hidden).to(weight_dtype))  # (V, C)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ weight)[: ctx.rows].to(hidden_dtype)  # (K, C)
        return grad_hidden, None, None


class _TiedEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward adds its rows into the head's gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        ids: torch.Tensor,
        weight: torch.Tensor,
        tied: _TiedGradient,
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        ctx.tied = tied
        return F.embedding(ids, weight)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[None, torch.Tensor | None, None]:
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (ids,) = ctx.saved_tensors
        grad = ctx.tied.take()
        if grad is None:  # the head took no part in this loss
            grad = grad_out.new_zeros(ctx.weight_shape)
        width = ctx.weight_shape[1]
        grad.index_add_(0, ids.flatten(), grad_out.reshape(-1, width).to(grad.dtype))
        return None, grad, None


# Row counts at which a CPU product with grad mode off runs as W @ x^T (see ``linear``).
_WEIGHT_FIRST_ROWS = range(8, 33)
# bf16 products on the CPU have their row count rounded up to a multiple of this
# (see ``linear``).
_BF16_ROW_MULTIPLE = 32


def _pads_rows(rows: int, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of ``rows`` rows of ``x`` by ``weight`` gets zero rows (``linear``):
    over 32 rows and no multiple of 32, in bf16 (autocast or dtype) on the CPU."""
    if rows <= _BF16_ROW_MULTIPLE or rows % _BF16_ROW_MULTIPLE == 0 or x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == weight.dtype == torch.bfloat16


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
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
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if rows in _WEIGHT_FIRST_ROWS and not torch.is_grad_enabled():
        columns = x.reshape(rows, x.shape[-1]).t()  # (K, M)
        out = (  # (N, M)
            torch.mm(weight, columns)
            if bias is None
            else torch.addmm(bias[:, None], weight, columns)
        )
        return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])  # (..., N)
    if _pads_rows(rows, x, weight):
        padded = _pad_rows(x.reshape(rows, x.shape[-1]).to(torch.bfloat16))  # (M', K)
        out = F.linear(padded, weight, bias)[:rows]  # (M, N)
        return out.view(*x.shape[:-1], weight.shape[0])  # (..., N)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    """LayerNorm with GPT-2's epsilon; parameters named like the paper (weight, bias)."""

    def __init__(self, n_embd: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GELU(nn.Module):
    """GPT-2's GELU: the tanh approximation (Hugging Face's ``gelu_new``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def _attention_backend(q: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """SDPA's math kernel for bf16 training on CPU, the default choice otherwise.

    On CPU the flash kernel's bf16 backward is ~3x slower than the math kernel's at
    GPT-2 fine-tuning lengths (8 x 12 heads x 70 positions, forward + backward: 13.4 ms
    against 4.3 ms; ``bench/attention.py``). In fp32 flash is the faster (3.8 against
    5.3 ms) and stays, so fp32 results do not move. Inference keeps flash too.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class MultiHeadAttention(nn.Module):
    """Causal self-attention with q, k, v projected by one fused linear layer."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.qkv = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in that order
        self.out_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        layer: int = 0,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, T, 3C), or (N, 3C) when packed
        if packing is not None:
            qkv = packing.unpack(qkv)  # (B, T, 3C): attention needs rows
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0

        if cache is None:
            # Right padding only ever follows real tokens, so the causal mask suffices.
            with _attention_backend(q):
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            start, end = cache.length, cache.length + T
            cache.keys[layer, :, :, start:end] = k
            cache.values[layer, :, :, start:end] = v
            k = cache.keys[layer, :, :, :end]  # (B, nh, end, hs)
            v = cache.values[layer, :, :, :end]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        if packing is not None:
            y = packing.pack(y)  # (N, C)
        return self.resid_dropout(self.out_proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP, 4x wide."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = GELU()
        self.proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(config.n_embd, config.layer_norm_eps)
        self.attn = MultiHeadAttention(config)
        self.norm2 = LayerNorm(config.n_embd, config.layer_norm_eps)
        self.ff = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        *,
        layer: int = 0,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(
            self.norm1(x), layer=layer, cache=cache, attn_mask=attn_mask, packing=packing
        )
        return x + self.ff(self.norm2(x))


class GPTModel(nn.Module):
    """GPT-2: embeddings, ``n_layer`` transformer blocks, final LayerNorm, output head.

    The head is the token embedding itself when ``config.tie_embeddings`` (GPT-2's
    layout), else ``out_head``, a weight of its own (the reference's layout; see
    ``untie_embeddings``).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.context_length, config.n_embd)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.final_norm = LayerNorm(config.n_embd, config.layer_norm_eps)
        self.out_head: nn.Module | None = (
            None if config.tie_embeddings else Linear(config.n_embd, config.vocab_size, bias=False)
        )
        # The tied head's adapter: set by lora.apply_lora(targets=[..., "head"]).
        self.head_lora: nn.Module | None = None
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at initialisation.
        for name, param in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "ff.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def out_head_weight(self) -> torch.Tensor:
        """The output projection's (V, C) weight: ``out_head``'s, or the token embedding."""
        if self.out_head is None:
            return self.tok_emb.weight
        return self.out_head.weight

    @torch.no_grad()
    def untie_embeddings(self) -> None:
        """Give the output head a weight of its own, a copy of the token embedding.

        This is the reference's ``load_weights_into_gpt``: its ``out_head`` gets a new
        ``nn.Parameter`` initialised from ``wte``, and the two are then trained apart.
        The logits do not change; what is learned does. A model already untied is left
        as it is.
        """
        if self.out_head is not None:
            return
        if self.head_lora is not None:
            raise ValueError("untie the embeddings before adding a LoRA 'head' adapter")
        weight = self.tok_emb.weight
        head = Linear(
            self.config.n_embd, self.config.vocab_size, bias=False,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        head.weight.copy_(weight)
        head.weight.requires_grad_(weight.requires_grad)
        self.out_head = head
        self.config = replace(self.config, tie_embeddings=False)

    def head(self, hidden: torch.Tensor, *, tied: _TiedGradient | None = None) -> torch.Tensor:
        """Vocabulary logits (..., V) for final hidden states (..., C); (K, C) with ``tied``."""
        if self.out_head is not None:
            return self.out_head(hidden)
        if tied is None:
            logits = linear(hidden, self.tok_emb.weight)
        else:
            logits = _TiedHead.apply(hidden, self.tok_emb.weight, tied)
        return logits if self.head_lora is None else logits + self.head_lora(hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        packing: Packing | None = None,
        tied: _TiedGradient | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm output (B, T, C) for token ids ``idx`` (B, T); (N, C) when packed.

        ``tied``: the ledger that ``head(..., tied=)`` of the same loss shares (``loss``).
        """
        T = idx.shape[1]
        offset = cache.length if cache is not None else 0
        if offset + T > self.config.context_length:
            raise ValueError(
                f"sequence of {offset + T} tokens exceeds the context length "
                f"{self.config.context_length}"
            )
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=idx.device)  # (T,)
        ids = idx
        if packing is not None:  # (N, C): only the positions that matter
            ids, position_ids = packing.pack(idx), packing.pack(position_ids.expand(idx.shape))
        if tied is None:
            tokens = self.tok_emb(ids)
        else:
            tokens = _TiedEmbedding.apply(ids, self.tok_emb.weight, tied)
        x = tokens + self.pos_emb(position_ids)  # (B, T, C), or (N, C) when packed
        x = self.emb_dropout(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, layer=layer, cache=cache, attn_mask=attn_mask, packing=packing)
        if cache is not None:
            cache.length += T
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T)."""
        return self.head(self.hidden_states(idx))

    def loss(
        self, idx: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean"
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over targets that are not ``IGNORE_INDEX``.

        Equals ``F.cross_entropy(self(idx).flatten(0, 1), targets.flatten())`` but
        skips the positions after each row's last counted target (right padding:
        see ``Packing``) and projects onto the vocabulary only where a target
        counts, the largest matrix product of all. With gradients on, the loss's
        backward reuses the log-probabilities' memory (``_CrossEntropy``).
        """
        logits, counted, _, _ = self._counted_logits(idx, targets)
        if reduction not in ("mean", "sum") or not torch.is_grad_enabled():
            return F.cross_entropy(logits, counted, reduction=reduction)
        return _CrossEntropy.apply(logits, counted, reduction)

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position cross-entropy (B, T), zero where the target is ignored."""
        logits, counted, packing, keep = self._counted_logits(idx, targets)
        losses = torch.zeros(keep.shape[0], dtype=torch.float32, device=targets.device)
        losses[keep] = F.cross_entropy(logits, counted, reduction="none")
        return packing.unpack(losses[:, None]).view(targets.shape)

    def _counted_logits(
        self, idx: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Packing, torch.Tensor]:
        """fp32 logits (K, V) and targets (K,) of the counted positions, the packing and the
        mask (N,) of counted positions among the packed ones."""
        packing = Packing.for_targets(targets)
        tied = None
        if self.out_head is None and torch.is_grad_enabled() and self.tok_emb.weight.requires_grad:
            tied = _TiedGradient()  # the tied weight's gradient built in one buffer
        hidden = self.hidden_states(idx, packing=packing, tied=tied)  # (N, C)
        packed_targets = packing.pack(targets)  # (N,)
        keep = packed_targets != IGNORE_INDEX
        logits = self.head(hidden[keep], tied=tied)  # (K, V): the vocabulary only where it counts
        return logits.float(), packed_targets[keep], packing, keep
