"""Tests for jupyter_codellama.postprocess: stop modes, suffix repeats, whitespace, and streaming."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jupyter_codellama.postprocess import StreamTrimmer, resolve_mode, trim_completion


def trim(text: str, mode: str = "auto", prefix: str = "", suffix: str = "", truncated: bool = False) -> str:
    return trim_completion(text, mode=mode, prefix=prefix, suffix=suffix, truncated=truncated)


def stream(
    deltas: list[str], mode: str = "auto", prefix: str = "", suffix: str = "", truncated: bool = False
) -> list[str]:
    """What a StreamTrimmer emits for the deltas: one entry per push, the finish() last."""
    trimmer = StreamTrimmer(mode=mode, prefix=prefix, suffix=suffix)
    return [trimmer.push(delta) for delta in deltas] + [trimmer.finish(truncated=truncated)]


# --- modes ------------------------------------------------------------------------------------


def test_resolve_mode_auto_follows_the_text_before_the_cursor_on_its_line() -> None:
    assert resolve_mode("auto", "x = foo(") == "line"
    assert resolve_mode("auto", "def f():\n    return g(") == "line"
    assert resolve_mode("auto", "def f():\n    ") == "block"
    assert resolve_mode("auto", "x = 1\n") == "block"
    assert resolve_mode("auto", "") == "block"
    # Right after the colon that opens a block, the completion is the body on the next lines.
    assert resolve_mode("auto", "def f(x):") == "block"
    assert resolve_mode("auto", "    for i in range(3):  # each row ") == "block"
    assert resolve_mode("auto", "d = {'a':") == "line"
    assert resolve_mode("auto", "x = y[1:") == "line"
    for mode in ("line", "block", "none"):
        assert resolve_mode(mode, "x = ") == mode


def test_unknown_mode_is_refused_with_one_sentence() -> None:
    with pytest.raises(ValueError, match="Unknown completion mode 'word'"):
        resolve_mode("word", "")
    with pytest.raises(ValueError):
        trim("x", mode="Line")
    with pytest.raises(ValueError):
        StreamTrimmer(mode="", prefix="", suffix="")


def test_line_mode_stops_at_the_end_of_the_line() -> None:
    assert trim("np.zeros(3)\nprint(x)\n", mode="line", prefix="x = ") == "np.zeros(3)"
    assert trim("\nprint(x)", mode="line", prefix="x = 1") == ""


def test_auto_mode_is_line_mode_inside_a_started_line() -> None:
    assert trim("range(10):\n    print(i)", prefix="for i in ") == "range(10):"


def test_auto_mode_after_a_block_header_gives_the_body() -> None:
    text = "\n    return x * 2\n\nprint(f(1))"
    assert trim(text, prefix="def f(x):", suffix="\n") == "\n    return x * 2"
    text = "\n        total += x\n    else:\n        total = 0"
    assert trim(text, prefix="    if x > 0:", suffix="\n") == "\n        total += x"


def test_block_mode_stops_at_a_dedent_below_the_starting_indentation() -> None:
    prefix = "def f(x):\n    "
    text = "y = x * 2\n    return y\n\ndef g():\n    pass\n"
    assert trim(text, prefix=prefix) == "y = x * 2\n    return y"
    assert trim(text, mode="block", prefix=prefix) == "y = x * 2\n    return y"


def test_block_mode_at_top_level_stops_at_a_new_statement_after_a_blank_line() -> None:
    text = "def area(r):\n    return 3.14 * r * r\n\nprint(area(2))\n"
    assert trim(text, prefix="import math\n") == "def area(r):\n    return 3.14 * r * r"
    # Without a blank line, consecutive top-level statements are one block.
    assert trim("x = 1\ny = 2\n\nz = 3", prefix="") == "x = 1\ny = 2"


def test_block_mode_keeps_blank_lines_inside_the_block() -> None:
    text = "a = 1\n\n    return a\nx = 2"
    assert trim(text, prefix="def f():\n    ") == "a = 1\n\n    return a"


def test_block_mode_ignores_lines_inside_brackets_and_strings_it_opened() -> None:
    block = 'query = """\nSELECT *\nFROM t\n"""\n    rows = run(query,\nfetch=True)'
    assert trim(block + "\nprint(rows)", prefix="def f():\n    ") == block


def test_block_mode_keeps_a_dedented_closing_bracket_line() -> None:
    text = "1,\n    2,\n)\nprint(values)"
    assert trim(text, prefix="values = (\n    ") == "1,\n    2,\n)"


def test_block_mode_takes_its_indentation_from_the_first_non_blank_line() -> None:
    text = "\n    return 1\n\nx = f()"
    assert trim(text, prefix="def f():\n") == "\n    return 1"
    assert trim(text, mode="block", prefix="def f():") == "\n    return 1"


def test_none_mode_keeps_everything_but_repeats_and_trailing_whitespace() -> None:
    text = "y = 1\n\nprint(y)  \n\n\n"
    assert trim(text, mode="none", prefix="x = 0\n") == "y = 1\n\nprint(y)"


# --- whole statements in block mode ------------------------------------------------------------


def test_a_completion_cut_off_by_the_limit_loses_its_unfinished_line() -> None:
    text = 'if n < 2:\n        return n\n    raise ValueError("n'
    prefix = "def fib(n):\n    "
    assert trim(text, prefix=prefix, truncated=True) == "if n < 2:\n        return n"
    assert trim(text, prefix=prefix) == text  # the model ended it there itself: all of it is the answer
    assert "".join(stream(list(text), prefix=prefix, truncated=True)) == "if n < 2:\n        return n"


def test_a_cut_off_statement_is_dropped_whole_even_across_lines() -> None:
    text = "x = 1\n    config = {\n        'a': 1,\n        'b':"
    assert trim(text, prefix="def f():\n    ", truncated=True) == "x = 1"


def test_a_block_header_cut_off_before_its_body_is_dropped() -> None:
    text = "total = 0\n    for x in xs:\n"
    assert trim(text, prefix="def f(xs):\n    ", truncated=True) == "total = 0"
    text = "total = 0\n    for x in xs:\n        total += x\n        if total >"
    assert (
        trim(text, prefix="def f(xs):\n    ", truncated=True)
        == "total = 0\n    for x in xs:\n        total += x"
    )


def test_the_first_line_streams_as_it_comes_and_stays_when_cut_off() -> None:
    assert stream(["if n", " < 2"], prefix="def f(n):\n    ", truncated=True) == ["if n", " < 2", ""]
    assert trim("x = foo(a,\n    b", prefix="def f():\n    ", truncated=True) == "x = foo(a,"


def test_later_lines_stream_once_their_statement_is_complete() -> None:
    deltas = ["a = 1\n", "    b = [", "1,\n", "        2]", "\n", "    c"]
    shown = stream(deltas, prefix="def f():\n    ")
    assert shown == ["a = 1", "", "", "", "\n    b = [1,\n        2]", "", "\n    c"]


def test_a_statement_repeated_word_for_word_ends_the_block() -> None:
    text = "self.x = x\n        self.y = y\n        self.y = y\n        self.y = y"
    prefix = "class P:\n    def __init__(self, x, y):\n        "
    assert trim(text, prefix=prefix) == "self.x = x\n        self.y = y"
    trimmer = StreamTrimmer(mode="auto", prefix=prefix, suffix="")
    shown = "".join(trimmer.push(line + "\n") for line in text.split("\n")[:3])
    assert trimmer.done  # generation stops at the repeat rather than run to the limit
    assert shown + trimmer.finish() == "self.x = x\n        self.y = y"


def test_a_repeated_statement_ends_a_whole_answer_too_and_waits_while_it_may_be_one() -> None:
    assert trim("a()\nb()\nb()\nb()", mode="none") == "a()\nb()"
    trimmer = StreamTrimmer(mode="none", prefix="", suffix="")
    assert trimmer.push("b()\nb(") == "b()"  # the second line may still become a repeat: it waits
    assert trimmer.push("1)") == "\nb(1)"  # it did not
    assert trimmer.push("\nb(1)\n") == "" and trimmer.done


def test_only_one_line_statements_count_as_repeats() -> None:
    calls = '    parser.add_argument(\n        "--a", type=int,\n    )\n    parser.add_argument(\n        "--b",\n    )'
    assert (
        trim(calls + "\n    return parser", prefix="def make():\n    p = 1\n")
        == calls + "\n    return parser"
    )


def test_a_header_without_a_body_is_never_shown_after_the_first_line() -> None:
    # The model dedents (or loops) right after a header: the header goes, streamed or not.
    text = "    x\n    def f():\nx"
    for truncated in (False, True):
        assert trim(text, mode="block", truncated=truncated) == "    x"
        assert "".join(stream([text], mode="block", truncated=truncated)) == "    x"
    # Blank and comment lines are no body; the model ending there leaves the header out too.
    assert trim("y = 1\n    if y:\n\n        ret", prefix="def f(y):\n    ", truncated=True) == "y = 1"
    assert trim("y = 1\n    if y:\n        # check", prefix="def f(y):\n    ") == "y = 1"
    assert (
        trim("y = 1\n    if y:\n        return y", prefix="def f(y):\n    ")
        == "y = 1\n    if y:\n        return y"
    )


def test_a_line_continued_with_a_backslash_is_not_a_whole_statement() -> None:
    assert trim("a = 1\n    b = a + \\\n        2", prefix="def f():\n    ", truncated=True) == "a = 1"


def test_inside_a_docstring_the_lines_are_its_text_until_it_closes() -> None:
    prefix = 'def mean(values):\n    """\n    '
    text = 'Average of the values.\n\n    Args:\n        values: numbers.\n    """\n    return sum(values) / len(values)\n\nx = 1'
    # The editor closed the quotes already: the model's closing line repeats them and goes.
    assert (
        trim(text, prefix=prefix, suffix='\n    """\n')
        == "Average of the values.\n\n    Args:\n        values: numbers."
    )
    # Otherwise the block goes on after the docstring, to the dedent.
    assert trim(text, prefix=prefix) == text.removesuffix("\n\nx = 1")
    # Docstring lines stream one by one, not held as one unfinished string.
    shown = stream(
        ["Average of the values.\n", "\n    Args:\n", "        values"], prefix=prefix, truncated=True
    )
    assert shown == ["Average of the values.", "\n\n    Args:", "", ""]


def test_repeats_inside_brackets_are_kept() -> None:
    text = "rows = [\n        0,\n        0,\n    ]"
    assert trim(text, prefix="def f():\n    ") == text
    assert trim(text, mode="none") == text


# --- repeats of the suffix --------------------------------------------------------------------


def test_a_closing_bracket_already_after_the_cursor_is_dropped() -> None:
    assert trim("a, b)", prefix="print(", suffix=")\n") == "a, b"
    assert trim('hello")', prefix='print("', suffix='")') == "hello"


def test_a_bracket_the_completion_opened_itself_is_kept() -> None:
    assert trim("len(x)", prefix="print(", suffix=")\n") == "len(x)"
    assert trim("f(a))", prefix="print(", suffix=")\n") == "f(a)"


def test_the_rest_of_the_line_repeated_is_dropped() -> None:
    assert trim("x + y, z)", prefix="total = f(", suffix="z)\nreturn total") == "x + y, "
    assert trim("return result", mode="block", prefix="    ", suffix="result\n") == "return "


def test_an_overlap_may_not_split_a_word() -> None:
    assert trim("total", prefix="x = ", suffix="l = 3\n") == "total"
    assert trim("print(a", prefix="", suffix="ab\n") == "print(a"


def test_a_line_equal_to_the_next_line_of_the_suffix_stops_the_completion() -> None:
    prefix = "def f(x):\n    y = x + 1\n    "
    suffix = "\n    return y\n"
    assert trim("z = y * 2\n    return y\n", prefix=prefix, suffix=suffix) == "z = y * 2"
    # On an empty line the cursor's own line counts: repeating the line below yields nothing.
    assert trim("b = 2\n", prefix="a = 1\n", suffix="b = 2\n") == ""


def test_a_repeated_closing_line_stops_before_it() -> None:
    text = "1,\n    2,\n)\nprint(values)"
    assert trim(text, prefix="values = (\n    ", suffix="\n)\n") == "1,\n    2,"


def test_a_line_inside_brackets_the_completion_opened_is_not_a_repeat() -> None:
    text = "run(\n    a,\n)\nx = 1"
    assert trim(text, mode="none", prefix="", suffix="\n)\n") == "run(\n    a,\n)\nx = 1"


def test_a_new_cell_marker_ends_the_completion_in_every_mode() -> None:
    text = "x = 1\n\n# %%\ny = 2"
    for mode in ("block", "none"):
        assert trim(text, mode=mode, prefix="") == "x = 1"
    assert trim("# %% [markdown]\n# Notes", mode="none", prefix="a = 1\n") == ""
    assert trim("x = 1\n    # %% not a marker\n", mode="none", prefix="") == "x = 1\n    # %% not a marker"


# --- whitespace -------------------------------------------------------------------------------


def test_trailing_spaces_and_blank_lines_go() -> None:
    assert trim("a = 1   \nb = 2\t\n\n   \n", prefix="") == "a = 1\nb = 2"
    assert trim("foo   ", prefix="x = ") == "foo"


def test_a_final_newline_is_kept_only_where_the_suffix_continues_the_line() -> None:
    # Cursor at the start of "b = 2": the newline keeps that line on its own.
    assert trim("a = 1\n", prefix="x = 0\n", suffix="b = 2\n") == "a = 1\n"
    # Cursor at the end of a line: the suffix already starts with a newline.
    assert trim("a = 1\n", prefix="x = 0\n", suffix="\nb = 2\n") == "a = 1"
    assert trim("a = 1\n", prefix="x = 0\n", suffix="") == "a = 1"
    assert trim("a = 1\n", mode="none", prefix="x = 0\n", suffix="b = 2") == "a = 1\n"
    # Line mode never ends a line, and whitespace alone is nothing to show.
    assert trim("a\n", mode="line", prefix="", suffix="b") == "a"
    assert trim("\n\n", mode="block", prefix="", suffix="b") == ""


def test_line_breaks_come_out_as_newlines_however_the_model_wrote_them() -> None:
    assert trim("a = 1\r\nb = 2\rc = 3\r\n", mode="none") == "a = 1\nb = 2\nc = 3"
    assert trim("a = 1\rb = 2", mode="line", prefix="x = 0\n") == "a = 1"
    # A "\r\n" split across two deltas is one line break, not two.
    assert "".join(stream(["a\r", "\nb\r", "\r\n", "c"], mode="none")) == "a\nb\n\nc"


# --- streaming --------------------------------------------------------------------------------


def test_streaming_emits_before_the_end_and_says_when_to_stop() -> None:
    trimmer = StreamTrimmer(mode="line", prefix="x = ", suffix="\n")
    assert trimmer.push("np.zeros") == "np.zeros"
    assert not trimmer.done
    assert trimmer.push("(3)\nprint") == "(3)"
    assert trimmer.done
    assert trimmer.push("(x)") == ""
    assert trimmer.finish() == ""
    assert trimmer.finish() == ""


def test_streaming_holds_back_what_may_repeat_the_suffix() -> None:
    trimmer = StreamTrimmer(mode="line", prefix="print(", suffix=")\n")
    assert trimmer.push("a, b") == "a, b"
    assert trimmer.push(")") == ""  # may be the suffix's ")" again
    assert trimmer.push("\n") == ""
    assert trimmer.done
    assert trimmer.finish() == ""


def test_streaming_holds_back_trailing_whitespace_until_it_matters() -> None:
    trimmer = StreamTrimmer(mode="none", prefix="", suffix="")
    assert trimmer.push("a = 1  ") == "a = 1"
    assert trimmer.push("\n") == ""
    assert trimmer.push("b") == "\nb"
    assert trimmer.finish() == ""


def test_streaming_block_mode_stops_at_the_dedent_without_more_text() -> None:
    trimmer = StreamTrimmer(mode="auto", prefix="def f():\n    ", suffix="")
    shown = trimmer.push("return 1\n") + trimmer.push("\nd")
    assert trimmer.done
    assert shown + trimmer.finish() == "return 1"


CODE_ALPHABET = st.sampled_from(
    ["a", "b", "x", "_", "1", " ", "    ", "\t", "\n", "\n\n", "(", ")", "[", "]", "{", "}", ":", ",", "=",
     "#", "%", "# %%", "\r", "\r\n", "'", '"', '"""', "\\", "return", "def f():", "pass"]
)  # fmt: skip
CODE = st.lists(CODE_ALPHABET, max_size=30).map("".join)


@st.composite
def split_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(CODE)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in pairwise(bounds)]


# A completion as it streams in, where it is, and whether the model ended it or was cut off.
STREAMED_COMPLETIONS = {
    "split": split_text(),
    "mode": st.sampled_from(["line", "block", "auto", "none"]),
    "prefix": CODE,
    "suffix": CODE,
    "truncated": st.booleans(),
}


@settings(max_examples=1500, deadline=None)
@given(**STREAMED_COMPLETIONS)
def test_streaming_equals_trimming_the_whole_text(
    split: tuple[str, list[str]], mode: str, prefix: str, suffix: str, truncated: bool
) -> None:
    text, deltas = split
    expected = trim_completion(text, mode=mode, prefix=prefix, suffix=suffix, truncated=truncated)
    trimmer = StreamTrimmer(mode=mode, prefix=prefix, suffix=suffix)
    shown = ""
    for delta in deltas:
        shown += trimmer.push(delta)
        # What was shown is final: it is the start of the answer, whatever comes next.
        assert expected.startswith(shown)
    assert shown + trimmer.finish(truncated=truncated) == expected


@settings(max_examples=500, deadline=None)
@given(**STREAMED_COMPLETIONS)
# Found in review: a stop right below a header that still waited for its body.
@example(split=("    x\n    def f():\nx", ["    x\n    def f():\nx"]), mode="block", prefix="", suffix="",
         truncated=True)  # fmt: skip
def test_stopping_when_done_gives_the_same_answer(
    split: tuple[str, list[str]], mode: str, prefix: str, suffix: str, truncated: bool
) -> None:
    text, deltas = split
    trimmer = StreamTrimmer(mode=mode, prefix=prefix, suffix=suffix)
    shown = ""
    for delta in deltas:
        shown += trimmer.push(delta)
        if trimmer.done:
            break  # as the service does: generation stops here
    expected = trim_completion(text, mode=mode, prefix=prefix, suffix=suffix, truncated=truncated)
    assert shown + trimmer.finish(truncated=truncated) == expected


@settings(max_examples=500, deadline=None)
@given(text=CODE, prefix=CODE, suffix=CODE, mode=st.sampled_from(["line", "block", "auto", "none"]))
def test_trimmed_text_is_the_start_of_the_completion_or_a_cut_of_it(
    text: str, prefix: str, suffix: str, mode: str
) -> None:
    result = trim_completion(text, mode=mode, prefix=prefix, suffix=suffix)
    lines = result.split("\n")
    assert all(line == line.rstrip() for line in lines[:-1] or [""])
    if resolve_mode(mode, prefix) == "line":
        assert "\n" not in result
    # Nothing is invented: apart from stripped spaces, the result reads as the start of the text.
    assert _squeeze(text).startswith(_squeeze(result))


def _squeeze(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()
