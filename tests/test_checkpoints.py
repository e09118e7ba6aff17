"""Checkpoint folders: detection, loading choices, and a clear error for every way one can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernel_model import ModelError, load_model
from kernel_model.checkpoint import load_transformer, make_test_checkpoint, random_state, write_meta
from kernel_model.fast import Int8Linear, int8_parameters, quantize_int8, quantize_rows
from kernel_model.model import ModelArgs


def test_python_variant_completes_but_refuses_to_infill(tmp_path, llama_tokenizer_file):
    make_test_checkpoint(tmp_path, "hf", llama_tokenizer_file, kv_heads=2)
    model = load_model(tmp_path)
    assert not model.supports_infilling and model.max_context == 16_384
    assert isinstance(model.complete("def f():\n", max_new_tokens=4), str)
    with pytest.raises(ModelError, match="fill-in-the-middle"):
        model.infill("a = ", "\n")


def test_info_describes_the_model(fim_model):
    info = fim_model.info()
    assert info["layers"] == 2 and info["heads"] == 4 and info["vocab"] == 32016
    assert info["supports_infilling"] and info["rope_theta"] == 1e6
    assert info["device"] == "cpu" and info["dtype"] == "float32"


def test_dtype_choice_is_honoured(fim_checkpoint):
    assert str(load_model(fim_checkpoint, dtype="bfloat16").dtype) == "torch.bfloat16"
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(fim_checkpoint, dtype="int3")


def test_missing_and_foreign_folders(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError):
        load_model(tmp_path)


def test_missing_tokenizer(tmp_path, fim_checkpoint):
    shutil.copytree(fim_checkpoint, tmp_path / "ck")
    (tmp_path / "ck" / "tokenizer.model").unlink()
    with pytest.raises(ModelError, match="tokenizer file not found"):
        load_model(tmp_path / "ck")


def test_shapes_that_do_not_match_the_config(tmp_path, fim_checkpoint):
    shutil.copytree(fim_checkpoint, tmp_path / "ck")
    params = json.loads((tmp_path / "ck" / "params.json").read_text())
    params["dim"] = 128
    (tmp_path / "ck" / "params.json").write_text(json.dumps(params))
    with pytest.raises(ModelError, match=r"has shape .* implies"):
        load_model(tmp_path / "ck")


def test_tokenizer_larger_than_the_vocabulary(tmp_path, fim_checkpoint, llama_tokenizer_file):
    make_test_checkpoint(tmp_path, "meta", llama_tokenizer_file)
    shutil.copyfile(fim_checkpoint / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(ModelError, match="do not belong together"):
        load_model(tmp_path)


def test_corrupt_weights(tmp_path, fim_checkpoint):
    shutil.copytree(fim_checkpoint, tmp_path / "ck")
    (tmp_path / "ck" / "consolidated.00.pth").write_bytes(b"\0" * 100)
    with pytest.raises(ModelError, match=r"cannot read consolidated\.00\.pth"):
        load_model(tmp_path / "ck")


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_the_window_defaults_to_the_trained_length(tmp_path, codellama_tokenizer_file, layout):
    make_test_checkpoint(tmp_path, layout, codellama_tokenizer_file)
    assert load_model(tmp_path).max_context == 16_384  # what the test checkpoints record
    config = tmp_path / ("params.json" if layout == "meta" else "config.json")
    field = "max_seq_len" if layout == "meta" else "max_position_embeddings"
    for recorded, served in ((1024, 1024), (262_144, 100_000), (None, 16_384), ("long", 16_384)):
        settings = json.loads(config.read_text())
        settings.pop(field, None)
        if recorded is not None:
            settings[field] = recorded
        config.write_text(json.dumps(settings))
        assert load_model(tmp_path).max_context == served, recorded
    assert load_model(tmp_path, max_context=4096).max_context == 4096  # asked for: extrapolate


@pytest.mark.parametrize(
    ("layout", "setting"),
    [("hf", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
     ("hf", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}),
     ("meta", {"use_scaled_rope": True})],
)  # fmt: skip
def test_scaled_rope_is_refused_not_computed_wrong(tmp_path, codellama_tokenizer_file, layout, setting):
    make_test_checkpoint(tmp_path, layout, codellama_tokenizer_file)
    config = tmp_path / ("params.json" if layout == "meta" else "config.json")
    config.write_text(json.dumps({**json.loads(config.read_text()), **setting}))
    with pytest.raises(ModelError, match="RoPE"):
        load_model(tmp_path)


def test_bad_context_size(fim_checkpoint):
    with pytest.raises(ModelError, match="max_context"):
        load_model(fim_checkpoint, max_context=200_000)


@pytest.mark.parametrize("shards", [1, 2])
def test_int8_weights_load_as_their_dequantized_values(tmp_path, codellama_tokenizer_file, shards):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32016, multiple_of=32)
    state = random_state(args, seed=1)
    write_meta(tmp_path, args, state, shards=shards, int8=True)
    shutil.copyfile(codellama_tokenizer_file, tmp_path / "tokenizer.model")
    stored = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert stored["layers.1.feed_forward.w2.weight"].dtype == torch.int8
    assert stored["norm.weight"].dtype == torch.float32 and "norm.weight_scale" not in stored

    model, _ = load_transformer(tmp_path, 32016, torch.device("cpu"), torch.float32, 4096)
    for name, weight in model.state_dict().items():
        original = state[name]
        if original.dim() == 1:
            assert torch.equal(weight, original)
            continue
        # Each shard quantizes its own rows, never coarser than the whole row: error ≤ half a step.
        half_step = original.abs().amax(dim=1, keepdim=True) / 127 / 2
        assert ((weight - original).abs() <= half_step * 1.0001).all(), name
    assert isinstance(load_model(tmp_path).infill("def f(x):\n    ", "\n", max_new_tokens=4), str)


def test_int8_weight_without_its_scales(tmp_path, codellama_tokenizer_file):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32016, multiple_of=32)
    write_meta(tmp_path, args, random_state(args, seed=0), int8=True)
    shutil.copyfile(codellama_tokenizer_file, tmp_path / "tokenizer.model")
    weights = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del weights["output.weight_scale"]
    torch.save(weights, tmp_path / "consolidated.00.pth")
    with pytest.raises(ModelError, match=r"output\.weight is int8 but has no per-row output\.weight_scale"):
        load_model(tmp_path)


@pytest.mark.parametrize(("layout", "shards"), [("meta", 2), ("hf", 1)])
def test_int8_quantizes_each_matrix_while_loading(tmp_path, codellama_tokenizer_file, layout, shards):
    make_test_checkpoint(tmp_path, layout, codellama_tokenizer_file, kv_heads=2, shards=shards, seed=4)
    loaded = load_transformer(tmp_path, 32016, torch.device("cpu"), torch.float32, None, quant="int8")[0]
    # The same model as loading in float and quantizing afterwards, without the float copy.
    reference = quantize_int8(load_transformer(tmp_path, 32016, torch.device("cpu"), torch.float32, None)[0])
    assert not any(isinstance(module, torch.nn.Linear) for module in loaded.modules())
    assert int8_parameters(loaded) == int8_parameters(reference) > 0
    expected = reference.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def test_int8_of_tied_embeddings_quantizes_the_shared_table(tmp_path, codellama_tokenizer_file):
    make_test_checkpoint(tmp_path, "hf", codellama_tokenizer_file, seed=5)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    embeddings = weights["model.embed_tokens.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_transformer(tmp_path, 32016, torch.device("cpu"), torch.float32, None, quant="int8")[0]
    assert isinstance(loaded.output, Int8Linear)
    assert torch.equal(loaded.output.weight, quantize_rows(embeddings)[0])
    assert isinstance(
        load_model(tmp_path, quant="int8").infill("def f(x):\n    ", "\n", max_new_tokens=4), str
    )


def test_quant_takes_the_words_the_command_line_and_settings_use(fim_checkpoint):
    assert load_model(fim_checkpoint, quant="none").quant is None
    with pytest.raises(ModelError, match="use auto, none, int8"):
        load_model(fim_checkpoint, quant="int4")
