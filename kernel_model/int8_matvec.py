"""Batch-1 decode's int8 weight-only matrix-vector product as a Triton kernel (CUDA, or Triton's interpreter).

A decode step reads every weight once for one row of activations, so its speed is the bytes it
reads. Int8 weights halve them only if the conversion happens in registers: converting a matrix to
bf16 first reads the int8 copy, then writes and reads a bf16 one, more traffic than bf16 alone.
Compiled, inductor was to fuse the conversion into a reduction of its own (gpt-fast's recipe), yet
on an H200 int8 decoded at 0.80x bf16. This kernel reads each int8 row once, widens it to float32
next to the activations, applies the row's scale, and can add the residual stream in the same pass.

The kernel is built when an int8 model loads (`prepare`), so importing this module costs nothing
without Triton. It runs on CUDA, and on a CPU under Triton's interpreter (`TRITON_INTERPRET=1` before
Triton is imported), which is how the tests check it against the conversion without a GPU.
`KERNEL_MODEL_INT8_MATVEC=0` at load turns it off: the benchmark's comparison with the conversion.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger(__name__)

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

_ready: dict[str, bool] = {}  # device type -> whether the kernel runs there (see `prepare`)
_kernel_launcher = None  # built by `prepare`
_disabled = False  # set once if the kernel fails at run time: decoding carries on converting instead


def prepare(device: torch.device) -> bool:
    """Decide, at model load, whether decode steps on `device` use the kernel, and build it if so.

    Deciding here keeps `applies` and `matvec` down to reading module state, which torch.compile
    traces as constants: tracing Triton's own set-up would break the compiled step's graph.
    """
    global _kernel_launcher
    here = device.type == "cuda" or (device.type == "cpu" and _interpreting())
    wanted = os.environ.get("KERNEL_MODEL_INT8_MATVEC", "1") != "0"
    _ready[device.type] = ready = here and wanted and importlib.util.find_spec("triton") is not None
    if ready and _kernel_launcher is None:
        _kernel_launcher = _kernel()
    return ready


def ready(device: torch.device) -> bool:
    """Whether one-row products on `device` go through the kernel (as `prepare` last decided)."""
    return not _disabled and _ready.get(device.type, False)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def applies(x: torch.Tensor) -> bool:
    """Whether the kernel computes `x @ W`: one row of activations, on a device `prepare` chose it for."""
    return x.numel() == x.shape[-1] and ready(x.device)


def matvec(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """(x @ weight.T) * scales (+ residual): x [..., K] with one row, weight [N, K] int8, scales [N].

    The result has x's shape with N last, x's dtype, and one rounding: the sum, the scale and the
    residual are all taken in float32.
    """
    if torch.compiler.is_compiling():  # a failure shows when the step compiles, at load
        return int8_matvec_op(x, weight, scales, residual)
    try:
        return _launch(x, weight, scales, residual)
    except Exception as exc:  # a kernel that cannot build here must not fail decoding
        global _disabled
        _disabled = True
        log.warning("int8 matrix-vector kernel failed, converting weights instead: %s", exc)
        out = (x @ weight.t().to(x.dtype)) * scales
        return out if residual is None else residual + out


def _launch(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor:
    rows, columns = weight.shape
    out = x.new_empty((*x.shape[:-1], rows))
    blocks = {}
    if _interpreting():
        blocks = dict(zip(("BLOCK_N", "BLOCK_K"), _INTERPRETER_BLOCKS, strict=True))

    def grid(meta: dict) -> tuple[int]:
        return ((rows + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)

    _kernel_launcher[grid](
        x.contiguous(),
        weight,
        scales,
        scales if residual is None else residual,  # never read without a residual
        out,
        rows,
        columns,
        weight.stride(0),
        weight.stride(1),
        HAS_RESIDUAL=residual is not None,
        **blocks,
    )
    return out


# Compiled steps see the kernel as one opaque operator: inductor places the call and CUDA graphs
# capture it, while nothing traces into Triton's launcher.
@torch.library.custom_op("kernel_model::int8_matvec", mutates_args=())
def int8_matvec_op(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor:
    return _launch(x, weight, scales, residual)


@int8_matvec_op.register_fake
def _(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_matvec_kernel(
        x_ptr,
        w_ptr,
        scales_ptr,
        residual_ptr,
        out_ptr,
        N,
        K,
        stride_wn,
        stride_wk,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past the end read row 0 again instead of masking every load; their results are not stored.
        safe_rows = tl.where(rows < N, rows, 0)
        # Products pile up per column and are summed once at the end, not once per block.
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            columns = start + tl.arange(0, BLOCK_K)
            # Where K is a multiple of 16 (every Code Llama width), Triton sees that the mask is
            # constant over 16 columns and still loads 16 bytes at a time.
            pointers = w_ptr + safe_rows[:, None] * stride_wn + columns[None, :] * stride_wk
            w = tl.load(pointers, mask=columns[None, :] < K, other=0)
            x = tl.load(x_ptr + columns, mask=columns < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        total = tl.sum(acc, axis=1) * tl.load(scales_ptr + safe_rows).to(tl.float32)
        if HAS_RESIDUAL:
            total += tl.load(residual_ptr + safe_rows).to(tl.float32)
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=rows < N)

    if _interpreting():
        return int8_matvec_kernel
    configs = [
        triton.Config({"BLOCK_N": rows, "BLOCK_K": columns}, num_warps=warps)
        for rows, columns, warps in _CUDA_CONFIGS
    ]
    # Tuned once per matrix shape, at load: the warm-up's first steps run before any graph capture.
    return triton.autotune(configs, key=["N", "K"])(int8_matvec_kernel)
