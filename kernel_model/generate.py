"""Generation: prefix-cached prefill, incremental decode, sampling, token healing, streaming text, stopping.

A stack of small functions (sample, prefill, decode one step) under one `Generation` iterator that
yields text deltas and leaves its `result` behind, so callers can stream, cancel and time it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ModelError, PromptTooLong
from .model import KVCache, Transformer
from .prompts import Prompt, healing_candidates
from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 sequence to


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    deadline: float | None = None  # time.monotonic() after which generation ends

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ModelError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise ModelError(f"temperature must be 0 or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ModelError(f"top_p must be in (0, 1], not {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ModelError("stop strings must be non-empty strings")


@dataclass
class GenerationResult:
    text: str = ""
    finish_reason: str = ""  # "end" | "stop" | "length" | "deadline" | "cancelled" | "closed"
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    completion_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # generated ids, healed text included
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


class PrefixCache:
    """KV caches of recent prompts, least recently used first out; a new prompt continues the best match.

    Typing at the cursor changes only a prompt's tail, so nearly all of a long notebook's keys and
    values are reused. Each slot holds one sequence's cache and the tokens it was computed from.
    """

    def __init__(self, model: Transformer, slots: int = 2) -> None:
        self.model = model
        self.slots = slots
        self._entries: OrderedDict[int, tuple[KVCache, list[int]]] = OrderedDict()
        self._next_key = 0

    def acquire(self, ids: Sequence[int]) -> tuple[int, KVCache, int]:
        """A cache for `ids` and how many leading ids it already holds (always < len(ids))."""
        best_key, best_len = None, -1
        for key, (_, tokens) in self._entries.items():
            shared = common_prefix_length(tokens, ids)
            if shared > best_len:
                best_key, best_len = key, shared
        if best_key is None or (best_len == 0 and len(self._entries) < self.slots):
            best_key, best_len = self._next_key, 0
            self._next_key += 1
            self._entries[best_key] = (self.model.new_cache(), [])
            while len(self._entries) > self.slots:
                self._entries.popitem(last=False)
        self._entries.move_to_end(best_key)
        cache, tokens = self._entries[best_key]
        reused = min(best_len, len(ids) - 1)  # the last prompt token runs again: its logits start decoding
        cache.truncate(reused)
        del tokens[reused:]
        return best_key, cache, reused

    def record(self, key: int, tokens: Sequence[int]) -> None:
        if key in self._entries:
            self._entries[key][1][:] = tokens

    def discard(self, key: int) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits [V] → one id: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep the smallest set whose mass reaches top_p; the first id always stays.
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


class TextAssembler:
    """Turns generated ids into text deltas that never split a character nor show a stop string."""

    def __init__(self, tokenizer: Tokenizer, heal: str, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.heal = heal
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        decoded = self.tokenizer.decode_infilling(self.ids)
        if len(decoded) < len(self.heal):
            return ""
        text = decoded[len(self.heal) :]
        end = len(text.rstrip(_REPLACEMENT))  # an unfinished character waits for its next byte
        for stop in self.stop:
            at = text.find(stop)
            if at != -1 and at < end:
                end, self.stopped = at, True
        self.text = text[:end]
        if not self.stopped:
            end -= longest_partial_stop(self.text, self.stop)
        delta = text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def finish(self) -> str:
        """The text held back for a stop string that never came, minus an unfinished character."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


def longest_partial_stop(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could still grow into a stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


class Generation:
    """One request's generation: iterate for text deltas; `result` is complete when iteration ends."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prompt: Prompt,
        params: SamplingParams,
        cache: PrefixCache,
        cancel: threading.Event | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.params = params
        self.cache = cache
        self.cancel = cancel or threading.Event()
        self.lock = lock or threading.Lock()
        self.result = GenerationResult(prompt_tokens=len(prompt.ids))
        context = model.args.max_context
        if len(prompt.ids) >= context:
            raise PromptTooLong(
                f"the prompt has {len(prompt.ids)} tokens; the model's context holds {context} "
                "including the completion"
            )
        self.max_new_tokens = min(params.max_new_tokens, context - len(prompt.ids))
        self._steps: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._steps is None:
            self._steps = self._locked_run()
        return next(self._steps)

    def close(self) -> None:
        """Stop early (the caller's own stop rule); the model is free again when this returns."""
        if self._steps is not None:
            self._steps.close()

    def text(self) -> str:
        for _ in self:
            pass
        return self.result.text

    def _locked_run(self) -> Iterator[str]:
        with self.lock, torch.inference_mode():
            yield from self._run()

    def _run(self) -> Iterator[str]:
        params, result, tokenizer = self.params, self.result, self.tokenizer
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.model.tok_embeddings.weight.device)
            generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns()) % 2**63)
        assembler = TextAssembler(tokenizer, self.prompt.heal, params.stop)
        key, kv, reused = self.cache.acquire(self.prompt.ids)
        result.reused_tokens = reused
        tokens = list(self.prompt.ids)
        self.cache.record(key, tokens[:reused])
        started = time.perf_counter()
        try:
            logits = self._forward(tokens[reused:], reused, kv)
        except BaseException:
            self.cache.discard(key)
            raise
        result.prefill_ms = (time.perf_counter() - started) * 1000
        self.cache.record(key, tokens)
        started = time.perf_counter()
        remaining_heal = self.prompt.heal
        vocab = tokenizer.vocab_size
        try:
            for step in range(self.max_new_tokens):
                if self.cancel.is_set():
                    result.finish_reason = "cancelled"
                    break
                if params.deadline is not None and time.monotonic() > params.deadline:
                    result.finish_reason = "deadline"
                    break
                step_logits = logits[0, -1, :vocab]
                if remaining_heal:
                    allowed = healing_candidates(tokenizer, remaining_heal)
                    masked = torch.full_like(step_logits, float("-inf"))
                    masked[allowed] = step_logits[allowed]
                    step_logits = masked
                token = sample(step_logits, params.temperature, params.top_p, generator)
                if remaining_heal:
                    piece = tokenizer.piece_texts[token] or ""
                    remaining_heal = remaining_heal[len(piece) :] if remaining_heal.startswith(piece) else ""
                elif token in self.prompt.stop_ids:
                    result.finish_reason = "end"
                    break
                result.completion_tokens = step + 1
                result.tokens.append(token)
                delta = assembler.push(token)
                if delta:
                    yield delta
                if assembler.stopped:
                    result.finish_reason = "stop"
                    break
                if step + 1 == self.max_new_tokens:
                    result.finish_reason = "length"
                    break
                tokens.append(token)
                logits = self._forward([token], len(tokens) - 1, kv)
                self.cache.record(key, tokens)
        except GeneratorExit:
            # The caller stopped reading (its own stop rule): what the cache holds is still valid.
            result.finish_reason = result.finish_reason or "closed"
            result.text = assembler.text
            raise
        except BaseException:
            self.cache.discard(key)  # a failed step may leave the cache half-written
            raise
        finally:
            result.decode_ms = (time.perf_counter() - started) * 1000
        tail = assembler.finish()
        result.text = assembler.text
        if tail:
            yield tail

    def _forward(self, ids: list[int], start: int, kv: KVCache) -> torch.Tensor:
        device = self.model.tok_embeddings.weight.device
        batch = torch.tensor([ids], dtype=torch.long, device=device)
        return self.model(batch, start=start, cache=kv, last_only=True)
