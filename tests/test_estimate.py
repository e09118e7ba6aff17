"""The token estimate used where Code Llama's tokenizer is not at hand: never short, not wildly long."""

from __future__ import annotations

import base64
import json
import random
import string
import subprocess
import sys

import pytest
from conftest import NOTEBOOKS

from jupyter_codellama.estimate import estimate_tokens
from kernel_model.tokenizer import Tokenizer

RNG = random.Random(0)
AWKWARD = {
    "code": "def scale(frame, by=2):\n    return frame.assign(total=frame['a'] * by)\n" * 20,
    "numbers": str(list(range(10_000, 12_000, 7))),
    "table": "\n".join(f"{i:3d}  {i * 0.731:9.6f}  {-i / 3:10.4f}" for i in range(60)),
    "tab-separated": "\n".join("\t".join(str(RNG.randint(0, 999)) for _ in range(8)) for _ in range(60)),
    "base64": base64.b64encode(RNG.randbytes(2000)).decode(),
    "identifiers": " ".join(
        "".join(RNG.choices(string.ascii_letters, k=RNG.randint(3, 12))) for _ in range(200)
    ),
    "dna": "".join(RNG.choices("ACGT", k=3000)),
    "camel case": "getHTTPResponseCode XMLHttpRequest parseJSONToDict " * 40,
    "cjk": "# 计算平均值并打印结果\nx = 1  # 这是一个变量\n" * 20,
    "cyrillic": "# Вычислить среднее значение и вывести результат\n" * 20,
    "emoji": "print('done ✅ 😀')\n" * 20,
    "carriage returns": "a\rb\r" * 300,
}


@pytest.fixture(scope="module")
def code_llama(llama_tokenizer_file) -> Tokenizer:
    return Tokenizer(llama_tokenizer_file)


@pytest.mark.parametrize("kind", AWKWARD)
def test_never_short_on_text_that_defeats_a_characters_per_token_ratio(code_llama, kind) -> None:
    """A short estimate overflows the window: printed numbers were 2x over a fixed ratio."""
    text = AWKWARD[kind]
    real = code_llama.count(text)
    assert real <= estimate_tokens(text) <= 6 * real


def test_never_short_on_the_test_notebooks_and_about_right_on_code(code_llama) -> None:
    ratios = []
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            texts = ["".join(cell["source"])] + ["".join(o.get("text", "")) for o in cell.get("outputs", [])]
            ratios += [estimate_tokens(t) / code_llama.count(t) for t in texts if len(t) >= 20]
    ratios.sort()
    assert len(ratios) > 500 and ratios[0] >= 1.0
    assert ratios[len(ratios) // 2] < 1.6  # the median: context is not wasted wholesale


def test_the_kernel_estimates_without_loading_torch() -> None:
    code = "import sys\nfrom jupyter_codellama.estimate import estimate_tokens\nestimate_tokens('x = 1')\n"
    code += "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
