"""The kernel_model command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kernel_model", *args], capture_output=True, text=True, timeout=300
    )


def test_make_info_complete_infill(tmp_path, codellama_tokenizer_file):
    out = tmp_path / "ck"
    shape = ["--dim", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2"]
    made = run("make-test-checkpoint", str(out), "--layout", "hf", "--shards", "2", *shape,
               "--tokenizer", str(codellama_tokenizer_file))  # fmt: skip
    assert made.returncode == 0, made.stderr
    info = run("info", "--model", str(out))
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["kv_heads"] == 2 and described["supports_infilling"] is True
    assert set(described) >= {"parameters", "layers", "heads", "vocab", "rope_theta", "device", "dtype"}
    completed = run("complete", "--model", str(out), "--prompt", "def f(x):", "--max-new-tokens", "4")
    assert completed.returncode == 0, completed.stderr
    infilled = run("infill", "--model", str(out), "--prefix", "def f(x):\n    ", "--suffix", "\n",
                   "--suffix-first", "--max-new-tokens", "4", "--temperature", "0.5")  # fmt: skip
    assert infilled.returncode == 0, infilled.stderr


def test_quant_chooses_how_the_embedded_model_is_held():
    held = {quant: json.loads(run("info", "--model", "embedded", "--quant", quant).stdout)["quant"]
            for quant in ("none", "int8")}  # fmt: skip
    assert held == {"none": None, "int8": "int8"}


def test_errors_are_one_line(tmp_path):
    result = run("info", "--model", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: checkpoint folder not found")
    assert "Traceback" not in result.stderr


def test_bad_checkpoints_and_arguments_get_one_line_not_a_traceback(tmp_path, codellama_tokenizer_file):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "params.json").write_text("[1, 2]")
    torch.save({}, odd / "consolidated.00.pth")
    (odd / "tokenizer.model").write_bytes(codellama_tokenizer_file.read_bytes())
    for args, message in [
        (("info", "--model", str(odd)), "must hold a JSON object"),
        (("bench", "--shape", "tiny", "--repeats", "0"), "must be 1 or more"),
        (("bench", "--shape", "tiny", "--prompt-tokens", "64,abc"), "must be a whole number"),
    ]:
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
