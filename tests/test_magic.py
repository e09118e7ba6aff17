"""%%codellama: prompts and displays in process, then real kernels against an in-kernel model and a Jupyter server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from jupyter_codellama.client import (
    CodeLlamaError,
    GenerationRequest,
    KernelBackend,
    ModelInfo,
    Outcome,
    backend_from_environment,
)
from jupyter_codellama.estimate import estimate_tokens
from jupyter_codellama.kernel_context import KernelContext, clean_history, describe, describe_namespace
from jupyter_codellama.magic import CodeLlamaMagics
from jupyter_codellama.magic_display import MIME_TYPE, Answer
from jupyter_codellama.magic_prompt import MARGIN_TOKENS, build_prompt
from jupyter_codellama.postprocess import trim_completion
from kernel_model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
LOAD = "%load_ext jupyter_codellama"
ANSWER_KEYS = {"code", "done", "cancelled", "tokens", "tokens_per_second", "model", "request_id"}
BASE = ModelInfo("CodeLlama-7b-hf", supports_infilling=True, max_context=4096)
INSTRUCT = ModelInfo("CodeLlama-7b-Instruct-hf", supports_infilling=True, max_context=4096)
PYTHON_ONLY = ModelInfo("CodeLlama-7b-Python-hf", supports_infilling=False, max_context=4096)

FRAME_CELL = """\
class Frame:  # pandas-like by its attributes; pandas itself is not needed
    shape = (120, 2)
    columns = ["price", "quantity"]
    dtypes = {"price": "float64", "quantity": "int64"}

sales = Frame()"""


# -- the namespace summary and the history --------------------------------------------------------


class Huge:
    """An object whose repr() would be a disaster: describing it must not call it."""

    shape = (10**9, 4)
    dtype = "float64"

    def __repr__(self) -> str:
        raise AssertionError("repr() of a huge object")


class Exploding:
    @property
    def shape(self) -> tuple:
        raise RuntimeError("lazy backend not connected")


def typed(frame: int, /, *, by: float = 1.5) -> dict:
    return {}


def test_namespace_summary_reads_attributes_not_reprs():
    import json as json_module

    namespace = {
        "sales": PandasLikeFrame(),
        "matrix": Huge(),
        "text": "x" * 100_000,
        "big": 10**5000,
        "config": {"alpha": 1, "beta": 2},
        "rows": [1, 2, "three"],
        "json": json_module,
        "scale": lambda x, factor=2: x * factor,
        "load": lambda path, rows=list(range(10**6)), *, sep=",": None,
        "typed": typed,
        "broken": Exploding(),
        "_private": 1,
        "In": [],
    }
    lines = describe_namespace(namespace)
    summary = "\n".join(lines)
    assert "sales: PandasLikeFrame shape (120, 2); columns: price (float64), quantity (int64)" in summary
    assert "matrix: Huge shape (1000000000, 4), dtype float64" in summary
    assert "json: module json" in summary and "scale: function(x, factor=2)" in summary
    assert "load: function(path, rows=…, *, sep=',')" in summary  # a default's repr is never taken whole
    assert "typed: function(frame: int, /, *, by: float = 1.5) -> dict" in summary
    assert "config: dict of 2 items; keys: 'alpha', 'beta'" in summary
    assert "rows: list of 3 items of int | str" in summary and "broken: test_magic.Exploding" in summary
    assert "int of 16610 bits" in summary and "_private" not in summary and "In:" not in summary
    assert all(len(line) <= 200 for line in lines)
    odd = describe_namespace({"odd": SimpleNamespace(shape=(1, 1), columns=("a\nimport os",), dtypes={})})
    assert odd == ["odd: SimpleNamespace shape (1, 1); columns: a\\nimport os"]  # one comment line


class PandasLikeFrame:
    shape = (120, 2)
    columns = ("price", "quantity")
    dtypes = MappingProxyType({"price": "float64", "quantity": "int64"})


def test_many_columns_and_long_values_are_capped():
    class Wide:
        shape = (3, 500)
        columns = tuple(f"column_{i}" for i in range(500))
        dtypes = MappingProxyType({f"column_{i}": "int8" for i in range(500)})

    line = describe(Wide())
    assert "column_0 (int8)" in line and "… 476 more" in line and "column_499" not in line
    assert len(describe("y" * 10_000)) < 100


def test_history_keeps_python_cells_once_each_in_run_order():
    raw = [
        "",
        "import os",
        "%%bash\nls",
        "%%codellama\nplot it",
        "x = 1\n!pip install foo\n%time y = 2\nfiles = !ls\nx?",
        "import os",
        "ratio = (total\n    % 7)\nsame = (a\n    != b)",
    ]
    assert clean_history(raw) == ["x = 1", "import os", "ratio = (total\n    % 7)\nsame = (a\n    != b)"]


# -- prompts ----------------------------------------------------------------------------------------


CONTEXT = KernelContext(cells=("import math", "x = math.pi"), variables=("x: float = 3.14",))


def test_base_model_prompt_is_code_ending_in_the_instruction_as_a_comment():
    prompt = build_prompt("round x\nto 2 places", CONTEXT, BASE, 64)
    assert prompt.prefix == (
        "# %%\nimport math\n\n# %%\nx = math.pi\n\n# %%\n# Variables in the kernel now:\n# x: float = 3.14\n\n"
        "# %%\n# Task: round x\n# to 2 places\n"
    )
    assert not prompt.infill and prompt.stop == ("\n# %%",) and prompt.kind == "instruction"


def test_instruct_model_prompt_uses_the_chat_format_and_opens_a_code_block():
    prompt = build_prompt("round x", CONTEXT, INSTRUCT, 64)
    assert prompt.prefix.startswith("[INST] ") and prompt.prefix.endswith(" [/INST] ```python\n")
    assert "x = math.pi" in prompt.prefix and "- x: float = 3.14" in prompt.prefix
    assert prompt.stop == ("```",)
    assert build_prompt("round x", CONTEXT, BASE, 64, style="instruct").prefix.startswith("[INST]")


def test_fill_cell_infills_and_answers_the_whole_cell():
    prompt = build_prompt("def area(r):\n    return <FILL>\n", CONTEXT, INSTRUCT, 64)
    assert prompt.infill and prompt.kind == "fill"
    assert prompt.prefix.endswith("# %%\ndef area(r):\n    return ") and prompt.suffix == "\n"
    assert prompt.code("math.pi * r ** 2") == "def area(r):\n    return math.pi * r ** 2\n"
    assert prompt.code("(\r\n    r\r)") == "def area(r):\n    return (\n    r\n)\n"


def test_fill_errors_are_one_sentence():
    with pytest.raises(CodeLlamaError, match="cannot infill"):
        build_prompt("x = <FILL>", CONTEXT, PYTHON_ONLY, 64)
    with pytest.raises(CodeLlamaError, match="2 <FILL> markers"):
        build_prompt("<FILL> and <FILL>", CONTEXT, BASE, 64)


def test_context_is_trimmed_oldest_cells_first_to_the_window():
    cells = tuple(f"step_{i} = {i}  # " + "." * 80 for i in range(200))
    small = ModelInfo("CodeLlama-7b-hf", supports_infilling=True, max_context=1024)
    prompt = build_prompt("sum the steps", KernelContext(cells, ("x: int = 1",)), small, 128)
    assert estimate_tokens(prompt.prefix) <= 1024 - 128 - MARGIN_TOKENS
    assert "step_199 = 199" in prompt.prefix and "step_0 = 0" not in prompt.prefix
    assert prompt.cells_dropped > 0 and prompt.cells_used + prompt.cells_dropped == 200
    kept = [i for i in range(200) if f"step_{i} = {i} " in prompt.prefix]
    assert kept == list(range(200 - len(kept), 200))  # a contiguous run of the newest


def test_a_history_of_printed_numbers_still_fits_the_real_token_count(llama_tokenizer_file):
    """Digits cost a token each: a characters-per-token budget let these prompts overflow."""
    cells = tuple(f"weights{i} = {[round(0.1 + j / 997, 6) for j in range(80)]}" for i in range(12))
    small = ModelInfo("CodeLlama-7b-hf", supports_infilling=True, max_context=1024)
    prompt = build_prompt("normalise the weights", KernelContext(cells, ()), small, 64)
    assert 0 < prompt.cells_used < 12
    assert Tokenizer(llama_tokenizer_file).count(prompt.prefix) <= 1024 - 64


def test_a_cell_larger_than_the_window_is_one_clear_error():
    with pytest.raises(CodeLlamaError, match="too long for the model"):
        build_prompt("x" * 20_000, None, BASE, 64)
    with pytest.raises(CodeLlamaError, match="leaves no room"):
        build_prompt("x", None, BASE, 5000)


# -- the answer display -----------------------------------------------------------------------------


def test_answer_bundle_follows_the_mime_contract():
    answer = Answer("magic-1", "CodeLlama-7b-hf", "server", build_prompt("x", None, BASE, 8))
    answer.add("print('```')")
    streaming = answer.bundle()
    assert set(streaming) == {MIME_TYPE, "text/plain", "text/markdown", "text/html"}
    assert set(streaming[MIME_TYPE]) >= ANSWER_KEYS and streaming[MIME_TYPE]["done"] is False
    answer.finish(Outcome("print('```')\n", completion_tokens=7, decode_ms=100.0, cancelled=False))
    data = answer.bundle()
    assert data[MIME_TYPE]["code"] == data["text/plain"] == "print('```')"
    assert data[MIME_TYPE]["tokens"] == 7 and data[MIME_TYPE]["tokens_per_second"] == 70.0
    assert data[MIME_TYPE]["done"] is True and data[MIME_TYPE]["cancelled"] is False
    assert data["text/markdown"].startswith("````python\nprint('```')\n````")  # the fence outlasts the code's
    assert "```" in data["text/html"] and "<pre" in data["text/html"]
    json.dumps(data)


# -- the magic in this process, on a scripted backend -----------------------------------------------


class ScriptedBackend:
    """Answers every request with the same text, a chunk at a time, and records the requests."""

    kind = "server"
    description = "a scripted backend"

    def __init__(self, text: str, model: ModelInfo = BASE) -> None:
        self.text = text
        self.model = model
        self.requests: list[GenerationRequest] = []

    def model_info(self) -> ModelInfo:
        return self.model

    def status_line(self) -> str:
        return "scripted"

    def generate(
        self, request: GenerationRequest, on_text: Callable[[str], None], cancel: threading.Event
    ) -> Outcome:
        self.requests.append(request)
        for line in self.text.splitlines(keepends=True):
            on_text(line)
        return Outcome(
            self.text, completion_tokens=len(self.text.splitlines()), decode_ms=1.0, cancelled=False
        )


@pytest.fixture
def shell():
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()
    ip.rl_next_input = None
    return ip


def run_magic(shell, backend, line: str, body: str) -> tuple[Any, list[dict]]:
    from IPython.utils.capture import capture_output

    magics = CodeLlamaMagics(shell, backend=backend)
    with capture_output() as captured:
        result = magics.codellama(line, body)
    return result, [output.data for output in captured.outputs]


def test_generated_code_that_deletes_a_file_is_shown_and_inserted_never_run(shell, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    malicious = f"import os\nos.remove({str(victim)!r})\n"
    backend = ScriptedBackend(malicious)
    _, outputs = run_magic(shell, backend, "--insert --no-context", "clean up the folder")
    assert victim.read_text() == "precious"
    final = outputs[-1][MIME_TYPE]
    assert final["done"] and "os.remove" in final["code"]
    assert shell.rl_next_input == final["code"]
    assert "clean up the folder" in backend.requests[0].prefix


def test_insert_is_skipped_when_the_answer_was_stopped(shell):
    class Stopped(ScriptedBackend):
        def generate(self, request, on_text, cancel):
            on_text("partial")
            return Outcome("partial", 1, 1.0, cancelled=True)

    _, outputs = run_magic(shell, Stopped(""), "--insert", "anything")
    assert outputs[-1][MIME_TYPE]["cancelled"] and shell.rl_next_input is None


@pytest.mark.parametrize(
    ("finish_reason", "code", "inserted"),
    [("length", "def long():\n    x = [", True), ("deadline", "def long():\n", True), ("end", "  \n", False),
     ("end", "x = 1", True)],
)  # fmt: skip
def test_insert_takes_an_answer_with_code_and_says_when_it_was_cut_off(shell, finish_reason, code, inserted):
    class Ending(ScriptedBackend):
        def generate(self, request, on_text, cancel):
            on_text(code)
            return Outcome(code, 3, 1.0, cancelled=False, finish_reason=finish_reason)

    _, outputs = run_magic(shell, Ending(""), "--insert --no-context", "anything")
    final = outputs[-1][MIME_TYPE]
    assert final["done"] and final["finish_reason"] == finish_reason
    assert (shell.rl_next_input is not None) == inserted
    if finish_reason == "length":
        assert "cut off at the token limit" in outputs[-1]["text/markdown"]


def test_an_empty_request_is_refused_before_any_request(shell):
    backend = ScriptedBackend("unused")
    with pytest.raises(CodeLlamaError, match="the cell is empty"):
        run_magic(shell, backend, "", "  \n")
    assert backend.requests == []


def test_a_server_error_mid_answer_is_one_line(shell):
    class Failing(ScriptedBackend):
        def generate(self, request, on_text, cancel):
            raise CodeLlamaError("the server could not answer: the model is busy")

    with pytest.raises(CodeLlamaError, match="model is busy") as raised:
        run_magic(shell, Failing(""), "", "anything")
    assert raised.value._render_traceback_() == ["codellama: the server could not answer: the model is busy"]


# -- real kernels (nbclient) with the model loaded in the kernel ------------------------------------


def kernel_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_CODELLAMA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def run_notebook(cells: list[str], env: dict[str, str], cwd: Path) -> tuple[Any, dict[int, dict]]:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    replies: dict[int, dict] = {}

    def record(cell: Any, cell_index: int, execute_reply: dict) -> None:
        replies[cell_index] = execute_reply

    client = NotebookClient(
        notebook, kernel_name="python3", timeout=300, allow_errors=True,
        resources={"metadata": {"path": str(cwd)}}, on_cell_executed=record,
    )  # fmt: skip
    client.execute(env=env)
    return notebook, replies


def answer_of(cell: Any) -> dict:
    answers = [o["data"][MIME_TYPE] for o in cell.outputs if MIME_TYPE in o.get("data", {})]
    assert len(answers) == 1, cell.outputs  # one display, updated in place
    return answers[0]


def stream_text(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")


def errors_of(cell: Any) -> list[dict]:
    return [o for o in cell.outputs if o["output_type"] == "error"]


def test_in_kernel_model_answers_fills_inserts_and_sees_the_namespace(fim_checkpoint, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cells = [
        LOAD,
        FRAME_CELL,
        "%%codellama --show-prompt\nplot the mean price per quantity",
        "%%codellama --max-new-tokens 8\nwrite a function that adds two numbers",
        "%%codellama --max-new-tokens 8 --insert\ndef add(a, b):\n    <FILL>\n",
        f"%%codellama --max-new-tokens 4 --insert\nimport os\nos.remove({str(victim)!r})  # <FILL>",
        "import sys\nfrom jupyter_codellama.client import KernelBackend\nprint(KernelBackend.loads)",
        "%codellama status",
    ]
    notebook, replies = run_notebook(cells, kernel_env(JUPYTER_CODELLAMA_MODEL=str(fim_checkpoint)), tmp_path)
    out = notebook.cells
    assert not any(errors_of(cell) for cell in out), [errors_of(cell) for cell in out]

    prompt = stream_text(out[2])
    assert "sales: Frame shape (120, 2); columns: price (float64), quantity (int64)" in prompt
    assert "class Frame:" in prompt and "# Task: plot the mean price per quantity" in prompt
    assert "no Jupyter server announced a model" in prompt  # said once, on first use

    answer = answer_of(out[3])
    assert set(answer) >= ANSWER_KEYS and answer["done"] and not answer["cancelled"]
    assert answer["model"] == fim_checkpoint.name and answer["backend"] == "kernel"
    assert 0 < answer["tokens"] <= 8 and isinstance(answer["code"], str)
    plain = next(o for o in out[3].outputs if MIME_TYPE in o.get("data", {}))["data"]["text/plain"]
    assert plain == answer["code"]

    fill = answer_of(out[4])
    assert fill["kind"] == "fill" and fill["code"].startswith("def add(a, b):\n    ")
    [payload] = replies[4]["content"]["payload"]
    assert payload["source"] == "set_next_input" and payload["text"] == fill["code"]
    assert payload["replace"] is False

    deleting = answer_of(out[5])
    assert "os.remove(" in deleting["code"] and victim.read_text() == "precious"
    assert replies[5]["content"]["payload"][0]["text"] == deleting["code"]

    assert stream_text(out[6]).strip() == "1"  # one model load for all the cells
    assert "infills" in stream_text(out[7])


def test_bad_option_and_unreachable_server_are_one_line_each(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = kernel_env(JUPYTER_CODELLAMA_URL=f"http://127.0.0.1:{port}/", JUPYTER_CODELLAMA_KEY="k")
    cells = [
        LOAD,
        "%%codellama --max-new-tokens lots\nanything",
        "%%codellama --frobnicate\nanything",
        "%%codellama\nwrite hello world",
        "import sys\nprint('torch' in sys.modules)",
    ]
    notebook, _ = run_notebook(cells, env, tmp_path)
    tracebacks = [[e["traceback"] for e in errors_of(cell)] for cell in notebook.cells[1:4]]
    for [traceback] in tracebacks:
        assert len(traceback) == 1 and traceback[0].startswith("codellama: "), traceback
    assert "--max-new-tokens: must be a whole number" in tracebacks[0][0][0]
    assert "unrecognized arguments: --frobnicate" in tracebacks[1][0][0]
    assert f"cannot reach the Jupyter server at http://127.0.0.1:{port}/" in tracebacks[2][0][0]
    assert stream_text(notebook.cells[4]).strip() == "False"  # no fallback to loading the model


def self_signed_certificate(folder: Path, host: str) -> tuple[Path, Path]:
    """A certificate for `host` (not the loopback address a kernel dials) and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_the_kernel_trusts_its_https_servers_certificate(tmp_path):
    import http.server
    import ssl

    cert, key = self_signed_certificate(tmp_path, "jupyter.example.com")

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"state": "ready", "model": {"name": "tls-test"}}).encode()
            self.send_response(200 if self.headers.get("X-CodeLlama-Key") == "k" else 403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Status)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/"
    try:
        backend = backend_from_environment({"JUPYTER_CODELLAMA_URL": url, "JUPYTER_CODELLAMA_KEY": "k",
                                            "JUPYTER_CODELLAMA_CAFILE": str(cert)})  # fmt: skip
        assert backend.status()["model"]["name"] == "tls-test"
        untrusted = backend_from_environment({"JUPYTER_CODELLAMA_URL": url, "JUPYTER_CODELLAMA_KEY": "k"})
        with pytest.raises(CodeLlamaError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.status()
    finally:
        server.shutdown()
        server.server_close()


# -- a real Jupyter server with the extension, and kernels it starts --------------------------------


class JupyterServer:
    def __init__(self, root: Path, checkpoint: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.token = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}/lab-base/"
        home = root / "jupyter"
        env = kernel_env(JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"))
        self.log = (root / "server.log").open("w")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ip=127.0.0.1",
                f"--port={self.port}", "--ServerApp.port_retries=0", "--ServerApp.base_url=/lab-base/",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
                '--ServerApp.jpserver_extensions={"jupyter_codellama": True}',
                f"--CodeLlamaExtension.model={checkpoint}", "--CodeLlamaExtension.max_new_tokens=3000",
                "--CodeLlamaExtension.max_context_tokens=8192", "--CodeLlamaExtension.request_timeout=600",
            ],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def api(self, path: str, method: str = "GET", body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def wait_until_ready(self) -> None:
        for _ in range(1200):
            assert self.process.poll() is None, "the server exited"
            try:
                if self.api("codellama/status")["state"] == "ready":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server's model never became ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class ServerKernel:
    """A kernel the server starts (so it inherits the server's environment), driven over its websocket."""

    def __init__(self, server: JupyterServer) -> None:
        import websocket

        self.server = server
        self.id = server.api("api/kernels", "POST", {"name": "python3"})["id"]
        self.session = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/lab-base/api/kernels/{self.id}/channels?session_id={self.session}",
            header=[f"Authorization: token {server.token}"], timeout=120,
        )  # fmt: skip
        self.request("kernel_info_request", {})
        self.until(lambda m: m["msg_type"] == "kernel_info_reply")

    def request(self, msg_type: str, content: dict, channel: str = "shell") -> str:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": msg_type, "session": self.session, "username": "test",
                  "date": "2026-01-01T00:00:00Z", "version": "5.3"}  # fmt: skip
        message = {
            "header": header,
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": channel,
        }
        self.ws.send(json.dumps(message))
        return msg_id

    def execute(self, code: str, allow_stdin: bool = False) -> str:
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": allow_stdin, "stop_on_error": True}  # fmt: skip
        return self.request("execute_request", content)

    def messages(self) -> Iterator[dict]:
        while True:
            message = json.loads(self.ws.recv())
            message["msg_type"] = message["header"]["msg_type"]
            yield message

    def until(self, done: Callable[[dict], bool], seen: list[dict] | None = None) -> dict:
        for message in self.messages():
            if seen is not None:
                seen.append(message)
            if done(message):
                return message
        raise AssertionError("unreachable")

    def run(self, code: str) -> list[dict]:
        """Execute and return the cell's iopub messages, up to its idle status."""
        msg_id, seen = self.execute(code), []
        self.until(lambda m: is_idle(m, msg_id), seen)
        return [m for m in seen if m["parent_header"].get("msg_id") == msg_id]

    def close(self) -> None:
        self.ws.close()
        self.server.api(f"api/kernels/{self.id}", "DELETE")


def is_idle(message: dict, msg_id: str) -> bool:
    return (
        message["msg_type"] == "status"
        and message["content"]["execution_state"] == "idle"
        and message["parent_header"].get("msg_id") == msg_id
    )


def answer_in(message: dict) -> dict | None:
    if message["msg_type"] in ("display_data", "update_display_data"):
        return message["content"]["data"].get(MIME_TYPE)
    return None


def printed(messages: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


@pytest.fixture(scope="module")
def server(fim_checkpoint, tmp_path_factory):
    running = JupyterServer(tmp_path_factory.mktemp("server-root"), fim_checkpoint)
    try:
        running.wait_until_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture
def kernel(server):
    started = ServerKernel(server)
    started.run(LOAD)
    yield started
    started.close()


LONG = "%%codellama --no-context --max-new-tokens 3000 {options}\nwrite a long script"


def test_kernel_uses_the_servers_model_and_never_loads_weights(kernel, server):
    messages = kernel.run("import os\nprint(os.environ['JUPYTER_CODELLAMA_URL'])")
    assert printed(messages).strip() == server.url
    messages = kernel.run("%%codellama --max-new-tokens 12\nwrite hello world")
    answers = [a for a in map(answer_in, messages) if a]
    assert answers[-1]["done"] and answers[-1]["backend"] == "server" and answers[-1]["tokens"] > 0
    assert answers[-1]["request_id"] == answers[0]["request_id"]
    [display] = [m for m in messages if m["msg_type"] == "display_data"]
    assert display["content"]["transient"]["display_id"]
    messages = kernel.run("import sys\nprint('torch' in sys.modules, 'kernel_model' in sys.modules)")
    assert printed(messages).strip() == "False False"
    assert "the Jupyter server at " + server.url in printed(kernel.run("%codellama status"))


def test_interrupting_the_kernel_stops_the_answer_on_the_server(kernel, server):
    msg_id = kernel.execute(LONG.format(options="--wait"))
    kernel.until(
        lambda m: m["parent_header"].get("msg_id") == msg_id and (answer_in(m) or {}).get("tokens", 0) > 0
    )
    server.api(f"api/kernels/{kernel.id}/interrupt", "POST")
    seen: list[dict] = []
    kernel.until(lambda m: is_idle(m, msg_id), seen)
    final = [a for a in map(answer_in, seen) if a][-1]
    assert final["done"] and final["cancelled"] and final["tokens"] < 3000 and final["error"] is None
    assert not [m for m in seen if m["msg_type"] == "error"]


def test_a_stop_from_the_browser_stops_the_answer_on_the_server(kernel, server):
    import websocket

    # JupyterLab's renderer sends the answer's request id over the tab's own socket while the cell runs.
    msg_id = kernel.execute(LONG.format(options=""), allow_stdin=True)
    first = answer_in(kernel.until(lambda m: (answer_in(m) or {}).get("tokens", 0) > 0))
    assert first is not None and first["backend"] == "server"
    browser = websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/lab-base/codellama/ws",
        header=[f"Authorization: token {server.token}"], timeout=60,
    )  # fmt: skip
    browser.send(json.dumps({"type": "cancel", "id": first["request_id"]}))
    final = answer_in(kernel.until(lambda m: (answer_in(m) or {}).get("done", False)))
    browser.close()
    assert final is not None and final["cancelled"] and final["tokens"] < 3000
    kernel.until(lambda m: is_idle(m, msg_id))


def test_the_stop_button_stops_an_answer_the_kernel_writes(fim_checkpoint, tmp_path):
    pytest.importorskip("ipywidgets")
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(
        kernel_name="python3", env=kernel_env(JUPYTER_CODELLAMA_MODEL=str(fim_checkpoint)), cwd=str(tmp_path)
    )
    try:
        client.execute_interactive(LOAD, timeout=120)
        # A frontend with a person at it (stdin allowed): the cell returns at once and the answer streams on.
        msg_id = client.execute(LONG.format(options=""), allow_stdin=True)
        seen = []
        while not seen or not is_idle(seen[-1], msg_id):
            seen.append(client.get_iopub_msg(timeout=300))
        [button] = [
            m["content"]["comm_id"]
            for m in seen
            if m["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_model_name") == "ButtonModel"
        ]
        message = seen[-1]
        while not (answer_in(message) or {}).get("tokens", 0):
            message = client.get_iopub_msg(timeout=300)
        click = client.session.msg("comm_msg", {"comm_id": button, "data": {"method": "custom",
                                                                          "content": {"event": "click"}}})  # fmt: skip
        client.shell_channel.send(click)
        while not (answer_in(message) or {}).get("done", False):
            message = client.get_iopub_msg(timeout=300)
        final = answer_in(message)
        assert final is not None and final["backend"] == "kernel"
        assert final["cancelled"] and final["tokens"] < 3000
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_the_kernels_own_model_answers_as_the_server_would_trim_it(fim_checkpoint, fim_model):
    request = GenerationRequest("k", "def f(x):\n    ", "\n", True, 24, 0.0)
    streamed: list[str] = []
    outcome = KernelBackend(str(fim_checkpoint)).generate(request, streamed.append, threading.Event())
    raw = fim_model.stream_infill(request.prefix, request.suffix, suffix_first=True, max_new_tokens=24)
    expected = trim_completion("".join(raw), mode="none", prefix=request.prefix, suffix=request.suffix,
                               truncated=raw.result.finish_reason == "length")  # fmt: skip
    assert outcome.text == expected == "".join(streamed) and all(streamed)


class LoopingGeneration:
    """What a small model's stream looks like when it loops: the same line until the token limit."""

    def __init__(self) -> None:
        self.deltas = iter(["x = 1\n", "x = 1\n", "x = 1\n", "x ="])
        self.result = SimpleNamespace(finish_reason="length", completion_tokens=12, decode_ms=1.0)
        self.closed = False

    def __iter__(self):
        return self.deltas

    def close(self) -> None:
        self.closed = True


def test_the_kernels_own_model_stops_a_loop_as_the_server_does():
    generation = LoopingGeneration()
    backend = KernelBackend("looping")
    backend._model = SimpleNamespace(
        supports_infilling=True, stream_infill=lambda *args, **kwargs: generation
    )
    streamed: list[str] = []
    request = GenerationRequest("k", "", "", True, 12, 0.0)
    outcome = backend.generate(request, streamed.append, threading.Event())
    assert outcome.text == "x = 1" and streamed == ["x = 1"] and generation.closed
