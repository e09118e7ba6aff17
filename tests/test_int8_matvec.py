"""The int8 decode kernel: where it applies, its fallback, and its own tests run under Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_model import int8_matvec
from kernel_model.fast import quantize_rows

INTERPRETED_TESTS = Path(__file__).with_name("interpreted_triton.py")


@pytest.fixture
def kernel_state(monkeypatch):
    """The module's decisions as they were: a test's `prepare` must not leak into later tests."""
    monkeypatch.setattr(int8_matvec, "_disabled", False)
    monkeypatch.setattr(int8_matvec, "_ready", {})
    monkeypatch.setattr(int8_matvec, "_kernel_launcher", None)


def test_kernel_applies_to_one_row_where_triton_runs(kernel_state, monkeypatch):
    pytest.importorskip("triton", reason="the int8 kernel is written in Triton")
    cpu, one_row, prompt = torch.device("cpu"), torch.zeros(1, 8), torch.zeros(4, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not int8_matvec.prepare(cpu) and not int8_matvec.applies(one_row)  # a plain CPU converts
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert int8_matvec.prepare(cpu) and int8_matvec.applies(one_row)
    assert not int8_matvec.applies(prompt)  # prompts are compute-bound: converting costs little there
    monkeypatch.setenv("KERNEL_MODEL_INT8_MATVEC", "0")
    assert not int8_matvec.prepare(cpu) and not int8_matvec.applies(one_row)


def test_a_failing_kernel_falls_back_to_converting(kernel_state, monkeypatch, caplog):
    def unbuildable(*args):
        raise RuntimeError("no compiler for this device")

    monkeypatch.setattr(int8_matvec, "_ready", {"cpu": True})
    monkeypatch.setattr(int8_matvec, "_launch", unbuildable)
    weight, scales = quantize_rows(torch.randn(6, 16))
    x, residual = torch.randn(1, 16), torch.randn(1, 6)
    out = int8_matvec.matvec(x, weight, scales, residual)
    expected = (x.double() @ weight.double().t()) * scales.double() + residual.double()
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert "converting weights instead" in caplog.text and not int8_matvec.applies(x)


def test_the_kernel_passes_its_tests_under_the_interpreter():
    pytest.importorskip("triton", reason="the int8 kernel is written in Triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", str(INTERPRETED_TESTS), "-q", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-2000:]
