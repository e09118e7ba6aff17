"""The string-level public API: `load_model` and `CodeLlama` (complete, infill, and their streams)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from . import decode_kernels
from .checkpoint import MAX_CONTEXT, load_transformer, stores_int8
from .errors import ModelError
from .fast import MIN_BUCKET, FastDecoder, FastTransformer, describe, int8_parameters, quantize_int8
from .generate import (
    Decoder,
    Generation,
    GenerationLock,
    ModelDecoder,
    PrefixCache,
    SamplingParams,
    healing_index,
)
from .model import Transformer, count_parameters
from .prompts import Prompt, completion_prompt, infilling_prompt
from .tokenizer import Tokenizer

EMBEDDED_PATH = Path(__file__).parent / "embedded"
CACHE_SLOTS = 4  # notebooks whose prompts keep their keys and values (least recently used out first)
QUANTIZATIONS = ("int8",)
QUANT_CHOICES = ("auto", "none", *QUANTIZATIONS)  # as command lines and settings spell load_model's quant
QUANT_HELP = (
    "int8 weights; auto (default): int8-stored checkpoints stay int8 on an x86 CPU; none: all in --dtype"
)
# How far static decode steps' logits may stray from the eager forward's (fast.FastDecoder.check)
# before the engine decodes eagerly: ROUNDING_FACTOR times the drift rounding alone shows on this
# model and device, and never less than the dtype's floor. Half precision rounds differently along
# the two paths' op orders, more with depth: the 7B shape in bf16 (random weights) drifts 0.05 on a
# CPU, 0.06 on an H200; on a CPU the static step's drift and rounding's agree to within 10 %, while
# a wrong token scores 0.2-0.5 and memory nobody wrote 1.2-1.4. The floor covers the H200's drift
# whatever rounding measures there; the tests prove the static step exact in float32.
STATIC_STEP_FLOOR = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}
ROUNDING_FACTOR = 3.0

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 halves memory and bandwidth on a GPU; CPUs run float32 matmuls much faster than bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    max_context: int | None = None,
    *,
    fast: bool = True,
    quant: str | None = "auto",
    compile: bool | str = False,
    graphs: bool | None = None,
    warmup: bool = True,
) -> CodeLlama:
    """A checkpoint folder (Meta or Hugging Face layout) or "embedded", ready to generate.

    `fast` (default) runs fused projections and, on CUDA, decode steps replayed as CUDA graphs
    (`graphs`, default on there); `quant="int8"` stores projections as int8 with per-row scales,
    quantizing each matrix as it loads (the model never exists in full precision on the device);
    `quant="auto"` (the default) keeps the matrices of a checkpoint stored as int8 (the embedded
    model) in int8 on a CPU whose int8 kernel reads them as they are (`decode_kernels`): a decode
    step then reads a quarter of the bytes; everywhere else, and with `quant=None` (or "none"), they
    are held in `dtype`.
    `compile` also compiles the decode step (True: inductor, or a torch.compile backend name).
    `warmup` does at load what the first keystroke would otherwise pay for (see CodeLlama.warmup).
    `max_context` is the window in tokens; by default the length the checkpoint records having been
    trained at (params.json `max_seq_len`, config.json `max_position_embeddings`), else 16,384.
    """
    if max_context is not None and not 16 <= max_context <= MAX_CONTEXT:
        raise ModelError(f"max_context must be between 16 and {MAX_CONTEXT}, not {max_context}")
    embedded = str(path) == "embedded"
    folder = EMBEDDED_PATH if embedded else Path(path).expanduser()
    if embedded and not (folder / "params.json").is_file():
        raise ModelError("the embedded model is not part of this installation; pass a checkpoint folder")
    if not folder.is_dir():
        raise ModelError(f"checkpoint folder not found: {folder}")
    tokenizer = Tokenizer(folder / "tokenizer.model")
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if quant == "none":  # as command lines and settings spell None
        quant = None
    if quant == "auto":  # the plain path (fast=False) has no kernels: it would convert every matrix
        int8_here = fast and resolved_device.type == "cpu" and decode_kernels.cpu_reads_int8()
        quant = "int8" if int8_here and stores_int8(folder) else None
    check_quantization(quant)
    model, layout = load_transformer(
        folder, tokenizer.vocab_size, resolved_device, resolved_dtype, max_context, quant
    )
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ModelError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model embeds only "
            f"{model.args.vocab_size}: they do not belong together"
        )
    name = "embedded" if embedded else folder.name
    return CodeLlama(
        model, tokenizer, name=name, layout=layout,
        fast=fast, quant=quant, compile=compile, graphs=graphs, warmup=warmup,
    )  # fmt: skip


def check_quantization(quant: str | None) -> None:
    if quant is not None and quant not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quant!r}; use {', '.join(QUANT_CHOICES)}")


def default_cache_bytes(device: torch.device) -> int | None:
    """How much the prefix cache may hold: 40% of the GPU memory left after loading, or of RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.4 * free)
    try:
        return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


class CodeLlama:
    """A loaded model and its tokenizer. Thread-safe: generations run one at a time.

    `fast`, `quant`, `compile`, `graphs` and `warmup` as `load_model` describes them; `fast=False`
    runs the plain `Transformer.forward`, the reference every fast path is tested against.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        name: str,
        layout: str,
        cache_slots: int = CACHE_SLOTS,
        *,
        cache_bytes: int | None = None,
        fast: bool = True,
        quant: str | None = None,
        compile: bool | str = False,
        graphs: bool | None = None,
        warmup: bool = False,
    ):
        check_quantization(quant)
        if quant == "int8":
            quantize_int8(model)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.layout = layout
        self.quant = quant
        self.decoder: Decoder = self._decoder(fast, compile, graphs)
        if cache_bytes is None:
            cache_bytes = default_cache_bytes(self.device)
        self.prefix_cache = PrefixCache(model, slots=cache_slots, max_bytes=cache_bytes)
        self._lock = GenerationLock()
        if warmup:
            self.warmup()

    def _decoder(self, fast: bool, compile: bool | str, graphs: bool | None) -> Decoder:
        if not fast:
            return ModelDecoder(self.model)
        cuda = self.device.type == "cuda"
        if graphs and not cuda:
            raise ModelError("CUDA graphs need a CUDA device")
        fast_model = FastTransformer(self.model)
        if self.quant and cuda and not compile and not decode_kernels.ready(self.device, "int8"):
            # Without the kernel each step converts every int8 matrix to bf16 in memory: slower than bf16.
            log.warning("int8 weights decode fast only with Triton installed, or compiled (compile=True)")
        return FastDecoder(fast_model, graphs=cuda if graphs is None else graphs, compile=compile)

    def warmup(self) -> None:
        """Pay now what the first keystroke would: the healing index, compilation, graph capture.

        Static decode steps are checked against the eager forward; if they disagree the engine
        falls back to eager steps (and says so in the log) rather than serve wrong tokens.
        """
        with self._lock:  # the decoder's buffers are shared with any generation running
            self._warmup()

    def _warmup(self) -> None:
        healing_index(self.tokenizer)
        decoder = self.decoder
        if not isinstance(decoder, FastDecoder) or not decoder.static:
            return
        floor = STATIC_STEP_FLOOR.get(self.dtype, STATIC_STEP_FLOOR[torch.bfloat16])
        # Two spans, so a compiled step meets a second cache length now, not on a user's keystroke.
        for length in (8, MIN_BUCKET + 8):
            if length + 8 > self.max_context:
                break
            prompt = [self.tokenizer.bos_id, *range(100, 100 + length - 1)]
            distance, rounding = decoder.check(prompt)
            if not distance <= max(floor, ROUNDING_FACTOR * rounding):
                log.warning(
                    "static decode steps differ from the eager forward by %.3g (relative; rounding "
                    "alone: %.3g); decoding eagerly instead", distance, rounding,
                )  # fmt: skip
                self.decoder = FastDecoder(decoder.fast)
                return

    @property
    def supports_infilling(self) -> bool:
        return self.tokenizer.supports_infilling

    @property
    def max_context(self) -> int:
        return self.model.args.max_context

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.tok_embeddings.weight.dtype

    def info(self) -> dict:
        args = self.model.args
        return {
            "name": self.name,
            "layout": self.layout,
            "parameters": count_parameters(self.model) + int8_parameters(self.model),
            "layers": args.n_layers,
            "dim": args.dim,
            "heads": args.n_heads,
            "kv_heads": args.n_kv_heads,
            "vocab": args.vocab_size,
            "rope_theta": args.rope_theta,
            "max_context": args.max_context,
            "supports_infilling": self.supports_infilling,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quant": self.quant,
            "decoder": describe(self.decoder),
        }

    # -- prompts and the low-level generation the server uses ------------------------------------

    def completion_prompt(self, text: str) -> Prompt:
        return completion_prompt(self.tokenizer, text)

    def infilling_prompt(self, prefix: str, suffix: str, suffix_first: bool = False) -> Prompt:
        return infilling_prompt(self.tokenizer, prefix, suffix, suffix_first)

    def generate(
        self, prompt: Prompt, params: SamplingParams, cancel: threading.Event | None = None
    ) -> Generation:
        """A generation to iterate (text deltas); set `cancel` from any thread to stop it between tokens."""
        return Generation(
            self.model, self.tokenizer, prompt, params, self.prefix_cache, cancel, self._lock, self.decoder
        )

    # -- the string API ---------------------------------------------------------------------------

    def stream_complete(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.95,
        stop: Sequence[str] | None = None,
        *,
        seed: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop or ()))
        return self.generate(self.completion_prompt(prompt), params, cancel)

    def stream_infill(
        self,
        prefix: str,
        suffix: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.95,
        suffix_first: bool = False,
        stop: Sequence[str] | None = None,
        *,
        seed: int | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stop or ()))
        return self.generate(self.infilling_prompt(prefix, suffix, suffix_first), params, cancel)

    def complete(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.95,
        stop: Sequence[str] | None = None,
        *,
        seed: int | None = None,
    ) -> str:
        return self.stream_complete(prompt, max_new_tokens, temperature, top_p, stop, seed=seed).text()

    def infill(
        self,
        prefix: str,
        suffix: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.95,
        suffix_first: bool = False,
        stop: Sequence[str] | None = None,
        *,
        seed: int | None = None,
    ) -> str:
        """The middle between `prefix` and `suffix` (not the surrounding text)."""
        generation = self.stream_infill(
            prefix, suffix, max_new_tokens, temperature, top_p, suffix_first, stop, seed=seed
        )
        return generation.text()
