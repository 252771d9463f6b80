"""The routes under {base_url}depin/ through a real Jupyter server (pytest-jupyter's jp_fetch)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

import depin_jupyter

ROUTES = [("GET", "depin/status"), ("GET", "depin/runs"), ("GET", "depin/runs/20260101T000000.000000Z-abcd"),
          ("POST", "depin/reproduce"), ("GET", "depin/reproduce/0123456789abcdef")]


def body(response: Any) -> Any:
    return json.loads(response.body)


async def test_status_not_connected(jp_fetch: Any) -> None:
    r = await jp_fetch("depin", "status")
    assert r.code == 200 and r.headers["Content-Type"].startswith("application/json")
    s = body(r)
    assert s["connected"] is False and s["connections"] == [] and "%depin connect" in s["message"]


async def test_status_lists_the_published_session(published: Any, jp_fetch: Any) -> None:
    s = body(await jp_fetch("depin", "status"))
    assert s["connected"] is True and s["workers"] == 1 and s["gpus"] == 0
    (conn,) = s["connections"]
    assert conn["scheduler"] == published.address and conn["ok"]
    assert {"name", "address", "nthreads", "memory_limit", "gpu_model", "gpu_memory_total",
            "gpu_utilization", "executing", "volunteer", "trust", "credit"} <= set(conn["workers"][0])


async def test_runs_and_run(store_with_runs: Any, jp_fetch: Any) -> None:
    rs, (first, second, unfinished) = store_with_runs
    out = body(await jp_fetch("depin", "runs", params={"store": "depin-results.zarr"}))
    assert out["store"] == rs.url and [r["run_id"] for r in out["runs"]] == [unfinished, second, first]
    assert out["runs"][1]["worker"] == "worker-7" and out["runs"][1]["duration_s"] == 1.25
    # these runs were stored without energy figures: every energy field is there, and null
    assert all(r[k] is None for r in out["runs"]
               for k in ("energy_j", "energy", "energy_reason", "gpu_power_mean_w", "pool"))
    verified = body(await jp_fetch("depin", "runs", params={"verify": "1"}))
    assert verified["verify"]["ok"] and verified["runs"][1]["verified"] is True
    doc = body(await jp_fetch("depin", "runs", first))
    assert doc["manifest"]["run_id"] == first and doc["manifest"]["status"] == "ok"


async def test_runs_carry_the_energy_of_each_run(jp_root_dir: Any, jp_fetch: Any) -> None:
    """Measured joules, or "not measured" and why, as the worker recorded them in the manifest."""
    from depin_jupyter.store import open_store

    rs = open_store(str(jp_root_dir / "depin-results.zarr"))
    why = "no RAPL power counters on this machine (/sys/class/powercap/intel-rapl:*)"
    for name, figures in (("rapl", {"energy_j": 12.5, "source": "rapl", "cpu_package_energy_j": 12.5,
                                    "cpu_seconds": 0.5, "wall_seconds": 0.6}),
                          ("none", {"energy_j": "not measured", "reason": why, "cpu_seconds": 0.5,
                                    "wall_seconds": 0.6})):
        w = rs.begin_run(code="x = 1", inputs={}, options={}, cache_key=None, name=name)
        w.finish(timings={"total_s": 0.6}, extra={"energy": figures, "pool": None})
    runs = {r["name"]: r for r in body(await jp_fetch("depin", "runs"))["runs"]}
    assert runs["rapl"]["energy_j"] == 12.5 and runs["rapl"]["energy_reason"] is None
    assert runs["rapl"]["energy"] == "12.5 J (rapl), CPU packages 12.5 J; CPU 0.50 s"
    assert runs["none"]["energy_j"] is None and runs["none"]["energy_reason"] == why
    assert runs["none"]["energy"] == f"not measured ({why}); CPU 0.50 s"
    assert runs["none"]["pool"] is None and runs["none"]["gpu_power_mean_w"] is None


async def test_unknown_run_is_404_with_a_message(store_with_runs: Any, jp_fetch: Any) -> None:
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("depin", "runs", "20990101T000000.000000Z-dead")
    assert err.value.code == 404
    assert "no run 20990101T000000.000000Z-dead" in body(err.value.response)["message"]


async def test_incomplete_run_is_409_and_missing_store_404(store_with_runs: Any, jp_fetch: Any) -> None:
    _, (_, _, unfinished) = store_with_runs
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("depin", "runs", unfinished)
    assert err.value.code == 409 and "incomplete" in body(err.value.response)["message"]
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("depin", "runs", params={"store": "nowhere.zarr"})
    assert err.value.code == 404 and "no depin store at" in body(err.value.response)["message"]


async def test_reproduce_refusals(jp_fetch: Any, jp_root_dir: Any) -> None:
    async def refused(payload: Any) -> tuple[int, str]:
        with pytest.raises(HTTPClientError) as err:
            await jp_fetch("depin", "reproduce", method="POST", body=json.dumps(payload))
        return err.value.code, body(err.value.response)["message"]

    assert (await refused({"store": "x"}))[0] == 400  # no notebook
    code, message = await refused({"notebook": "../../etc/passwd.ipynb"})
    assert code == 400 and "outside the server root" in message
    code, message = await refused({"notebook": "missing.ipynb"})
    assert code == 404 and "no notebook 'missing.ipynb'" in message
    (jp_root_dir / "nb.ipynb").write_text("{}")
    code, message = await refused({"notebook": "nb.ipynb"})  # no store beside it
    assert code == 404 and "no depin store at" in message
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("depin", "reproduce", "0123456789abcdef")
    assert err.value.code == 404


@pytest.mark.parametrize("method,path", ROUTES)
async def test_every_route_needs_the_token(method: str, path: str, http_server_client: Any,
                                           jp_base_url: str) -> None:
    for headers in ({}, {"Authorization": "token wrong"}):
        r = await http_server_client.fetch(f"{jp_base_url}{path}", method=method, headers=headers,
                                           body="{}" if method == "POST" else None, raise_error=False)
        assert r.code == 403, (path, headers, r.code)


async def test_post_with_a_login_cookie_needs_xsrf(store_with_runs: Any, http_server_client: Any,
                                                   jp_base_url: str, jp_serverapp: Any) -> None:
    """A browser session (cookie, no token header) must echo the _xsrf cookie in X-XSRFToken."""
    token = jp_serverapp.identity_provider.token
    r = await http_server_client.fetch(f"{jp_base_url}depin/status?token={token}")  # logs in: sets cookies
    cookies = {c.split("=", 1)[0]: c.split(";", 1)[0] for c in r.headers.get_list("Set-Cookie")}
    login = next(v for k, v in cookies.items() if k.startswith("username-"))
    r = await http_server_client.fetch(f"{jp_base_url}login")
    xsrf = next(c.split(";", 1)[0] for c in r.headers.get_list("Set-Cookie") if c.startswith("_xsrf="))
    url, payload = f"{jp_base_url}depin/reproduce", json.dumps({"notebook": "missing.ipynb"})
    refused = await http_server_client.fetch(url, method="POST", body=payload, raise_error=False,
                                             headers={"Cookie": f"{login}; {xsrf}"})
    assert refused.code == 403 and "_xsrf" in body(refused)["message"]
    cookie_ok = await http_server_client.fetch(url, method="POST", body=payload, raise_error=False, headers={
        "Cookie": f"{login}; {xsrf}", "X-XSRFToken": xsrf.split("=", 1)[1]})
    assert cookie_ok.code == 404  # authenticated and XSRF-checked: the route itself answers


def test_extension_hooks_point_at_the_build() -> None:
    import pathlib

    (lab,) = depin_jupyter._jupyter_labextension_paths()
    built = pathlib.Path(depin_jupyter.__file__).parent / lab["src"] / "package.json"
    assert built.exists(), "the labextension is not built: run `pip install -e .` (or `jlpm build`)"
    meta = json.loads(built.read_text())
    assert meta["name"] == lab["dest"] == "depin-jupyter" and meta["jupyterlab"]["_build"]["load"]
    assert depin_jupyter._jupyter_server_extension_points() == [{"module": "depin_jupyter"}]
