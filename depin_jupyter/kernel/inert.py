"""Output from volunteers reaches the notebook inert: plain text, images, and HTML sanitized by nh3.

JupyterLab trusts live output, so a `<script>`, an `onerror=` attribute or an `application/javascript`
bundle a volunteer put into a cell's display would run in the scientist's browser, next to the kernel. On
a volunteer network every display event and shown value is reduced to these MIME types before IPython
publishes it; everything else is dropped (and the drop is said in the plain text).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

__all__ = ["INERT_TYPES", "inert_bundle"]

_IMAGES = ("image/png", "image/jpeg", "image/gif")
INERT_TYPES = ("text/plain", "text/html", *_IMAGES)
_MAX_TEXT = 1 << 20  # a bundle entry longer than this is cut: output, not a payload channel


def _image(value: Any) -> str | None:
    """A base64 image as a string, or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return value


def _html(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    import nh3

    return str(nh3.clean(value[:_MAX_TEXT]))  # no scripts, event handlers, javascript: URLs, iframes, styles


def inert_bundle(data: Any, metadata: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data, metadata) with only inert MIME types; sanitized HTML; image sizes as the only metadata."""
    if not isinstance(data, dict):
        return {"text/plain": "[depin: a display from the volunteer was not a MIME bundle and was dropped]"}, {}
    out: dict[str, Any] = {}
    text = data.get("text/plain")
    if isinstance(text, str):
        out["text/plain"] = text[:_MAX_TEXT]
    html = _html(data.get("text/html"))
    if html is not None:
        out["text/html"] = html
    for kind in _IMAGES:
        image = _image(data.get(kind))
        if image is not None:
            out[kind] = image
    dropped = sorted(str(k) for k in data if k not in out)
    if dropped and not out:
        out["text/plain"] = f"[depin: output of type {', '.join(dropped)} from a volunteer is not shown (not inert)]"
    md: dict[str, Any] = {}
    if isinstance(metadata, dict):
        for kind in _IMAGES:
            sizes = metadata.get(kind)
            if kind in out and isinstance(sizes, dict):
                md[kind] = {k: v for k, v in sizes.items() if k in ("width", "height") and isinstance(v, (int, float))}
    return out, md
