"""The decode kernel: where it applies, its fallback, and its own tests run under Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_model import decode_kernels
from kernel_model.fast import quantize_rows

INTERPRETED_TESTS = Path(__file__).with_name("interpreted_triton.py")


@pytest.fixture
def kernel_state(monkeypatch):
    """The module's decisions as they were: a test's `prepare` must not leak into later tests."""
    for name, value in (
        ("_disabled", False),
        ("_ready", {}),
        ("_any_ready", False),
        ("_kernels", {}),
        ("_checked", {}),
    ):
        monkeypatch.setattr(decode_kernels, name, value)


def test_the_kernel_applies_to_one_row_of_the_weights_chosen(kernel_state, monkeypatch):
    pytest.importorskip("triton", reason="the decode kernel is written in Triton")
    # Triton was imported without its interpreter here, so the kernels cannot run: the decision
    # alone is under test (the child process below runs them, self-test included).
    monkeypatch.setattr(decode_kernels, "_self_test", lambda device, wanted: True)
    cpu, one_row, prompt, scales = torch.device("cpu"), torch.zeros(1, 8), torch.zeros(4, 8), torch.ones(8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KERNEL_MODEL_DECODE_KERNELS", raising=False)
    plain_cpu = "int8" if decode_kernels.cpu_reads_int8() else "none"  # aten's int8 kernel, on x86
    assert decode_kernels.prepare(cpu, int8_weights=True) == plain_cpu
    assert decode_kernels.applies(one_row, scales) == (plain_cpu == "int8")
    assert not decode_kernels.applies(one_row, None)  # aten has no kernel of ours for float weights
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert decode_kernels.prepare(cpu, int8_weights=False) == "none"  # the default: int8 weights only
    assert decode_kernels.prepare(cpu, int8_weights=True) == "int8"
    assert decode_kernels.applies(one_row, scales) and not decode_kernels.applies(one_row, None)
    assert not decode_kernels.applies(prompt, scales)  # prompts are compute-bound: torch's products there
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "all")
    assert decode_kernels.prepare(cpu, int8_weights=True) == "all" and decode_kernels.applies(one_row, None)
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "none")
    assert decode_kernels.prepare(cpu, int8_weights=True) == "none" and not decode_kernels.applies(
        one_row, scales
    )
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "fast")
    with pytest.raises(ValueError, match="KERNEL_MODEL_DECODE_KERNELS='fast'"):
        decode_kernels.prepare(cpu, int8_weights=True)


def test_kernels_that_fail_their_self_test_are_not_used(kernel_state, monkeypatch, caplog):
    pytest.importorskip("triton", reason="the decode kernel is written in Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # chosen too late in this process: the kernels fail to run
    monkeypatch.setenv("KERNEL_MODEL_DECODE_KERNELS", "all")
    assert decode_kernels.prepare(torch.device("cpu"), int8_weights=True) == "none"
    assert "decode kernels unusable here" in caplog.text
    assert not decode_kernels.applies(torch.zeros(1, 8), None)


def test_a_failing_kernel_falls_back_to_torchs_operations(kernel_state, monkeypatch, caplog):
    def unbuildable(*args):
        raise RuntimeError("no compiler for this device")

    monkeypatch.setattr(decode_kernels, "_ready", {("cpu", "int8"): True})
    monkeypatch.setattr(decode_kernels, "_any_ready", True)
    monkeypatch.setattr(decode_kernels, "_launch", unbuildable)
    weight, scales = quantize_rows(torch.randn(6, 16))
    x, residual = torch.randn(1, 16), torch.randn(1, 6)
    assert decode_kernels.applies(x, scales)
    out = decode_kernels.matvec(x, weight, scales, residual)
    expected = (x.double() @ weight.double().t()) * scales.double() + residual.double()
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert "using torch's operations instead" in caplog.text and not decode_kernels.applies(x, scales)


def test_the_kernel_passes_its_tests_under_the_interpreter():
    pytest.importorskip("triton", reason="the decode kernel is written in Triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("KERNEL_MODEL_DECODE_KERNELS", None)
    child = subprocess.run(
        [sys.executable, "-m", "pytest", str(INTERPRETED_TESTS), "-q", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-2000:]


@pytest.mark.skipif(
    not decode_kernels.cpu_reads_int8(), reason="aten's int8 kernel is vectorized on x86 only"
)
@pytest.mark.parametrize("columns", [256, 40], ids=["its-widths", "a-width-it-gets-wrong"])
def test_the_cpu_int8_kernel_computes_every_variant(kernel_state, monkeypatch, columns):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KERNEL_MODEL_DECODE_KERNELS", raising=False)
    cpu = torch.device("cpu")
    assert decode_kernels.prepare(cpu, int8_weights=True) == "int8"  # its self-test passed
    generator = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    weight, scales = quantize_rows(draw(48, columns))
    assert not decode_kernels.applies(draw(17, columns).float(), scales)  # a prompt: converted, then BLAS
    x, gate_up, residual, norm = (
        draw(1, columns),
        draw(1, 2 * columns),
        draw(1, 48),
        draw(columns).abs() + 0.5,
    )
    for row, options in (
        (x, {}),
        (x, {"norm": norm, "eps": 1e-5}),
        (x, {"residual": residual}),
        (gate_up, {"residual": residual, "swiglu": True}),
        (draw(1, 12, columns), {"norm": norm, "eps": 1e-5}),  # the last line of an edited prompt
    ):
        assert decode_kernels.applies(row.float(), scales)
        arguments = {"residual": None, "norm": None, "eps": 0.0, "swiglu": False, **options}
        expected = decode_kernels._reference(row, weight, scales, **arguments)
        as_served = {name: v.float() if isinstance(v, torch.Tensor) else v for name, v in arguments.items()}
        got = decode_kernels.matvec(row.float(), weight, scales.float(), **as_served)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert float((got.double() - expected).norm() / expected.norm()) <= 0.01  # bf16 activations
