"""Run by tests/test_decode_matvec.py in a child with TRITON_INTERPRET=1: the decode kernel on the CPU.

Triton's interpreter must be chosen before Triton is first imported (its own library functions are
built then), so these tests cannot share the main test process, and pytest does not collect this
file by itself (its name does not start with test_).
"""

from __future__ import annotations

import os

import pytest
import torch

from kernel_model import decode_matvec
from kernel_model.bench import random_transformer
from kernel_model.fast import FastDecoder, FastTransformer, quantize_int8, quantize_rows
from kernel_model.model import ModelArgs

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "needs TRITON_INTERPRET=1 from the start (tests/test_decode_matvec.py sets it)",
        allow_module_level=True,
    )


@pytest.fixture(autouse=True)
def kernels_for_all_weights(monkeypatch):
    monkeypatch.setattr(decode_matvec, "_disabled", False)
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "all")
    assert decode_matvec.prepare(torch.device("cpu")) == "all"


def reference(x, weight, scales, residual, norm, eps, swiglu):
    """The kernel's arithmetic in float64 torch."""
    x = x.double()
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = torch.nn.functional.silu(gate) * up
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    out = x @ weight.double().t()
    if scales is not None:
        out = out * scales.double()
    return out if residual is None else out + residual.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "float"])
@pytest.mark.parametrize("prologue", ["plain", "rms_norm", "swiglu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize(("rows", "columns", "layout"), [(48, 128, "rows"), (37, 100, "columns")])
def test_kernel_computes_its_products(dtype, int8, prologue, with_residual, rows, columns, layout):
    generator = torch.Generator().manual_seed(rows + columns)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    weight, scales = quantize_rows(draw(rows, columns)) if int8 else (draw(rows, columns), None)
    if layout == "columns":  # a view of an [in, out] matrix, as the CPU keeps its tall matrices
        weight = weight.t().contiguous().t()
    x = draw(1, 1, 2 * columns if prologue == "swiglu" else columns)
    residual = draw(1, 1, rows) if with_residual else None
    norm = draw(columns).abs() + 0.5 if prologue == "rms_norm" else None
    arguments = (x, weight, scales, residual, norm, 1e-5, prologue == "swiglu")
    assert decode_matvec.applies(x, scales)
    out = decode_matvec.matvec(*arguments)
    assert out.shape == (1, 1, rows) and out.dtype == dtype
    assert decode_matvec.applies(x, scales)  # the kernel ran: a failure would have turned it off
    expected = reference(*arguments)
    # float32: sums in another order. bf16: within one step of its 8-bit mantissa, since the
    # interpreter truncates where a GPU rounds to nearest.
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((out.double() - expected).abs() <= tolerance * expected.abs() + 1e-4).all()


def fast_model(int8: bool, seed: int = 5) -> FastTransformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                     max_context=512)  # fmt: skip
    model = random_transformer(args, torch.device("cpu"), torch.float32, seed)
    return FastTransformer(quantize_int8(model) if int8 else model)


def greedy(decoder: FastDecoder, prompt: list[int], new_tokens: int) -> list[int]:
    fast = decoder.fast
    cache = fast.model.new_cache()
    with torch.inference_mode():
        first = int(decoder.logits(prompt, 0, cache).argmax())
        steps = decoder.greedy(first, len(prompt), cache, fast.args.vocab_size)
        return [first, *(next(steps) for _ in range(new_tokens - 1))]


STEPS = {"eager": {}, "static": {"static": True}, "compiled": {"static": True, "compile": "aot_eager"}}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "float"])
def test_decoding_through_the_kernel_gives_torchs_tokens(monkeypatch, step, int8):
    prompt = [1, 17, 300, 42, 7, 99, 256, 3]
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "none")
    expected = greedy(FastDecoder(fast_model(int8), static=True), prompt, 12)
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "int8" if int8 else "all")
    launches = []
    launch = decode_matvec._launch

    def counted(x, weight, scales, residual, norm, eps, swiglu):  # outside any trace: compiled, in the op
        launches.append("swiglu" if swiglu else "norm" if norm is not None else "residual")
        assert (residual is not None) == (launches[-1] != "norm")
        return launch(x, weight, scales, residual, norm, eps, swiglu)

    monkeypatch.setattr(decode_matvec, "_launch", counted)
    assert greedy(FastDecoder(fast_model(int8), **STEPS[step]), prompt, 12) == expected
    # 11 steps of 2 layers: q/k/v and gate/up after their norms, the attention's output and the
    # down projection (after SwiGLU) with their residual adds; then the output after the last
    # norm, once more for the prompt's last row, the only one whose logits a prefill computes.
    counts = {kind: launches.count(kind) for kind in ("norm", "residual", "swiglu")}
    assert counts == {"norm": 11 * 5 + 1, "residual": 11 * 2, "swiglu": 11 * 2}
