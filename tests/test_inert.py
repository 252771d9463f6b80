"""Output from volunteers is inert: what `kernel.inert` lets through, and what it never does."""

from __future__ import annotations

import base64

from depin_jupyter.kernel.inert import INERT_TYPES, inert_bundle

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


def test_scripts_handlers_and_javascript_never_pass():
    data = {
        "text/plain": "ok",
        "text/html": '<b onclick="steal()">x</b><script>fetch("/api/kernels")</script>'
                     '<img src=x onerror="alert(1)"><a href="javascript:alert(1)">l</a><iframe src="/lab"></iframe>',
        "application/javascript": "alert(1)",
        "application/vnd.jupyter.widget-view+json": {"model_id": "x"},
        "image/svg+xml": "<svg onload='alert(1)'/>",
        "text/markdown": "<script>alert(1)</script>",
        "image/png": PNG,
    }
    out, md = inert_bundle(data, {"image/png": {"width": 10, "onload": "x"}, "isolated": False})
    assert set(out) <= set(INERT_TYPES) and set(out) == {"text/plain", "text/html", "image/png"}
    html = out["text/html"].lower()
    for bad in ("<script", "onclick", "onerror", "javascript:", "<iframe", "fetch("):
        assert bad not in html, (bad, html)
    assert "<b>x</b>" in html  # plain markup stays
    assert md == {"image/png": {"width": 10}}


def test_nothing_inert_left_says_so_and_bad_images_are_dropped():
    out, _ = inert_bundle({"application/javascript": "alert(1)", "image/png": "not base64!!"}, {})
    assert set(out) == {"text/plain"} and "not shown" in out["text/plain"] and "application/javascript" in out["text/plain"]
    out, _ = inert_bundle("not a bundle", None)
    assert set(out) == {"text/plain"}


def test_an_ordinary_bundle_is_unchanged():
    data = {"text/plain": "array([1, 2])", "text/html": "<table><tr><td>1</td></tr></table>", "image/png": PNG}
    out, _ = inert_bundle(data, {})
    assert out["text/plain"] == data["text/plain"] and out["image/png"] == PNG and "<td>1</td>" in out["text/html"]
