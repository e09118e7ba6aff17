"""The Llama 2 transformer as Code Llama uses it: RMSNorm, SwiGLU, RoPE (theta 1e6), GQA, a KV cache.

References: Touvron et al. 2023 (Llama 2), Rozière et al. 2023 (Code Llama), Meta's `llama/model.py`.
The layout follows gpt-fast: arguments with named presets, one cache object, blocks, attention,
feed-forward, norm, rotary helpers. Every forward takes an explicit start position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as query heads (no GQA)
    vocab_size: int = 32016
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0  # Code Llama's long-context base (Llama 2 used 1e4)
    max_context: int = 16_384
    hidden_dim: int | None = None  # None: derived from multiple_of / ffn_dim_multiplier (Meta's params.json)
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        self.head_dim = self.dim // self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> ModelArgs:
        if name not in PRESETS:
            raise ValueError(f"unknown model shape {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    # Llama's rule: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`.
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# The published Code Llama `params.json` files.
PRESETS: dict[str, dict] = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32016),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32016),
    "34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000, ffn_dim_multiplier=1.0),
}


class KVCache(nn.Module):
    """Keys and values of every layer for one batch of sequences, grown on demand.

    Capacity grows geometrically instead of being allocated for `max_context` up front, so a
    100k-token configuration costs nothing until a prompt actually gets that long.
    """

    def __init__(self, args: ModelArgs, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.args = args
        self.batch = batch
        self.length = 0  # positions [0, length) hold valid entries
        shape = (args.n_layers, batch, args.n_kv_heads, 0, args.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        new_capacity = max(total, min(2 * self.capacity, self.args.max_context), 256)
        # Zeros, not garbage: a static decode step (fast.py) attends over a whole span with the
        # unwritten tail masked, and a masked NaN would still poison the softmax.
        grown_k = self.k.new_zeros((*self.k.shape[:3], new_capacity, self.k.shape[4]))
        grown_v = torch.zeros_like(grown_k)
        grown_k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
        grown_v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v = grown_k, grown_v

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (prefix reuse keeps the shared head)."""
        self.length = min(self.length, length)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # k, v: [B, Hkv, T, D]; returns every key/value up to the end of this chunk.
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def new_cache(self, batch: int = 1) -> KVCache:
        weight = self.tok_embeddings.weight
        return KVCache(self.args, batch, weight.device, weight.dtype)

    def forward(
        self, tokens: torch.Tensor, start: int = 0, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 → logits [B, T, V] (or [B, 1, V] with last_only)."""
        seq_len = tokens.shape[1]
        end = start + seq_len
        check_positions(self.args, start, end, cache)
        if cache is not None:
            cache.reserve(end)
        cos, sin = rope_tables(self.args, start, end, tokens.device)
        mask = causal_mask(start, seq_len, tokens.device)
        h = self.tok_embeddings(tokens)
        for index, layer in enumerate(self.layers):
            h = layer(h, index, start, cos, sin, mask, cache)
        if cache is not None:
            cache.length = end
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()


def check_positions(args: ModelArgs, start: int, end: int, cache: KVCache | None) -> None:
    """Refuse positions start..end-1 past the context, or a chunk that skips what the cache holds."""
    if end > args.max_context:
        raise ValueError(f"{end} tokens exceed the model's context of {args.max_context}")
    if cache is not None and start > cache.length:
        raise ValueError(f"cache holds {cache.length} positions, cannot continue at {start}")


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, layer, start, cos, sin, mask, cache):
        h = x + self.attention(self.attention_norm(x), layer, start, cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, layer, start, cos, sin, mask, cache):
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        if mask is None:
            # A fresh prompt (start 0) is plain causal; a single decode step sees everything.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq_len > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as Meta's reference does.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def causal_mask(start: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [T, start+T] mask for a chunk continuing a cached sequence; None where SDPA's own flags do."""
    if start == 0 or seq_len == 1:
        return None
    rows = torch.arange(start, start + seq_len, device=device)[:, None]
    cols = torch.arange(start + seq_len, device=device)[None, :]
    return cols <= rows


def rope_tables(args: ModelArgs, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos/sin [T, D/2] for positions start..end-1, computed per call (no table sized for max_context)."""
    half = args.head_dim // 2
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float64) / half))
    positions = torch.arange(start, end, device=device, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Meta's layout: dimensions (2i, 2i+1) form one complex number. x: [B, T, H, D].
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
