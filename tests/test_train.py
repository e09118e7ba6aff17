"""The trainer: a few steps lower the loss, a run resumes from its state, the export loads like a real checkpoint."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from kernel_model import load_model
from kernel_model import train as train_module
from kernel_model.train import TrainConfig, fit_steps, learning_rate, train


def repeating_batches(vocab: int, seq_len: int, batch: int):
    generator = torch.Generator().manual_seed(0)
    fixed = torch.randint(3, vocab, (batch, seq_len + 1), generator=generator)
    while True:
        yield fixed


def test_steps_lower_the_loss_and_export_loads(tmp_path, codellama_tokenizer_file):
    cfg = TrainConfig(dim=32, layers=1, heads=2, seq_len=32, batch_size=2, steps=12, warmup_steps=2,
                      learning_rate=1e-2, log_every=1, save_every=100)  # fmt: skip
    folder = train(
        cfg,
        lambda start: repeating_batches(32016, 32, 2),
        codellama_tokenizer_file,
        tmp_path / "run",
        torch.device("cpu"),
    )
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    assert all(record["tokens_per_s"] > 0 for record in log)
    model = load_model(folder)
    assert model.supports_infilling and model.info()["dim"] == 32
    assert model.max_context == 32  # the trained length
    assert isinstance(model.infill("def f(x):\n", "\n", max_new_tokens=4), str)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 40 * 2**20


def test_int8_export_halves_the_bytes_and_loads(tmp_path, codellama_tokenizer_file):
    cfg = TrainConfig(dim=64, layers=1, heads=2, seq_len=16, batch_size=2, steps=2, warmup_steps=1)
    run = tmp_path / "run"
    bf16 = train(cfg, lambda start: repeating_batches(32016, 16, 2), codellama_tokenizer_file, run,
                 torch.device("cpu"))  # fmt: skip
    bf16_bytes = (bf16 / "consolidated.00.pth").stat().st_size
    # Re-running a finished run only exports it again: the way to re-export a trained model as int8.
    int8 = train(TrainConfig(**{**cfg.__dict__, "export_int8": True}),
                 lambda start: repeating_batches(32016, 16, 2), codellama_tokenizer_file, run,
                 torch.device("cpu"))  # fmt: skip
    assert (int8 / "consolidated.00.pth").stat().st_size < 0.6 * bf16_bytes
    assert isinstance(load_model(int8).infill("def f(x):\n    ", "\n", max_new_tokens=4), str)


def test_a_run_resumes_where_it_stopped(tmp_path, codellama_tokenizer_file):
    cfg = TrainConfig(dim=32, layers=1, heads=2, seq_len=16, batch_size=2, steps=4, warmup_steps=1,
                      log_every=1, save_every=2)  # fmt: skip
    run = tmp_path / "run"
    train(
        cfg, lambda start: repeating_batches(32016, 16, 2), codellama_tokenizer_file, run, torch.device("cpu")
    )
    longer = TrainConfig(**{**cfg.__dict__, "steps": 6})
    train(
        longer,
        lambda start: repeating_batches(32016, 16, 2),
        codellama_tokenizer_file,
        run,
        torch.device("cpu"),
    )
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_run_continues_from_a_trained_model(tmp_path, codellama_tokenizer_file):
    cfg = TrainConfig(dim=32, layers=1, heads=2, seq_len=32, batch_size=2, steps=12, warmup_steps=2,
                      learning_rate=1e-2, log_every=1, save_every=100, export_int8=True)  # fmt: skip
    first = train(cfg, lambda start: repeating_batches(32016, 32, 2), codellama_tokenizer_file,
                  tmp_path / "first", torch.device("cpu"))  # fmt: skip
    continued = TrainConfig(**{**cfg.__dict__, "steps": 1, "init_from": str(first)})
    train(continued, lambda start: repeating_batches(32016, 32, 2), codellama_tokenizer_file,
          tmp_path / "second", torch.device("cpu"))  # fmt: skip

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    # The second run starts where the first ended (int8 rounding aside), not from a random start.
    assert abs(losses("second")[0] - losses("first")[-1]) < 0.2 < losses("first")[0] - losses("first")[-1]
    wider = TrainConfig(**{**continued.__dict__, "dim": 64})
    with pytest.raises(SystemExit, match="dim 32 vs 64"):
        train(wider, lambda start: repeating_batches(32016, 32, 2), codellama_tokenizer_file,
              tmp_path / "third", torch.device("cpu"))  # fmt: skip


def test_a_budgeted_run_fits_its_steps_and_resumes_them(tmp_path, codellama_tokenizer_file, monkeypatch):
    monkeypatch.setattr(train_module, "BUDGET_SKIP_STEPS", 2)  # fit early: the test need not wait for it
    monkeypatch.setattr(train_module, "BUDGET_TIMED_STEPS", 5)
    # Steps timed at 1 s whatever the machine's load: the fit is 7 + 20 * 0.97 // 1 = 26 steps.
    fit = train_module.fit_steps
    monkeypatch.setattr(
        train_module, "fit_steps", lambda cfg, step, per_step, elapsed: fit(cfg, step, 1.0, 0.0)
    )
    cfg = TrainConfig(dim=32, layers=1, heads=2, seq_len=16, batch_size=2, steps=10**6, warmup_steps=10,
                      budget_seconds=20.0, log_every=1, save_every=5)  # fmt: skip
    run = tmp_path / "run"

    class Crash(Exception):
        pass

    def crashing_batches(start):
        yield from itertools.islice(repeating_batches(32016, 16, 2), 8)
        raise Crash

    # A crash while reading the 9th batch, after the fit at step 7 and a save at step 8.
    with pytest.raises(Crash):
        train(TrainConfig(**{**cfg.__dict__, "save_every": 1}), crashing_batches, codellama_tokenizer_file,
              run, torch.device("cpu"))  # fmt: skip
    fitted = json.loads((run / "config.json").read_text())["steps"]
    stopped = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert stopped[-1] == 8 and fitted == 26

    def batches(start):
        return repeating_batches(32016, 16, 2)

    # Run again: it resumes where it stopped and ends where the fitted schedule ends.
    train(cfg, batches, codellama_tokenizer_file, run, torch.device("cpu"))
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert json.loads((run / "config.json").read_text())["steps"] == fitted
    assert steps[-1] == fitted and sorted(set(steps)) == list(range(1, fitted + 1))


def test_fitted_steps_fill_the_time_left():
    cfg = TrainConfig(budget_seconds=100.0, steps=5)
    # 10 s spent, 90 s left, 3 % held back: 87.3 s of 0.1 s steps after the 60 already run.
    assert fit_steps(cfg, 60, seconds_per_step=0.1, elapsed=10.0).steps in (60 + 872, 60 + 873)  # rounding
    assert fit_steps(cfg, 60, seconds_per_step=0.1, elapsed=120.0).steps == 60  # over budget: stop now


def test_a_budget_needs_a_warm_up_to_time_steps_in(tmp_path, codellama_tokenizer_file):
    cfg = TrainConfig(budget_seconds=60.0, warmup_steps=10)
    with pytest.raises(ValueError, match="at least 60 warm-up steps"):
        train(cfg, lambda start: iter(()), codellama_tokenizer_file, tmp_path, torch.device("cpu"))


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0, min_learning_rate=0.1)
    assert learning_rate(0, cfg) == 0.1 and learning_rate(9, cfg) == 1.0
    assert abs(learning_rate(100, cfg) - 0.1) < 1e-9
    assert learning_rate(50, cfg) < learning_rate(20, cfg)
