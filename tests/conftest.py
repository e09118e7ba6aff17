"""Shared fixtures: the Llama 2 tokenizer, its 32,016-piece Code Llama variant, small random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel_model.checkpoint import make_test_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA_TOKENIZER = SHARED / "data" / "llama2-codellama-python-tokenizer.model"
NOTEBOOKS = SHARED / "data" / "notebooks"


@pytest.fixture(scope="session")
def llama_tokenizer_file() -> Path:
    """Code Llama - Python's tokenizer: 32,000 pieces, no FIM pieces."""
    assert LLAMA_TOKENIZER.is_file(), f"missing {LLAMA_TOKENIZER}"
    return LLAMA_TOKENIZER


@pytest.fixture(scope="session")
def codellama_tokenizer_file(tmp_path_factory: pytest.TempPathFactory, llama_tokenizer_file: Path) -> Path:
    """The infilling Code Llama 7B/13B tokenizer: the same pieces plus 16, FIM pieces at 32007-32010."""
    from kernel_model.vocab import add_fim_pieces

    path = tmp_path_factory.mktemp("tokenizer") / "codellama-tokenizer.model"
    path.write_bytes(add_fim_pieces(llama_tokenizer_file.read_bytes()))
    return path


@pytest.fixture(scope="session")
def fim_checkpoint(tmp_path_factory: pytest.TempPathFactory, codellama_tokenizer_file: Path) -> Path:
    """A tiny random-weight infilling Code Llama in Meta's layout."""
    out = tmp_path_factory.mktemp("fim-checkpoint")
    make_test_checkpoint(out, "meta", codellama_tokenizer_file, dim=64, layers=2, heads=4, seed=1)
    return out


@pytest.fixture(scope="session")
def fim_model(fim_checkpoint: Path):
    from kernel_model import load_model

    return load_model(fim_checkpoint)
