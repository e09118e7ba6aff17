"""Checkpoint folders in Meta's layout (params.json + consolidated.NN.pth) and Hugging Face's (safetensors).

Weights are opened memory-mapped and the model is built on the meta device, then each tensor is
converted once to its target device and dtype: one copy in memory, never two.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelError
from .fast import Int8Linear, projections, quantize_rows
from .model import ModelArgs, Transformer, ffn_hidden_dim

# How fairscale's model-parallel layers split each weight across Meta's shards: the dimension to
# concatenate along, or None for weights every shard holds whole (norms).
_META_SHARD_DIM = {
    "tok_embeddings": 1,  # ParallelEmbedding splits the embedding dimension
    "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,  # ColumnParallelLinear
    "wo": 1, "w2": 1,  # RowParallelLinear
    "attention_norm": None, "ffn_norm": None, "norm": None,
}  # fmt: skip

DEFAULT_CONTEXT = 16_384  # Code Llama's training length: the window of a checkpoint that records none
MAX_CONTEXT = 100_000  # Code Llama's long-context claim; RoPE theta 1e6 was trained for it

# A matrix stored as int8 (our format for small shipped models; Meta's own checkpoints are bf16) has
# one float32 scale per row beside it, under its name plus this suffix: w = q * scale[:, None].
INT8_SCALE_SUFFIX = "_scale"

_HF_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def detect_layout(folder: Path) -> str:
    if not folder.is_dir():
        raise ModelError(f"checkpoint folder not found: {folder}")
    if (folder / "params.json").is_file() and sorted(folder.glob("consolidated.*.pth")):
        return "meta"
    if (folder / "config.json").is_file() and sorted(folder.glob("*.safetensors")):
        return "hf"
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    raise ModelError(
        f"{folder} is neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a Hugging Face "
        f"one (config.json + *.safetensors); it holds: {found}"
    )


def read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(content, dict):
        raise ModelError(f"{path} must hold a JSON object")
    return content


def window(recorded: object, max_context: int | None) -> int:
    """The context window to serve: as asked, else the length the checkpoint says it was trained at.

    A model attends poorly past its training length (our CPU-trained embedded model's loss doubles
    beyond it), so without a request the window stops there.
    """
    if max_context is not None:
        return max_context
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        return max(16, min(recorded, MAX_CONTEXT))
    return DEFAULT_CONTEXT


def meta_args(params: dict, vocab_size: int, max_context: int | None) -> ModelArgs:
    known = {
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "multiple_of",
        "ffn_dim_multiplier",
        "norm_eps",
        "rope_theta",
    }
    kwargs = {k: v for k, v in params.items() if k in known}
    if params.get("use_scaled_rope"):  # Llama 3.1's long-context RoPE, which this engine does not compute
        raise ModelError("params.json asks for scaled RoPE, which this engine does not implement")
    try:
        if params.get("vocab_size", -1) > 0:
            vocab_size = params["vocab_size"]
        # `max_seq_len` is the field Meta's own ModelArgs uses; Meta's files leave it out, ours record it.
        context = window(params.get("max_seq_len"), max_context)
        return ModelArgs(**kwargs, vocab_size=vocab_size, max_context=context)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"params.json does not describe a Llama model: {exc}") from exc


def hf_args(config: dict, max_context: int | None) -> ModelArgs:
    # Transformers names a RoPE variant in `rope_scaling` (older) or `rope_parameters`; Code Llama uses
    # the plain one. Loading another would give wrong logits without a word.
    for rope in (config.get("rope_scaling"), config.get("rope_parameters")):
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if kind != "default":
            raise ModelError(
                f"config.json asks for {kind!r} RoPE scaling, which this engine does not implement"
            )
    try:
        return ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=float(
                config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1e4)
            ),
            max_context=window(config.get("max_position_embeddings"), max_context),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"config.json does not describe a Llama model: missing or bad {exc}") from exc


def meta_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge model-parallel shards tensor by tensor (13B ships 2, 34B ships 4)."""
    shards = [read_shard(path) for path in sorted(folder.glob("consolidated.*.pth"))]
    for name in shards[0]:
        if name.endswith("rope.freqs"):  # a precomputed table older checkpoints carry; derived here
            continue
        if name.endswith(INT8_SCALE_SUFFIX):
            continue  # read with its matrix
        # Each shard's rows carry their own scales, so shards are dequantized before they are merged.
        parts = [dequantized(shard, name) for shard in shards]
        kind = name.split(".")[-2]
        if kind not in _META_SHARD_DIM:
            raise ModelError(f"unexpected weight {name!r} in the Meta checkpoint")
        dim = _META_SHARD_DIM[kind]
        yield name, parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def stores_int8(folder: Path) -> bool:
    """Whether a checkpoint holds int8 matrices (our shipped models do; Meta's and Hugging Face's don't)."""
    if detect_layout(folder) != "meta":
        return False
    shard = read_shard(sorted(folder.glob("consolidated.*.pth"))[0])
    return any(name.endswith(INT8_SCALE_SUFFIX) for name in shard)


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """One consolidated.NN.pth, memory-mapped: tensors are read when used."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ModelError(f"cannot read {path.name}: {exc}") from exc


def dequantized(shard: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    tensor = shard[name]
    if tensor.dtype != torch.int8:
        return tensor
    scale = shard.get(name + INT8_SCALE_SUFFIX)
    if scale is None or scale.shape != tensor.shape[:1]:
        raise ModelError(f"weight {name} is int8 but has no per-row {name}{INT8_SCALE_SUFFIX} beside it")
    return tensor.float() * scale.float()[:, None]


def hf_tensors(folder: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    for path in sorted(folder.glob("*.safetensors")):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise ModelError(f"cannot read {path.name}: {exc}") from exc
        for hf_name in handle.keys():  # noqa: SIM118 — safe_open is not a mapping
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            name = hf_to_meta_name(hf_name)
            tensor = handle.get_tensor(hf_name)
            # HF permutes q/k rows for its rotate-half RoPE; undo it for Meta's interleaved pairs.
            if name.endswith("attention.wq.weight"):
                tensor = unpermute_rotary(tensor, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                tensor = unpermute_rotary(tensor, args.n_kv_heads)
            yield name, tensor


def hf_to_meta_name(hf_name: str) -> str:
    if hf_name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if match and match.group(2) in _HF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{_HF_LAYER_NAMES[match.group(2)]}.weight"
    raise ModelError(f"unexpected weight {hf_name!r} in the Hugging Face checkpoint")


def meta_to_hf_name(name: str) -> str:
    top = {meta: hf for hf, meta in _HF_TOP_NAMES.items()}
    if name in top:
        return top[name]
    layer = {meta: hf for hf, meta in _HF_LAYER_NAMES.items()}
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if match and match.group(2) in layer:
        return f"model.layers.{match.group(1)}.{layer[match.group(2)]}.weight"
    raise ModelError(f"no Hugging Face name for {name!r}")


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def build_model(
    args: ModelArgs,
    tensors: Iterator[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    quant: str | None = None,
) -> Transformer:
    """`quant="int8"` quantizes each projection as it arrives, on the device: a model that fits there
    only as int8 (13B on a 24 GB card) never exists in full precision, not even while loading."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    module_names = {module: name for name, module in model.named_modules()}
    to_int8 = {
        f"{module_names[parent]}.{attribute}".lstrip(".") + ".weight": (parent, attribute)
        for parent, attribute in (projections(model) if quant == "int8" else [])
    }
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, Int8Linear] = {}

    def place(name: str, weight: torch.Tensor) -> None:
        if name in to_int8:
            quantized[name] = Int8Linear(*quantize_rows(weight))
        else:
            state[name] = weight

    for name, tensor in tensors:
        if name not in expected:
            raise ModelError(f"unexpected weight {name!r} for this model")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ModelError(
                f"weight {name} has shape {tuple(tensor.shape)}, the checkpoint's config implies "
                f"{tuple(expected[name])}"
            )
        place(name, tensor.to(device=device, dtype=dtype))
    if "output.weight" not in state.keys() | quantized.keys() and "tok_embeddings.weight" in state:
        place("output.weight", state["tok_embeddings.weight"])  # tied embeddings (HF tie_word_embeddings)
    missing = sorted(set(expected) - set(state) - set(quantized))
    if missing:
        raise ModelError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
    for name, linear in quantized.items():
        parent, attribute = to_int8[name]
        setattr(parent, attribute, linear)
    model.load_state_dict(state, assign=True, strict=False)  # the int8 layers hold their own weights
    return model.eval()


def read_args(folder: Path, vocab_size: int, max_context: int | None) -> tuple[str, ModelArgs]:
    """A checkpoint folder's layout and shape, either layout."""
    layout = detect_layout(folder)
    if layout == "meta":
        return layout, meta_args(read_json(folder / "params.json"), vocab_size, max_context)
    return layout, hf_args(read_json(folder / "config.json"), max_context)


def read_tensors(folder: Path, layout: str, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight under Meta's names, one at a time, memory-mapped."""
    return meta_tensors(folder) if layout == "meta" else hf_tensors(folder, args)


def load_transformer(
    folder: Path,
    vocab_size: int,
    device: torch.device,
    dtype: torch.dtype,
    max_context: int | None,
    quant: str | None = None,
):
    """The model of a checkpoint folder, either layout; returns (model, layout)."""
    layout, args = read_args(folder, vocab_size, max_context)
    return build_model(args, read_tensors(folder, layout, args), device, dtype, quant), layout


# ---------------------------------------------------------------------------------------------
# Writing checkpoints: the small random-weight models the tests use, and the embedded model.


def random_state(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight"):
            # Not all ones, so a loader that drops a norm gives different logits.
            state[name] = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            state[name] = 0.02 * torch.randn(tensor.shape, generator=generator)
    return state


def write_meta(
    out: Path, args: ModelArgs, state: dict[str, torch.Tensor], shards: int = 1, int8: bool = False
) -> None:
    """`int8`: store every matrix as per-row absmax int8 (half of bf16's bytes); norms keep their dtype."""
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "max_seq_len": args.max_context,
    }  # fmt: skip
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.hidden_dim != ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier):
        raise ModelError("a Meta checkpoint derives the FFN size from dim; this hidden_dim cannot be written")
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    for shard in range(shards):
        part = {}
        for name, tensor in state.items():
            dim = _META_SHARD_DIM[name.split(".")[-2]]
            piece = tensor.clone() if dim is None else tensor.chunk(shards, dim=dim)[shard].clone()
            if int8 and piece.dim() == 2:
                piece, scale = quantize_rows(piece.float())
                part[name + INT8_SCALE_SUFFIX] = scale
            part[name] = piece
        torch.save(part, out / f"consolidated.{shard:02d}.pth")


def hf_state_dict(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-named weights under Hugging Face's names, q/k rows permuted for its rotate-half RoPE."""
    hf_state = {}
    for name, tensor in state.items():
        if name.endswith("attention.wq.weight"):
            tensor = permute_rotary(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_rotary(tensor, args.n_kv_heads)
        hf_state[meta_to_hf_name(name)] = tensor.contiguous()
    return hf_state


def hf_config(args: ModelArgs) -> dict:
    """The `config.json` of a LlamaForCausalLM with this shape."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_context, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }  # fmt: skip


def write_hf(out: Path, args: ModelArgs, state: dict[str, torch.Tensor], shards: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    hf_state = hf_state_dict(args, state)
    (out / "config.json").write_text(json.dumps(hf_config(args), indent=2) + "\n")
    names = list(hf_state)
    if shards == 1:
        save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: hf_state[n] for n in names[shard::shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_test_checkpoint(
    out: Path,
    layout: str,
    tokenizer_file: Path,
    *,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    shards: int = 1,
    seed: int = 0,
) -> ModelArgs:
    """A small random-weight checkpoint with a real tokenizer: the shape of a real one, in either layout."""
    import sentencepiece

    if layout not in ("meta", "hf"):
        raise ModelError(f"layout must be 'meta' or 'hf', not {layout!r}")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file)).vocab_size()
    args = ModelArgs(
        dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, vocab_size=vocab, multiple_of=32
    )
    state = random_state(args, seed)
    (write_meta if layout == "meta" else write_hf)(Path(out), args, state, shards)
    shutil.copyfile(tokenizer_file, Path(out) / "tokenizer.model")
    return args
