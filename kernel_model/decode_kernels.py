"""A decode step's work as few Triton kernels: its one-row products with the norms, SwiGLU and
residual adds around them, RoPE with the write into the KV cache, and attention over that cache;
on an x86 CPU, its int8 products through aten's int8 weight kernel.

A decode step reads every weight once for one row of activations, so its speed is the bytes it
reads and the kernels it launches. Two things torch's ops do badly there:

- Int8 weights halve the bytes only if they are widened in registers. Converting a matrix to bf16
  first reads the int8 copy, then writes and reads a bf16 one: more traffic than bf16 alone.
  Compiled, inductor was to fuse the conversion into a reduction of its own (gpt-fast's recipe),
  yet on an H200 int8 decoded at 0.80x bf16.
- Each layer launches 16 kernels (18 with int8), each a few microseconds even replayed from a
  CUDA graph: on the default (graph-replayed, uncompiled) path 7B decoded at 57% of roofline.

`matvec`: each program reads a few weight rows once (int8 with per-row scales, or float) against
the activations, and can take the RMS norm before the product (every program sums the squares of
the 4,096-wide row itself, from L2) or SwiGLU of a gate/up pair, and add the residual stream after
it; sums, norm, scale and residual in float32, one rounding. `rope_into_cache`: one program per
head rotates the queries and keys and writes keys and values at the step's position.
`attend_cache`: attention over exactly the keys so far, their number read on the device
(flash-decoding: pieces of the context in parallel, then their weighted sum). A layer is then 7
kernels (q/k/v, RoPE and cache, attention in two, output, gate/up, down) where torch's ops took 16.

On a CPU there is no Triton, but the same int8 products go to `torch._weight_int8pack_mm`, which
reads the int8 rows as stored against bf16 activations, sums in float32 and rounds each product to
bf16 (the scales apply after, in float32); it also takes the few rows a keystroke's edit prefills
(up to `_ATEN_ROWS`, where it beats converting the matrix). A CPU step is bound by the bytes it
reads just as a GPU's is: `embedded` (20 M parameters) reads 20 MB per token this way, which a
laptop's last-level cache can hold, instead of the 81 MB of its float32 copy, and decodes 1.7x
faster on one thread of this project's VM, 2.5x on two (BENCHMARKS.md). Only x86 builds with AVX2
or AVX-512 get it: elsewhere aten falls back to scalar code, three times slower than float32 here.

`KERNEL_MODEL_DECODE_KERNELS` chooses, at model load: `int8` (the default: int8 weights' products
only, which have nothing better), `all` (every product, RoPE and attention, in place of cuBLAS,
SDPA and torch's ops; off by default until a GPU has measured it), `none` (torch's ops, as
before: the benchmark's baseline; `load_model` then holds an int8-stored checkpoint in float32 on a
CPU). Before a model uses them, `prepare` runs each variant once against torch's operations and
drops the kernels if any fails. Triton's run on CUDA, and on a CPU under Triton's interpreter
(`TRITON_INTERPRET=1` before Triton is imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

CHOICES = ("int8", "all", "none")
PLAIN, RMS_NORM, SWIGLU = 0, 1, 2  # what the kernel does to the activations before the product

# (rows per program, columns per loop iteration, warps). Few rows per program keep thousands of
# programs in flight for the 4,096-row matrices; long column blocks give each load many bytes.
_CUDA_CONFIGS = [
    (1, 2048, 4),
    (2, 1024, 4),
    (2, 2048, 8),
    (4, 512, 4),
    (4, 1024, 4),
    (4, 1024, 8),
    (8, 512, 4),
    (8, 1024, 8),
    (16, 256, 4),
    (16, 512, 8),
]
_INTERPRETER_BLOCKS = (16, 64)  # the interpreter runs every program in Python: fewer, larger ones
_ATEN_CPU_CAPABILITIES = ("AVX2", "AVX512")  # where aten's int8 weight kernel is vectorized
# Its AVX-512 code reads 16 columns at a time and returns NaN for a width that is not a multiple
# (torch 2.13); such products take torch's operations.
_ATEN_COLUMN_MULTIPLE = 16
# Up to 16 rows (the last line of an edited prompt) aten's kernel beats converting the matrix to
# float32 for a BLAS product; at 32 they tie, beyond it loses (a dim-384 layer, 1 thread).
_ATEN_ROWS = 16

_ready: dict[tuple[str, str], bool] = {}  # (device type, "int8" or "all") -> on there (see `prepare`)
_any_ready = False  # so that a step on a device without kernels pays one read per product
_kernels: dict = {}  # built by `prepare`
_checked: dict[tuple[str, str, bool], bool] = {}  # (device type, choice, aten's?) -> passed `_self_test`
_disabled = False  # set once if a kernel fails at run time: decoding carries on with torch's ops
_ones: dict[int, torch.Tensor] = {}  # bf16 unit scales by row count, for aten's int8 kernel


def choice() -> str:
    value = os.environ.get("KERNEL_MODEL_DECODE_KERNELS", "int8")
    if value not in CHOICES:
        raise ValueError(f"KERNEL_MODEL_DECODE_KERNELS={value!r}: use one of {', '.join(CHOICES)}")
    return value


def prepare(device: torch.device, int8_weights: bool) -> str:
    """Decide, at model load, what of a model on `device` goes through the kernels; build and check them.

    Returns what the model gets (int8, all or none): under the default choice a model without int8
    weights gets none, and pays nothing at load. The kernels are run once against torch's
    operations first (`_self_test`): one that fails to build or computes wrong is dropped here,
    before any step is compiled or captured, and the load goes on with torch's operations.
    Deciding here keeps `applies` and the kernels' callers down to reading module state, which
    torch.compile traces as constants: tracing Triton's own set-up would break the compiled step.
    """
    global _any_ready
    wanted = choice()
    if _aten_cpu(device):
        # No Triton on a plain CPU: only int8 products have a kernel, aten's.
        wanted = "int8" if wanted != "none" and _aten_int8_available() else "none"
    elif device.type not in ("cuda", "cpu") or importlib.util.find_spec("triton") is None:  # cpu: interpreted
        wanted = "none"
    if wanted == "int8" and not int8_weights:  # nothing of this model's; another's int8 choice stands
        _ready[(device.type, "all")] = False
        _any_ready = any(_ready.values())
        return "none"
    if wanted != "none":
        if not _kernels and not _aten_cpu(device):
            _kernels.update(_build())
        if not _passes_self_test(device, wanted):
            wanted = "none"
    _ready[(device.type, "int8")] = wanted in ("int8", "all")
    _ready[(device.type, "all")] = wanted == "all"
    _any_ready = any(_ready.values())
    return wanted


def _passes_self_test(device: torch.device, wanted: str) -> bool:
    key = (device.type, wanted, _aten_cpu(device))  # a CPU runs aten's kernel, or Triton's interpreted
    if key not in _checked:
        _checked[key] = _self_test(device, wanted)
    return _checked[key]


def _self_test(device: torch.device, wanted: str) -> bool:
    """Every variant a step uses against torch's operations on a small random layer; False if any fails.

    Widths are multiples of 16 as a model's are, so Triton builds the same specializations the
    model's shapes will reuse.
    """
    from .fast import quantize_rows  # fast imports this module: here, not at the top

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    rows, columns = 64, 256
    norm, residual = draw(columns).abs() + 0.5, draw(1, rows)
    try:
        for int8 in (True, False) if wanted == "all" else (True,):
            weight, scales = quantize_rows(draw(rows, columns)) if int8 else (draw(rows, columns), None)
            for x, extra in (
                (draw(1, columns), {"norm": norm, "eps": 1e-5}),
                (draw(1, columns), {"residual": residual}),
                (draw(1, 2 * columns), {"residual": residual, "swiglu": True}),
            ):
                arguments = {"residual": None, "norm": None, "eps": 0.0, "swiglu": False, **extra}
                got = _launch(x, weight, scales, **arguments)
                _compare(got, _reference(x, weight, scales, **arguments), "int8" if int8 else "float")
        if wanted == "all":
            _check_rope(device, dtype, draw)
            _check_attention(device, dtype, draw)
    except Exception as exc:  # building, running, or a wrong answer: torch's operations it is
        log.warning("decode kernels unusable here (%s); using torch's operations", exc)
        return False
    return True


def _compare(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # One rounding against the reference's several: bf16 keeps ~3 significant digits.
    distance = float((got.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-6))
    if not distance <= 0.02:
        raise ValueError(f"the {what} kernel's answer is off by {distance:.3g} (relative)")


def _check_attention(device: torch.device, dtype: torch.dtype, draw) -> None:
    n_heads, n_kv_heads, head_dim, span = 4, 2, 128, 2 * ATTENTION_SPLIT
    q = draw(1, n_heads, 1, head_dim)
    k_cache, v_cache = draw(2, 1, n_kv_heads, span, head_dim), draw(2, 1, n_kv_heads, span, head_dim)
    for position in (0, ATTENTION_SPLIT + 7):  # one key; and a second split cut short
        got = attend_cache(q, k_cache, v_cache, 1, torch.tensor([position], device=device), span)
        keys, values = (
            cache[1, :, :, : position + 1].repeat_interleave(2, dim=1) for cache in (k_cache, v_cache)
        )
        expected = torch.nn.functional.scaled_dot_product_attention(q.float(), keys.float(), values.float())
        _compare(got.view(n_heads, head_dim), expected.view(n_heads, head_dim), "attention")


def _check_rope(device: torch.device, dtype: torch.dtype, draw) -> None:
    from .fast import rotate  # torch's own RoPE, the reference

    n_heads, n_kv_heads, head_dim, position = 4, 2, 128, 3
    qkv = draw(1, 1, (n_heads + 2 * n_kv_heads) * head_dim)
    angles = draw(8, head_dim // 2).float() * 3
    pairs = torch.stack((angles.cos(), angles.sin()), dim=-1).contiguous()
    k_cache, v_cache = (torch.zeros(2, 1, n_kv_heads, 8, head_dim, device=device, dtype=dtype) for _ in "kv")
    q = rope_into_cache(qkv, pairs, torch.tensor([position], device=device), k_cache, v_cache, 1, n_heads)
    heads = qkv.view(1, 1, n_heads + 2 * n_kv_heads, head_dim)
    rotated = rotate(heads[:, :, : n_heads + n_kv_heads], pairs[position : position + 1])[0, 0]
    _compare(q.view(n_heads, head_dim), rotated[:n_heads], "RoPE")
    _compare(k_cache[1, 0, :, position], rotated[n_heads:], "RoPE")
    _compare(v_cache[1, 0, :, position], heads[0, 0, n_heads + n_kv_heads :], "cache")


def ready(device: torch.device, what: str) -> bool:
    """Whether `what` on `device` goes through the kernels: "int8" (int8 weights' products) or "all"."""
    return not _disabled and _ready.get((device.type, what), False)


def applies(x: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether `matvec` computes `x @ W`: one row of activations (a few for aten's int8 kernel on a
    CPU), weights `prepare` chose it for."""
    if not _any_ready:
        return False
    rows = x.numel() // x.shape[-1]
    if rows == 1:
        return ready(x.device, "all" if scales is None else "int8")
    return rows <= _ATEN_ROWS and scales is not None and _aten_cpu(x.device) and ready(x.device, "int8")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _aten_cpu(device: torch.device) -> bool:
    """Whether products on `device` go to aten's CPU kernel rather than Triton's (compiled or interpreted)."""
    return device.type == "cpu" and not _interpreting()


def cpu_reads_int8() -> bool:
    """Whether int8 weights on a CPU decode through aten's int8 kernel: there, chosen, and past its self-test."""
    if _interpreting() or choice() == "none" or not _aten_int8_available():
        return False
    return _passes_self_test(torch.device("cpu"), "int8")


def _aten_int8_available() -> bool:
    capability = torch.backends.cpu.get_cpu_capability()
    return hasattr(torch, "_weight_int8pack_mm") and capability in _ATEN_CPU_CAPABILITIES


def matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    swiglu: bool = False,
) -> torch.Tensor:
    """residual + (f(x) @ weight.T) * scales for one row x [..., K] (a few, see `applies`); weight [N, K].

    f is the identity, the RMS norm with weights `norm` and `eps`, or with `swiglu` silu(gate) * up
    of x = [gate, up] (then x has 2K values). Scales and residual are optional. The result has x's
    shape with N last and x's dtype.
    """
    if torch.compiler.is_compiling():  # no fallback inside a compiled step: `prepare` tested the kernel
        return decode_matvec_op(x, weight, scales, residual, norm, eps, swiglu)
    try:
        return _launch(x, weight, scales, residual, norm, eps, swiglu)
    except Exception as exc:  # a kernel that cannot build here must not fail decoding
        global _disabled
        _disabled = True
        log.warning("the decode kernels failed, using torch's operations instead: %s", exc)
        return _reference(x, weight, scales, residual, norm, eps, swiglu)


def _reference(x, weight, scales, residual, norm, eps, swiglu) -> torch.Tensor:
    """What the kernel computes, in torch's operations (the fallback)."""
    x = _prologue(x, norm, eps, swiglu)
    out = x @ weight.t().to(x.dtype)
    if scales is not None:
        out = out * scales
    return out if residual is None else residual + out


def _prologue(x, norm, eps, swiglu) -> torch.Tensor:
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    if norm is not None:
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],), norm, eps)
    return x


def _aten_launch(x, weight, scales, residual, norm, eps, swiglu) -> torch.Tensor:
    """The CPU's int8 product: norm or SwiGLU in torch's operations, then aten's int8 kernel."""
    x = _prologue(x, norm, eps, swiglu)
    if scales is None or x.shape[-1] % _ATEN_COLUMN_MULTIPLE or not weight.is_contiguous():
        return _reference(x, weight, scales, residual, None, 0.0, False)
    rows = weight.shape[0]
    # The scales apply after, in their own dtype: the kernel takes only bf16 ones, a rounding saved.
    out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), weight, _unit_scales(rows))
    out = (out.view(*x.shape[:-1], rows) * scales).to(x.dtype)
    return out if residual is None else residual + out


def _unit_scales(rows: int) -> torch.Tensor:
    ones = _ones.get(rows)
    if ones is None:
        ones = _ones[rows] = torch.ones(rows, dtype=torch.bfloat16)
    return ones


def _launch(x, weight, scales, residual, norm, eps, swiglu) -> torch.Tensor:
    if _aten_cpu(x.device):
        return _aten_launch(x, weight, scales, residual, norm, eps, swiglu)
    rows, columns = weight.shape
    out = x.new_empty((*x.shape[:-1], rows))
    blocks = {}
    if _interpreting():
        blocks = dict(zip(("BLOCK_N", "BLOCK_K"), _INTERPRETER_BLOCKS, strict=True))

    def grid(meta: dict) -> tuple[int]:
        return ((rows + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)

    _kernels["matvec"][grid](
        x.contiguous(),
        # Pointers the kernel does not read stand in for absent tensors.
        weight if norm is None else norm,
        weight,
        weight if scales is None else scales,
        weight if residual is None else residual,
        out,
        rows,
        columns,
        weight.stride(0),
        weight.stride(1),
        eps,
        PROLOGUE=SWIGLU if swiglu else RMS_NORM if norm is not None else PLAIN,
        HAS_SCALES=scales is not None,
        HAS_RESIDUAL=residual is not None,
        **blocks,
    )
    return out


def _rope_launch(qkv, pairs, position, k_cache, v_cache, layer, n_heads) -> torch.Tensor:
    n_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[4]
    q = qkv.new_empty((1, n_heads, 1, head_dim))
    _kernels["rope"][(n_heads + 2 * n_kv_heads,)](
        qkv.contiguous(),
        pairs,
        position,
        k_cache,
        v_cache,
        q,
        layer * k_cache.stride(0),
        k_cache.stride(2),
        k_cache.stride(3),
        pairs.stride(0),
        HQ=n_heads,
        HKV=n_kv_heads,
        D=head_dim,
    )
    return q


# Compiled steps see the kernel as one opaque operator: inductor places the call and CUDA graphs
# capture it, while nothing traces into Triton's launcher.
@torch.library.custom_op("kernel_model::decode_matvec", mutates_args=())
def decode_matvec_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm: torch.Tensor | None,
    eps: float,
    swiglu: bool,
) -> torch.Tensor:
    return _launch(x, weight, scales, residual, norm, eps, swiglu)


@decode_matvec_op.register_fake
def _(x, weight, scales, residual, norm, eps, swiglu) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# An operator even when eager: only static steps call it, and CUDA graphs replay them without the
# dispatcher's overhead.
@torch.library.custom_op("kernel_model::rope_into_cache", mutates_args=("k_cache", "v_cache"))
def rope_into_cache(
    qkv: torch.Tensor,
    pairs: torch.Tensor,
    position: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    n_heads: int,
) -> torch.Tensor:
    """One step's queries [1, Hq, 1, D], rotated; its keys (rotated) and values written into the cache.

    qkv [..., (Hq + 2 Hkv) D] is the q/k/v product of one row; pairs [positions, D/2, 2] holds each
    position's (cos, sin) (Meta's interleaved pairs); position [1] is the step's, on the device;
    the caches are [layers, 1, Hkv, capacity, D]. Call it where `ready(device, "all")`: a failure
    here propagates, since the cache may be half written.
    """
    return _rope_launch(qkv, pairs, position, k_cache, v_cache, layer, n_heads)


@rope_into_cache.register_fake
def _(qkv, pairs, position, k_cache, v_cache, layer, n_heads) -> torch.Tensor:
    return qkv.new_empty((1, n_heads, 1, k_cache.shape[4]))


ATTENTION_SPLIT = 256  # keys per program of `attend_cache`: a 16k context keeps thousands in flight


def attention_applies(n_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """`attend_cache` and `rope_into_cache` take power-of-two head widths and query groups up to 8
    (Llama's: 1, or 8 for 34B and 70B); larger groups would not fit a program's registers."""
    group = n_heads // n_kv_heads
    return head_dim & (head_dim - 1) == 0 and group & (group - 1) == 0 and group <= 8


@torch.library.custom_op("kernel_model::attend_cache", mutates_args=())
def attend_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layer: int,
    position: torch.Tensor,
    span: int,
) -> torch.Tensor:
    """One query row [1, Hq, 1, D] over the cache's keys 0..position of `layer` → [1, 1, Hq·D].

    The number of keys is read on the device, so a captured step replays at every position, and
    only those keys are read (a masked attention reads the whole power-of-two `span`, up to twice
    as many: at a 4k context up to 2 GB a token for 7B). Each program takes one key/value head, the
    query heads that share it and `ATTENTION_SPLIT` positions of the span with an online softmax;
    a second kernel weighs the pieces together by their log-sum-exp (flash-decoding).
    """
    _, n_heads, _, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    splits = max(1, -(-span // ATTENTION_SPLIT))
    pieces = q.new_empty((splits, n_heads, head_dim), dtype=torch.float32)
    log_sums = q.new_empty((splits, n_heads), dtype=torch.float32)
    _kernels["attention"][(n_kv_heads, splits)](
        q.contiguous(),
        k_cache,
        v_cache,
        position,
        pieces,
        log_sums,
        layer * k_cache.stride(0),
        k_cache.stride(2),
        k_cache.stride(3),
        head_dim**-0.5,
        G=n_heads // n_kv_heads,
        D=head_dim,
        SPLIT=ATTENTION_SPLIT,
        BLOCK=max(8, 64 // (n_heads // n_kv_heads)),  # G x BLOCK x D products held at once
    )
    out = q.new_empty((1, 1, n_heads * head_dim))
    _kernels["combine"][(n_heads,)](pieces, log_sums, out, splits, n_heads, D=head_dim, BLOCK=16)
    return out


@attend_cache.register_fake
def _(q, k_cache, v_cache, layer, position, span) -> torch.Tensor:
    return q.new_empty((1, 1, q.shape[1] * q.shape[3]))


def _build() -> dict:
    import triton
    import triton.language as tl

    @triton.jit
    def decode_matvec_kernel(
        x_ptr,
        norm_ptr,
        w_ptr,
        scales_ptr,
        residual_ptr,
        out_ptr,
        N,
        K,
        stride_wn,
        stride_wk,
        eps,
        PROLOGUE: tl.constexpr,
        HAS_SCALES: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past the end read row 0 again instead of masking every load; their results are not stored.
        safe_rows = tl.where(rows < N, rows, 0)
        scale = tl.full((), 1.0, tl.float32)
        if PROLOGUE == 1:  # RMS norm: the whole row's mean square first (the row is in L2 by now)
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for start in range(0, K, BLOCK_K):
                columns = start + tl.arange(0, BLOCK_K)
                value = tl.load(x_ptr + columns, mask=columns < K, other=0.0).to(tl.float32)
                squares += value * value
            scale = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        # Products pile up per column and are summed once at the end, not once per block.
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            columns = start + tl.arange(0, BLOCK_K)
            # Where K is a multiple of 16 (every Code Llama width), Triton sees that the mask is
            # constant over 16 columns and still loads 16 bytes at a time.
            inside = columns < K
            if PROLOGUE == 2:  # SwiGLU: x holds the gate, then the up projection
                gate = tl.load(x_ptr + columns, mask=inside, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + K + columns, mask=inside, other=0.0).to(tl.float32)
                value = gate * tl.sigmoid(gate) * up
            else:
                value = tl.load(x_ptr + columns, mask=inside, other=0.0).to(tl.float32)
                if PROLOGUE == 1:
                    gain = tl.load(norm_ptr + columns, mask=inside, other=0.0).to(tl.float32)
                    value = value * scale * gain
            pointers = w_ptr + safe_rows[:, None] * stride_wn + columns[None, :] * stride_wk
            w = tl.load(pointers, mask=inside[None, :], other=0)
            acc += w.to(tl.float32) * value[None, :]
        total = tl.sum(acc, axis=1)
        if HAS_SCALES:
            total *= tl.load(scales_ptr + safe_rows).to(tl.float32)
        if HAS_RESIDUAL:
            total += tl.load(residual_ptr + safe_rows).to(tl.float32)
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def rope_cache_kernel(
        qkv_ptr,
        pairs_ptr,
        position_ptr,
        k_ptr,
        v_ptr,
        q_ptr,
        layer_offset,
        head_stride,
        position_stride,
        pairs_stride,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
    ):
        head = tl.program_id(0)  # queries, then keys, then values: qkv's own order
        position = tl.load(position_ptr)
        row_ptr = qkv_ptr + head * D
        half = tl.arange(0, D // 2)
        if head < HQ + HKV:  # Meta's RoPE on interleaved pairs, in float32
            even = tl.load(row_ptr + 2 * half).to(tl.float32)
            odd = tl.load(row_ptr + 2 * half + 1).to(tl.float32)
            cos = tl.load(pairs_ptr + position * pairs_stride + 2 * half)
            sin = tl.load(pairs_ptr + position * pairs_stride + 2 * half + 1)
            even, odd = even * cos - odd * sin, even * sin + odd * cos
            # Each branch names its own pointer: q and the cache may differ in type.
            if head < HQ:
                q_out = q_ptr + head * D
                tl.store(q_out + 2 * half, even.to(q_ptr.dtype.element_ty))
                tl.store(q_out + 2 * half + 1, odd.to(q_ptr.dtype.element_ty))
            else:
                k_out = (
                    k_ptr + layer_offset + (head - HQ).to(tl.int64) * head_stride + position * position_stride
                )
                tl.store(k_out + 2 * half, even.to(k_ptr.dtype.element_ty))
                tl.store(k_out + 2 * half + 1, odd.to(k_ptr.dtype.element_ty))
        else:
            columns = tl.arange(0, D)
            v_head = (head - HQ - HKV).to(tl.int64)
            v_out = v_ptr + layer_offset + v_head * head_stride + position * position_stride
            tl.store(v_out + columns, tl.load(row_ptr + columns).to(v_ptr.dtype.element_ty))

    @triton.jit
    def attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        position_ptr,
        pieces_ptr,
        log_sums_ptr,
        layer_offset,
        head_stride,
        position_stride,
        scale,
        G: tl.constexpr,
        D: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        kv_head = tl.program_id(0)
        split = tl.program_id(1)
        length = tl.load(position_ptr) + 1
        heads = kv_head * G + tl.arange(0, G)  # the query heads sharing this key/value head
        columns = tl.arange(0, D)
        q = tl.load(q_ptr + heads[:, None] * D + columns[None, :]).to(tl.float32) * scale
        # 64-bit: a 13B cache of 16k positions is past 2**31 elements within a layer's heads.
        base = layer_offset + kv_head.to(tl.int64) * head_stride
        best = tl.full((G,), float("-inf"), tl.float32)
        total = tl.zeros((G,), tl.float32)
        acc = tl.zeros((G, D), tl.float32)
        for start in range(split * SPLIT, tl.minimum(split * SPLIT + SPLIT, length), BLOCK):
            keys_at = start + tl.arange(0, BLOCK)
            seen = keys_at < length
            offsets = base + keys_at[:, None] * position_stride + columns[None, :]
            k = tl.load(k_ptr + offsets, mask=seen[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_ptr + offsets, mask=seen[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, BLOCK]
            scores = tl.where(seen[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            # A block with no key yet seen leaves best at -inf: keep its weights 0, not NaN.
            safe_best = tl.where(new_best == float("-inf"), 0.0, new_best)
            weights = tl.exp(scores - safe_best[:, None])
            decay = tl.exp(best - safe_best)
            total = total * decay + tl.sum(weights, axis=1)
            acc = acc * decay[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
            best = new_best
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(pieces_ptr + (split * G * tl.num_programs(0) + heads[:, None]) * D + columns[None, :], out)
        log_sum = tl.where(total > 0, best + tl.log(total), float("-inf"))
        tl.store(log_sums_ptr + split * G * tl.num_programs(0) + heads, log_sum)

    @triton.jit
    def combine_kernel(
        pieces_ptr, log_sums_ptr, out_ptr, splits, n_heads, D: tl.constexpr, BLOCK: tl.constexpr
    ):
        # BLOCK pieces at a time, as vectors, with the same online rescaling as the pieces themselves.
        # Piece 0 always holds key 0, so `best` is finite after the first block: no NaN.
        head = tl.program_id(0)
        columns = tl.arange(0, D)
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for start in range(0, splits, BLOCK):
            index = start + tl.arange(0, BLOCK)
            inside = index < splits
            log_sums = tl.load(log_sums_ptr + index * n_heads + head, mask=inside, other=float("-inf"))
            offsets = (index[:, None] * n_heads + head) * D + columns[None, :]
            pieces = tl.load(pieces_ptr + offsets, mask=inside[:, None], other=0.0)
            new_best = tl.maximum(best, tl.max(log_sums, axis=0))
            weights = tl.exp(log_sums - new_best)
            decay = tl.exp(best - new_best)
            total = total * decay + tl.sum(weights, axis=0)
            acc = acc * decay + tl.sum(weights[:, None] * pieces, axis=0)
            best = new_best
        tl.store(out_ptr + head * D + columns, (acc / total).to(out_ptr.dtype.element_ty))

    kernels = {
        "matvec": decode_matvec_kernel,
        "rope": rope_cache_kernel,
        "attention": attention_kernel,
        "combine": combine_kernel,
    }
    if _interpreting():
        return kernels
    configs = [
        triton.Config({"BLOCK_N": rows, "BLOCK_K": columns}, num_warps=warps)
        for rows, columns, warps in _CUDA_CONFIGS
    ]
    # Tuned once per matrix and prologue, at load: the warm-up's first steps run before any capture.
    kernels["matvec"] = triton.autotune(configs, key=["N", "K", "PROLOGUE", "HAS_SCALES"])(
        decode_matvec_kernel
    )
    return kernels
