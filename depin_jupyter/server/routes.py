"""HTTP routes under ``{base_url}depin/``: thin, authenticated handlers over `DepinManager`.

Every method is ``@tornado.web.authenticated`` (no token or login cookie: 403, even where the server
allows unauthenticated access elsewhere). POST also passes Jupyter's XSRF check: a browser session
must send the ``_xsrf`` cookie value back (JupyterLab's ServerConnection does); requests carrying the
server token are exempt, as everywhere in Jupyter, since a browser never adds that header by itself.
"""

from __future__ import annotations

import json
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from depin_jupyter.server.manager import DEFAULT_RUN_LIMIT, BadRequest, DepinManager, ManagerError

__all__ = ["setup_routes"]


class _Handler(APIHandler):
    """Calls the manager and answers JSON; a ManagerError becomes its status and {"message": ...}."""

    @property
    def manager(self) -> DepinManager:
        return self.settings["depin_manager"]

    async def answer(self, call: Any) -> None:
        try:
            body = await call
        except ManagerError as exc:
            self.set_status(exc.status)
            body = {"message": str(exc)}
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body, default=str))


class StatusHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(self.manager.status())


class RunsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        await self.answer(self._runs())

    async def _runs(self) -> Any:
        try:
            limit = int(self.get_query_argument("limit", str(DEFAULT_RUN_LIMIT)))
        except ValueError:
            raise BadRequest("limit must be a whole number of runs") from None
        verify = self.get_query_argument("verify", "0").lower() in ("1", "true", "yes")
        return await self.manager.runs(self.get_query_argument("store", None), limit=limit, verify=verify)


class RunHandler(_Handler):
    @tornado.web.authenticated
    async def get(self, run_id: str) -> None:
        full = self.get_query_argument("full", "0").lower() in ("1", "true", "yes")
        await self.answer(self.manager.run(self.get_query_argument("store", None), run_id, full=full))


class ReproduceHandler(_Handler):
    """POST {"notebook": path from the server root, "store": optional}: start reproducing the notebook
    file (202 {"job": id, ...}; the running job of that notebook if there is one)."""

    @tornado.web.authenticated
    async def post(self) -> None:
        try:
            job = await self._reproduce()
        except ManagerError as exc:
            self.set_status(exc.status)
            job = {"message": str(exc)}
        else:
            self.set_status(202)
            self.set_header("Location", url_path_join(self.request.path, job["job"]))
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(job, default=str))

    async def _reproduce(self) -> Any:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise BadRequest(f"the request body must be JSON: {_REPRODUCE_BODY}") from None
        if not isinstance(body, dict) or not body.get("notebook"):
            raise BadRequest(f"give the notebook to reproduce as JSON {_REPRODUCE_BODY}")
        return await self.manager.reproduce_start(body["notebook"], body.get("store"))


class ReproduceJobHandler(_Handler):
    """GET: {"state": "running" | "done" | "failed", "report": ... when done, "error": ... when failed}."""

    @tornado.web.authenticated
    async def get(self, job: str) -> None:
        await self.answer(self._job(job))

    async def _job(self, job: str) -> Any:
        return self.manager.reproduce_job(job)


_REPRODUCE_BODY = '{"notebook": "path/from/the/server/root.ipynb", "store": "optional store path or URL"}'


def _kernel_pids(server_app: Any) -> dict[int, str]:
    """{process id: kernel id} of the server's local kernels (to tell which notebook a connection is)."""
    out: dict[int, str] = {}
    km = server_app.kernel_manager
    for kid in km.list_kernel_ids():
        pid = getattr(getattr(km.get_kernel(kid), "provisioner", None), "pid", None)
        if isinstance(pid, int):
            out[pid] = kid
    return out


def setup_routes(server_app: Any) -> DepinManager:
    """Register the routes on the server's web app; returns the manager they use."""
    web_app = server_app.web_app
    manager = DepinManager(server_app.root_dir, kernel_pids=lambda: _kernel_pids(server_app))
    web_app.settings["depin_manager"] = manager
    base = url_path_join(web_app.settings["base_url"], "depin")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "status"), StatusHandler),
        (url_path_join(base, "runs"), RunsHandler),
        (url_path_join(base, "runs", r"(?P<run_id>[^/]+)"), RunHandler),
        (url_path_join(base, "reproduce"), ReproduceHandler),
        (url_path_join(base, "reproduce", r"(?P<job>[^/]+)"), ReproduceJobHandler),
    ])
    return manager
