"""The frontend's unit tests (jest, `jlpm test` in labextension/), run from pytest so the one test command covers them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

LABEXTENSION = Path(__file__).resolve().parents[2] / "labextension"


@pytest.mark.skipif(shutil.which("jlpm") is None, reason="jlpm (from jupyterlab) is not installed")
def test_jest_suite_passes() -> None:
    if not (LABEXTENSION / "node_modules").is_dir():
        subprocess.run(["jlpm", "install", "--immutable"], cwd=LABEXTENSION, check=True, timeout=600)
    result = subprocess.run(
        ["jlpm", "test", "--ci"], cwd=LABEXTENSION, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.skipif(shutil.which("jlpm") is None, reason="jlpm (from jupyterlab) is not installed")
def test_frontend_sources_are_formatted() -> None:
    if not (LABEXTENSION / "node_modules").is_dir():
        pytest.skip("labextension/node_modules is missing; the jest test installs it")
    result = subprocess.run(
        ["jlpm", "lint:check"], cwd=LABEXTENSION, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
