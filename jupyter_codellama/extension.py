"""The jupyter-server extension: configuration, routes, and the model service shared by every handler."""

from __future__ import annotations

import os
import secrets

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, TraitError, Unicode, default, validate

from kernel_model.codellama import QUANT_CHOICES

from .client import CAFILE_ENV, KEY_ENV, MODEL_ENV, URL_ENV
from .handlers import handlers
from .protocol import Limits
from .remote import FIM_MODES, RemoteConfig
from .service import ModelService, ServiceConfig

API_KEY_ENV = "JUPYTER_CODELLAMA_API_KEY"
BACKENDS = ("local", "openai")
# Half of the window goes to the completion at most (the service), so this leaves a few lines of context.
MIN_CONTEXT_TOKENS = 128


class CodeLlamaExtension(ExtensionApp):
    name = "jupyter_codellama"
    description = "Code Llama completions for JupyterLab, served from this Jupyter server."

    model = Unicode(
        help=f"Checkpoint folder (Meta or Hugging Face layout) or 'embedded'. Default: ${MODEL_ENV} or embedded."
    ).tag(config=True)
    device = Unicode(
        "auto", help="'auto' (a CUDA GPU when present, else CPU), 'cpu', 'cuda', 'cuda:1', ..."
    ).tag(config=True)
    dtype = Unicode(
        "auto", help="'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16', 'float16', 'float32'."
    ).tag(config=True)
    quant = Unicode(
        "",
        help="'int8': hold the model's matrices as int8 with one scale per row, quantized one at a time as "
        "they load: half of bfloat16's memory (13B in about 14 GB), so a bigger model fits the GPU. "
        "'none': every matrix in dtype. Empty or 'auto': int8 where the checkpoint stores int8 (the "
        "embedded model) and the device is a CPU that reads int8 fast (x86 with AVX2), else as 'none'.",
    ).tag(config=True)
    compile = Bool(
        False,
        help="Compile the decode step with torch.compile while the model loads (the first start takes a "
        "minute or more longer; keystrokes never wait for it).",
    ).tag(config=True)
    backend = Unicode(
        "local",
        help="Where completions run: 'local' (kernel_model in this process, on its GPU or CPU) or 'openai' "
        "(a server speaking the OpenAI /v1/completions API: vLLM, TGI, llama.cpp, Ollama; see remote_*).",
    ).tag(config=True)
    remote_url = Unicode(help="Base URL of the OpenAI-compatible server, e.g. http://gpu-host:8000/v1.").tag(
        config=True
    )
    remote_model = Unicode(help="Model name on that server; empty: the first one it lists.").tag(config=True)
    remote_api_key_env = Unicode(
        API_KEY_ENV, help="Environment variable holding the server's API key (sent as a Bearer token)."
    ).tag(config=True)
    remote_api_key = Unicode(
        help="The server's API key, when not in remote_api_key_env. This extension never logs it nor sends "
        "it to the browser, but Jupyter's --debug log prints the whole config: prefer the environment."
    ).tag(config=True)
    remote_tokenizer = Unicode(
        help="A local tokenizer.model of the remote model, for exact prompt budgets; empty: an estimate "
        "that errs on the long side."
    ).tag(config=True)
    remote_fim = Unicode(
        "auto",
        help="Infilling prompt for the remote model: 'auto' (SPM unless the tokenizer or the name says it "
        "cannot infill: Python, 34B, 70B), 'spm', 'psm', or 'off' (complete from the prefix only).",
    ).tag(config=True)
    remote_max_context = Int(
        0, help="The remote model's window in tokens; 0: what the server reports, else 16384."
    ).tag(config=True)
    remote_connect_timeout = Float(5.0, help="Seconds to connect to the remote server.").tag(config=True)
    remote_read_timeout = Float(
        60.0, help="Longest silence (seconds) within a remote response, the first token included."
    ).tag(config=True)
    remote_retries = Int(
        2, help="Extra attempts when the remote server cannot be reached, only before anything streamed."
    ).tag(config=True)
    remote_probe_interval = Float(
        30.0, help="Seconds between health checks of the remote server (every 3 s while it is down)."
    ).tag(config=True)
    max_context_tokens = Int(4096, help="Prompt budget in tokens (context + completion).").tag(config=True)
    max_new_tokens = Int(256, help="Ceiling on tokens generated per request.").tag(config=True)
    max_candidates = Int(4, help="Ceiling on candidates per request (manual invoke).").tag(config=True)
    request_timeout = Float(30.0, help="Seconds a request may take, queueing included.").tag(config=True)
    queue_size = Int(
        16, help="Requests waiting for the model before new ones are told the model is busy."
    ).tag(config=True)
    prefix_share = Float(0.75, help="Share of the prompt budget given to the text before the cursor.").tag(
        config=True
    )
    include_outputs = Bool(
        True,
        help="Show the cell outputs a browser sends (its setting 'Send cell outputs as context') to the "
        "model as comments; false ignores them.",
    ).tag(config=True)
    max_message_bytes = Int(
        4 << 20,
        help="Largest request accepted, in bytes of JSON (a notebook's text is most of it); larger ones "
        "are refused with an error.",
    ).tag(config=True)
    max_notebook_cells = Int(5000, help="Most cells a notebook sent for completion may have.").tag(
        config=True
    )
    max_notebook_chars = Int(
        2_000_000,
        help="Most characters of text (sources and outputs) a notebook sent for completion may have.",
    ).tag(config=True)
    max_requests_per_connection = Int(
        4, help="Requests one browser tab (websocket) may have running at once; keep it below queue_size."
    ).tag(config=True)

    @validate(
        "max_context_tokens",
        "max_new_tokens",
        "max_candidates",
        "queue_size",
        "max_message_bytes",
        "max_notebook_cells",
        "max_notebook_chars",
        "max_requests_per_connection",
    )
    def _check_positive(self, proposal: dict) -> int:
        name, value = proposal["trait"].name, proposal["value"]
        least = MIN_CONTEXT_TOKENS if name == "max_context_tokens" else 1
        if value < least:
            raise TraitError(f"{name} must be at least {least}, not {value}")
        return value

    @validate("prefix_share")
    def _check_share(self, proposal: dict) -> float:
        if not 0.0 <= proposal["value"] <= 1.0:  # also refuses NaN
            raise TraitError(f"prefix_share must be between 0 and 1, not {proposal['value']}")
        return proposal["value"]

    @validate("request_timeout")
    def _check_timeout(self, proposal: dict) -> float:
        if not proposal["value"] > 0:
            raise TraitError(f"request_timeout must be more than 0 seconds, not {proposal['value']}")
        return proposal["value"]

    @default("model")
    def _default_model(self) -> str:
        return os.environ.get(MODEL_ENV) or "embedded"

    @validate("backend")
    def _check_backend(self, proposal: dict) -> str:
        if proposal["value"] not in BACKENDS:
            raise ValueError(f"backend {proposal['value']!r} is not available; use 'local' or 'openai'")
        return proposal["value"]

    @validate("quant")
    def _check_quant(self, proposal: dict) -> str:
        if proposal["value"] not in ("", *QUANT_CHOICES):
            raise TraitError(
                f"quant must be empty or one of {', '.join(QUANT_CHOICES)}, not {proposal['value']!r}"
            )
        return proposal["value"]

    @validate("remote_fim")
    def _check_remote_fim(self, proposal: dict) -> str:
        if proposal["value"] not in FIM_MODES:
            raise ValueError(f"remote_fim must be one of {', '.join(FIM_MODES)}, not {proposal['value']!r}")
        return proposal["value"]

    def remote_config(self) -> RemoteConfig:
        return RemoteConfig(
            url=self.remote_url,
            model=self.remote_model,
            # A key read from a file or a secret often ends in a line break, which no header carries.
            api_key=(self.remote_api_key or os.environ.get(self.remote_api_key_env, "")).strip(),
            tokenizer=self.remote_tokenizer,
            fim=self.remote_fim,
            connect_timeout=self.remote_connect_timeout,
            read_timeout=self.remote_read_timeout,
            retries=self.remote_retries,
            probe_interval=self.remote_probe_interval,
            max_context=self.remote_max_context,
        )

    def initialize_settings(self) -> None:
        if self.backend != "local" and (self.quant not in ("", "auto", "none") or self.compile):
            self.log.warning("Code Llama: quant and compile apply to the local backend only; ignored")
        config = ServiceConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            quant=self.quant or "auto",
            compile=self.compile,
            max_context_tokens=self.max_context_tokens,
            request_timeout=self.request_timeout,
            queue_size=self.queue_size,
            prefix_share=self.prefix_share,
            include_outputs=self.include_outputs,
            backend=self.backend,
            remote=self.remote_config(),
        )
        self.service = ModelService(config, log=self.log)
        self.service.start()
        # Kernels this server starts inherit its environment: that is how the %%codellama magic
        # finds this server's model, with a key no process outside this user's can read.
        kernel_key = secrets.token_urlsafe(32)
        os.environ[KEY_ENV] = kernel_key
        self.announce_url()
        self.settings.update(
            codellama_service=self.service,
            codellama_limits=Limits(
                max_new_tokens=self.max_new_tokens,
                max_candidates=self.max_candidates,
                max_message_bytes=self.max_message_bytes,
                max_cells=self.max_notebook_cells,
                max_notebook_chars=self.max_notebook_chars,
                max_in_flight=self.max_requests_per_connection,
            ),
            codellama_kernel_key=kernel_key,
        )

    def announce_url(self) -> None:
        app = self.serverapp
        host = "127.0.0.1" if app.ip in ("", "0.0.0.0", "localhost") else app.ip
        scheme = "https" if app.certfile else "http"
        base = app.base_url if app.base_url.endswith("/") else app.base_url + "/"
        os.environ[URL_ENV] = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{app.port}{base}"
        if app.certfile:
            # The kernels trust what the server presents; they run in the notebook's folder.
            os.environ[CAFILE_ENV] = os.path.abspath(os.path.expanduser(app.certfile))
        else:
            os.environ.pop(CAFILE_ENV, None)

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())

    async def _start_jupyter_server_extension(self, serverapp) -> None:
        self.announce_url()  # the port is final once the server listens

    async def stop_extension(self) -> None:
        self.service.stop()
