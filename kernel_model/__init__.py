"""kernel_model: a pure-PyTorch Code Llama engine (Meta and Hugging Face checkpoints, FIM, streaming)."""

from .codellama import EMBEDDED_PATH, CodeLlama, load_model
from .errors import InfillingNotSupported, ModelError, PromptTooLong
from .generate import Generation, GenerationResult, SamplingParams
from .prompts import Prompt
from .tokenizer import Tokenizer

__all__ = [
    "EMBEDDED_PATH",
    "CodeLlama",
    "Generation",
    "GenerationResult",
    "InfillingNotSupported",
    "ModelError",
    "Prompt",
    "PromptTooLong",
    "SamplingParams",
    "Tokenizer",
    "load_model",
]
