"""The string-level public API: `load_model` and `CodeLlama` (complete, infill, and their streams)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import load_transformer
from .errors import ModelError
from .generate import Generation, PrefixCache, SamplingParams
from .model import Transformer, count_parameters
from .prompts import Prompt, completion_prompt, infilling_prompt
from .tokenizer import Tokenizer

EMBEDDED_PATH = Path(__file__).parent / "embedded"
DEFAULT_CONTEXT = 16_384
MAX_CONTEXT = 100_000  # Code Llama's long-context claim; RoPE theta 1e6 was trained for it

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
    max_context: int = DEFAULT_CONTEXT,
) -> CodeLlama:
    """A checkpoint folder (Meta or Hugging Face layout) or "embedded", ready to generate."""
    if not 16 <= max_context <= MAX_CONTEXT:
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
    model, layout = load_transformer(
        folder, tokenizer.vocab_size, resolved_device, resolved_dtype, max_context
    )
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ModelError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model embeds only "
            f"{model.args.vocab_size}: they do not belong together"
        )
    name = "embedded" if embedded else folder.name
    return CodeLlama(model, tokenizer, name=name, layout=layout)


class CodeLlama:
    """A loaded model and its tokenizer. Thread-safe: generations run one at a time."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, name: str, layout: str, cache_slots: int = 2
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.layout = layout
        self.prefix_cache = PrefixCache(model, slots=cache_slots)
        self._lock = threading.Lock()

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
            "parameters": count_parameters(self.model),
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
        return Generation(self.model, self.tokenizer, prompt, params, self.prefix_cache, cancel, self._lock)

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
