"""`python -m kernel_model bench`: decode, prefill and keystroke latency of the engine, beside HF transformers.

Random weights are built directly on the target device, so a 7B shape needs no checkpoint on disk.
Every figure goes through the path the server uses — `CodeLlama.generate` with its `PrefixCache` —
and the roofline comes from this machine's measured copy bandwidth over the bytes of weights one
decode step reads. One JSON object goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import decode_kernels
from .codellama import (
    QUANT_CHOICES,
    QUANT_HELP,
    CodeLlama,
    load_model,
    resolve_device,
    resolve_dtype,
)
from .errors import ModelError
from .fast import PREFILL_CHUNK, FastDecoder, describe
from .generate import SamplingParams
from .model import ModelArgs, Transformer
from .prompts import Prompt
from .tokenizer import Tokenizer

# Small shapes for CPU runs and tests, next to the published ones (model.PRESETS). Vocabulary is
# Code Llama's, so the output projection weighs what it does in a real model.
SMALL_SHAPES: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=32016, multiple_of=32),
    "small": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=32016, multiple_of=64),
    "medium": dict(dim=1024, n_layers=8, n_heads=16, vocab_size=32016),
}
SHORT_PROMPT = 16  # "short context" decode: a one-line prompt
EDIT_TOKENS = 12  # about one line of code: what a keystroke-level edit changes at the prompt's tail


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _lengths(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",")]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="measure decode, prefill and time to first token (JSON)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint folder, or 'embedded'")
    source.add_argument("--shape", help=f"random weights: 7b, 13b, 34b, {', '.join(SMALL_SHAPES)}")
    p.add_argument("--dim", type=int, help="override the shape's model width")
    p.add_argument("--layers", type=int, help="override the shape's layer count")
    p.add_argument("--heads", type=int, help="override the shape's attention heads")
    p.add_argument("--kv-heads", type=int, help="override the shape's key/value heads (GQA)")
    p.add_argument("--tokenizer", type=Path, help="sentencepiece file for --shape (else synthetic ids)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--compile", action="store_true", help="compiled decode step (CUDA graphs on GPU)")
    p.add_argument("--plain", action="store_true", help="the unoptimised reference path, for comparison")
    p.add_argument(
        "--prefill-chunk", type=int, default=PREFILL_CHUNK, help="tokens a prompt is prefilled in at a time"
    )
    p.add_argument(
        "--decode-kernels",
        choices=decode_kernels.CHOICES,
        help="a decode step's work through our Triton kernels: int8 weights' products (default), all, none",
    )
    p.add_argument(
        "--prompt-attention",
        choices=("auto", "cudnn"),
        default="auto",
        help="a fresh prompt's attention: SDPA's choice, or cuDNN's first where it takes the inputs",
    )
    p.add_argument(
        "--prompt-tokens", type=_lengths, help="comma-separated prefill lengths (GPU 1024,4096,16384)"
    )
    p.add_argument("--long-context", type=_positive, default=4096, help="context of the long-context decode")
    p.add_argument("--new-tokens", type=_positive, default=128)
    p.add_argument(
        "--repeats", type=_positive, default=3, help="runs per figure; median, min and max reported"
    )
    p.add_argument("--compare-hf", action="store_true", help="the same figures for HF transformers")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also list the kernels a short-context decode spends its time in",
    )
    p.add_argument(
        "--threads", type=int, help="CPU threads (torch.set_num_threads); 1 is steadiest on a busy machine"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> None:
    print(json.dumps(run(args), indent=2))


# -- building the model ---------------------------------------------------------------------------


def shape_args(args: argparse.Namespace, max_context: int) -> ModelArgs:
    from .model import PRESETS

    presets = {**PRESETS, **SMALL_SHAPES}
    if args.shape not in presets:
        raise ModelError(f"unknown shape {args.shape!r}; known: {', '.join(presets)}")
    fields = dict(presets[args.shape])
    overrides = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "n_kv_heads": args.kv_heads}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if args.heads is not None and args.kv_heads is None:
        fields["n_kv_heads"] = None  # heads changed alone: plain multi-head attention
    try:
        return ModelArgs(**fields, max_context=max_context)
    except ValueError as exc:
        raise ModelError(str(exc)) from exc


@torch.no_grad()
def random_transformer(args: ModelArgs, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """A model with checkpoint.random_state's distribution, drawn on `device` (no CPU copy, no disk)."""
    with torch.device("meta"):
        model = Transformer(args)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        tensor = torch.empty(meta.shape, device=device, dtype=dtype)
        if name.endswith("norm.weight"):
            tensor.normal_(1.0, 0.1, generator=generator)  # not all ones: a dropped norm would show
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        state[name] = tensor
    model.load_state_dict(state, assign=True)
    return model.eval()


class SyntheticTokenizer:
    """Enough of `Tokenizer` for `Generation` when no sentencepiece file is at hand: each id is "t<id> "."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.piece_texts = [f"t{i} " for i in range(vocab_size)]
        self.bos_id, self.eos_id = 1, 2
        self.eot_id = None

    def decode_infilling(self, ids: list[int]) -> str:
        return "".join(self.piece_texts[i] for i in ids)

    def is_special(self, token: int) -> bool:
        return False


def find_tokenizer(args: argparse.Namespace, vocab_size: int) -> Tokenizer | SyntheticTokenizer:
    if args.tokenizer is not None:
        tokenizer = Tokenizer(args.tokenizer)
        if tokenizer.vocab_size > vocab_size:
            raise ModelError(
                f"the tokenizer has {tokenizer.vocab_size} pieces; the shape embeds {vocab_size}"
            )
        return tokenizer
    return SyntheticTokenizer(vocab_size)


def build_engine(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, max_context: int):
    """(CodeLlama, ModelArgs) for --model or --shape, with the requested fast paths applied."""
    options = {"compile": args.compile, "fast": not args.plain, "warmup": True}
    if args.model is not None:
        engine = load_model(args.model, device, dtype, max_context=max_context, quant=args.quant, **options)
        return engine, engine.model.args
    shape = shape_args(args, max_context)
    model = random_transformer(shape, device, dtype, args.seed)
    tokenizer = find_tokenizer(args, shape.vocab_size)
    quant = "int8" if args.quant == "int8" else None  # random weights are not stored as int8
    engine = CodeLlama(model, tokenizer, name=f"random-{args.shape}", layout="random", quant=quant, **options)
    return engine, shape


def apply_prompt_options(engine: CodeLlama, args: argparse.Namespace) -> None:
    """--prefill-chunk and --prompt-attention on the fast path (the plain path has neither)."""
    if not isinstance(engine.decoder, FastDecoder):
        return
    fast = engine.decoder.fast
    fast.prefill_chunk = args.prefill_chunk
    if args.prompt_attention == "cudnn":
        fast.prompt_backends = [
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        ]


# -- prompts --------------------------------------------------------------------------------------


def source_text(min_chars: int) -> str:
    """Real Python (the standard library's own source), as much as asked for."""
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        chunks.append(text)
        size += len(text)
        if size >= min_chars:
            break
    return "".join(chunks)


def prompt_ids(tokenizer, length: int, seed: int) -> list[int]:
    if isinstance(tokenizer, Tokenizer):
        ids = tokenizer.encode(source_text(6 * length), bos=True)[:length]
        if len(ids) == length:
            return ids
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, tokenizer.vocab_size) for _ in range(length - 1)]


def edited(ids: list[int], seed: int, vocab_size: int) -> list[int]:
    """The prompt after a one-line edit at the cursor: its last line's tokens replaced."""
    rng = random.Random(seed + 1)
    return ids[:-EDIT_TOKENS] + [rng.randrange(3, vocab_size) for _ in range(EDIT_TOKENS)]


# -- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) of one call.

    On a CPU shared with other work the wall clock also counts the time this process waited for
    a core; its CPU time does not, so the bench reports both.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def summary(values: list[float], digits: int = 2) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": len(values),
    }


def with_cpu_time(walls: list[float], cpus: list[float], device: torch.device, digits: int = 2) -> dict:
    result = summary(walls, digits)
    if device.type == "cpu":
        result["by_cpu_time"] = summary(cpus, digits)
    return result


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Runner:
    """One engine's figures: `generate(ids, n, cold)` runs a greedy generation of n tokens."""

    def __init__(self, name: str, generate: Callable[[list[int], int, bool], None], device: torch.device):
        self.name = name
        self.generate = generate
        self.device = device

    def measure(self, ids: list[int], new_tokens: int, cold: bool, repeats: int) -> dict:
        self.generate(ids, new_tokens, cold)  # warm-up: allocator, kernels, compiled graphs
        runs = [timed(lambda: self.generate(ids, new_tokens, cold), self.device) for _ in range(repeats)]
        return with_cpu_time([w for w, _ in runs], [c for _, c in runs], self.device)

    def decode_rate(self, ids: list[int], new_tokens: int, repeats: int, warmup: bool = True) -> dict:
        """Tokens per second of decoding alone: n-1 steps over the time n tokens take beyond one."""
        if warmup:
            self.generate(ids, new_tokens, True)
        walls, cpus = [], []
        for _ in range(repeats):
            one_wall, one_cpu = timed(lambda: self.generate(ids, 1, True), self.device)
            many_wall, many_cpu = timed(lambda: self.generate(ids, new_tokens, True), self.device)
            # A difference lost in noise (too few tokens) gives no rate rather than a huge one.
            if many_wall > one_wall:
                walls.append((new_tokens - 1) * 1000 / (many_wall - one_wall))
            if many_cpu > one_cpu:
                cpus.append((new_tokens - 1) * 1000 / (many_cpu - one_cpu))
        return with_cpu_time(walls or [float("nan")], cpus or [float("nan")], self.device, 1)


def engine_runner(engine: CodeLlama, device: torch.device) -> Runner:
    def generate(ids: list[int], new_tokens: int, cold: bool) -> None:
        if cold:
            engine.prefix_cache.clear()
        # No stop ids: random weights would otherwise end at an arbitrary point.
        generation = engine.generate(Prompt(ids), SamplingParams(max_new_tokens=new_tokens))
        generation.text()
        if generation.result.completion_tokens != new_tokens:
            raise ModelError(f"asked for {new_tokens} tokens, got {generation.result.completion_tokens}")

    return Runner("kernel_model", generate, device)


# -- bandwidth and roofline -----------------------------------------------------------------------


def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """GB/s of a large device-to-device copy, bytes read plus bytes written, best of `repeats`."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = min(timed(lambda: dst.copy_(src), device)[0] for _ in range(repeats))
    return 2 * size / (best / 1000) / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (the anchor's 13.48 GB for 7B bf16 counts them all)."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, 3)


# -- the figures ----------------------------------------------------------------------------------


def figures(
    runner: Runner, tokenizer, args: argparse.Namespace, lengths: list[int], prefix_reuse: bool
) -> dict:
    vocab = tokenizer.vocab_size
    result: dict = {"decode_tok_s": {}, "prefill_ms": {}, "ttft_ms": {}}
    for label, context in (("short", SHORT_PROMPT), (str(args.long_context), args.long_context)):
        progress(f"{runner.name}: decode at {label} context")
        ids = prompt_ids(tokenizer, context, args.seed)
        result["decode_tok_s"][label] = runner.decode_rate(ids, args.new_tokens, args.repeats)
    for length in lengths:
        progress(f"{runner.name}: prefill {length} tokens")
        ids = prompt_ids(tokenizer, length, args.seed)
        cold = runner.measure(ids, 1, True, args.repeats)
        result["prefill_ms"][str(length)] = cold
        entry = {"cold": cold}
        if prefix_reuse:
            # The notebook is cached; each run edits its last line, as a keystroke does.
            walls, cpus = [], []
            for repeat in range(args.repeats + 1):
                runner.generate(ids, 1, True)
                edit = edited(ids, args.seed + repeat, vocab)
                wall, cpu = timed(lambda edit=edit: runner.generate(edit, 1, False), runner.device)
                if repeat:  # the first is a warm-up
                    walls.append(wall)
                    cpus.append(cpu)
            entry["after_edit"] = with_cpu_time(walls, cpus, runner.device)
        result["ttft_ms"][str(length)] = entry
    return result


def head_to_head(
    ours: Runner, others: dict[str, Runner], ids: list[int], new_tokens: int, rounds: int
) -> dict:
    """Our decode rate over each other engine's, measured alternately round by round.

    On a shared machine the load drifts over minutes; alternating makes each round's ratio
    compare two runs made under the same conditions.
    """
    for runner in (ours, *others.values()):
        runner.generate(ids, new_tokens, True)  # warm-up
    walls: dict[str, list[float]] = {name: [] for name in others}
    cpus: dict[str, list[float]] = {name: [] for name in others}
    for _ in range(rounds):
        mine = ours.decode_rate(ids, new_tokens, 1, warmup=False)
        for name, runner in others.items():
            theirs = runner.decode_rate(ids, new_tokens, 1, warmup=False)
            walls[name].append(mine["median"] / theirs["median"])
            if "by_cpu_time" in mine:
                cpus[name].append(mine["by_cpu_time"]["median"] / theirs["by_cpu_time"]["median"])
    out = {}
    for name in others:
        out[name] = {"wall": summary(walls[name])}
        if cpus[name]:
            out[name]["cpu_time"] = summary(cpus[name])
    return out


def run(args: argparse.Namespace) -> dict:
    if args.model is None and args.shape is None:
        if args.dim is None and args.layers is None and args.heads is None:
            raise ModelError("give --model PATH, --shape NAME, or a custom --dim/--layers/--heads")
        args.shape = "tiny"  # the custom sizes override the small preset
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    lengths = args.prompt_tokens or ([1024, 4096, 16384] if device.type == "cuda" else [256, 1024])
    max_context = max(16_384, *lengths, args.long_context) + args.new_tokens
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    progress(f"building the model on {device} ({dtype})")
    if args.decode_kernels:
        os.environ["KERNEL_MODEL_DECODE_KERNELS"] = args.decode_kernels  # read as the model loads
    engine, shape = build_engine(args, device, dtype, max_context)
    apply_prompt_options(engine, args)
    bandwidth = copy_bandwidth(device)
    model_bytes = weight_bytes(engine.model)
    roofline = bandwidth * 1e9 / model_bytes
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "python -m kernel_model bench " + " ".join(sys.argv[2:]),
        "shape": {"dim": shape.dim, "layers": shape.n_layers, "heads": shape.n_heads,
                  "kv_heads": shape.n_kv_heads, "hidden": shape.hidden_dim, "vocab": shape.vocab_size},
        "dtype": str(dtype).removeprefix("torch."),
        "quant": engine.quant,
        "decode_kernels": {what: decode_kernels.ready(device, what) for what in ("int8", "all")},
        "compile": args.compile,
        "prefill_chunk": args.prefill_chunk,
        "prompt_attention": args.prompt_attention,
        "decoder": describe(engine.decoder),
        "plain": args.plain,
        "tokenizer": "sentencepiece" if isinstance(engine.tokenizer, Tokenizer) else "synthetic",
        "new_tokens": args.new_tokens,
        "weight_gb": round(model_bytes / 1e9, 3),
        "copy_bandwidth_gb_s": round(bandwidth, 1),
        "roofline_tok_s": round(roofline, 1),
    }  # fmt: skip
    ours = figures(engine_runner(engine, device), engine.tokenizer, args, lengths, prefix_reuse=True)
    ours["peak_memory_gb"] = peak_memory_gb(device)
    short = ours["decode_tok_s"]["short"]["median"]
    ours["roofline_pct"] = round(100 * short / roofline, 1)
    report["kernel_model"] = ours
    if args.profile:
        progress("profiling a short-context decode")
        report["decode_profile"] = profile_decode(engine_runner(engine, device), engine.tokenizer, args)
    if device.type == "cuda":
        progress("attention alone, by SDPA backend")
        report["attention_ms_by_backend"] = attention_by_backend(shape, device, dtype, lengths, args.repeats)
    if args.compare_hf:
        report["hf"], report["decode_speedup_vs_hf"] = compare_hf(engine, shape, device, dtype, args, lengths)
    return report


PROFILE_TOP = 25  # kernels listed by --profile


def profile_decode(runner: Runner, tokenizer, args: argparse.Namespace) -> dict:
    """The ops (on a GPU: kernels) a short-context greedy generation spends its time in, per new token.

    On CUDA the device time of kernels only (an op that launched a kernel, or a marker around one,
    reports the same time again), CUDA-graph replays traced kernel by kernel; otherwise the ops'
    own CPU time. The 16-token prompt's prefill is inside, a small share against `--new-tokens`
    steps. Names tell what fused: inductor's kernels are named after the ops inside them.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    ids = prompt_ids(tokenizer, SHORT_PROMPT, args.seed)
    runner.generate(ids, args.new_tokens, True)  # warm-up
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as trace:
        runner.generate(ids, args.new_tokens, True)
    sync(runner.device)

    def own_time(event) -> float:  # microseconds
        if not cuda:
            return event.self_cpu_time_total
        kernel = event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
        return event.self_device_time_total if kernel else 0.0

    events = sorted((e for e in trace.key_averages() if own_time(e) > 0), key=own_time, reverse=True)
    per_token = 1000 * args.new_tokens  # microseconds → ms per new token
    return {
        "clock": "device" if cuda else "cpu",
        "ms_per_token": round(sum(own_time(e) for e in events) / per_token, 3),
        "top": [
            {
                "name": e.key[:160],
                "calls_per_token": round(e.count / args.new_tokens, 1),
                "ms_per_token": round(own_time(e) / per_token, 4),
            }
            for e in events[:PROFILE_TOP]
        ],
    }


ATTENTION_BENCH_MAX = 16_384  # longer prompts run in chunks (fast.PREFILL_CHUNK) anyway


def attention_by_backend(shape: ModelArgs, device, dtype, lengths: list[int], repeats: int) -> dict:
    """One layer's causal attention over a fresh prompt, per SDPA backend (ms, and × layers).

    Prefill leaves the backend to SDPA; these figures say what choosing another would gain, and
    what its first call at a length not seen before costs (cuDNN builds an execution graph per
    shape unless TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1; a notebook's prompts change length all the time).
    """
    from functools import partial

    out: dict = {}
    for length in (n for n in lengths if n <= ATTENTION_BENCH_MAX):
        q = torch.randn((1, shape.n_heads, length, shape.head_dim), device=device, dtype=dtype)
        attention = partial(
            torch.nn.functional.scaled_dot_product_attention, q, q.clone(), q.clone(), is_causal=True
        )
        flops = 2 * 2 * shape.n_heads * shape.head_dim * length * length / 2  # causal: half the products
        by_backend: dict = {}
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
        ):
            try:
                with sdpa_kernel(backend):
                    first_ms = timed(attention, device)[0]  # cuDNN builds a graph per new length
                    ms = statistics.median(timed(attention, device)[0] for _ in range(max(repeats, 5)))
            except RuntimeError as exc:  # this backend does not take these inputs on this device
                by_backend[backend.name.lower()] = {
                    "error": (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                }
                continue
            by_backend[backend.name.lower()] = {
                "ms": round(ms, 3),
                "first_call_ms": round(first_ms, 3),
                "all_layers_ms": round(ms * shape.n_layers, 2),
                "tflop_s": round(flops / (ms / 1000) / 1e12, 1),
            }
        out[str(length)] = by_backend
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# -- Hugging Face transformers on the same weights ------------------------------------------------


def hf_model(state: dict[str, torch.Tensor], shape: ModelArgs, device: torch.device, dtype: torch.dtype):
    import transformers

    from .checkpoint import hf_config, hf_state_dict

    fields = {
        k: v for k, v in hf_config(shape).items() if k not in ("architectures", "model_type", "torch_dtype")
    }
    config = transformers.LlamaConfig(**fields, pad_token_id=0)
    config._attn_implementation = "sdpa"
    hf_state = hf_state_dict(shape, state)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(hf_state, assign=True)
    # Non-persistent buffers (RoPE frequencies) were made on the meta device: make them for real.
    for module_name, module in list(model.named_modules()):
        if any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(config).to(device))
    return model.eval()  # every weight is already ours, in our dtype; RoPE frequencies stay float32


def hf_runner(model, device: torch.device, static: bool) -> Runner:
    def generate(ids: list[int], new_tokens: int, cold: bool) -> None:
        kwargs = {"cache_implementation": "static"} if static else {}
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids], device=device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs,
            )  # fmt: skip
        if out.shape[1] != len(ids) + new_tokens:
            raise ModelError(f"transformers made {out.shape[1] - len(ids)} tokens, not {new_tokens}")

    return Runner("transformers-static" if static else "transformers-eager", generate, device)


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights by their Meta names; int8 projections as the floats they stand for."""
    from .fast import Int8Linear

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            state[f"{name}.weight"] = module.dequantized()
        for key, parameter in module.named_parameters(recurse=False):
            state[f"{name}.{key}" if name else key] = parameter.detach()
    return state


def compare_hf(engine: CodeLlama, shape: ModelArgs, device, dtype, args, lengths) -> tuple[dict, dict]:
    """transformers' figures on the same weights, and the head-to-head decode ratios."""
    try:
        import transformers
    except ImportError:
        return {"skipped": {"note": "transformers is not installed"}}, {}
    state = float_state(engine.model)
    need = sum(t.numel() * t.element_size() for t in state.values())
    both_fit = device.type != "cuda" or torch.cuda.mem_get_info(device)[0] > 1.2 * need
    tokenizer, ours = engine.tokenizer, engine_runner(engine, device)
    if not both_fit:  # e.g. 34B: measure transformers alone, after ours
        del engine, ours
        gc.collect()
        torch.cuda.empty_cache()
    model = hf_model(state, shape, device, dtype)
    del state
    out: dict = {}
    runners: dict[str, Runner] = {}
    for static in (True, False):
        name = "static_cache" if static else "eager"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runner = hf_runner(model, device, static)
        try:
            # On CUDA transformers compiles the static-cache decode itself (reduce-overhead).
            result = figures(runner, tokenizer, args, lengths, prefix_reuse=False)
        except Exception as exc:  # a comparison failing must not lose our own figures
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        result["peak_memory_gb"] = peak_memory_gb(device)
        result["transformers"] = transformers.__version__
        out[name] = result
        runners[name] = runner
    if not both_fit or not runners:
        return out, {}
    progress("head to head: decode at short context, alternating")
    ids = prompt_ids(tokenizer, SHORT_PROMPT, args.seed)
    return out, head_to_head(ours, runners, ids, args.new_tokens, max(3, 2 * args.repeats))
