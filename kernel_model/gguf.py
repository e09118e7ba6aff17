"""Export a checkpoint (Meta or Hugging Face layout, or the embedded model) to GGUF for llama.cpp and Ollama.

GGUF's "llama" architecture keeps q/k rows in Meta's layout (RoPE on interleaved pairs, ggml's
"normal" rope mode): llama.cpp's own converter un-permutes Hugging Face weights back to it. Our
loader already yields Meta's layout for both checkpoint layouts, so the weights are written as they
are. The tokenizer goes in whole (pieces, scores, types, as sentencepiece stores them) with the FIM
ids spelled out, because llama.cpp only guesses Code Llama's `▁<EOT>` from its text when told.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .checkpoint import read_args, read_tensors
from .codellama import EMBEDDED_PATH
from .errors import ModelError
from .model import ModelArgs
from .tokenizer import Tokenizer
from .vocab import UNUSED, read_pieces

ARCH = "llama"
OUT_TYPES = ("f32", "f16")

# Our (Meta) weight names → GGUF's, per layer and top-level.
_LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
    "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}  # fmt: skip
_TOP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def gguf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` → `blk.3.attn_q.weight`."""
    base = name.removesuffix(".weight")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.weight"
    parts = base.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"blk.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ModelError(f"no GGUF name for weight {name!r}")


def resolve_folder(model: str | Path) -> Path:
    folder = EMBEDDED_PATH if str(model) == "embedded" else Path(model).expanduser()
    if str(model) == "embedded" and not (folder / "params.json").is_file():
        raise ModelError("the embedded model is not part of this installation; pass a checkpoint folder")
    return folder


def weights(folder: Path, layout: str, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight in Meta's layout (HF q/k rows un-permuted), one at a time, memory-mapped."""
    tensors = read_tensors(folder, layout, args)
    seen_output = False
    embedding = None
    for name, tensor in tensors:
        seen_output |= name == "output.weight"
        if name == "tok_embeddings.weight":
            embedding = tensor
        yield name, tensor
    if not seen_output and embedding is not None:
        yield "output.weight", embedding  # tied embeddings: llama.cpp wants the output matrix itself


def as_array(name: str, tensor: torch.Tensor, out_type: str) -> np.ndarray:
    # Norm weights stay float32 as in llama.cpp's converter: they are tiny and precision-sensitive.
    keep_f32 = out_type == "f32" or tensor.ndim == 1
    return tensor.detach().to(torch.float32 if keep_f32 else torch.float16).contiguous().numpy()


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and sentencepiece types (the same numbers as GGUF's token types), padded to the model."""
    pieces = read_pieces(tokenizer.path.read_bytes())
    if len(pieces) != tokenizer.vocab_size:
        raise ModelError(
            f"{tokenizer.path} lists {len(pieces)} pieces, sentencepiece reports {tokenizer.vocab_size}"
        )
    tokens = [piece.encode("utf-8") for piece, _, _ in pieces]
    scores = [float(score) for _, score, _ in pieces]
    types = [int(kind) for _, _, kind in pieces]
    for index in range(len(pieces), vocab_size):
        # Embedding rows beyond the tokenizer (padded vocabularies) get placeholder pieces, as llama.cpp does.
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(UNUSED)
    return tokens, scores, types


def export_gguf(
    model: str | Path,
    out: str | Path,
    out_type: str = "f16",
    context_length: int | None = None,
    name: str | None = None,
) -> dict:
    """Write `model` as one GGUF file; returns a summary (tensors, bytes, FIM ids)."""
    import gguf

    if out_type not in OUT_TYPES:
        raise ModelError(f"out type must be one of {', '.join(OUT_TYPES)}, not {out_type!r}")
    folder = resolve_folder(model)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    layout, args = read_args(folder, tokenizer.vocab_size, context_length)
    if tokenizer.vocab_size > args.vocab_size:
        raise ModelError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model embeds only {args.vocab_size}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), ARCH)
    writer.add_name(name or ("embedded" if str(model) == "embedded" else folder.name))
    writer.add_context_length(args.max_context)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_layer_norm_rms_eps(float(args.norm_eps))
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if out_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    tokens, scores, types = vocabulary(tokenizer, args.vocab_size)
    writer.add_tokenizer_model("llama")  # sentencepiece BPE with byte fallback, as Llama 2
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.sp.unk_id())
    if tokenizer.pad_id >= 0:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)  # sentencepiece's dummy prefix, which every Code Llama tokenizer uses
    fim = {}
    if tokenizer.supports_infilling:
        fim = {"prefix": tokenizer.prefix_id, "suffix": tokenizer.suffix_id,
               "middle": tokenizer.middle_id, "eot": tokenizer.eot_id}  # fmt: skip
        # Both spellings: current llama.cpp reads fim_*; older builds (and Ollama's) read prefix/suffix/middle.
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, fim["prefix"])
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, fim["suffix"])
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, fim["middle"])
        writer.add_uint32(gguf.Keys.Tokenizer.PREFIX_ID, fim["prefix"])
        writer.add_uint32(gguf.Keys.Tokenizer.SUFFIX_ID, fim["suffix"])
        writer.add_uint32(gguf.Keys.Tokenizer.MIDDLE_ID, fim["middle"])
        # ▁<EOT> ends an infilling; as the EOT id llama.cpp counts it as end of generation.
        writer.add_eot_token_id(fim["eot"])

    # Two passes over the memory-mapped weights: shapes for the header, then the data one tensor at a
    # time, so a 34B export never holds more than one tensor converted in memory.
    count, total = 0, 0
    element = 4 if out_type == "f32" else 2
    for weight_name, tensor in weights(folder, layout, args):
        size = 4 if out_type == "f32" or tensor.ndim == 1 else element
        dtype = np.float32 if size == 4 else np.float16
        writer.add_tensor_info(
            gguf_name(weight_name), tuple(tensor.shape), np.dtype(dtype), tensor.numel() * size
        )
        count += 1
        total += tensor.numel() * size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for weight_name, tensor in weights(folder, layout, args):
        writer.write_tensor_data(as_array(weight_name, tensor, out_type))
    writer.close()
    return {"out": str(out), "layout": layout, "type": out_type, "tensors": count, "bytes": total,
            "vocab": args.vocab_size, "context_length": args.max_context, "fim": fim}  # fmt: skip


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            "export-gguf needs the 'gguf' package: pip install 'jupyter-codellama[gguf]'"
        ) from exc
    started = time.monotonic()
    summary = export_gguf(args.model, args.out, args.outtype, args.context_length, args.name)
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `export-gguf` on the engine's top-level subparsers (handler in `func`)."""
    p = subparsers.add_parser("export-gguf", help="write a checkpoint as a GGUF file for llama.cpp / Ollama")
    p.add_argument("--model", required=True, help="checkpoint folder (Meta or HF layout), or 'embedded'")
    p.add_argument("out", type=Path, help="the .gguf file to write")
    p.add_argument("--outtype", choices=OUT_TYPES, default="f16", help="matrix precision (norms stay f32)")
    p.add_argument("--context-length", type=int, default=None,
                   help="context the file declares (default: the checkpoint's trained length, else 16384)")  # fmt: skip
    p.add_argument("--name", default=None, help="general.name (default: the folder's name)")
    p.set_defaults(func=_cmd_export)
