"""Generation: prefix-cached prefill, incremental decode, sampling, token healing, streaming text, stopping.

A stack of small functions (sample, prefill, decode one step) under one `Generation` iterator that
yields text deltas and leaves its `result` behind, so callers can stream, cancel and time it.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import ModelError, PromptTooLong
from .model import KVCache, Transformer
from .prompts import Prompt
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
    `max_bytes` bounds the caches' memory as well as their number: with several long notebooks
    open, the least recently used ones go first. An evicted slot's cache is handed to the next
    prompt rather than freed, so its memory (and any decode graphs captured over it) live on.
    """

    def __init__(self, model: Transformer, slots: int = 2, max_bytes: int | None = None) -> None:
        self.model = model
        self.slots = slots
        self.max_bytes = max_bytes
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
            spare = None
            while len(self._entries) >= self.slots:
                spare = self._entries.popitem(last=False)[1][0]
            if spare is not None:
                spare.truncate(0)
            self._entries[best_key] = (spare if spare is not None else self.model.new_cache(), [])
        self._entries.move_to_end(best_key)
        cache, tokens = self._entries[best_key]
        reused = min(best_len, len(ids) - 1)  # the last prompt token runs again: its logits start decoding
        cache.truncate(reused)
        del tokens[reused:]
        return best_key, cache, reused

    def record(self, key: int, tokens: Sequence[int]) -> None:
        if key in self._entries:
            self._entries[key][1][:] = tokens

    def append(self, key: int, token: int) -> None:
        """One more token computed into the cache (record() without copying the whole list)."""
        if key in self._entries:
            self._entries[key][1].append(token)

    def fit(self, keep: int, positions: int = 0) -> None:
        """Drop least recently used caches until all fit in max_bytes with `keep` grown to `positions`.

        Called before the cache grows, so the memory of the caches dropped is free for it; the
        cache being used always stays, however large.
        """
        if self.max_bytes is None or keep not in self._entries:
            return
        kept = self._entries[keep][0]
        layers, batch, heads, _, dim = kept.k.shape
        per_position = 2 * layers * batch * heads * dim * kept.k.element_size()  # keys and values
        growth = max(0, positions - kept.capacity) * per_position
        for key in list(self._entries):
            if self.nbytes() + growth <= self.max_bytes:
                return
            if key != keep:
                del self._entries[key]

    def nbytes(self) -> int:
        return sum(cache.k.nbytes + cache.v.nbytes for cache, _ in self._entries.values())

    def discard(self, key: int) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    # Compare whole blocks at C speed (list slices), then find the first difference in the block
    # that has one: a 16k-token notebook is checked on every keystroke.
    block = 256
    for at in range(0, n, block):
        end = min(at + block, n)
        if a[at:end] != b[at:end]:  # (a list and a tuple never compare equal: the loop decides)
            for i in range(at, end):
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


class HealingIndex:
    """`prompts.healing_candidates` without scanning the vocabulary on every keystroke.

    Pieces that the healed text starts with are found by looking up each of its prefixes; pieces
    that start with it form one range of the sorted piece texts. Answers are kept per text, as
    index tensors on the device that masks the logits.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.by_text: dict[str, list[int]] = {}
        pairs = []
        for index, text in enumerate(tokenizer.piece_texts):
            if text:
                self.by_text.setdefault(text, []).append(index)
                pairs.append((text, index))
        pairs.sort()
        self.sorted_texts = [text for text, _ in pairs]
        self.sorted_ids = [index for _, index in pairs]
        self._tensors: dict[tuple[str, torch.device], torch.Tensor] = {}

    def candidates(self, remaining: str) -> list[int]:
        found = set()
        for size in range(1, len(remaining) + 1):
            found.update(self.by_text.get(remaining[:size], ()))
        at = bisect.bisect_left(self.sorted_texts, remaining)
        while at < len(self.sorted_texts) and self.sorted_texts[at].startswith(remaining):
            found.add(self.sorted_ids[at])
            at += 1
        return sorted(found)

    def tensor(self, remaining: str, device: torch.device) -> torch.Tensor:
        key = (remaining, device)
        if key not in self._tensors:
            if len(self._tensors) >= 256:
                self._tensors.clear()
            self._tensors[key] = torch.tensor(self.candidates(remaining), dtype=torch.long, device=device)
        return self._tensors[key]


_healing_indexes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def healing_index(tokenizer: Tokenizer) -> HealingIndex:
    if tokenizer not in _healing_indexes:
        _healing_indexes[tokenizer] = HealingIndex(tokenizer)
    return _healing_indexes[tokenizer]


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
        # Decoded text up to the last id that ends on a character boundary: only the ids after it
        # are decoded again, so a step costs the same at token 5 and at token 500.
        self._settled_text = ""
        self._settled_ids = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decoded = self._settled_text + self.tokenizer.decode_infilling(self.ids[self._settled_ids :])
        if self.tokenizer.piece_texts[token] is not None:
            # Plain text (not a byte of a longer character, not a special piece): what follows
            # decodes the same on its own.
            self._settled_text, self._settled_ids = decoded, len(self.ids)
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


class Decoder(Protocol):
    """How a generation runs the model: logits after chosen ids, or a stream of greedy ids.

    `logits` serves the prompt, sampled tokens and healed ones; `greedy` the common case, where a
    decoder may keep the device a step ahead of the host. Both write keys and values into `cache`.
    """

    def logits(self, ids: Sequence[int], start: int, cache: KVCache) -> torch.Tensor:
        """float32 logits [V] of the last of `ids`, which sit at positions start.. of the sequence."""

    def greedy(self, token: int, start: int, cache: KVCache, vocab: int) -> Iterator[int]:
        """Feed `token` at `start`, then yield argmax ids (over the first `vocab`) forever."""


class ModelDecoder:
    """A decoder over any module with `Transformer.forward`'s contract, one step per call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = model.tok_embeddings.weight.device if isinstance(model, Transformer) else model.device

    def logits(self, ids: Sequence[int], start: int, cache: KVCache) -> torch.Tensor:
        batch = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        return self.model(batch, start=start, cache=cache, last_only=True)[0, -1]

    def greedy(self, token: int, start: int, cache: KVCache, vocab: int) -> Iterator[int]:
        while True:
            token = int(self.logits([token], start, cache)[:vocab].argmax())
            start += 1
            yield token


class GenerationLock:
    """One generation at a time on a model (they share its caches), and one that says so.

    A generation holds the lock from its first delta until it ends or is closed; one read partly and
    then left open keeps it. Another thread waits for it, as for any running generation. The same
    thread would wait for ever, so it gets an error instead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None

    def __enter__(self) -> GenerationLock:
        if self._holder == threading.get_ident():
            raise ModelError(
                "a generation on this model is still open in this thread: read it to the end or close() it first"
            )
        self._lock.acquire()
        self._holder = threading.get_ident()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._holder = None
        self._lock.release()


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
        lock: GenerationLock | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.params = params
        self.cache = cache
        self.cancel = cancel or threading.Event()
        self.lock = lock or GenerationLock()
        self.decoder = decoder if decoder is not None else ModelDecoder(model)
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

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def text(self) -> str:
        for _ in self:
            pass
        return self.result.text

    def _locked_run(self) -> Iterator[str]:
        with self.lock, torch.inference_mode():
            yield from self._run()

    def _run(self) -> Iterator[str]:
        params, result, tokenizer, decoder = self.params, self.result, self.tokenizer, self.decoder
        device = self.model.tok_embeddings.weight.device
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed if params.seed is not None else int(time.time_ns()) % 2**63)
        assembler = TextAssembler(tokenizer, self.prompt.heal, params.stop)
        key, kv, reused = self.cache.acquire(self.prompt.ids)
        result.reused_tokens = reused
        tokens = list(self.prompt.ids)
        self.cache.record(key, tokens[:reused])
        started = time.perf_counter()
        try:
            # Room for the whole completion now, so no step reallocates the cache mid-stream.
            self.cache.fit(keep=key, positions=len(tokens) + self.max_new_tokens)
            kv.reserve(len(tokens) + self.max_new_tokens)
            logits = decoder.logits(tokens[reused:], reused, kv)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # prefill_ms is the device's time, not the launch's
        except BaseException:
            self.cache.discard(key)
            raise
        result.prefill_ms = (time.perf_counter() - started) * 1000
        self.cache.record(key, tokens)
        started = time.perf_counter()
        remaining_heal = self.prompt.heal
        vocab = tokenizer.vocab_size
        stream: Iterator[int] | None = None  # greedy ids once no step needs the logits themselves
        try:
            for step in range(self.max_new_tokens):
                if self.cancel.is_set():
                    result.finish_reason = "cancelled"
                    break
                if params.deadline is not None and time.monotonic() > params.deadline:
                    result.finish_reason = "deadline"
                    break
                if stream is not None:
                    token = next(stream)
                    self.cache.append(key, tokens[-1])  # its step has run (or is queued before any other)
                else:
                    token = self._choose(logits[:vocab], remaining_heal, generator)
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
                if stream is None and params.temperature == 0 and not remaining_heal:
                    stream = decoder.greedy(token, len(tokens) - 1, kv, vocab)
                elif stream is None:
                    logits = decoder.logits([token], len(tokens) - 1, kv)
                    self.cache.append(key, token)
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

    def _choose(self, logits: torch.Tensor, remaining_heal: str, generator: torch.Generator | None) -> int:
        if remaining_heal:
            # Only pieces that agree with the text cut from the prompt may come first.
            allowed = healing_index(self.tokenizer).tensor(remaining_heal, logits.device)
            masked = torch.full_like(logits, float("-inf"))
            masked[allowed] = logits[allowed]
            logits = masked
        return sample(logits, self.params.temperature, self.params.top_p, generator)
