"""The %%codellama prompt: an instruction or a <FILL> cell, with the kernel's context, fitted to the model's window.

Three shapes:
- a cell holding `<FILL>` (Meta's marker in `example_infilling.py`) is infilled: the context code
  and the text before the marker are the prefix, the text after it the suffix;
- an instruction to an Instruct model uses Llama 2's chat format, `[INST] … [/INST]`, and the
  answer is opened with a ```python fence so that it is code and ends at the closing fence;
- an instruction to a base model becomes code: the context cells in the percent format
  (`# %%`), then the instruction as a comment opening a new cell, which ends at the next `# %%`.
Tokens cannot be counted here (the tokenizer lives with the server's model), so the budget is
in estimated tokens (`estimate_tokens`, which errs on the long side: a notebook of printed numbers
or CJK comments costs a token a character or more).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .client import CodeLlamaError, ModelInfo
from .estimate import estimate_tokens
from .kernel_context import KernelContext
from .postprocess import normalize_line_breaks

FILL = "<FILL>"
MARGIN_TOKENS = 32  # the server keeps 16 tokens free for FIM pieces; more for the estimate's error
VARIABLES_SHARE = 0.25  # of the budget, at most, for the namespace summary; the code matters more
CELL_MARKER = "# %%"
STYLES = ("auto", "instruct", "base")


@dataclass(frozen=True)
class MagicPrompt:
    kind: str  # "instruction" | "fill"
    prefix: str
    suffix: str = ""
    infill: bool = False
    stop: tuple[str, ...] = ()
    before: str = ""  # a fill cell's text around <FILL>
    after: str = ""
    cells_used: int = 0
    cells_dropped: int = 0  # the oldest cells, left out to fit the window

    def code(self, generated: str) -> str:
        """The answer as a cell: a fill cell completed, or the generated code."""
        # A cell's lines end in "\n"; the in-kernel model's raw text may not (the server's is already clean).
        generated = normalize_line_breaks(generated)
        if self.kind == "fill":
            return self.before + generated + self.after
        return generated.strip("\n").rstrip()


def build_prompt(
    body: str, context: KernelContext | None, model: ModelInfo, max_new_tokens: int, style: str = "auto"
) -> MagicPrompt:
    context = context or KernelContext((), ())
    budget = model.max_context - max_new_tokens - MARGIN_TOKENS
    if budget <= 0:
        raise CodeLlamaError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {model.name}'s "
            f"{model.max_context}-token window"
        )
    fills = body.count(FILL)
    if fills > 1:
        raise CodeLlamaError(f"the cell has {fills} {FILL} markers; the model fills one place at a time")
    if fills == 1:
        if not model.supports_infilling:
            raise CodeLlamaError(
                f"{model.name} cannot infill (Code Llama - Python and 34B complete left to right only): "
                f"remove {FILL} and describe the code instead"
            )
        before, after = body.split(FILL)
        return fit(lambda c, v: fill_prompt(before, after, c, v), context, budget)
    instruction = body.strip()
    instruct = model.instruct if style == "auto" else style == "instruct"
    shape = instruct_prompt if instruct else base_prompt
    return fit(lambda c, v: shape(instruction, c, v), context, budget)


Render = Callable[[tuple[str, ...], tuple[str, ...]], MagicPrompt]


def fit(render: Render, context: KernelContext, budget: int) -> MagicPrompt:
    """The prompt with the newest cells and variables that fit `budget` tokens; the oldest go first."""
    bare = render((), ())
    if size(bare) > budget:
        raise CodeLlamaError(
            f"the cell is too long for the model: about {size(bare)} tokens, where "
            f"{budget} fit beside the answer; shorten it or lower --max-new-tokens"
        )
    variables = context.variables
    limit = min(budget, size(bare) + int(budget * VARIABLES_SHARE))
    while variables and size(render((), variables)) > limit:
        variables = variables[1:]
    cells = context.cells
    # The size grows with each cell kept: binary search the most newest cells that fit.
    low, high = 0, len(cells)
    while low < high:
        middle = (low + high + 1) // 2
        if size(render(cells[len(cells) - middle :], variables)) <= budget:
            low = middle
        else:
            high = middle - 1
    prompt = render(cells[len(cells) - low :], variables)
    return replace(prompt, cells_used=low, cells_dropped=len(cells) - low)


def size(prompt: MagicPrompt) -> int:
    return estimate_tokens(prompt.prefix) + estimate_tokens(prompt.suffix)


def code_context(cells: tuple[str, ...], variables: tuple[str, ...]) -> str:
    """The context as a percent-format script: one `# %%` section per cell, then the variables."""
    text = "".join(f"{CELL_MARKER}\n{cell}\n\n" for cell in cells)
    if variables:
        text += (
            f"{CELL_MARKER}\n# Variables in the kernel now:\n" + "".join(f"# {v}\n" for v in variables) + "\n"
        )
    return text


def fill_prompt(before: str, after: str, cells: tuple[str, ...], variables: tuple[str, ...]) -> MagicPrompt:
    prefix = code_context(cells, variables) + f"{CELL_MARKER}\n{before}"
    return MagicPrompt("fill", prefix, after, infill=True, before=before, after=after)


def base_prompt(instruction: str, cells: tuple[str, ...], variables: tuple[str, ...]) -> MagicPrompt:
    task = "".join(f"# {line}".rstrip() + "\n" for line in f"Task: {instruction}".splitlines())
    prefix = code_context(cells, variables) + f"{CELL_MARKER}\n{task}"
    # The model starts the next cell when this one is done.
    return MagicPrompt("instruction", prefix, stop=(f"\n{CELL_MARKER}",))


def instruct_prompt(instruction: str, cells: tuple[str, ...], variables: tuple[str, ...]) -> MagicPrompt:
    parts = ["I am working in a Jupyter notebook running Python."]
    if cells:
        history = "\n\n".join(cells)
        parts.append(f"These cells have run so far, oldest first:\n```python\n{history}\n```")
    if variables:
        parts.append("Variables defined in the kernel now:\n" + "\n".join(f"- {v}" for v in variables))
    parts.append(f"Write the code for the next cell. The task: {instruction}\nAnswer with Python code only.")
    # The BOS token is the server's; opening the fence in the answer makes the model answer in
    # code at once, and the closing fence ends it.
    prefix = "[INST] " + "\n\n".join(parts) + " [/INST] ```python\n"
    return MagicPrompt("instruction", prefix, stop=("```",))
