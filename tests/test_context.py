"""Tests for jupyter_codellama.context: notebook JSON to cells, and cells to a FIM prefix and suffix in a budget."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_codellama.context import (
    OUTPUT_MAX_LINES,
    Cell,
    FimContext,
    build_context,
    cells_from_json,
    plain_context,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
NOTEBOOKS = sorted((SHARED / "data" / "notebooks").glob("*.ipynb"))
REPO = Path(__file__).resolve().parents[1]
UNBOUNDED = 10**9


def count(text: str) -> int:
    """A deterministic stand-in for the sentencepiece count: about three characters a token."""
    return len(text) // 3 + 1


def load(path: Path) -> list[Cell]:
    return cells_from_json(json.loads(path.read_text(encoding="utf-8")))


def context(
    cells: list[Cell],
    index: int,
    offset: int,
    budget: int = UNBOUNDED,
    *,
    prefix_share: float = 0.75,
    include_outputs: bool = False,
) -> FimContext:
    return build_context(
        cells, index, offset, count_tokens=count, budget_tokens=budget, prefix_share=prefix_share,
        include_outputs=include_outputs,
    )  # fmt: skip


def positions(cells: list[Cell]) -> list[tuple[int, int]]:
    """Cursor positions to try: the start, middle and end of every cell."""
    return [
        (i, offset)
        for i, cell in enumerate(cells)
        for offset in sorted({0, len(cell.source) // 2, len(cell.source)})
    ]


def common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def assert_cursor_exact(ctx: FimContext, cell: Cell, offset: int, *, allow_line_cut: bool = False) -> None:
    """The prefix ends exactly at the cursor and the suffix starts right after it.

    The active cell may lose whole lines at its far ends; only with `allow_line_cut` (a budget
    smaller than the cursor's own line) may the cursor's line itself be cut.
    """
    before, after = cell.source[:offset], cell.source[offset:]
    marker = "# %%\n" if cell.cell_type == "code" else f"# %% [{cell.cell_type}]\n"
    line_starts = [0] + [i + 1 for i, ch in enumerate(before) if ch == "\n"]
    line_ends = [i + 1 for i, ch in enumerate(after) if ch == "\n"]
    whole_lines = any(ctx.prefix.endswith(marker + before[p:]) for p in line_starts) and (
        ctx.suffix.startswith(after) or ctx.suffix in {after[:q] for q in line_ends}
    )
    if whole_lines:
        return
    assert allow_line_cut and ctx.truncated
    assert before.endswith(ctx.prefix.rsplit(marker, 1)[-1]) and (after + "\n").startswith(ctx.suffix)


@pytest.fixture(scope="module")
def notebooks() -> dict[str, list[Cell]]:
    return {path.stem: load(path) for path in NOTEBOOKS}


# --- reading notebook JSON --------------------------------------------------------------------


def test_the_shared_notebooks_load(notebooks: dict[str, list[Cell]]) -> None:
    assert len(notebooks) == 12
    for cells in notebooks.values():
        assert 26 <= len(cells) <= 108
        assert {cell.cell_type for cell in cells} <= {"code", "markdown"}
    forests = notebooks["05.08-Random-Forests"]
    assert forests[2].source.startswith("%matplotlib inline\nimport numpy as np\n")


def test_cells_from_json_flattens_sources_and_outputs() -> None:
    notebook = {
        "cells": [
            {"cell_type": "markdown", "source": ["# Title\n", "Text"], "outputs": [{"bogus": 1}]},
            {
                "cell_type": "code",
                "source": "print(1)\nx",
                "outputs": [
                    {"output_type": "stream", "name": "stdout", "text": ["1\n", "2\n"]},
                    {"output_type": "stream", "name": "stdout", "text": "3\n"},
                    {"output_type": "execute_result", "data": {"text/plain": ["array([1,\n", "       2])"]}},
                    {"output_type": "display_data", "data": {"text/plain": "<Figure size 432x288 with 1 Axes>"}},
                    {"output_type": "display_data", "data": {"image/png": "iVBOR"}},
                    {"output_type": "error", "ename": "NameError", "evalue": "\x1b[0;31mname 'y'\x1b[0m", "traceback": []},
                ],
            },
            {"cell_type": "raw", "source": ""},
            {"cell_type": "code", "source": "", "outputs": [{"output_type": "stream", "text": "x" * 5000}]},
            {"cell_type": "code", "source": "", "outputs": [{"output_type": "stream", "text": "10%\r50%\r100%\n"}]},
        ]
    }  # fmt: skip
    cells = cells_from_json(notebook)
    assert [cell.cell_type for cell in cells] == ["markdown", "code", "raw", "code", "code"]
    assert cells[0] == Cell("markdown", "# Title\nText", ())
    assert cells[1].outputs == ("1\n2\n3", "array([1,\n       2])", "NameError: name 'y'")
    assert len(cells[3].outputs[0]) <= 2010
    assert cells[4].outputs == ("100%",)


@pytest.mark.parametrize(
    "notebook",
    [
        [],
        {"cells": {}},
        {"nbformat": 4},
        {"cells": [1]},
        {"cells": [{"cell_type": "heading", "source": ""}]},
        {"cells": [{"cell_type": "code"}]},
        {"cells": [{"cell_type": "code", "source": 5}]},
        {"cells": [{"cell_type": "code", "source": ["a", 2]}]},
        {"cells": [{"cell_type": "code", "source": "", "outputs": "x"}]},
        {"cells": [{"cell_type": "code", "source": "", "outputs": [3]}]},
        {"cells": [{"cell_type": "code", "source": "", "outputs": [{"output_type": "stream", "text": 3}]}]},
    ],
)
def test_cells_from_json_refuses_bad_shapes_in_one_sentence(notebook: object) -> None:
    with pytest.raises(ValueError) as raised:
        cells_from_json(notebook)  # type: ignore[arg-type]
    message = str(raised.value)
    assert message.endswith(".") and "\n" not in message and message.count(". ") == 0


def test_a_cell_checks_its_type() -> None:
    with pytest.raises(ValueError, match="cell_type"):
        Cell("heading", "x")
    assert Cell("code", "x", ["out"]).outputs == ("out",)  # type: ignore[arg-type]


# --- the prompt's shape -----------------------------------------------------------------------


def test_a_small_notebook_is_written_whole_in_percent_format() -> None:
    cells = [
        Cell("markdown", "# Data\n\nLoad it."),
        Cell("code", "%matplotlib inline\nimport numpy as np\n!pip list\nnp.ones?", ("ignored",)),
        Cell("raw", "raw text"),
        Cell("code", "   "),
        Cell("code", "x = np.arange(3)\nprint(x)"),
        Cell("code", "%%bash\nls -l"),
        Cell("code", "%%time\ny = x * 2"),
    ]
    ctx = context(cells, 4, len("x = np.ar"))
    assert ctx.prefix == (
        "# %% [markdown]\n# # Data\n#\n# Load it.\n\n"
        "# %%\n# %matplotlib inline\nimport numpy as np\n# !pip list\n# np.ones?\n\n"
        "# %% [raw]\n# raw text\n\n"
        "# %%\nx = np.ar"
    )
    assert ctx.suffix == "ange(3)\nprint(x)\n\n# %%\n# %%bash\n# ls -l\n\n# %%\n# %%time\ny = x * 2\n"
    assert (ctx.cells_in_prefix, ctx.cells_in_suffix, ctx.truncated) == (4, 2, False)


def test_the_active_cell_is_verbatim_magics_included() -> None:
    cells = [Cell("code", "import os"), Cell("code", "%timeit os.getcwd()\n!ls")]
    ctx = context(cells, 1, len("%timeit os."))
    assert ctx.prefix.endswith("# %%\n%timeit os.")
    assert ctx.suffix == "getcwd()\n!ls\n"


def test_a_markdown_active_cell_gets_its_marker() -> None:
    ctx = context([Cell("code", "x = 1"), Cell("markdown", "## Res")], 1, 6)
    assert ctx.prefix == "# %%\nx = 1\n\n# %% [markdown]\n## Res"
    assert ctx.suffix == ""


def test_outputs_become_short_comments_after_their_cell() -> None:
    long_output = "\n".join(f"row {i}" for i in range(50))
    cells = [
        Cell("code", "df.head()", (long_output, "x" * 300)),
        Cell("code", "df.shape", ("(3, 2)",)),
        Cell("code", "print(1)", ("stale output of the active cell",)),
    ]
    ctx = context(cells, 2, 0, include_outputs=True)
    assert "# Out: row 0\n#      row 1\n" in ctx.prefix
    assert f"#      row {OUTPUT_MAX_LINES - 1}\n#      ...\n" in ctx.prefix
    assert "row 10" not in ctx.prefix
    assert "# Out: " + "x" * 100 + " ...\n" in ctx.prefix
    assert "# %%\ndf.shape\n# Out: (3, 2)\n\n# %%\n" in ctx.prefix
    assert "stale" not in ctx.prefix + ctx.suffix
    assert "Out:" not in context(cells, 2, 0).prefix


def test_markdown_is_commented_everywhere(notebooks: dict[str, list[Cell]]) -> None:
    for cells in notebooks.values():
        code_cell = next(i for i, cell in enumerate(cells) if cell.cell_type == "code" and i > 5)
        ctx = context(cells, code_cell, 0, budget=2048)
        for text in (ctx.prefix, ctx.suffix):
            in_markdown = False
            for line in text.split("\n"):
                if line.startswith("# %%"):
                    in_markdown = line == "# %% [markdown]"
                elif in_markdown and line:
                    assert line.startswith("#"), line


def test_magics_outside_the_active_cell_are_comments(notebooks: dict[str, list[Cell]]) -> None:
    cells = notebooks["02.07-Fancy-Indexing"]
    ctx = context(cells, len(cells) - 1, 0)
    assert "# %timeit np.add.at(counts, np.searchsorted(bins, x), 1)\n" in ctx.prefix
    assert not any(line.lstrip().startswith(("%", "!")) for line in ctx.prefix.split("\n"))


# --- budget -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem[:5])
def test_real_notebooks_fit_the_budget_with_the_cursor_exact(path: Path) -> None:
    cells = load(path)
    for budget, outputs in ((512, False), (512, True), (96, False)):
        for index, offset in positions(cells):
            ctx = context(cells, index, offset, budget, include_outputs=outputs)
            assert count(ctx.prefix) + count(ctx.suffix) <= budget
            assert_cursor_exact(ctx, cells[index], offset, allow_line_cut=budget < 100)
            assert ctx == context(cells, index, offset, budget, include_outputs=outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem[:5])
def test_real_notebooks_are_cut_only_at_line_or_cell_boundaries(path: Path) -> None:
    cells = load(path)
    for index, offset in positions(cells)[::3]:
        full = context(cells, index, offset)
        assert not full.truncated
        ctx = context(cells, index, offset, 512)
        assert ctx.truncated == (ctx != full)
        # The suffix is the start of the whole suffix, ending at a line end.
        assert full.suffix.startswith(ctx.suffix)
        assert ctx.suffix in ("", full.suffix) or ctx.suffix.endswith("\n")
        # The prefix is the end of the whole prefix from a line start, after whole lines (the
        # gathered imports and definitions, a cell marker) that come from the notebook.
        tail = common_suffix(ctx.prefix, full.prefix)
        while tail and full.prefix[len(full.prefix) - tail - 1 : len(full.prefix) - tail] not in ("", "\n"):
            tail -= 1  # a shared "\n" before the kept lines is no part of them
        added = ctx.prefix[: len(ctx.prefix) - tail]
        assert added == "" or added.endswith("\n")
        known = set(full.prefix.split("\n"))
        for line in added.split("\n"):
            assert line in known or line.strip() == "..." or line.strip().startswith('"""'), line


def test_a_notebook_far_larger_than_the_budget(notebooks: dict[str, list[Cell]]) -> None:
    cells = notebooks["03.11-Working-with-Time-Series"]
    whole = context(cells, 54, 0)
    assert count(whole.prefix) + count(whole.suffix) > 15 * 512
    ctx = context(cells, 54, 0, 512)
    assert ctx.truncated
    assert 400 < count(ctx.prefix) + count(ctx.suffix) <= 512
    assert 1 < ctx.cells_in_prefix < 54 and 0 < ctx.cells_in_suffix < len(cells) - 55


def test_the_prefix_gets_its_share_and_unused_share_flows(notebooks: dict[str, list[Cell]]) -> None:
    cells = notebooks["03.11-Working-with-Time-Series"]
    middle = 54
    # 3:1 by share, less what cutting at cell and line boundaries leaves over to the other side.
    default = context(cells, middle, 0, 1024)
    assert count(default.prefix) > 2.25 * count(default.suffix)
    reversed_share = context(cells, middle, 0, 1024, prefix_share=0.25)
    assert count(reversed_share.suffix) > 2.25 * count(reversed_share.prefix)
    # At the notebook's end nothing follows: the prefix takes the suffix's share too.
    last = context(cells, len(cells) - 1, len(cells[-1].source), 1024)
    assert count(last.prefix) > 0.9 * 1024


def test_an_active_cell_larger_than_the_budget_keeps_the_lines_nearest_the_cursor() -> None:
    lines = [f"value_{i} = compute({i}, scale=2.5)  # step {i}\n" for i in range(400)]
    source = "".join(lines)
    offset = len("".join(lines[:200])) + len("value_200 = comp")
    cells = [Cell("code", "import math"), Cell("code", source), Cell("code", "print(value_1)")]
    ctx = context(cells, 1, offset, 300)
    assert count(ctx.prefix) + count(ctx.suffix) <= 300
    assert ctx.truncated and (ctx.cells_in_prefix, ctx.cells_in_suffix) == (1, 0)
    assert ctx.prefix.startswith("# %%\nvalue_") and ctx.prefix.endswith(
        "value_199 = compute(199, scale=2.5)  # step 199\nvalue_200 = comp"
    )
    assert ctx.suffix.startswith("ute(200, scale=2.5)  # step 200\nvalue_201") and ctx.suffix.endswith("\n")
    assert ctx.prefix.count("\n") > 2 * ctx.suffix.count("\n")
    assert_cursor_exact(ctx, cells[1], offset)


def test_a_cursor_line_longer_than_the_budget_is_cut_at_its_far_ends() -> None:
    source = "data = [" + ", ".join(str(i) for i in range(3000)) + "]"
    offset = source.index("1500")
    ctx = context([Cell("code", source)], 0, offset, 100)
    assert count(ctx.prefix) + count(ctx.suffix) <= 100
    assert source[:offset].endswith(ctx.prefix.removeprefix("# %%\n"))
    assert source[offset:].startswith(ctx.suffix)
    assert ctx.truncated and len(ctx.prefix) > len(ctx.suffix) > 0


def test_count_tokens_sees_pieces_each_once_never_the_prompt(notebooks: dict[str, list[Cell]]) -> None:
    cells = notebooks["05.02-Introducing-Scikit-Learn"]
    seen: list[str] = []

    def recording(text: str) -> int:
        seen.append(text)
        return count(text)

    ctx = build_context(cells, 60, 0, count_tokens=recording, budget_tokens=1024)
    assert ctx.truncated
    assert len(seen) == len(set(seen)) and len(seen) < 150
    assert ctx.prefix not in seen and ctx.suffix not in seen
    assert sum(map(len, seen)) < 3 * len(ctx.prefix + ctx.suffix)


def test_the_same_input_gives_the_same_output_in_any_process(notebooks: dict[str, list[Cell]]) -> None:
    script = (
        "import json, pathlib, sys\n"
        "from jupyter_codellama.context import build_context, cells_from_json\n"
        "cells = cells_from_json(json.loads(pathlib.Path(sys.argv[1]).read_text()))\n"
        "ctx = build_context(cells, 60, 5, count_tokens=lambda t: len(t) // 3 + 1, budget_tokens=300)\n"
        "print(json.dumps([ctx.prefix, ctx.suffix]))\n"
    )
    path = next(path for path in NOTEBOOKS if path.stem.startswith("05.02"))
    results = set()
    for seed in ("1", "2", "3"):
        run = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            capture_output=True, text=True, check=True, cwd=REPO, env={"PYTHONHASHSEED": seed, "PATH": ""},
        )  # fmt: skip
        results.add(run.stdout)
    here = context(notebooks["05.02-Introducing-Scikit-Learn"], 60, 5, 300)
    assert results == {json.dumps([here.prefix, here.suffix]) + "\n"}


# --- imports and definitions the cursor needs ---------------------------------------------------


def _imported_names(line: str) -> set[str]:
    match = re.match(r"(?:from \S+ )?import (.+)", line.split("#")[0].strip())
    if not match:
        return set()
    return {part.split(" as ")[-1].strip().split(".")[0] for part in match.group(1).split(",")}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem[:5])
def test_imports_and_functions_used_in_the_active_cell_survive(path: Path) -> None:
    cells = load(path)
    bound: dict[str, str] = {}  # name -> what last bound it at the top level: an import line or "def"
    checked = 0
    for index, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        source = cell.source
        own = _top_level_bindings(source)
        used = set(re.findall(r"(?<![\w.])[A-Za-z_]\w*", source)) - own.keys()
        ctx = context(cells, index, len(source), 512)
        for name in sorted(used & bound.keys()):
            if bound[name] == "def":
                assert re.search(rf"^(def|class) {name}\b", ctx.prefix, re.MULTILINE), (index, name)
            elif bound[name] != "assign":
                assert bound[name] in ctx.prefix, (index, name)
            checked += 1
        bound.update(own)
    assert checked > 10


def _top_level_bindings(source: str) -> dict[str, str]:
    bindings: dict[str, str] = {}
    for line in source.split("\n"):
        bindings.update(dict.fromkeys(_imported_names(line), line))
        match = re.match(r"(?:def|class) (\w+)", line)
        if match:
            bindings[match.group(1)] = "def"
        match = re.match(r"([\w, ]+)=[^=]", line)
        if match:
            bindings.update(dict.fromkeys(re.findall(r"\w+", match.group(1)), "assign"))
    return bindings


def filler(n: int) -> list[Cell]:
    return [Cell("markdown", f"Paragraph {i}: " + "words about the analysis " * 12) for i in range(n)]


def test_gathered_units_come_first_imports_first_and_only_what_is_used() -> None:
    helper = (
        "def smooth(values, width=3):\n"
        '    """Moving average of values."""\n'
        "    kernel = np.ones(width) / width\n"
        "    return np.convolve(values, kernel, mode='same')\n"
    )
    cells = [
        Cell("code", "import os\nimport numpy as np\nimport pandas as pd\nfrom sklearn.linear_model import LinearRegression"),
        Cell("code", helper),
        Cell("code", "model = LinearRegression(fit_intercept=True)\nunused = os.getcwd()"),
        *filler(40),
        Cell("code", "trend = smooth(series)\nmodel.fit("),
    ]  # fmt: skip
    ctx = context(cells, len(cells) - 1, len(cells[-1].source), 400)
    assert ctx.prefix.startswith(
        "# %%\nimport numpy as np\nfrom sklearn.linear_model import LinearRegression\n\n"
        + helper
        + "\nmodel = LinearRegression(fit_intercept=True)\n\n# %% [markdown]\n"
    )
    assert "import pandas" not in ctx.prefix and "import os" not in ctx.prefix
    assert ctx.prefix.endswith("# %%\ntrend = smooth(series)\nmodel.fit(")
    assert count(ctx.prefix) + count(ctx.suffix) <= 400


def test_a_large_definition_shrinks_to_its_signature_and_docstring() -> None:
    body = "".join(f"    total += weights[{i}] * values[{i}]\n" for i in range(200))
    big = (
        'def weighted_total(values, weights):\n    """Sum of values scaled by weights."""\n    total = 0\n'
        + body
    )
    cells = [Cell("code", big + "    return total\n"), *filler(30), Cell("code", "weighted_total(")]
    ctx = context(cells, len(cells) - 1, len("weighted_total("), 400)
    assert ctx.prefix.startswith(
        '# %%\ndef weighted_total(values, weights):\n    """Sum of values scaled by weights."""\n    ...\n'
    )
    assert "total +=" not in ctx.prefix


def test_a_class_keeps_its_method_signatures_when_shortened() -> None:
    methods = "".join(
        f"    def step_{i}(self, x):\n"
        + "".join(f"        x = x * {j} + {i}\n" for j in range(20))
        + "        return x\n"
        for i in range(4)
    )
    cells = [
        Cell("code", "class Pipeline:\n    name = 'p'\n" + methods),
        *filler(30),
        Cell("code", "p = Pipeline()\np."),
    ]
    ctx = context(cells, len(cells) - 1, len(cells[-1].source), 400)
    header = ctx.prefix.split("\n\n# %%")[0]
    assert header.startswith("# %%\nclass Pipeline:\n    name = 'p'\n    def step_0(self, x):\n        ...\n")
    assert "def step_3(self, x):" in header and "x * 5" not in header


def test_cells_that_do_not_parse_still_yield_their_definitions() -> None:
    broken = (
        "import numpy as np\n"
        "def scale(x):\n"
        "    return np.asarray(x) * 2\n"
        "\n"
        "result = scale([1, 2, 3]\n"  # unclosed: the cell does not parse
        "\n"
        "def shift(x, by=1):\n"
        "    return x +\n"  # a body mid-edit
    )
    cells = [Cell("code", broken), *filler(30), Cell("code", "shift(scale(data")]
    ctx = context(cells, len(cells) - 1, len(cells[-1].source), 300)
    header = ctx.prefix.split("\n\n# %% [markdown]")[0]
    assert "import numpy as np\n" in header
    assert "def scale(x):\n    return np.asarray(x) * 2\n" in header
    assert "def shift(x, by=1):\n" in header


def test_old_mac_line_endings_above_the_cursor_are_read_as_line_breaks() -> None:
    # Python's parser breaks lines at a lone "\r" too; a cell saved with them must not upset the
    # line numbers the definitions are read by.
    cells = [Cell("code", "class A:#%%bash\r  x = 1\rdef scale(v):\r    return v * 2\r"), *filler(30),
             Cell("code", "scale(A.")]  # fmt: skip
    ctx = context(cells, len(cells) - 1, len("scale(A."), 300)
    assert "def scale(v):" in ctx.prefix.split("\n\n# %% [markdown]")[0]


def test_the_active_cells_own_lines_above_the_cursor_are_gathered_when_cut() -> None:
    source = "import numpy as np\n" + "".join(f"row_{i} = {i}\n" for i in range(300)) + "np."
    ctx = context([Cell("code", source)], 0, len(source), 200)
    assert ctx.prefix.startswith("# %%\nimport numpy as np\n\n# %%\n")
    assert ctx.prefix.endswith("row_299 = 299\nnp.")


def test_a_name_rebound_below_the_cursor_is_not_fetched_from_above() -> None:
    cells = [
        Cell("code", "def model(x):\n    return x\n"),
        *filler(30),
        Cell("code", "X = data\nmodel = Ridge()\nmodel.fit(X)"),
    ]
    ctx = context(cells, len(cells) - 1, len("X = data\n"), 300)
    assert "def model" not in ctx.prefix


def test_words_in_strings_and_comments_are_not_uses_but_f_string_fields_are() -> None:
    cells = [
        Cell("code", "components = pca.transform(noisy)\ndensity = kde(x)\nshape = (3, 4)\nlabel = 'fit'\n"
                     "width = 8\nrow = {}"),
        *filler(30),
        Cell("code", "# the probability density\nplt.xlabel('number of components')\n"
                     "title = f'{label}: {{shape}} {row[\"components\"]:>{width}}'\n"),
    ]  # fmt: skip
    ctx = context(cells, len(cells) - 1, len(cells[-1].source), 300)
    header = ctx.prefix.split("\n\n# %% [markdown]")[0]
    assert "label = 'fit'" in header and "width = 8" in header and "row = {}" in header
    assert "components =" not in header and "density =" not in header and "shape =" not in header


def test_a_window_cut_inside_a_docstring_still_reads_the_code_after_it() -> None:
    # The kept text starts inside the docstring: its closing quotes must not open a string that hides
    # the code below.
    docstring = "".join(f"    Detail {i} about the summary that is written here.\n" for i in range(40))
    active = f'def report(data):\n    """Summarise.\n{docstring}    """\n    cleaned = scrub(data)\n    return cleaned\n'
    cells = [Cell("code", "def scrub(d):\n    return d.dropna()"), *filler(30), Cell("code", active)]
    ctx = context(cells, len(cells) - 1, len(active), 300)
    assert "Summarise" not in ctx.prefix and "def scrub(d):" in ctx.prefix


def test_a_long_assignment_is_not_carried_but_hides_older_bindings() -> None:
    table = "rates = {\n" + "".join(f"    'r{i}': {i},\n" for i in range(20)) + "}\n"
    cells = [Cell("code", "rates = [0.1, 0.2]"), Cell("code", table), *filler(30), Cell("code", "rates[")]
    ctx = context(cells, len(cells) - 1, len("rates["), 300)
    assert "rates =" not in ctx.prefix


def test_a_markdown_active_cell_gathers_no_definitions() -> None:
    cells = [Cell("code", "def data(x):\n    return x\n"), *filler(30), Cell("markdown", "The data shows")]
    ctx = context(cells, len(cells) - 1, len("The data shows"), 300)
    assert "def data" not in ctx.prefix and ctx.prefix.endswith("# %% [markdown]\nThe data shows")


def test_bad_arguments_are_refused_in_one_sentence() -> None:
    cells = [Cell("code", "abc")]
    calls = [
        lambda: build_context([], 0, 0, count_tokens=count, budget_tokens=10),
        lambda: build_context(cells, 1, 0, count_tokens=count, budget_tokens=10),
        lambda: build_context(cells, -1, 0, count_tokens=count, budget_tokens=10),
        lambda: build_context(cells, True, 0, count_tokens=count, budget_tokens=10),
        lambda: build_context(cells, 0, 4, count_tokens=count, budget_tokens=10),
        lambda: build_context(cells, 0, -1, count_tokens=count, budget_tokens=10),
        lambda: build_context(cells, 0, 1.0, count_tokens=count, budget_tokens=10),
        lambda: build_context(cells, 0, 0, count_tokens=count, budget_tokens=0),
        lambda: build_context(cells, 0, 0, count_tokens=count, budget_tokens=10.5),
        lambda: build_context(cells, 0, 0, count_tokens=count, budget_tokens=10, prefix_share=1.5),
        lambda: plain_context("a", "b", count_tokens=count, budget_tokens=-3),
    ]
    for call in calls:
        with pytest.raises(ValueError) as raised:
            call()  # type: ignore[no-untyped-call]
        message = str(raised.value)
        assert message.endswith(".") and "\n" not in message


# --- plain text -------------------------------------------------------------------------------


def test_plain_context_keeps_short_text_whole() -> None:
    ctx = plain_context("import os\nos.", "path\n", count_tokens=count, budget_tokens=100)
    assert ctx == FimContext("import os\nos.", "path\n", 0, 0, False)


def test_plain_context_trims_far_ends_at_line_boundaries() -> None:
    prefix = "".join(f"line {i}\n" for i in range(500)) + "x = "
    suffix = "1\n" + "".join(f"after {i}\n" for i in range(500))
    ctx = plain_context(prefix, suffix, count_tokens=count, budget_tokens=200)
    assert ctx.truncated
    assert count(ctx.prefix) + count(ctx.suffix) <= 200
    assert prefix.endswith(ctx.prefix) and ctx.prefix.startswith("line ")
    assert suffix.startswith(ctx.suffix) and ctx.suffix.endswith("\n")
    assert 2 * count(ctx.suffix) < count(ctx.prefix)
    # With nothing after the cursor, the prefix takes the suffix's share as well.
    only_prefix = plain_context(prefix, "", count_tokens=count, budget_tokens=200)
    assert only_prefix.prefix.count("\n") > 1.25 * ctx.prefix.count("\n")
