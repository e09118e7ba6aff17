"""Run by tests/test_int8_matvec.py in a child with TRITON_INTERPRET=1: the int8 decode kernel on the CPU.

Triton's interpreter must be chosen before Triton is first imported (its own library functions are
built then), so these tests cannot share the main test process, and pytest does not collect this
file by itself (its name does not start with test_).
"""

from __future__ import annotations

import os

import pytest
import torch

from kernel_model import int8_matvec
from kernel_model.bench import random_transformer
from kernel_model.fast import FastDecoder, FastTransformer, quantize_int8, quantize_rows
from kernel_model.model import ModelArgs

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "needs TRITON_INTERPRET=1 from the start (tests/test_int8_matvec.py sets it)", allow_module_level=True
    )


@pytest.fixture(autouse=True)
def kernel_on_the_cpu(monkeypatch):
    monkeypatch.setattr(int8_matvec, "_disabled", False)
    assert int8_matvec.prepare(torch.device("cpu"))


def reference(x, weight, scales, residual=None):
    out = (x.double() @ weight.double().t()) * scales.double()
    return out if residual is None else out + residual.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "columns"), [(48, 128), (37, 100)], ids=["even", "ragged"])
@pytest.mark.parametrize("layout", ["rows", "columns"])  # [N, K] in memory, or a view of [K, N]
@pytest.mark.parametrize("with_residual", [False, True])
def test_kernel_computes_the_scaled_product(dtype, rows, columns, layout, with_residual):
    generator = torch.Generator().manual_seed(rows + columns)
    weight, scales = quantize_rows(torch.randn(rows, columns, generator=generator).to(dtype))
    if layout == "columns":
        weight = weight.t().contiguous().t()
    x = torch.randn(1, 1, columns, generator=generator).to(dtype)
    residual = torch.randn(1, 1, rows, generator=generator).to(dtype) if with_residual else None
    assert int8_matvec.applies(x)
    out = int8_matvec.matvec(x, weight, scales, residual)
    assert out.shape == (1, 1, rows) and out.dtype == dtype
    assert int8_matvec.applies(x)  # the kernel ran: a failure would have turned it off
    expected = reference(x, weight, scales, residual)
    # float32: sums in another order. bf16: within one step of its 8-bit mantissa, since the
    # interpreter truncates where a GPU rounds to nearest.
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((out.double() - expected).abs() <= tolerance * expected.abs() + 1e-5).all()


def int8_model(seed: int = 5) -> FastTransformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                     max_context=512)  # fmt: skip
    return FastTransformer(quantize_int8(random_transformer(args, torch.device("cpu"), torch.float32, seed)))


def greedy(decoder: FastDecoder, prompt: list[int], new_tokens: int) -> list[int]:
    fast = decoder.fast
    cache = fast.model.new_cache()
    with torch.inference_mode():
        first = int(decoder.logits(prompt, 0, cache).argmax())
        steps = decoder.greedy(first, len(prompt), cache, fast.args.vocab_size)
        return [first, *(next(steps) for _ in range(new_tokens - 1))]


STEPS = {"eager": {}, "static": {"static": True}, "compiled": {"static": True, "compile": "aot_eager"}}


@pytest.mark.parametrize("step", STEPS)
def test_decoding_through_the_kernel_gives_the_converting_tokens(monkeypatch, step):
    prompt = [1, 17, 300, 42, 7, 99, 256, 3]
    monkeypatch.setenv("KERNEL_MODEL_INT8_MATVEC", "0")
    expected = greedy(FastDecoder(int8_model(), static=True), prompt, 12)
    monkeypatch.delenv("KERNEL_MODEL_INT8_MATVEC")
    launches = []
    launch = int8_matvec._launch

    def counted(x, weight, scales, residual):  # runs outside any trace: compiled, inside the operator
        launches.append(residual is not None)
        return launch(x, weight, scales, residual)

    monkeypatch.setattr(int8_matvec, "_launch", counted)
    assert greedy(FastDecoder(int8_model(), **STEPS[step]), prompt, 12) == expected
    # 11 steps of 2 layers: q/k/v and gate/up alone, then the output; the two residual adds fused.
    # One more output: the prompt's last row, the only one whose logits a prefill computes.
    assert (launches.count(False), launches.count(True)) == (11 * 5 + 1, 11 * 4)
