"""GPT-2 in plain PyTorch, computing exactly what OpenAI's GPT-2 computes.

The layout of Raschka's *Build a Large Language Model (From Scratch)*, chapter 4:
``GPTConfig``, ``LayerNorm``, ``GELU``, ``FeedForward``, ``MultiHeadAttention``,
``TransformerBlock``, ``GPTModel``, then ``KVCache`` for decoding. Where it differs:

* q, k, v come from one fused projection (``qkv``, GPT-2's ``c_attn``); attention is
  ``scaled_dot_product_attention``, so the device's fastest kernel runs.
* The output head is the token embedding itself when ``config.tie_embeddings`` (GPT-2's
  layout), else ``out_head``, a weight of its own (the book's; ``untie_embeddings``).
* ``loss`` and ``token_losses`` are the seam to ``gpt2_instruct.loss``, which runs this
  same forward on the positions that count (``packing=``) and builds the tied weight's
  gradient in one buffer (``tied=``): the forward's only two hooks.
* Linear layers are ``gpt2_instruct.cpu.Linear``: ``nn.Linear`` with the same parameters,
  its products shaped for the CPU's kernels there (``F.linear`` elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from gpt2_instruct.cpu import Linear, attention_backend, linear
from gpt2_instruct.loss import IGNORE_INDEX as IGNORE_INDEX  # re-exported: the model's API
from gpt2_instruct.loss import Packing, TiedGradient, model_loss, model_token_losses


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


class FeedForward(nn.Module):
    """Position-wise MLP, 4x wide."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = GELU()
        self.proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))  # (..., C) -> (..., 4C) -> (..., C)


class MultiHeadAttention(nn.Module):
    """Causal self-attention with q, k, v projected by one fused linear layer."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
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
            qkv = packing.unpack(qkv)  # (B, T, 3C): attention needs whole rows
        B, T, C3 = qkv.shape
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
            for t in qkv.split(C3 // 3, dim=2)
        )
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:  # right padding only ever follows real tokens: causal suffices
            with attention_backend(q):
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v = cache.append(layer, k, v)  # (B, nh, S, hs): every position so far
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C3 // 3)  # (B, T, C)
        if packing is not None:
            y = packing.pack(y)  # (N, C)
        return self.resid_dropout(self.out_proj(y))


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

    The book's ``tok_emb``, ``pos_emb``, ``drop_emb``, ``final_norm`` and ``out_head``;
    its ``trf_blocks`` are ``blocks`` (the name in every checkpoint key). ``out_head`` is
    None when the head is the token embedding (``config.tie_embeddings``).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.context_length, config.n_embd)
        self.drop_emb = nn.Dropout(config.dropout)
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

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        packing: Packing | None = None,
        tied: TiedGradient | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm output (B, T, C) for token ids ``idx`` (B, T); (N, C) when packed.

        ``packing`` and ``tied`` are the loss's hooks (``gpt2_instruct.loss``).
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
        if packing is not None:  # (N,): only the positions that matter
            ids, position_ids = packing.pack(idx), packing.pack(position_ids.expand(idx.shape))
        tokens = self.tok_emb(ids) if tied is None else tied.embed(ids, self.tok_emb.weight)
        x = self.drop_emb(tokens + self.pos_emb(position_ids))  # (B, T, C), or (N, C) packed
        for layer, block in enumerate(self.blocks):
            x = block(x, layer=layer, cache=cache, attn_mask=attn_mask, packing=packing)
        if cache is not None:
            cache.length += T
        return self.final_norm(x)

    def head(self, hidden: torch.Tensor, *, tied: TiedGradient | None = None) -> torch.Tensor:
        """Vocabulary logits (..., V) for final hidden states (..., C); (K, C) with ``tied``."""
        if self.out_head is not None:
            return self.out_head(hidden)
        weight = self.tok_emb.weight
        logits = linear(hidden, weight) if tied is None else tied.project(hidden, weight)
        return logits if self.head_lora is None else logits + self.head_lora(hidden)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T)."""
        return self.head(self.hidden_states(idx))

    def loss(
        self, idx: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean"
    ) -> torch.Tensor:
        """``F.cross_entropy(self(idx).flatten(0, 1), targets.flatten(), reduction=...)``
        over targets that are not ``IGNORE_INDEX``, computed by ``loss.model_loss``."""
        return model_loss(self, idx, targets, reduction=reduction)

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position cross-entropy (B, T), zero where the target is ignored."""
        return model_token_losses(self, idx, targets)

    @property
    def out_head_weight(self) -> torch.Tensor:
        """The output projection's (V, C) weight: ``out_head``'s, or the token embedding."""
        return self.tok_emb.weight if self.out_head is None else self.out_head.weight

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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


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

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys and values (B, nh, T, hs) after the ``length`` written
        so far; return that layer's keys and values up to them (B, nh, length + T, hs)."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

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
