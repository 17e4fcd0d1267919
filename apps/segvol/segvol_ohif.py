"""SegVol Label's own OHIF configuration and extension, served on top of the OHIF build inside the monailabel wheel.

MONAI Label serves OHIF v3 (3.10.0-beta.5, prebuilt) at ``/ohif/`` from its package, ``app-config.js`` included.
The shipped bundle reads ``app-config.js`` at runtime and imports the ``extensions`` and ``modes`` it lists by URL
(ES modules), so no OHIF build is needed to change what the viewer shows. ``install_ohif_routes`` registers, before
MONAI Label's ``/ohif/{path:path}`` catch-all:

* ``GET /ohif/app-config.js``: ``apps/segvol/ohif/app-config.js`` (the data source of the shipped config, plus our
  extension and our MONAI Label mode);
* ``GET /ohif/segvol/{file}``: the plain JS modules of ``apps/segvol/ohif/`` (no build step): the SegVol panel
  (text with autocomplete, 3D box, +/- points, save to SegVol Label, next sample, model status) and the mode that
  puts it beside the MONAI Label panel and OHIF's segmentation panel (brush, eraser, shapes).

Everything else under ``/ohif/`` is still the shipped build. The files are read from the project on every request
(small, and an edit shows on reload); names are checked against the folder listing, so nothing outside it is served.
"""
from __future__ import annotations

import os

OHIF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ohif")
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".json": "application/json", ".png": "image/png", ".svg": "image/svg+xml"}


def ohif_file(name: str):
    """The path of ``name`` in ``apps/segvol/ohif`` (a plain file listed there), or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    try:
        listed = set(os.listdir(OHIF_DIR))
    except OSError:
        return None
    path = os.path.join(OHIF_DIR, name)
    if name not in listed or not os.path.isfile(path):
        return None
    return path


def _response(path: str):
    from fastapi.responses import Response

    with open(path, "rb") as handle:
        body = handle.read()
    media_type = MEDIA_TYPES.get(os.path.splitext(path)[1], "application/octet-stream")
    # no caching: a new version of the project's modules must reach the annotator on the next reload
    return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})


def install_ohif_routes(app) -> None:
    """Serve ``app-config.js`` and ``/ohif/segvol/*`` from the project, ahead of MONAI Label's ``/ohif`` routes."""
    from fastapi import HTTPException
    from fastapi.routing import APIRoute

    async def app_config():
        path = ohif_file("app-config.js")
        if path is None:
            raise HTTPException(status_code=404, detail="apps/segvol/ohif/app-config.js is missing")
        return _response(path)

    async def segvol_module(file: str):
        path = ohif_file(file)
        if path is None or file == "app-config.js":
            raise HTTPException(status_code=404, detail=f"no file {file[:100]!r} in the SegVol OHIF extension")
        return _response(path)

    routes = [APIRoute("/ohif/app-config.js", app_config, methods=["GET"], include_in_schema=False),
              APIRoute("/ohif/segvol/{file}", segvol_module, methods=["GET"], include_in_schema=False)]
    app.router.routes[0:0] = routes  # before MONAI Label's /ohif/{path:path}, wherever that router sits
    if hasattr(app.router, "_mark_routes_changed"):
        app.router._mark_routes_changed()
