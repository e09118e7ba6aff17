"""jupyter_codellama: Code Llama completions in JupyterLab, served by a jupyter-server extension."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .extension import CodeLlamaExtension

    return [{"module": "jupyter_codellama", "app": CodeLlamaExtension}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "jupyter-codellama"}]


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext jupyter_codellama`: the %%codellama and %codellama magics."""
    from .magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magic import unload_ipython_extension as unload

    unload(ipython)
