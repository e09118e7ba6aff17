"""`eval fim-probe`: masked lines drawn from a corpus, teacher-forced figures that agree with greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kernel_model import load_model
from kernel_model.__main__ import main as cli
from kernel_model.fim import psm_ids, spm_ids
from kernel_model.fim_probe import masked_lines, score_middle

DOCUMENTS = [
    "import numpy as np\n\n\ndef mean(values):\n    total = sum(values)\n    return total / len(values)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n",
    "for i in range(10):\n    if i % 2:\n        print(i)\n",
    "x = 1\n",  # a single line: nothing to mask after the first, so it is skipped
]


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "shard-00000.txt"
    path.write_bytes(b"".join(doc.encode() + b"\x00" for doc in DOCUMENTS))
    return path


def test_masked_lines_split_documents_at_one_nonblank_line() -> None:
    tasks = masked_lines(DOCUMENTS, samples=len(DOCUMENTS), seed=3)
    assert len(tasks) == len(DOCUMENTS) - 1
    for task in tasks:
        assert task.prefix + task.middle + task.suffix in DOCUMENTS
        assert task.prefix and task.middle.strip() and "\n" not in task.middle


def test_masked_lines_draw_the_same_lines_from_the_same_seed() -> None:
    assert masked_lines(DOCUMENTS, 2, seed=7) == masked_lines(DOCUMENTS, 2, seed=7)
    assert len(masked_lines(DOCUMENTS[:3] * 10, 5, seed=7)) == 5


def test_whole_line_hit_is_exactly_greedy_decoding_writing_the_middle() -> None:
    model = load_model("embedded")
    tok, net = model.tokenizer, model.model
    for task in masked_lines(DOCUMENTS, len(DOCUMENTS), seed=1):
        middle = tok.encode_infilling(task.middle)
        for layout in (psm_ids, spm_ids):
            ids = layout(task.prefix, task.middle, task.suffix, tok)
            nll, first, whole = score_middle(net, ids, len(middle))
            prompt = ids[: len(ids) - 1 - len(middle)]
            greedy: list[int] = []
            for _ in middle:
                with torch.inference_mode():
                    greedy.append(int(net(torch.tensor([prompt + greedy]))[0, -1].argmax()))
            assert whole == (greedy == middle)
            assert first == (greedy[0] == middle[0])
            assert nll > 0


def test_cli_prints_every_layout_with_and_without_the_suffix(
    shard: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["eval", "fim-probe", "--model", "embedded", "--corpus", str(shard), "--samples", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    drawn = len(masked_lines(DOCUMENTS, 3, seed=0))  # the CLI's default seed
    for key in ("psm", "psm_no_suffix", "spm", "spm_no_suffix"):
        figures = summary[key]
        assert figures["lines"] == drawn > 0
        assert figures["middle_nll"] > 0 and 0 <= figures["whole_line"] <= figures["first_token"] <= 1


def test_cli_refuses_a_missing_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["eval", "fim-probe", "--model", "embedded", "--corpus", str(tmp_path / "nowhere.txt")]) == 2
    assert "error:" in capsys.readouterr().err
