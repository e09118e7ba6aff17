"""Inference fast paths over a loaded `Transformer`: fused projections, a cached RoPE table, int8 weights,
chunked prefill, and a static-shape decode step that CUDA graphs (and optionally torch.compile) replay.

`FastTransformer.forward` has `Transformer.forward`'s contract, so the plain model stays the reference
the tests compare against. The decoders here drive generation one token at a time; on a GPU the
greedy one keeps the next step queued before it reads a token back, so the host never waits for
the device between tokens.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from . import decode_kernels
from .model import KVCache, ModelArgs, Transformer, check_positions

log = logging.getLogger(__name__)

PREFILL_CHUNK = 8192  # longer prompts run in chunks: bounded activations, and no [T, S] mask ever built
MIN_BUCKET = 256  # the smallest key span a captured decode step attends over
MAX_GRAPHS = 48  # captured decode steps kept (slots x buckets); older ones are dropped first


# -- int8 weight-only quantization ----------------------------------------------------------------


class Int8Linear(nn.Module):
    """A bias-free linear layer holding int8 weights and one scale per output row (symmetric)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out], the activations' dtype

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        weight, scales = quantize_rows(linear.weight.detach())
        return cls(weight, scales)

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale applies after the sum: compiled, the int8 → x.dtype conversion fuses into the matmul.
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: w ≈ q * scale with q in [-127, 127]."""
    w32 = weight.float()
    scales = w32.abs().amax(dim=1).clamp(min=1e-8) / 127
    q = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


def projections(model: Transformer) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) of every float projection int8 replaces: attention, feed-forward, output.

    Embeddings and norms stay in the model's dtype: a step reads one embedding row, so only the
    matrices it reads whole are worth halving.
    """
    found: list[tuple[nn.Module, str]] = []
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            found += [
                (parent, name) for name, child in parent.named_children() if isinstance(child, nn.Linear)
            ]
    if isinstance(model.output, nn.Linear):
        found.append((model, "output"))
    return found


@torch.no_grad()
def quantize_int8(model: Transformer) -> Transformer:
    """Replace every projection still in float (see `projections`) by an `Int8Linear`, in place."""
    for parent, name in projections(model):
        setattr(parent, name, Int8Linear.quantize(getattr(parent, name)))
    return model


def int8_parameters(model: nn.Module) -> int:
    """Weights held as int8 buffers, which `model.parameters()` does not list."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))


def dequantize(model: Transformer) -> Transformer:
    """The float model an int8 model stands for (its own reference in the tests), in place."""
    for module in [model, *model.layers, *(m for layer in model.layers for m in layer.children())]:
        for name, child in list(module.named_children()):
            if isinstance(child, Int8Linear):
                linear = nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=False)
                linear.weight = nn.Parameter(child.dequantized(), requires_grad=False)
                setattr(module, name, linear)
    return model


# -- fused weights --------------------------------------------------------------------------------


def _matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, Int8Linear):
        return module.weight, module.scales
    return module.weight.detach(), None


def _fuse(modules: list[nn.Module], transpose: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One matrix [in, out] (and per-output scales) for projections of the same input; x @ it applies them.

    The modules are rebound to views of it, so memory holds one copy and `state_dict()` — and the
    plain forward, the reference — still see each projection under its own name. `transpose`
    stores it [in, out] in memory; otherwise it is a view of the usual [out, in] layout.
    """
    parts = [_matrix(m) for m in modules]
    weight = parts[0][0] if len(parts) == 1 else torch.cat([w for w, _ in parts])
    scales = parts[0][1] if len(parts) == 1 or parts[0][1] is None else torch.cat([s for _, s in parts])
    matrix = weight.t().contiguous() if transpose else weight.t()
    column = 0
    for module, (w, _) in zip(modules, parts, strict=True):
        columns = slice(column, column + w.shape[0])
        view = matrix[:, columns].t()
        if isinstance(module, Int8Linear):
            module.weight, module.scales = view, scales[columns]
        else:
            module.weight = nn.Parameter(view, requires_grad=False)
        column += w.shape[0]
    return matrix, scales


def transposes(device: torch.device, out_features: int, in_features: int, int8: bool) -> bool:
    # CPU BLAS computes x @ W faster from a [in, out] copy when W is much taller than wide (the
    # output projection: 3x at dim 256); GPUs read the usual layout at full speed, and so does
    # aten's int8 kernel, which takes only that layout.
    if int8 and decode_kernels.ready(device, "int8"):
        return False
    return device.type == "cpu" and out_features >= 4 * in_features


class FastLayer(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        attention, ffn = block.attention, block.feed_forward
        self.n_heads, self.n_kv_heads = attention.n_heads, attention.n_kv_heads
        self.head_dim = attention.head_dim
        device, int8 = attention.wq.weight.device, isinstance(attention.wq, Int8Linear)
        dim, hidden = attention.wq.weight.shape[1], ffn.w1.weight.shape[0]
        qkv_rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        fused = {
            "qkv": _fuse([attention.wq, attention.wk, attention.wv], transposes(device, qkv_rows, dim, int8)),
            "13": _fuse([ffn.w1, ffn.w3], transposes(device, 2 * hidden, dim, int8)),  # gate, up: one matmul
            "o": _fuse([attention.wo], False),
            "2": _fuse([ffn.w2], False),
        }
        for name, (matrix, scales) in fused.items():
            self.register_buffer(f"w{name}", matrix, persistent=False)
            self.register_buffer(f"s{name}", scales, persistent=False)
        self.attention_norm = block.attention_norm.weight.detach()
        self.ffn_norm = block.ffn_norm.weight.detach()
        # What block_halves' two functions take, in their order (FastTransformer._plan joins them).
        self.before_attention = (self.attention_norm, self.wqkv, self.sqkv)
        self.after_attention = (self.wo, self.so, self.ffn_norm, self.w13, self.s13, self.w2, self.s2)


def linear(x: torch.Tensor, matrix: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """x @ matrix [in, out], int8 matrices scaled per output; one row (a few on a CPU) goes to
    `decode_kernels` where it runs (which reads int8 as it is), else int8 is converted to x's dtype first."""
    if decode_kernels.applies(x, scales):
        return decode_kernels.matvec(x, matrix.t(), scales)
    if scales is None:
        return x @ matrix
    return (x @ matrix.to(x.dtype)) * scales


def residual(
    h: torch.Tensor, x: torch.Tensor, matrix: torch.Tensor, scales: torch.Tensor | None
) -> torch.Tensor:
    """h + x @ matrix, in one op where it can: the decode kernel's residual add, or addmm (2-D)."""
    if decode_kernels.applies(x, scales):
        return decode_kernels.matvec(x, matrix.t(), scales, residual=h)
    if scales is None:
        return torch.addmm(h, x, matrix) if h.dim() == 2 else h + x @ matrix
    return h + linear(x, matrix, scales)


def norm_linear(
    h: torch.Tensor, norm: torch.Tensor, eps: float, matrix: torch.Tensor, scales: torch.Tensor | None
) -> torch.Tensor:
    """linear(rms_norm(h)): for one row, the norm inside the decode kernel where it runs."""
    if decode_kernels.applies(h, scales):
        return decode_kernels.matvec(h, matrix.t(), scales, norm=norm, eps=eps)
    return linear(rms_norm(h, norm, eps), matrix, scales)


def swiglu_residual(
    h: torch.Tensor, gate_up: torch.Tensor, matrix: torch.Tensor, scales: torch.Tensor | None
) -> torch.Tensor:
    """h + (silu(gate) * up) @ matrix for gate_up = [gate, up]: for one row, all in the decode kernel."""
    if decode_kernels.applies(h, scales):
        return decode_kernels.matvec(gate_up, matrix.t(), scales, residual=h, swiglu=True)
    hidden = gate_up.shape[-1] // 2
    return residual(h, F.silu(gate_up[..., :hidden]) * gate_up[..., hidden:], matrix, scales)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # One fused kernel that computes in float32 whatever the dtype; model.RMSNorm, the reference,
    # also rounds to the activations' dtype before the weight, which this skips: four passes over
    # the activations saved, one rounding fewer.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, T, H, D] with Meta's interleaved pairs; freqs: complex [T, D/2], or its real view [T, D/2, 2].

    The complex form is one multiply, the fewest kernels eagerly; compiled code takes the real view,
    since inductor generates no code for complex numbers and fuses the real arithmetic instead.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if freqs.is_complex():
        return torch.view_as_real(torch.view_as_complex(pairs) * freqs[:, None, :]).flatten(-2).type_as(x)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def block_halves(args: ModelArgs) -> tuple[Callable, Callable]:
    """A block's two halves around its attention, shared by prompts and the static decode step.

    project(h, freqs, *layer.before_attention) → q, k, v [B, H, T, D], rotated;
    finish(h, attended [B, T, Hq·D], *layer.after_attention) → the block's output.
    """
    hq, hkv, d, eps = args.n_heads, args.n_kv_heads, args.head_dim, args.norm_eps

    def project(h, freqs, norm, wqkv, sqkv):
        batch, seq_len, _ = h.shape
        qkv = norm_linear(h, norm, eps, wqkv, sqkv)
        qk = rotate(qkv[..., : (hq + hkv) * d].view(batch, seq_len, hq + hkv, d), freqs)  # one RoPE for both
        v = qkv[..., (hq + hkv) * d :].view(batch, seq_len, hkv, d)
        return qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2), v.transpose(1, 2)

    def finish(h, attended, wo, so, norm, w13, s13, w2, s2):
        h = residual(h, attended, wo, so)
        return swiglu_residual(h, norm_linear(h, norm, eps, w13, s13), w2, s2)

    return project, finish


class RotaryTable:
    """cos + i·sin of every position's angles, grown geometrically like the KV cache.

    Angles are computed in float64 exactly as model.rope_tables does, so both paths rotate by the
    same float32 numbers.
    """

    def __init__(self, head_dim: int, theta: float, max_context: int, device: torch.device) -> None:
        self.half, self.theta, self.max_context, self.device = head_dim // 2, theta, max_context, device
        self.table = torch.empty((0, self.half), dtype=torch.complex64, device=device)
        self.pairs = torch.view_as_real(self.table)  # the same numbers as (cos, sin) pairs [N, D/2, 2]

    def reserve(self, end: int) -> torch.Tensor:
        if end > self.table.shape[0]:
            size = min(max(end, 2 * self.table.shape[0], 1024), max(self.max_context, end))
            exponent = torch.arange(0, self.half, device=self.device, dtype=torch.float64) / self.half
            inv_freq = 1.0 / (self.theta**exponent)
            angles = torch.outer(torch.arange(size, device=self.device, dtype=torch.float64), inv_freq)
            self.table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
            self.pairs = torch.view_as_real(self.table)
        return self.table

    def __call__(self, start: int, end: int) -> torch.Tensor:
        return self.reserve(end)[start:end]


# -- the fast model -------------------------------------------------------------------------------


class FastTransformer(nn.Module):
    """The inference view of a loaded Transformer: `forward` as the model's, with fewer, larger ops."""

    def __init__(self, model: Transformer, prefill_chunk: int = PREFILL_CHUNK) -> None:
        super().__init__()
        self.model = model
        self.args = model.args
        self.prefill_chunk = prefill_chunk
        # SDPA backends a fresh prompt's attention tries, in order; None leaves the choice to SDPA
        # (flash on a GPU). The benchmark sets it to weigh cuDNN's attention (BENCHMARKS.md).
        self.prompt_backends: list[SDPBackend] | None = None
        self.halves = block_halves(self.args)
        self.embedding = model.tok_embeddings.weight.detach()
        # Before the weights are fused: where the kernels run decides the layout they are fused in.
        int8 = isinstance(model.output, Int8Linear)
        decode_kernels.prepare(self.device, int8_weights=int8)
        self.layers = nn.ModuleList(FastLayer(block) for block in model.layers)
        self.norm = model.norm.weight.detach()
        vocab, dim = model.output.weight.shape
        self.wout, self.sout = _fuse([model.output], transposes(self.device, vocab, dim, int8))
        self.rope = RotaryTable(self.args.head_dim, self.args.rope_theta, self.args.max_context, self.device)
        # Each layer's weights as one plain tuple: the one-token path reads them per op.
        self._plan = [(*layer.before_attention, *layer.after_attention) for layer in self.layers]
        self._views: weakref.WeakKeyDictionary[KVCache, tuple] = weakref.WeakKeyDictionary()

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    def forward(
        self, tokens: torch.Tensor, start: int = 0, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """tokens [B, T] at positions start..start+T-1 → logits [B, T, V] (or [B, 1, V] with last_only)."""
        seq_len = tokens.shape[1]
        end = start + seq_len
        check_positions(self.args, start, end, cache)
        if cache is None:
            if seq_len > self.prefill_chunk:
                raise ValueError("prompts longer than one prefill chunk need a cache to be chunked")
            return self._chunk(tokens, start, None, last_only)
        cache.reserve(end)
        if seq_len == 1 and tokens.shape[0] == 1:
            return self._decode_one(tokens, start, cache)
        outputs = []
        for offset in range(0, seq_len, self.prefill_chunk):
            piece = tokens[:, offset : offset + self.prefill_chunk]
            last = offset + piece.shape[1] == seq_len
            if not last and last_only:
                self._chunk(piece, start + offset, cache, None)  # keys and values only
            else:
                outputs.append(self._chunk(piece, start + offset, cache, last_only))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _chunk(
        self, tokens: torch.Tensor, start: int, cache: KVCache | None, last_only: bool | None
    ) -> torch.Tensor | None:
        seq_len = tokens.shape[1]
        freqs = self.rope(start, start + seq_len)
        project, finish = self.halves
        h = F.embedding(tokens, self.embedding)
        for index, layer in enumerate(self.layers):
            q, k, v = project(h, freqs, *layer.before_attention)
            if cache is not None:
                k, v = cache.update(index, start, k, v)
            h = finish(h, attend(q, k, v, start, self.prompt_backends), *layer.after_attention)
        if cache is not None:
            cache.length = start + seq_len
        if last_only is None:
            return None
        if last_only:
            h = h[:, -1:]
        return norm_linear(h, self.norm, self.args.norm_eps, self.wout, self.sout).float()

    def _decode_one(self, token: torch.Tensor | int, position: int, cache: KVCache) -> torch.Tensor:
        """forward() for one token of one sequence, in as few ops as it takes → logits [1, 1, V].

        On a CPU a small model's step is mostly per-op overhead (~2-9 us each), so: 2-D
        activations, RoPE on q and k at once, residual adds fused into the matmuls (addmm), cache
        views made once per cache, weights read from plain tuples rather than module attributes.
        """
        end = position + 1
        freqs = self.rope.reserve(end)[position]  # [D/2]
        if isinstance(token, int):
            h = self.embedding[token].view(1, -1)
        else:
            h = F.embedding(token.view(1), self.embedding)
        exact = self.dtype == torch.float32  # no float32 round trip for RoPE
        keys_by_layer, values_by_layer = self._layer_views(cache)
        hq, hkv, d, eps = self.args.n_heads, self.args.n_kv_heads, self.args.head_dim, self.args.norm_eps
        for plan, keys, values in zip(self._plan, keys_by_layer, values_by_layer, strict=True):
            attention_norm, wqkv, sqkv, wo, so, ffn_norm, w13, s13, w2, s2 = plan
            qkv = norm_linear(h, attention_norm, eps, wqkv, sqkv)
            qk = qkv[0, : (hq + hkv) * d]
            pairs = torch.view_as_complex((qk if exact else qk.float()).view(hq + hkv, d // 2, 2))
            qk = torch.view_as_real(pairs * freqs).view(hq + hkv, d)
            if not exact:
                qk = qk.to(h.dtype)
            keys.select(2, position).copy_(qk[hq:].view(1, hkv, d))
            values.select(2, position).copy_(qkv[:, (hq + hkv) * d :].view(1, hkv, d))
            # The query heads sharing a key head go side by side: GQA without copying the cache.
            q = qk[:hq].view(1, hkv, hq // hkv, d)
            out = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end])
            h = residual(h, out.view(1, hq * d), wo, so)
            h = swiglu_residual(h, norm_linear(h, ffn_norm, eps, w13, s13), w2, s2)
        cache.length = end
        logits = norm_linear(h, self.norm, self.args.norm_eps, self.wout, self.sout)
        return (logits if exact else logits.float()).view(1, 1, -1)

    def step(self, token: int, position: int, cache: KVCache) -> torch.Tensor:
        """Logits [V] after one host-side token at `position` of a one-sequence cache."""
        check_positions(self.args, position, position + 1, cache)
        cache.reserve(position + 1)
        return self._decode_one(token, position, cache)[0, 0]

    def _layer_views(self, cache: KVCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's keys and values [B, Hkv, capacity, D], made again only when the cache grows."""
        views = self._views.get(cache)
        if views is None or views[0] is not cache.k:
            views = (cache.k, list(cache.k.unbind(0)), list(cache.v.unbind(0)))
            self._views[cache] = views
        return views[1], views[2]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    backends: list[SDPBackend] | None = None,
) -> torch.Tensor:
    """q [B, Hq, T, D] over k, v [B, Hkv, S, D] (S = start + T) → [B, T, Hq·D].

    `backends`: those a fresh prompt (start 0) may use, in the order to try them.
    """
    batch, hq, seq_len, d = q.shape
    hkv = k.shape[1]
    if seq_len == 1:
        # One query sees every key: the query heads sharing a key head go side by side, so GQA
        # needs no copy of the cache.
        out = F.scaled_dot_product_attention(q.reshape(batch, hkv, hq // hkv, d), k, v)
        return out.reshape(batch, 1, hq * d)
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if start == 0 and backends:
        with sdpa_kernel(backends, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        # A chunk continuing the cache: causal aligned to the last key, which flash attention
        # runs without building a [T, S] mask.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(seq_len, k.shape[2]))
    return out.transpose(1, 2).reshape(batch, seq_len, hq * d)


# -- decoding -------------------------------------------------------------------------------------


def span_for(position: int, capacity: int) -> int:
    """Keys a static step at `position` attends over: a power of two, so few spans cover every length."""
    return min(capacity, max(MIN_BUCKET, 1 << position.bit_length()))


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, logits: torch.Tensor) -> None:
        self.graph = graph
        self.logits = logits  # the graph's output, rewritten by every replay


class FastDecoder:
    """`generate.Decoder` over a FastTransformer.

    Prompts and sampled steps run the eager, chunked forward. Greedy steps read their input token
    from a device buffer and write the argmax back into it, so no step needs the host: on a GPU the
    stream runs one step ahead (`lookahead`) and copies each id home asynchronously. With `static`
    steps (`compile`, `graphs`) the position is a device tensor too and the step attends over a
    fixed power-of-two span of the cache with a mask, so its shapes repeat: torch.compile compiles
    it once for all spans and a CUDA graph per (cache, span) replays it in one launch.
    """

    def __init__(
        self,
        fast: FastTransformer,
        *,
        graphs: bool = False,
        compile: bool | str = False,
        static: bool = False,
        lookahead: bool | None = None,
    ) -> None:
        self.fast = fast
        self.device = fast.device
        cuda = self.device.type == "cuda"
        if graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.graphs = graphs
        self.static = static or graphs or bool(compile)
        self.lookahead = cuda if lookahead is None else lookahead
        self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._layer_index = [torch.tensor([i], device=self.device) for i in range(fast.args.n_layers)]
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self._step = self._static_step
        self.compiled = bool(compile)
        if compile:
            backend = "inductor" if compile is True else compile
            # Only with coordinate-descent tuning does inductor turn a one-row matrix product into a
            # reduction of its own (gpt-fast's recipe): on an H200 bf16 decoded at 220-239 tok/s
            # this way. Int8 products go to decode_kernels' kernel where Triton runs; else inductor
            # converts each matrix whole first, which decoded at 0.8x bf16 (BENCHMARKS.md).
            options = {"coordinate_descent_tuning": True} if backend == "inductor" and cuda else None
            self._step = torch.compile(self._static_step, backend=backend, fullgraph=True, options=options)
        if self.static:
            # Captured steps read the table by address: it must never be reallocated.
            fast.rope.reserve(fast.args.max_context)
        self._captures: weakref.WeakKeyDictionary[KVCache, OrderedDict] = weakref.WeakKeyDictionary()
        if self.lookahead and cuda:
            self._host = torch.empty(2, dtype=torch.long, pin_memory=True)
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
        else:
            self._host = torch.empty(2, dtype=torch.long)
            self._events = None

    # -- generate.Decoder ---------------------------------------------------------------------

    def logits(self, ids, start: int, cache: KVCache) -> torch.Tensor:
        batch = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.fast(batch, start, cache, last_only=True)[0, -1]

    def greedy(self, token: int, start: int, cache: KVCache, vocab: int) -> Iterator[int]:
        self.token.fill_(token)
        position = start
        if not self.lookahead and not self.static:
            while True:  # the host needs each id anyway: pick it there
                token = host_argmax(self.fast.step(token, position, cache)[:vocab])
                position += 1
                yield token
        if not self.lookahead:
            while True:
                self._advance(cache, position, vocab)
                position += 1
                yield int(self.token)
        # One step stays queued ahead of the id being read, so the device never waits for the host.
        self._advance(cache, position, vocab)
        self._send(0)
        slot = 0
        while True:
            position += 1
            self._advance(cache, position, vocab)
            self._send(1 - slot)
            yield self._receive(slot)
            slot = 1 - slot

    # -- one step -----------------------------------------------------------------------------

    def _advance(self, cache: KVCache, position: int, vocab: int) -> torch.Tensor:
        """Queue the step for the id in `self.token` at `position`; its argmax replaces that id.

        Returns the step's logits [V] (a graph's output buffer: valid until the next step).
        """
        cache.reserve(position + 1)
        if not self.static:
            logits = self.fast(self.token, position, cache, last_only=True)[0, -1]
            self.token.copy_(logits[:vocab].argmax().view(1, 1))
            return logits
        self.position.fill_(position)
        span = span_for(position + 1, cache.capacity)
        captured = self._captured(cache, span, vocab) if self.graphs else None
        if captured is not None:
            captured.graph.replay()
            logits = captured.logits
        else:
            logits = self._step_and_pick(cache, span, vocab)
        cache.length = position + 1
        return logits[0]

    def _step_and_pick(self, cache: KVCache, span: int, vocab: int) -> torch.Tensor:
        logits = self._step(self.token, self.position, cache.k, cache.v, span)
        self.token.copy_(logits[:, :vocab].argmax(dim=-1, keepdim=True))
        return logits

    def _static_step(
        self,
        token: torch.Tensor,
        position: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        span: int,
    ) -> torch.Tensor:
        """token [1, 1] at position [1] (device tensors) → logits [1, V], attending over `span` keys."""
        fast = self.fast
        project, finish = fast.halves
        args = fast.args
        # RoPE with the cache write, and attention over the keys so far, in kernels of ours
        fused = decode_kernels.ready(self.device, "all") and decode_kernels.attention_applies(
            args.n_heads, args.n_kv_heads, args.head_dim
        )
        if not fused:
            freqs = (fast.rope.pairs if self.compiled else fast.rope.table).index_select(0, position)
            visible = (torch.arange(span, device=position.device) <= position).view(1, 1, 1, span)
        h = F.embedding(token, fast.embedding)
        batch, hkv, d = 1, args.n_kv_heads, args.head_dim
        for index, layer in enumerate(fast.layers):
            if fused:
                norm, wqkv, sqkv = layer.before_attention
                qkv = norm_linear(h, norm, args.norm_eps, wqkv, sqkv)
                q = decode_kernels.rope_into_cache(
                    qkv, fast.rope.pairs, position, k_cache, v_cache, index, layer.n_heads
                )
            else:
                q, k, v = project(h, freqs, *layer.before_attention)
                # index_put_ on the whole cache, not a copy into a layer's view: compiled, a write
                # through a view becomes a copy of the entire cache per step (measured with inductor).
                at = [self._layer_index[index], None, None, position]
                torch.ops.aten.index_put_(k_cache, at, k.reshape(1, batch, hkv, d))
                torch.ops.aten.index_put_(v_cache, at, v.reshape(1, batch, hkv, d))
            if fused:
                out = decode_kernels.attend_cache(q, k_cache, v_cache, index, position, span)
            else:
                keys, values = k_cache[index, :, :, :span], v_cache[index, :, :, :span]
                grouped = q.reshape(batch, hkv, layer.n_heads // hkv, d)  # GQA without copying the cache
                out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=visible)
            h = finish(h, out.reshape(batch, 1, layer.n_heads * d), *layer.after_attention)
        return norm_linear(h, fast.norm, fast.args.norm_eps, fast.wout, fast.sout).float()[:, 0]

    # -- CUDA graphs --------------------------------------------------------------------------

    def _captured(self, cache: KVCache, span: int, vocab: int) -> _Captured | None:
        """The graph of a step over this cache and span, captured on first use (None: no graphs)."""
        graphs = self._captures.setdefault(cache, OrderedDict())
        # A graph holds raw addresses and strides: once the cache has grown into new memory,
        # its graphs would write to freed memory, so they go.
        layout = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape))
        for key in [key for key in graphs if key[0] != layout]:
            del graphs[key]
        key = (layout, span, vocab)
        if key not in graphs:
            if sum(len(g) for g in self._captures.values()) >= MAX_GRAPHS:
                for other in list(self._captures.values()):
                    if other is not graphs:
                        other.clear()
                while graphs and len(graphs) >= MAX_GRAPHS:
                    graphs.popitem(last=False)
            try:
                graphs[key] = self._capture(cache, span, vocab)
            except Exception as exc:  # a capture that fails must not fail the request
                log.warning("CUDA graph capture failed, decoding without graphs: %s", exc)
                self.graphs = False
                return None
        graphs.move_to_end(key)
        return graphs[key]

    def _capture(self, cache: KVCache, span: int, vocab: int) -> _Captured:
        token = self.token.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up runs (compiled code loaded, cuBLAS algorithms chosen) write the same keys
            # and values the real step will: same token, same position.
            for _ in range(2):
                self.token.copy_(token)
                self._step_and_pick(cache, span, vocab)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.token.copy_(token)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = self._step_and_pick(cache, span, vocab)
        return _Captured(graph, logits)

    # -- reading ids back ---------------------------------------------------------------------

    def _send(self, slot: int) -> None:
        if self._events is None:
            self._host[slot] = self.token[0, 0]
            return
        self._host[slot : slot + 1].copy_(self.token.view(1), non_blocking=True)
        self._events[slot].record()

    def _receive(self, slot: int) -> int:
        if self._events is not None:
            self._events[slot].synchronize()
        return int(self._host[slot])

    # -- load time ----------------------------------------------------------------------------

    def check(self, prompt: list[int], steps: int = 4) -> tuple[float, float]:
        """How far static steps stray from the eager forward, beside how far rounding alone moves it.

        Returns (distance, rounding), the largest of each over `steps` decoding steps on scratch
        caches. Both are relative distances between logit vectors, |a - b| / |b| (0: equal; about
        1 or more: unrelated): `distance` from a static step to the eager one-token step,
        `rounding` from an eager prefill of the same tokens to that step — the same arithmetic in
        another order, so in half precision it measures the drift this model and device show
        without any bug. A NaN in either step's logits makes `distance` infinite.

        Run at load: it compiles and captures what the first request would otherwise pay for, and
        a static step that disagrees with the eager one (stale memory, a bad capture) shows here
        before any user sees it.
        """
        if not self.static:
            return 0.0, 0.0
        vocab = self.fast.args.vocab_size
        eager, static = self.fast.model.new_cache(), self.fast.model.new_cache()
        worst = rounding = 0.0
        with torch.inference_mode():
            for cache in (eager, static):
                cache.reserve(len(prompt) + steps)
                self.logits(prompt[:-1], 0, cache)
            tokens = list(prompt)
            for step in range(steps):
                position = len(prompt) - 1 + step
                expected = self.logits(tokens[-1:], position, eager)
                prefilled = self.logits(tokens, 0, self.fast.model.new_cache())
                self.token.fill_(tokens[-1])
                got = self._advance(static, position, vocab)
                distance = relative_distance(got, expected)
                if distance != distance:  # NaN: nothing to compare
                    return float("inf"), rounding
                worst = max(worst, distance)
                rounding = max(rounding, relative_distance(prefilled, expected))
                tokens.append(int(expected[:vocab].argmax()))
        return worst, rounding


def relative_distance(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """|logits - reference| / |reference| over whole vectors, in float32 (NaN if either holds one)."""
    reference = reference.float()
    return float((logits.float() - reference).norm() / reference.norm().clamp(min=1e-6))


def host_argmax(logits: torch.Tensor) -> int:
    """The first index of the largest value; NumPy's vectorised scan is ~10x torch's on a CPU vector."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        return int(logits.numpy().argmax())
    return int(logits.argmax())


def describe(decoder: object) -> str:
    """ "plain", "fast", or "fast" with "+compile", "+graphs": what decodes, for info() and the bench."""
    if not isinstance(decoder, FastDecoder):
        return "plain"
    return "fast" + ("+compile" if decoder.compiled else "") + ("+graphs" if decoder.graphs else "")
