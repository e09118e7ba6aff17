"""Train a small Code Llama from scratch with Code Llama's recipe, and export it as a Meta checkpoint.

python -m kernel_model.train --tokens TOKENS --tokenizer tokenizer.model --out RUN [--dim --layers ...]

AdamW (0.9, 0.95), cosine schedule with linear warm-up, gradient clipping at 1.0, bf16 autocast on
a GPU. TOKENS is the file `python -m kernel_model tokenize-corpus` writes, FIM already applied to
90 % of documents, half PSM, half SPM (kernel_model.fim). The run folder holds a
resumable `state.pt`, a JSON-lines `log.jsonl` (loss, learning rate, tokens/s) and, at the end,
`model/` in Meta's layout — the same files `load_model` reads for a real Code Llama.

`--init-from MODEL` starts from a trained model of the same shape (a checkpoint folder or `embedded`)
instead of random weights, so that short runs — a CPU's, or what a lent GPU's minutes allow — add up.

`--budget-seconds S` fits the run to a time budget (a lent GPU's minutes): it times a few steps during
the warm-up and sets `--steps` so the whole cosine schedule ends within S, which also stops the run;
config.json records the steps chosen, and a resumed run keeps them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import load_transformer, write_meta
from .model import ModelArgs, Transformer, count_parameters
from .tokenizer import Tokenizer


@dataclass
class TrainConfig:
    dim: int = 256
    layers: int = 6
    heads: int = 8
    kv_heads: int | None = None
    seq_len: int = 512
    batch_size: int = 16
    steps: int = 2000
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 200
    max_seconds: float = 0.0  # stop (and export) after this long; 0: run every step
    compile: bool = False
    export_int8: bool = False  # int8 matrices: a model twice the size fits the same bytes
    budget_seconds: float = 0.0  # choose `steps` so the run ends within this, from its measured step rate
    align_windows: bool = False  # a window starts at every sample (fim.batches): whole FIM samples
    init_from: str = ""  # a checkpoint folder (or "embedded") of this shape to continue from; "": random


# A budgeted run times steps after the first few (compilation, allocator warm-up) and before the
# warm-up ends, so the cosine schedule is fixed before it starts.
BUDGET_SKIP_STEPS = 10
BUDGET_TIMED_STEPS = 50


def learning_rate(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_learning_rate + 0.5 * (cfg.learning_rate - cfg.min_learning_rate) * (
        1 + math.cos(math.pi * progress)
    )


def make_optimizer(model: Transformer, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    # No weight decay on norms (1-d): decaying their gains toward zero only fights the normalisation.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def loss_on(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a [B, T+1] batch."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def train(
    cfg: TrainConfig,
    make_batches: Callable[[int], Iterator[torch.Tensor]],
    tokenizer_file: Path,
    out: Path,
    device: torch.device,
) -> Path:
    """Run (or resume) training in `out`; `make_batches(k)` yields the stream from batch k on.

    Returns the exported model folder.
    """
    if cfg.budget_seconds and cfg.warmup_steps < BUDGET_SKIP_STEPS + BUDGET_TIMED_STEPS:
        raise ValueError(
            f"a budgeted run times its steps during the warm-up: use at least "
            f"{BUDGET_SKIP_STEPS + BUDGET_TIMED_STEPS} warm-up steps"
        )
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(tokenizer_file)
    if not tokenizer.supports_infilling:
        raise SystemExit(f"{tokenizer_file} has no FIM pieces: train one with `python -m kernel_model.vocab`")
    torch.manual_seed(cfg.seed)
    args = ModelArgs(
        dim=cfg.dim, n_layers=cfg.layers, n_heads=cfg.heads, n_kv_heads=cfg.kv_heads,
        vocab_size=tokenizer.vocab_size, multiple_of=32, max_context=max(cfg.seq_len, 4096),
    )  # fmt: skip
    model = Transformer(args).to(device)
    state_file = out / "state.pt"
    if cfg.init_from and not state_file.exists():  # a resumed run's weights come from its state
        load_weights(model, cfg.init_from, tokenizer.vocab_size)
    else:
        init_weights(model, args)
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda")
    step = 0
    fitting = bool(cfg.budget_seconds)  # until the step count is fitted to the budget
    if state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if cfg.budget_seconds and state.get("steps"):
            cfg = dataclasses.replace(cfg, steps=state["steps"])  # the schedule the budget fixed
            fitting = False
    fit_from = step
    # The budget is also a hard stop: step times can drift after they were measured.
    stop_after = cfg.max_seconds or cfg.budget_seconds
    batches = make_batches(step)  # the data stream is a pure function of the seed: resume mid-stream
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    forward = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    print(
        f"training {count_parameters(model) / 1e6:.1f} M parameters on {device}, from step {step}", flush=True
    )
    log = (out / "log.jsonl").open("a")
    started = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    while step < cfg.steps:
        if stop_after and time.perf_counter() - started > stop_after:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        batch = next(batches).to(device, non_blocking=True)
        with autocast:
            loss = loss_on(forward, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += batch.numel()
        if fitting and step - fit_from in (BUDGET_SKIP_STEPS, BUDGET_SKIP_STEPS + BUDGET_TIMED_STEPS):
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the loop runs ahead of the GPU; time what it has done
            if step - fit_from == BUDGET_SKIP_STEPS:
                timed_from = time.perf_counter()
            else:
                cfg = fit_steps(cfg, step, (time.perf_counter() - timed_from) / BUDGET_TIMED_STEPS,
                                time.perf_counter() - started)  # fmt: skip
                (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
                print(f"{cfg.steps} steps fit the budget of {cfg.budget_seconds:.0f} s", flush=True)
                if cfg.steps < 2 * cfg.warmup_steps:
                    print(f"warning: the budget leaves little or no decay after {cfg.warmup_steps} "
                          "warm-up steps; give it more time or fewer warm-up steps", flush=True)  # fmt: skip
                fitting = False
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step, "loss": round(loss.item(), 4), "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": round(float(grad_norm), 3), "tokens_per_s": round(window_tokens / elapsed),
                "elapsed_s": round(time.perf_counter() - started, 1),
            }  # fmt: skip
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
            window_tokens, window_start = 0, time.perf_counter()
        if step % cfg.save_every == 0:
            save_state(state_file, model, optimizer, step, None if fitting else cfg.steps)
    save_state(state_file, model, optimizer, step, None if fitting else cfg.steps)
    # The exported window is the trained length: past it a model this small stops making sense.
    trained = dataclasses.replace(args, max_context=cfg.seq_len)
    return export(model, trained, tokenizer_file, out / "model", int8=cfg.export_int8)


def fit_steps(cfg: TrainConfig, step: int, seconds_per_step: float, elapsed: float) -> TrainConfig:
    # 3 % held back for logging and state saves, which the timed steps did not include.
    remaining = max(0.0, cfg.budget_seconds - elapsed) * 0.97
    return dataclasses.replace(cfg, steps=step + int(remaining / seconds_per_step))


def init_weights(model: Transformer, args: ModelArgs) -> None:
    # GPT-2 style: small normal init, residual projections scaled down by depth.
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2:
            continue
        std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
        torch.nn.init.normal_(parameter, mean=0.0, std=std)


def load_weights(model: Transformer, checkpoint: str, vocab_size: int) -> None:
    """Start from a trained model's weights (int8 ones dequantized), which must have `model`'s shape."""
    from .codellama import EMBEDDED_PATH  # the serving side is only needed here

    folder = EMBEDDED_PATH if checkpoint == "embedded" else Path(checkpoint)
    trained, _ = load_transformer(folder, vocab_size, torch.device("cpu"), torch.float32, None)
    ours, theirs = model.args, trained.args
    shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "rope_theta")
    if any(getattr(ours, name) != getattr(theirs, name) for name in shape):
        raise SystemExit(
            f"{folder} has another shape than this run: "
            + ", ".join(f"{name} {getattr(theirs, name)} vs {getattr(ours, name)}" for name in shape)
        )
    model.load_state_dict(trained.state_dict())


def save_state(
    path: Path, model: Transformer, optimizer: torch.optim.Optimizer, step: int, steps: int | None
) -> None:
    """`steps`: the schedule's length, or None while a budgeted run has not fitted it yet."""
    temporary = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "steps": steps}
    torch.save(state, temporary)
    os.replace(temporary, path)  # a crash mid-save never leaves a broken state behind


def export(
    model: Transformer, args: ModelArgs, tokenizer_file: Path, folder: Path, int8: bool = False
) -> Path:
    """Meta's layout in bfloat16 (half the bytes; the engine upcasts to float32 on CPU), or int8 matrices."""
    dtype = torch.float32 if int8 else torch.bfloat16  # int8 rounds the float32 weights, not a bf16 rounding
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in model.state_dict().items()}
    write_meta(folder, args, state, int8=int8)
    shutil.copyfile(tokenizer_file, folder / "tokenizer.model")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    from .fim import batches  # the data side is only needed here

    parser = argparse.ArgumentParser(prog="python -m kernel_model.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--tokens", type=Path, required=True, help="a token file from tokenize-corpus")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    for name, value in asdict(TrainConfig()).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value)
        else:
            parser.add_argument(flag, type=type(value) if value is not None else int, default=value)
    options = parser.parse_args(argv)
    cfg = TrainConfig(**{name: getattr(options, name) for name in asdict(TrainConfig())})
    if options.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(options.device)

    sample_start_id = Tokenizer(options.tokenizer).bos_id if cfg.align_windows else None

    def make_batches(start: int) -> Iterator[torch.Tensor]:
        return batches(
            options.tokens,
            cfg.seq_len,
            cfg.batch_size,
            cfg.seed,
            start=start,
            sample_start_id=sample_start_id,
        )

    folder = train(cfg, make_batches, options.tokenizer, options.out, device)
    print(f"exported {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
