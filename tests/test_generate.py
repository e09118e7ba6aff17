"""Generation on a small random-weight model: streaming, stopping, cancelling, healing, prefix reuse."""

from __future__ import annotations

import threading
import time

import pytest

from kernel_model import PromptTooLong, SamplingParams, load_model
from kernel_model.generate import TextAssembler, longest_partial_stop

PREFIX = "import numpy as np\n\n\ndef normalize(values):\n    "
SUFFIX = "\n    return result\n"


def test_stream_deltas_add_up_to_the_text(fim_model):
    for suffix_first in (False, True):
        whole = fim_model.infill(PREFIX, SUFFIX, max_new_tokens=24, suffix_first=suffix_first)
        deltas = list(fim_model.stream_infill(PREFIX, SUFFIX, max_new_tokens=24, suffix_first=suffix_first))
        assert "".join(deltas) == whole
    streamed = fim_model.stream_complete("def f(x):\n", max_new_tokens=16)
    assert "".join(streamed) == streamed.result.text == fim_model.complete("def f(x):\n", max_new_tokens=16)


def test_healed_text_is_regenerated_but_not_returned(fim_model):
    generation = fim_model.stream_infill(PREFIX, SUFFIX, max_new_tokens=12, suffix_first=True)
    text = generation.text()
    regenerated = fim_model.tokenizer.decode_infilling(generation.result.tokens)
    assert regenerated.startswith("    ")  # the cut indentation, typed again by the model
    assert regenerated[4:].startswith(text)


def test_max_new_tokens_and_finish_reason(fim_model):
    generation = fim_model.stream_complete("x = ", max_new_tokens=5)
    generation.text()
    assert generation.result.completion_tokens <= 5
    assert generation.result.finish_reason in ("length", "end")


def test_stop_strings_end_the_text_before_them(fim_model):
    text = fim_model.complete("def f(x):\n", max_new_tokens=40, temperature=1.0, seed=3)
    assert len(text) > 2
    stop = text[1:3]
    stopped = fim_model.complete("def f(x):\n", max_new_tokens=40, temperature=1.0, seed=3, stop=[stop])
    assert stopped == text[: text.find(stop)]


def test_stop_strings_are_held_back_while_partial():
    assert longest_partial_stop("abc\n#", ["\n# %%"]) == 2
    assert longest_partial_stop("abc", ["\n"]) == 0


def test_text_assembler_never_splits_a_character(codellama_tokenizer_file):
    from kernel_model import Tokenizer

    tokenizer = Tokenizer(codellama_tokenizer_file)
    ids = tokenizer.encode_infilling("x = '日本'  # ✓")
    assembler = TextAssembler(tokenizer, heal="", stop=())
    deltas = [assembler.push(i) for i in ids] + [assembler.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "x = '日本'  # ✓"


def test_sampling_is_reproducible_from_a_seed(fim_model):
    first = fim_model.complete("def ", max_new_tokens=16, temperature=0.8, seed=11)
    assert first == fim_model.complete("def ", max_new_tokens=16, temperature=0.8, seed=11)


def test_cancel_stops_between_tokens(fim_model):
    cancel = threading.Event()
    generation = fim_model.stream_complete("def ", max_new_tokens=500, cancel=cancel)
    for produced, _ in enumerate(generation, start=1):
        if produced == 2:
            cancel.set()
    assert generation.result.finish_reason == "cancelled"
    assert generation.result.completion_tokens < 500


def test_deadline_ends_generation(fim_model):
    params = SamplingParams(max_new_tokens=500, deadline=time.monotonic())
    generation = fim_model.generate(fim_model.completion_prompt("def "), params)
    generation.text()
    assert generation.result.finish_reason == "deadline"


def test_prefix_reuse_runs_only_the_new_tokens_and_changes_nothing(fim_checkpoint):
    model = load_model(fim_checkpoint)
    notebook = "import pandas as pd\n\n" + "df = pd.read_csv('data.csv')\nprint(df.head())\n" * 20
    first = model.stream_infill(notebook + "x = ", "\n", max_new_tokens=8, suffix_first=True)
    first.text()
    assert first.result.reused_tokens == 0
    second = model.stream_infill(notebook + "x = d", "\n", max_new_tokens=8, suffix_first=True)
    text = second.text()
    assert second.result.reused_tokens > 0.9 * second.result.prompt_tokens
    model.prefix_cache.clear()
    assert model.infill(notebook + "x = d", "\n", max_new_tokens=8, suffix_first=True) == text


def test_a_generation_left_open_is_an_error_in_its_thread_not_a_hang(fim_model):
    from kernel_model import ModelError

    with fim_model.stream_complete("def f(x):\n", max_new_tokens=8) as left_open:
        next(left_open)
        with pytest.raises(ModelError, match="still open in this thread"):
            fim_model.complete("x = ", max_new_tokens=2)
    assert isinstance(fim_model.complete("x = ", max_new_tokens=2), str)  # closed on leaving the block


def test_prompt_longer_than_the_context_is_refused(fim_checkpoint):
    model = load_model(fim_checkpoint, max_context=64)
    with pytest.raises(PromptTooLong, match="context holds 64"):
        model.complete("x = 1\n" * 100)
    assert len(model.complete("x", max_new_tokens=200)) >= 0  # clamped to the room left, not an error


def test_long_context_allocates_nothing_up_front(fim_checkpoint):
    model = load_model(fim_checkpoint, max_context=100_000)
    assert model.max_context == 100_000
    assert model.model.new_cache().capacity == 0
    assert isinstance(model.complete("def f():\n", max_new_tokens=4), str)


def test_bad_sampling_parameters_are_clear(fim_model):
    from kernel_model import ModelError

    for kwargs, message in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [""]}, "stop"),
    ]:
        with pytest.raises(ModelError, match=message):
            fim_model.complete("x", **kwargs)
