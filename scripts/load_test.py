"""Load test: many websocket clients completing in a notebook, against a Jupyter server started here on loopback.

    python scripts/load_test.py                       # 32 clients x 50 requests, the embedded model
    python scripts/load_test.py --model PATH --clients 8 --requests 20 --json out.json

The script starts `jupyter server` on 127.0.0.1 with a random token and throwaway directories, waits
for the model, then runs the clients: each sends its requests one after another (every fifth one
superseded at once by the next keystroke, as typing does), waits for the final message and backs
off a little after "busy", as the frontend would. It reports latency (p50/p99 of requests that
completed), throughput, every outcome, and the server's memory before, at peak and after. It is
bounded in count and time (--time-limit) and stops the server whatever happens.

Exit status 0 only if every request ended in `done` or a clear `busy`/`error`, none hung, the server
is idle afterwards and its memory came back to within --memory-slack of the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

NOTEBOOK = [
    ("markdown", "# Sales analysis\nLoad the data, clean it, and look at the monthly totals."),
    ("code", "import numpy as np\nimport pandas as pd\nimport matplotlib.pyplot as plt"),
    ("code", "sales = pd.read_csv('sales.csv', parse_dates=['date'])\nsales.head()"),
    ("code", "def clean(frame):\n    frame = frame.dropna(subset=['amount'])\n    frame['amount'] = frame['amount'].clip(lower=0)\n    return frame"),
    ("code", "sales = clean(sales)\nmonthly = sales.groupby(sales['date'].dt.to_period('M'))['amount'].sum()"),
    ("markdown", "## Monthly totals"),
    ("code", "fig, ax = plt.subplots(figsize=(8, 4))\nmonthly.plot(ax=ax)\nax.set_title('Monthly sales')"),
    ("code", "def top_customers(frame, n=10):\n    totals = frame.groupby('customer')['amount'].sum()\n    return totals.sort_values(ascending=False).head(n)"),
    ("code", "top = top_customers(sales)\nprint(top)"),
    ("code", "growth = monthly.pct_change()\ngrowth.describe()"),
]  # fmt: skip


@dataclass
class Outcome:
    kind: str  # done | cancelled | busy | error | hang | closed
    latency: float  # seconds from send to the final message
    tokens: int = 0
    message: str = ""
    finish_reason: str = ""  # of a done: end, length, stop, mode, deadline, cancelled
    queue_ms: float = 0.0


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    rss_samples: list[int] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_checkpoint(folder: Path) -> Path:
    """A small random-weight infilling checkpoint, made with kernel_model's own command."""
    from kernel_model.vocab import add_fim_pieces

    tokenizer = folder / "codellama-tokenizer.model"
    source = ROOT.parent / "shared" / "data" / "llama2-codellama-python-tokenizer.model"
    tokenizer.write_bytes(add_fim_pieces(source.read_bytes()))
    out = folder / "checkpoint"
    subprocess.run(
        [sys.executable, "-m", "kernel_model", "make-test-checkpoint", str(out), "--tokenizer", str(tokenizer)],
        check=True, cwd=ROOT,
    )  # fmt: skip
    return out


def start_server(
    args: argparse.Namespace, model: str, workdir: Path, port: int, token: str
) -> subprocess.Popen:
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(workdir / "config"),
        "JUPYTER_DATA_DIR": str(workdir / "data"),
        "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    root = workdir / "root"
    root.mkdir()
    command = [
        sys.executable, "-m", "jupyter", "server", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--port-retries=0", f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
        "--ServerApp.jpserver_extensions={'jupyter_codellama': True}",
        f"--CodeLlamaExtension.model={model}", f"--CodeLlamaExtension.max_new_tokens={args.max_new_tokens}",
        f"--CodeLlamaExtension.request_timeout={args.request_timeout}",
    ]  # fmt: skip
    if os.geteuid() == 0:
        command.append("--allow-root")  # containers and CI run as root
    log = open(workdir / "server.log", "w")  # noqa: SIM115 -- handed to the child, closed with it
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(15)


async def status(base: str, token: str) -> dict[str, Any]:
    response = await AsyncHTTPClient().fetch(
        f"{base}codellama/status", headers={"Authorization": f"token {token}"}
    )
    return json.loads(response.body)


async def wait_ready(base: str, token: str, server: subprocess.Popen, limit: float) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        with contextlib.suppress(Exception):  # not listening yet
            state = await status(base, token)
            if state["state"] == "ready":
                return state
            if state["state"] == "error":
                raise SystemExit(f"the model failed to load: {state['error']}")
        await asyncio.sleep(0.2)
    raise SystemExit("the server did not become ready in time")


def request_for(client: int, index: int) -> dict[str, Any]:
    """A completion somewhere in the notebook, different per client and request (the cursor moves)."""
    rng = random.Random(client * 1000 + index)
    cells = [{"cell_type": kind, "source": source} for kind, source in NOTEBOOK]
    code = [i for i, (kind, _) in enumerate(NOTEBOOK) if kind == "code"]
    cell = rng.choice(code)
    source = cells[cell]["source"]
    return {
        "type": "complete",
        "notebook": {"cells": cells},
        "cell": cell,
        "offset": rng.randint(0, len(source)),
    }


async def client(
    number: int, url: str, token: str, args: argparse.Namespace, run: Run, stop_at: float
) -> None:
    ws = await websocket_connect(f"{url}?token={token}")
    try:
        index = 0
        while index < args.requests and time.monotonic() < stop_at:
            batch = [request_for(number, index)]
            if index % 5 == 4 and index + 1 < args.requests:
                # A keystroke right after a request: the same cell again, the older one superseded.
                following = request_for(number, index + 1)
                following.update(cell=batch[0]["cell"], offset=batch[0]["offset"])
                batch.append(following)
            sent: dict[str, float] = {}
            for offset, body in enumerate(batch):
                request_id = f"c{number}-r{index + offset}"
                sent[request_id] = time.monotonic()
                await ws.write_message(json.dumps({**body, "id": request_id}))
            busy = False
            while sent:
                remaining = min(args.request_limit, stop_at - time.monotonic() + args.request_limit)
                try:
                    raw = await asyncio.wait_for(ws.read_message(), timeout=max(remaining, 0.1))
                except asyncio.TimeoutError:
                    run.outcomes.extend(Outcome("hang", args.request_limit) for _ in sent)
                    return
                if raw is None:
                    run.outcomes.extend(Outcome("closed", 0.0, message=str(ws.close_reason)) for _ in sent)
                    return
                message = json.loads(raw)
                started = sent.get(message.get("id"))
                if started is None or message["type"] == "chunk":
                    continue
                del sent[message["id"]]
                latency = time.monotonic() - started
                if message["type"] == "done":
                    kind = "cancelled" if message.get("cancelled") else "done"
                    run.outcomes.append(Outcome(
                        kind, latency, message["usage"]["completion_tokens"],
                        finish_reason=message.get("finish_reason", ""), queue_ms=message["timings"]["queue_ms"],
                    ))  # fmt: skip
                elif message.get("busy"):
                    busy = True
                    run.outcomes.append(Outcome("busy", latency, message=message["message"]))
                else:
                    run.outcomes.append(Outcome("error", latency, message=message["message"]))
            index += len(batch)
            if busy:
                await asyncio.sleep(random.uniform(0.05, 0.3))  # back off, as the frontend does
    finally:
        ws.close()


async def sample_memory(pid: int, run: Run, done: asyncio.Event) -> None:
    while not done.is_set():
        run.rss_samples.append(rss(pid))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 0.25)


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="codellama-load-"))
    model = args.model
    if model is None:
        model = "embedded" if (ROOT / "kernel_model" / "embedded" / "params.json").is_file() else None
        model = model or str(test_checkpoint(workdir))
    port, token = free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}/"
    server = start_server(args, model, workdir, port, token)
    started = time.monotonic()
    stop_at = started + args.time_limit
    report: dict[str, Any] = {"model": model, "clients": args.clients, "requests_per_client": args.requests}
    try:
        ready = await wait_ready(base, token, server, min(args.time_limit, 300))
        report["model_info"] = ready["model"]
        warm = Run()
        await client(-1, f"ws://127.0.0.1:{port}/codellama/ws", token, argparse.Namespace(**{**vars(args), "requests": 5}), warm, stop_at)  # fmt: skip
        await asyncio.sleep(1.0)
        baseline = rss(server.pid)

        run = Run()
        sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(server.pid, run, sampling))
        began = time.monotonic()
        url = f"ws://127.0.0.1:{port}/codellama/ws"
        results = await asyncio.gather(
            *(client(n, url, token, args, run, stop_at) for n in range(args.clients)), return_exceptions=True
        )
        elapsed = time.monotonic() - began
        sampling.set()
        await sampler
        failures = [repr(result) for result in results if isinstance(result, BaseException)]

        await asyncio.sleep(args.settle)
        after_status = await status(base, token)
        after = rss(server.pid)
    finally:
        stop_server(server)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    kinds = Counter(outcome.kind for outcome in run.outcomes)
    completed = [o.latency for o in run.outcomes if o.kind == "done"]
    tokens = sum(o.tokens for o in run.outcomes)
    peak = max(run.rss_samples, default=baseline)
    report.update(
        requests=len(run.outcomes),
        outcomes=dict(kinds),
        finish_reasons=dict(Counter(o.finish_reason for o in run.outcomes if o.kind == "done")),
        error_messages=dict(
            Counter(o.message for o in run.outcomes if o.kind in ("error", "busy", "closed"))
        ),
        client_failures=failures,
        seconds=round(elapsed, 2),
        latency_p50_ms=round(percentile(completed, 0.50) * 1000, 1),
        latency_p99_ms=round(percentile(completed, 0.99) * 1000, 1),
        latency_max_ms=round(max(completed, default=float("nan")) * 1000, 1),
        queue_wait_p50_ms=round(percentile([o.queue_ms for o in run.outcomes if o.kind == "done"], 0.5), 1),
        completions_per_s=round(len(completed) / elapsed, 2),
        tokens_per_s=round(tokens / elapsed, 1),
        rss_baseline_mib=round(baseline / MiB, 1),
        rss_peak_mib=round(peak / MiB, 1),
        rss_after_mib=round(after / MiB, 1),
        server_after={"busy": after_status["busy"], "queued": after_status["queued"]},
    )
    expected = args.clients * args.requests
    problems = []
    if failures:
        problems.append(f"{len(failures)} clients failed")
    if kinds["hang"] or kinds["closed"]:
        problems.append(f"{kinds['hang']} requests hung, {kinds['closed']} sockets closed")
    if len(run.outcomes) < expected:
        problems.append(f"only {len(run.outcomes)} of {expected} requests were sent within the time limit")
    if after_status["busy"] or after_status["queued"]:
        problems.append("the server was still busy afterwards")
    if after - baseline > args.memory_slack * MiB:
        problems.append(f"memory grew by {(after - baseline) / MiB:.0f} MiB")
    report["problems"] = problems

    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if problems else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="checkpoint folder or 'embedded' (default: embedded, else a test checkpoint)"
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="the server's ceiling")
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="the server's per-request deadline"
    )
    parser.add_argument(
        "--request-limit", type=float, default=120.0, help="seconds before a request counts as hung"
    )
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="idle seconds before memory is measured again"
    )
    parser.add_argument(
        "--memory-slack", type=float, default=64.0, help="MiB above the baseline still accepted"
    )
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the server's directory and log")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
