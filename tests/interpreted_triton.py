"""Run by tests/test_decode_kernels.py in a child with TRITON_INTERPRET=1: the decode kernel on the CPU.

Triton's interpreter must be chosen before Triton is first imported (its own library functions are
built then), so these tests cannot share the main test process, and pytest does not collect this
file by itself (its name does not start with test_).
"""

from __future__ import annotations

import os

import pytest
import torch

from kernel_model import decode_kernels
from kernel_model.bench import random_transformer
from kernel_model.fast import FastDecoder, FastTransformer, RotaryTable, quantize_int8, quantize_rows, rotate
from kernel_model.model import ModelArgs

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "needs TRITON_INTERPRET=1 from the start (tests/test_decode_kernels.py sets it)",
        allow_module_level=True,
    )


@pytest.fixture(autouse=True)
def kernels_for_all_weights(monkeypatch):
    monkeypatch.setattr(decode_kernels, "_disabled", False)
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "all")
    assert decode_kernels.prepare(torch.device("cpu"), int8_weights=True) == "all"


def test_a_kernel_that_computes_wrong_fails_the_self_test(monkeypatch, caplog):
    launch = decode_kernels._launch

    def off_by_a_bit(*args, **kwargs):
        return launch(*args, **kwargs) * 1.05

    monkeypatch.setattr(decode_kernels, "_launch", off_by_a_bit)
    monkeypatch.setattr(decode_kernels, "_checked", {})
    assert decode_kernels.prepare(torch.device("cpu"), int8_weights=True) == "none"
    assert "kernel's answer is off by 0.05" in caplog.text


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
    assert decode_kernels.applies(x, scales)
    out = decode_kernels.matvec(*arguments)
    assert out.shape == (1, 1, rows) and out.dtype == dtype
    assert decode_kernels.applies(x, scales)  # the kernel ran: a failure would have turned it off
    expected = reference(*arguments)
    # float32: sums in another order. bf16: within one step of its 8-bit mantissa, since the
    # interpreter truncates where a GPU rounds to nearest.
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((out.double() - expected).abs() <= tolerance * expected.abs() + 1e-4).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_into_cache_rotates_and_writes_as_torch_does(dtype):
    hq, hkv, d, layers, capacity, position, layer = 4, 2, 16, 3, 8, 5, 1
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 1, (hq + 2 * hkv) * d, generator=generator).to(dtype)
    table = RotaryTable(d, 1e6, capacity, torch.device("cpu"))
    table.reserve(capacity)
    k_cache, v_cache = (torch.zeros(layers, 1, hkv, capacity, d, dtype=dtype) for _ in range(2))
    q = decode_kernels.rope_into_cache(
        qkv, table.pairs, torch.tensor([position]), k_cache, v_cache, layer, hq
    )
    heads = qkv.view(1, 1, hq + 2 * hkv, d)
    rotated = rotate(heads[:, :, : hq + hkv], table(position, position + 1))  # torch's own RoPE
    tolerance = 1e-6 if dtype == torch.float32 else 2**-7
    assert torch.allclose(q.float(), rotated[0, 0, :hq].float().view(1, hq, 1, d), rtol=tolerance, atol=1e-6)
    keys = k_cache[layer, 0, :, position]
    assert torch.allclose(keys.float(), rotated[0, 0, hq:].float(), rtol=tolerance, atol=1e-6)
    assert torch.equal(v_cache[layer, 0, :, position], heads[0, 0, hq + hkv :])
    written = torch.zeros(layers, capacity, dtype=torch.bool)
    written[layer, position] = True
    for cache in (k_cache, v_cache):  # nothing else was touched
        assert not cache.permute(0, 3, 1, 2, 4)[~written].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 4), (4, 2), (8, 1)])
def test_attend_cache_reads_the_keys_so_far_as_sdpa_does(dtype, n_heads, n_kv_heads):
    head_dim, span, layer = 16, 20 * decode_kernels.ATTENTION_SPLIT, 1  # more pieces than one combine block
    generator = torch.Generator().manual_seed(n_heads + n_kv_heads)
    q = torch.randn(1, n_heads, 1, head_dim, generator=generator).to(dtype)
    k_cache, v_cache = (
        torch.randn(2, 1, n_kv_heads, span, head_dim, generator=generator).to(dtype) for _ in "kv"
    )
    for position in (0, 100, decode_kernels.ATTENTION_SPLIT, 700, span - 1):  # within, at and across pieces
        got = decode_kernels.attend_cache(q, k_cache, v_cache, layer, torch.tensor([position]), span)
        group = n_heads // n_kv_heads
        keys, values = (
            c[layer, :, :, : position + 1].repeat_interleave(group, dim=1) for c in (k_cache, v_cache)
        )
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.double(), keys.double(), values.double()
        )
        tolerance = 1e-5 if dtype == torch.float32 else 2**-7
        assert got.shape == (1, 1, n_heads * head_dim) and got.dtype == dtype
        assert torch.allclose(got.double(), expected.reshape(got.shape), rtol=tolerance, atol=tolerance)


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


STEPS = {
    "eager": {},
    "static": {"static": True},
    "traced": {"static": True, "compile": "aot_eager"},
    "inductor": {"static": True, "compile": True},  # on a CPU: C++ around our operators
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("int8", [True, False], ids=["int8", "float"])
def test_decoding_through_the_kernel_gives_torchs_tokens(monkeypatch, step, int8):
    # Past MIN_BUCKET, so static steps attend over a 512-key span: two pieces of `attend_cache`.
    prompt = [1, *torch.randint(3, 512, (299,), generator=torch.Generator().manual_seed(1)).tolist()]
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "none")
    expected = greedy(FastDecoder(fast_model(int8), static=True), prompt, 12)
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "int8" if int8 else "all")
    decoder = FastDecoder(fast_model(int8), **STEPS[step])  # loading runs the kernels' self-test
    launches = []
    launch, rope_launch = decode_kernels._launch, decode_kernels._rope_launch

    def counted(x, weight, scales, residual, norm, eps, swiglu):  # outside any trace: compiled, in the op
        launches.append("swiglu" if swiglu else "norm" if norm is not None else "residual")
        assert (residual is not None) == (launches[-1] != "norm")
        return launch(x, weight, scales, residual, norm, eps, swiglu)

    def counted_rope(*args):
        launches.append("rope")
        return rope_launch(*args)

    monkeypatch.setattr(decode_kernels, "_launch", counted)
    monkeypatch.setattr(decode_kernels, "_rope_launch", counted_rope)
    assert greedy(decoder, prompt, 12) == expected
    # 11 steps of 2 layers: q/k/v and gate/up after their norms, the attention's output and the
    # down projection (after SwiGLU) with their residual adds; then the output after the last
    # norm, once more for the prompt's last row, the only one whose logits a prefill computes.
    # RoPE and the cache write once a layer, where all kernels are on and the step is static.
    counts = {kind: launches.count(kind) for kind in ("norm", "residual", "swiglu", "rope")}
    rope = 0 if int8 or step == "eager" else 11 * 2
    assert counts == {"norm": 11 * 5 + 1, "residual": 11 * 2, "swiglu": 11 * 2, "rope": rope}
