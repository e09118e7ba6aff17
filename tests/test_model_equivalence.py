"""Our Llama against Hugging Face transformers' LlamaForCausalLM holding the same random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernel_model import load_model
from kernel_model.checkpoint import make_test_checkpoint
from kernel_model.generate import SamplingParams
from kernel_model.model import ModelArgs, Transformer, count_parameters
from kernel_model.prompts import Prompt

transformers = pytest.importorskip("transformers")

SHAPE = dict(dim=64, layers=2, heads=4, seed=7)


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def prompt_ids(model, length: int = 300) -> list[int]:
    source = Path(torch.__file__).read_text()  # real Python source, long enough
    ids = model.tokenizer.encode(source, bos=True)[:length]
    assert len(ids) == length
    return ids


def our_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.model(torch.tensor([ids]))[0]


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def layouts(request, tmp_path_factory, codellama_tokenizer_file) -> dict[str, Path]:
    """The same weights written as HF safetensors, one Meta shard, and two Meta shards."""
    kv_heads = request.param
    root = tmp_path_factory.mktemp(f"layouts-{kv_heads}")
    folders = {}
    for name, layout, shards in [
        ("hf", "hf", 1),
        ("meta", "meta", 1),
        ("meta2", "meta", 2),
        ("hf2", "hf", 2),
    ]:
        folders[name] = root / name
        make_test_checkpoint(
            folders[name], layout, codellama_tokenizer_file, kv_heads=kv_heads, shards=shards, **SHAPE
        )
    return folders


def test_logits_match_transformers_in_every_layout(layouts):
    reference_model = load_model(layouts["meta"])
    ids = prompt_ids(reference_model)
    expected = hf_logits(layouts["hf"], ids)
    for name, folder in layouts.items():
        ours = our_logits(load_model(folder), ids)
        assert (ours - expected).abs().max().item() <= 1e-4, name


def test_greedy_continuation_matches_transformers(layouts):
    model = load_model(layouts["meta2"])
    ids = prompt_ids(model, 40)
    hf = transformers.LlamaForCausalLM.from_pretrained(layouts["hf"], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    expected = out[0, len(ids) :].tolist()
    generation = model.generate(Prompt(ids), SamplingParams(max_new_tokens=24))
    generation.text()
    assert generation.result.tokens == expected


def test_cached_decode_equals_full_recompute(layouts):
    model = load_model(layouts["meta"])
    ids = prompt_ids(model, 64)
    full = our_logits(model, ids)
    cache = model.model.new_cache()
    with torch.no_grad():
        chunks = [model.model(torch.tensor([ids[:40]]), 0, cache)[0]]
        chunks.append(model.model(torch.tensor([ids[40:50]]), 40, cache)[0])  # a chunk continuing the cache
        for position in range(50, 64):
            chunks.append(model.model(torch.tensor([[ids[position]]]), position, cache)[0])
    assert (torch.cat(chunks) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("shape", "billions"), [("7b", 6.74), ("13b", 13.0), ("34b", 33.7)])
def test_published_shapes_have_published_sizes(shape, billions):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_preset(shape))
    assert round(count_parameters(model) / 1e9, 2 if billions < 10 else 1) == billions
