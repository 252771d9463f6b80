"""The Jupyter server side of the JupyterLab extension: routes under ``{base_url}depin/``.

`routes.py` holds the thin authenticated handlers, `manager.py` the logic (tested without HTTP).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load"]


def load(server_app: Any) -> None:
    """Register the depin routes (called by `depin_jupyter._load_jupyter_server_extension`)."""
    from depin_jupyter.server.routes import setup_routes

    setup_routes(server_app)
    server_app.log.info("depin_jupyter | routes registered under %sdepin/", server_app.web_app.settings["base_url"])
