"""Where completions run: the engine interface the model service drives, and the in-process kernel_model engine."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from kernel_model import CodeLlama, Generation, SamplingParams, load_model


@dataclass
class StreamStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    finish_reason: str = ""  # "end", "stop", "length", "deadline", "cancelled" or "closed"


class CompletionStream(Protocol):
    """Text deltas of one generation; `stats` is complete once iteration ends or `close` returns."""

    stats: StreamStats

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...


class Engine(Protocol):
    name: str
    supports_infilling: bool
    max_context: int

    def describe(self) -> dict[str, Any]:
        """The status's model fields beyond name, supports_infilling and max_context (device, dtype)."""

    def count_tokens(self, text: str) -> int: ...

    def stream(
        self, prefix: str, suffix: str, *, infill: bool, params: SamplingParams, cancel: threading.Event
    ) -> CompletionStream: ...

    def reset(self) -> None:
        """Forget cached state after a failure, so the next request starts clean."""


class LocalStream:
    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    def __iter__(self) -> Iterator[str]:
        return self.generation

    def close(self) -> None:
        self.generation.close()

    @property
    def stats(self) -> StreamStats:
        result = self.generation.result
        return StreamStats(result.prompt_tokens, result.completion_tokens, result.reused_tokens,
                           result.prefill_ms, result.decode_ms, result.finish_reason)  # fmt: skip


class LocalEngine:
    """kernel_model in this process, on this machine's GPU or CPU."""

    def __init__(self, model: CodeLlama) -> None:
        self.model = model
        self.name = model.name
        self.supports_infilling = model.supports_infilling
        self.max_context = model.max_context
        # Unchanged cells give the context builder identical strings on every keystroke.
        self._count = functools.lru_cache(maxsize=8192)(model.tokenizer.count)

    @classmethod
    def load(
        cls, model: str, device: str, dtype: str, *, quant: str | None = None, compile: bool = False
    ) -> LocalEngine:
        return cls(load_model(model, device=device, dtype=dtype, quant=quant, compile=compile))

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.model.device), "dtype": str(self.model.dtype).removeprefix("torch."),
                "quant": self.model.quant}  # fmt: skip

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    def stream(
        self, prefix: str, suffix: str, *, infill: bool, params: SamplingParams, cancel: threading.Event
    ) -> LocalStream:
        if infill and self.supports_infilling:
            # SPM: the suffix comes first, so a keystroke at the cursor changes only the prompt's
            # tail and the prefix cache covers the rest; it also infills single lines better.
            prompt = self.model.infilling_prompt(prefix, suffix, suffix_first=True)
        else:
            # Models without FIM pieces (Python variants, 34B) still complete from the prefix alone.
            prompt = self.model.completion_prompt(prefix)
        return LocalStream(self.model.generate(prompt, params, cancel))

    def reset(self) -> None:
        self.model.prefix_cache.clear()
