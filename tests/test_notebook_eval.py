"""The notebook-context benchmark: how tasks are cut from cells, and the command end to end on the embedded model."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from jupyter_codellama.notebook_eval import (
    STRATEGIES,
    Task,
    edit_similarity,
    eligible_lines,
    main,
    mask_line,
    notebook_tasks,
    strategy_body,
    word_boundaries,
)

T = TypeVar("T")

CELL = "import numpy as np\n\ndef f(x):\n    total = np.sum(x)  # all\n    return total\n# done\n%time f(1)\n"


class Third(random.Random):
    """Picks the third choice, so a test can name the cursor a `rest` task gets."""

    def choice(self, seq: Sequence[T]) -> T:
        return seq[2]


def test_eligible_lines_skip_blanks_comments_magics_and_short_lines() -> None:
    assert eligible_lines(CELL) == [0, 2, 3, 4]
    assert eligible_lines("x = 1\ny = x + 2\n") == [1]  # "x = 1" is too short to say anything
    assert eligible_lines("%%bash\necho hello world\n") == []  # not Python
    assert eligible_lines("%%time\ntotal = sum(range(10))\n") == [1]


def test_a_line_task_keeps_the_indentation_and_the_lines_below() -> None:
    source, offset, truth = mask_line(CELL, 3, "line", random.Random(0))
    assert source == "import numpy as np\n\ndef f(x):\n    \n    return total\n# done\n%time f(1)\n"
    assert offset == len("import numpy as np\n\ndef f(x):\n    ")
    assert truth == "total = np.sum(x)  # all"
    assert mask_line("a = 1\nprint(a)", 1, "line", random.Random(0)) == ("a = 1\n", 6, "print(a)")


def test_a_rest_task_stops_at_a_word_boundary() -> None:
    line = "    total = np.sum(x)  # all"
    # After "total", before "np", after "np", ... never inside a word, always 3 characters or more left.
    assert word_boundaries(line) == [9, 12, 14, 15, 18, 19, 20, 25]
    source, offset, truth = mask_line(CELL, 3, "rest", Third())
    assert source == "import numpy as np\n\ndef f(x):\n    total = np\n    return total\n# done\n%time f(1)\n"
    assert offset == len("import numpy as np\n\ndef f(x):\n    total = np")
    assert truth == ".sum(x)  # all"
    assert mask_line("    result", 0, "rest", Third()) is None  # one word: nowhere to stop inside it


def test_tasks_sample_every_kth_line_and_the_same_lines_for_both_kinds() -> None:
    cells = [
        {"cell_type": "markdown", "source": "# Title"},
        {"cell_type": "code", "source": ["import numpy as np\n", "values = np.arange(10)"]},
        {"cell_type": "code", "source": "total = values.sum()\nprint(total)\n"},
    ]
    everything = notebook_tasks("nb", cells, ("line",), 1, 0, None)
    assert [(t.cell, t.line) for t in everything] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    second = notebook_tasks("nb", cells, ("line", "rest"), 2, 0, None)
    lines = [(t.cell, t.line) for t in second if t.kind == "line"]
    assert lines in ([(1, 0), (2, 0)], [(1, 1), (2, 1)])
    assert [(t.cell, t.line) for t in second if t.kind == "rest"] == lines
    assert second == notebook_tasks("nb", cells, ("line", "rest"), 2, 0, None)  # seeded: the same again
    assert len(notebook_tasks("nb", cells, ("line",), 1, 0, 3)) == 3
    task = everything[3]
    assert task.task_id == "nb/2:1/line" and task.truth == "print(total)" and task.offset == 21


def test_strategies_differ_only_in_the_cells_around_the_active_one() -> None:
    cells = [{"cell_type": "code", "source": f"a{i} = {i}"} for i in range(4)]
    task = Task("nb/2:0/line", "line", "nb", 2, 0, "", 0, "a2 = 2")
    active = {"cell_type": "code", "source": ""}
    notebook = strategy_body(cells, task, "notebook")
    assert notebook == {"notebook": {"cells": [*cells[:2], active, cells[3]]}, "cell": 2, "offset": 0}
    assert strategy_body(cells, task, "above")["notebook"]["cells"] == [*cells[:2], active]
    assert strategy_body(cells, task, "cell") == {"notebook": {"cells": [active]}, "cell": 0, "offset": 0}


def test_edit_similarity() -> None:
    assert edit_similarity("np.sum(x)", "np.sum(x)") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("abc", "") == 0.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)


def test_the_command_runs_on_a_small_notebook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": ["# Sums\n", "Adding up an array."]},
        {"cell_type": "code", "metadata": {}, "execution_count": 1, "outputs": [],
         "source": ["import numpy as np\n", "values = np.arange(10)"]},
        {"cell_type": "code", "metadata": {}, "execution_count": 2, "source": ["values.sum()"],
         "outputs": [{"output_type": "execute_result", "execution_count": 2, "metadata": {},
                      "data": {"text/plain": ["45"]}}]},
    ]  # fmt: skip
    (tmp_path / "sums.ipynb").write_text(json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5}))
    rows_file = tmp_path / "rows.jsonl"
    argv = [str(tmp_path), "--limit", "2", "--every", "1", "--max-new-tokens", "8"]
    assert main([*argv, "--output", str(rows_file)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["notebooks"] == 1
    assert summary["settings"]["mode"] == "auto" and summary["settings"]["include_outputs"] is True
    # The first two eligible lines, both in the first code cell: each makes a line and a rest task.
    for kind in ("line", "rest"):
        assert set(summary["results"][kind]) == {"notebook", "above", "cell"}
        for scores in summary["results"][kind].values():
            assert scores["tasks"] == 2
            assert 0.0 <= scores["exact_match"] <= 1.0 and 0.0 <= scores["edit_similarity"] <= 1.0
            assert scores["prompt_tokens"] > 0
        assert set(summary["paired"][kind]) == {"notebook_vs_above", "notebook_vs_cell"}
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert len(rows) == 12
    truths = {row["task_id"]: row["truth"] for row in rows}
    assert truths["sums/1:0/line"] == "import numpy as np"
    assert truths["sums/1:1/line"] == "values = np.arange(10)"
    by_strategy = {(row["task_id"], row["strategy"]): row for row in rows}
    for task_id in truths:
        cell, above, notebook = (by_strategy[task_id, s]["prompt_tokens"] for s in STRATEGIES[::-1])
        assert cell < above < notebook  # the markdown above, then the cell below, add to the prompt
        assert by_strategy[task_id, "cell"]["cells_in_prefix"] == 1
        assert by_strategy[task_id, "notebook"]["cells_in_suffix"] == 1


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "Expecting property name"),
        ('{"worksheets": []}', "no list of cells"),
        ('{"cells": []}', "no cells"),
        ('{"cells": [{"cell_type": "heading", "source": "x"}]}', "heading"),
    ],
)
def test_a_notebook_the_server_would_refuse_stops_the_run_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, reason: str
) -> None:
    (tmp_path / "bad.ipynb").write_text(content)
    assert main([str(tmp_path), "--model", str(tmp_path / "no-such-model")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {tmp_path / 'bad.ipynb'}: ") and reason in error
