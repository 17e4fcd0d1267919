"""SegVol Label's HTTP server: MONAI Label's own FastAPI app, hardened, without forking MONAI Label.

``scripts/serve.sh`` starts it (arguments as ``monailabel start_server``; the bind defaults to 127.0.0.1)::

    python apps/segvol/segvol_server.py --app apps/segvol --studies datastore [--port 8000] [--conf key value ...]

What it adds to MONAI Label's app (``monailabel.app:app``), before uvicorn serves it:

* **Same-origin by default.** MONAI Label answers CORS for any origin with credentials; here no origin but the
  server's own is served (``--conf cors_origins https://a,https://b`` allows others). A request carrying a foreign
  ``Origin`` is refused 403 before it runs, so a web page the annotator visits cannot drive the server.
* **A token when the server listens beyond loopback** (``SEGVOL_AUTH_TOKEN`` or ``--conf auth_token_file``): sent as
  ``Authorization: Bearer <token>`` (the Python and Slicer clients: Slicer's login dialog takes any user name and the
  token as password, through MONAI Label's ``/auth/token``), or as the ``segvol_token`` cookie that opening any page
  with ``?token=<token>`` sets (OHIF in a browser). Without a token the server refuses to bind a non-loopback address.
* **Every id, tag and request body checked before any work** (``segvol_server_checks``): a malformed request is a 4xx
  naming the field, never a 500; uploads are bounded (``--conf max_upload_mb``), as are prompts.
* **Inference off the event loop**: MONAI Label runs each endpoint's blocking work on the event loop, so one
  inference froze ``/info``, the datastore and OHIF's static files. Here every endpoint runs in a worker thread;
  inference requests go one at a time through a single inference worker (one model, requests queued).
* **No temp file left behind**: uploads and results live in a temp folder of the server's own (removed at the next
  start once the process is gone); when an endpoint fails, the upload copies it registered are removed at once.
"""
from __future__ import annotations

import asyncio
import functools
import glob
import hmac
import ipaddress
import json
import logging
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from http.cookies import SimpleCookie
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import parse_qs

APP_DIR = os.path.dirname(os.path.abspath(__file__))
LOOPBACK_NAMES = ("localhost", "ip6-localhost")
TOKEN_COOKIE = "segvol_token"
logger = logging.getLogger("segvol_server")


# ----------------------------------------------------------------------------------------------------------------------
# policy: what the operator configured
# ----------------------------------------------------------------------------------------------------------------------
class Policy:
    """The server's exposure settings, read from ``--conf`` (MONAI Label's app conf) and the environment."""

    def __init__(self, conf: Dict[str, str], environ=os.environ):
        from lib.validation import parse_bool  # the app's ``lib`` (loaded by MONAI Label with the app)

        self.cors_origins = [o.strip().rstrip("/") for o in conf.get("cors_origins", "").split(",") if o.strip()]
        self.token = read_token(conf, environ)
        self.allow_local_paths = parse_bool(conf.get("allow_local_paths"), "--conf allow_local_paths", False)
        self.max_upload_bytes = int(float(conf.get("max_upload_mb", 2048)) * 2**20)
        self.max_json_bytes = int(float(conf.get("max_params_kb", 256)) * 2**10)
        self.max_points = int(conf.get("max_points", 1000))
        self.max_names = int(conf.get("max_names", 1024))

    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        origin = origin.rstrip("/")
        if origin in self.cors_origins:
            return True
        return bool(host) and origin in (f"{scheme}://{host}", f"http://{host}", f"https://{host}")

    def token_matches(self, candidate: Optional[str]) -> bool:
        return bool(self.token) and bool(candidate) and hmac.compare_digest(candidate.encode(), self.token.encode())


def read_token(conf: Dict[str, str], environ=os.environ) -> str:
    token = environ.get("SEGVOL_AUTH_TOKEN", "").strip()
    path = conf.get("auth_token_file", "")
    if not token and path:
        with open(path) as handle:
            token = handle.read().strip()
    return token


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# the gate every request passes (pure ASGI: it runs before FastAPI parses anything)
# ----------------------------------------------------------------------------------------------------------------------
PUBLIC_PATHS = ("/auth/", "/auth/token")


class Gate:
    """Origin, token, body size and path-like query parameters, checked before the request reaches MONAI Label."""

    def __init__(self, app, policy: Policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from segvol_server_checks import check_query

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)

        origin = headers.get("origin")
        if origin and not self.policy.origin_allowed(origin, headers.get("host", ""), scope.get("scheme", "http")):
            return await reject(send, 403, f"origin {origin[:100]} is not allowed (same origin only; the operator "
                                           "can allow origins with --conf cors_origins)")

        set_cookie = None
        preflight = scope.get("method") == "OPTIONS" and "access-control-request-method" in headers
        if self.policy.token and path not in PUBLIC_PATHS and not preflight:  # a preflight carries no credentials
            bearer = headers.get("authorization", "")
            bearer = bearer.split(" ", 1)[1].strip() if bearer.lower().startswith("bearer ") else ""
            cookie = SimpleCookie(headers.get("cookie", ""))
            from_cookie = cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else ""
            from_query = (query.get("token") or [""])[0]
            if self.policy.token_matches(from_query):
                set_cookie = from_query
            elif not (self.policy.token_matches(bearer) or self.policy.token_matches(from_cookie)):
                return await reject(send, 401, "authentication required: send 'Authorization: Bearer <token>' "
                                               "(or open the page once with ?token=<token>)",
                                    [(b"www-authenticate", b"Bearer")])

        length = headers.get("content-length")
        limit = self.policy.max_upload_bytes
        if length is not None:
            if not length.isdigit():
                return await reject(send, 400, "Content-Length must be a number")
            if int(length) > limit:
                return await reject(send, 413, f"request body of {int(length)} bytes is over the limit of {limit} "
                                               "bytes (--conf max_upload_mb)")
        try:
            check_query(scope.get("method", "GET"), path, query, self.policy)
        except Exception as error:
            from lib.http_errors import http_error  # the app's ``lib``

            answer = http_error(error)
            if answer is None:
                raise
            return await reject(send, answer.status_code, answer.detail)

        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_with_cookie(message):
            if set_cookie and message.get("type") == "http.response.start":
                value = f"{TOKEN_COOKIE}={set_cookie}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(b"set-cookie", value.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, bounded_receive, send_with_cookie)
        except BodyTooLarge as error:
            await reject(send, 413, str(error))


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body over the limit of {limit} bytes (--conf max_upload_mb)")


async def reject(send, status: int, detail: str, extra_headers: Optional[List] = None):
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------------------------------
# endpoints: checked first, then run off the event loop
# ----------------------------------------------------------------------------------------------------------------------
INFERENCE_ROUTES = {"/infer/{model}", "/infer/wsi/{model}", "/infer/wsi_v2/{model}"}
ON_LOOP_PREFIXES = ("/proxy", "/ohif", "/auth")  # async all the way down: they stay on the event loop


def offload_endpoints(app, policy: Policy) -> None:
    """Replace every MONAI Label endpoint by one that checks its arguments and runs it in a worker thread."""
    from fastapi.routing import APIRoute
    from segvol_server_checks import ENDPOINT_CHECKS

    # the inference worker: one thread runs every inference request, off the event loop, so /info and the datastore
    # answer meanwhile and inference requests queue in arrival order (lock order: lib/service.py's docstring)
    inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segvol-infer")
    for router in _routers(app.router):
        routes = router.routes
        for position, route in enumerate(list(routes)):
            if not isinstance(route, APIRoute) or route.path.startswith(ON_LOOP_PREFIXES):
                continue
            if not asyncio.iscoroutinefunction(route.endpoint):
                continue
            checks = [ENDPOINT_CHECKS[(method, route.path)] for method in route.methods
                      if (method, route.path) in ENDPOINT_CHECKS]
            executor = inference if route.path in INFERENCE_ROUTES else None
            endpoint = _threaded(route.endpoint, checks[0] if checks else None, executor, policy)
            routes[position] = APIRoute(
                route.path, endpoint, methods=list(route.methods), name=route.name, summary=route.summary,
                tags=route.tags, include_in_schema=route.include_in_schema, response_class=route.response_class,
                deprecated=route.deprecated, responses=route.responses, status_code=route.status_code)
        if hasattr(router, "_mark_routes_changed"):
            router._mark_routes_changed()  # FastAPI rebuilds the handlers of included routers on a version change


def _routers(router):
    """The app's router and every router included in it (FastAPI keeps included routers as such in recent versions,
    and copies their routes into the app's list in older ones)."""
    yield router
    for route in router.routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routers(included)


def _threaded(original: Callable, check: Optional[Callable], executor, policy: Policy):
    @functools.wraps(original)
    async def endpoint(**kwargs):
        from starlette.concurrency import run_in_threadpool

        try:
            if check is not None:
                await run_in_threadpool(check, kwargs, policy)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(executor, lambda: asyncio.run(original(**kwargs)))
        except BaseException:
            discard_uploads(kwargs)
            raise

    return endpoint


def discard_uploads(kwargs: Dict[str, Any]) -> None:
    """MONAI Label registers each upload copy for removal after the response; a failed request never sends one."""
    from monailabel.utils.others.generic import remove_file

    tasks = getattr(kwargs.get("background_tasks"), "tasks", [])
    for task in tasks:
        if getattr(task, "func", None) is remove_file:
            try:
                remove_file(*task.args)
            except Exception:  # already gone
                pass


# ----------------------------------------------------------------------------------------------------------------------
# errors as short 4xx messages
# ----------------------------------------------------------------------------------------------------------------------
def install_error_handlers(app) -> None:
    """The app's request errors answered as ``lib.http_errors.http_error`` says; FastAPI's own shape errors without
    echoing the input; Starlette's form-size refusal as the 413 it is."""
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from lib.http_errors import http_error  # the app's ``lib`` (on sys.path: main() puts the app folder there)
    from lib.service import WeightsUnavailableError
    from segvol.errors import SegVolInputError

    async def request_error(_request, error: Exception):
        answer = http_error(error)
        return JSONResponse({"detail": answer.detail}, status_code=answer.status_code)

    async def validation_error(_request, error: RequestValidationError):
        # FastAPI echoes each offending input back; a client's 1 MB prompt must not come back in the answer.
        problems = []
        for item in error.errors()[:10]:
            where = ".".join(str(part) for part in item.get("loc", ()))
            problems.append(f"{where}: {str(item.get('msg', 'invalid'))[:200]}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    async def starlette_error(request, error: StarletteHTTPException):
        # Starlette refuses a form field over its size limit with a bare 400 that names no field; it is a size limit
        if error.status_code == 400 and str(error.detail).startswith("Field exceeded maximum size"):
            return JSONResponse({"detail": f"a form field (params or a prompt) is too large: {error.detail}"},
                                status_code=413)
        return await http_exception_handler(request, error)

    for kind in (SegVolInputError, WeightsUnavailableError, ImageNotFoundException, LabelNotFoundException,
                 json.JSONDecodeError):
        app.add_exception_handler(kind, request_error)
    app.add_exception_handler(StarletteHTTPException, starlette_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def install_auth_routes(app, policy: Policy) -> None:
    """``/auth`` as MONAI Label's clients use it (Slicer's login dialog): the token is the password."""
    from fastapi import Form, HTTPException, Request
    from monailabel.config import settings

    if settings.MONAI_LABEL_AUTH_ENABLE:
        return  # MONAI Label's own (Keycloak) authentication is configured: leave it in charge

    @app.get("/auth/", include_in_schema=False)
    async def auth_enabled():
        return {"enabled": bool(policy.token), "client_id": "segvol-label", "realm": ""}

    @app.post("/auth/token", include_in_schema=False)
    async def auth_token(username: str = Form(""), password: str = Form("")):
        if not policy.token_matches(password):
            raise HTTPException(status_code=401, detail="wrong token: give the server's token as password")
        return {"access_token": policy.token, "token_type": "Bearer"}

    @app.get("/auth/token/valid", include_in_schema=False)
    async def auth_valid(request: Request):
        return {"username": "segvol", "roles": []}  # the gate already refused a request without a valid token

    moved = app.router.routes[-3:]
    del app.router.routes[-3:]
    app.router.routes[0:0] = moved  # before MONAI Label's own /auth routes, when those are included
    if hasattr(app.router, "_mark_routes_changed"):
        app.router._mark_routes_changed()


# ----------------------------------------------------------------------------------------------------------------------
# the app uvicorn serves
# ----------------------------------------------------------------------------------------------------------------------
def private_tempdir() -> str:
    """A temp folder of this server's own, removed at the next start once this process is gone.

    MONAI Label copies uploads and writes results into the temp folder and sends results under their file name; the
    Python and Slicer clients save a download under that name in *their* temp folder, which on the same machine was the
    very file the server deletes after answering. Uploads a killed server left behind are removed here too."""
    from segvol.io import process_alive

    base = tempfile.gettempdir()
    for stale in glob.glob(os.path.join(base, "segvol-server-*")):
        pid = stale.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = os.path.join(base, f"segvol-server-{os.getpid()}")
    os.makedirs(folder, exist_ok=True)
    tempfile.tempdir = folder
    return folder


def build_app():
    from monailabel.app import app as monailabel_app
    from monailabel.config import settings
    from segvol_ohif import install_ohif_routes
    from starlette.middleware.cors import CORSMiddleware

    policy = Policy(dict(settings.MONAI_LABEL_APP_CONF or {}))
    private_tempdir()
    monailabel_app.user_middleware = [m for m in monailabel_app.user_middleware if m.cls is not CORSMiddleware]
    if policy.cors_origins:
        monailabel_app.add_middleware(CORSMiddleware, allow_origins=policy.cors_origins, allow_credentials=True,
                                      allow_methods=["*"], allow_headers=["*"])
    monailabel_app.add_middleware(Gate, policy=policy)
    install_error_handlers(monailabel_app)
    install_auth_routes(monailabel_app, policy)
    install_ohif_routes(monailabel_app)  # our app-config.js and SegVol extension (segvol_ohif)
    offload_endpoints(monailabel_app, policy)
    monailabel_app.state.segvol_policy = policy
    return monailabel_app


_app = None


def __getattr__(name):  # uvicorn imports "segvol_server:app" once MONAI Label has set its settings up
    global _app
    if name == "app":
        if _app is None:
            _app = build_app()
        return _app
    raise AttributeError(name)


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------
def _option(argv: List[str], *names: str) -> Optional[str]:
    for number, arg in enumerate(argv):
        for name in names:
            if arg == name and number + 1 < len(argv):
                return argv[number + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _confs(argv: List[str]) -> Dict[str, str]:
    confs = {}
    for number, arg in enumerate(argv):
        if arg in ("-c", "--conf") and number + 2 < len(argv):
            confs[argv[number + 1]] = argv[number + 2]
    return confs


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "start_server":
        argv = argv[1:]
    if _option(argv, "--uvicorn_app"):
        print("segvol_server: --uvicorn_app is set by this script", file=sys.stderr)
        return 2
    host = _option(argv, "-i", "--host")
    if host is None:
        host = "127.0.0.1"
        argv += ["--host", host]
    try:
        token = read_token(_confs(argv))
    except OSError as error:
        print(f"segvol_server: cannot read --conf auth_token_file: {error}", file=sys.stderr)
        return 2
    if not is_loopback(host) and not token:
        print(f"segvol_server: refusing to listen on {host} without authentication: set SEGVOL_AUTH_TOKEN (or "
              "--conf auth_token_file <file>) so clients must send the token, or bind 127.0.0.1", file=sys.stderr)
        return 2
    if not is_loopback(host) and "--ssl_certfile" not in argv:
        print(f"segvol_server: warning: listening on {host} without TLS: the token crosses the network in clear; "
              "put the server behind a TLS proxy or pass --ssl_keyfile/--ssl_certfile", file=sys.stderr)
    sys.path.insert(0, APP_DIR)
    from monailabel.main import Main

    sys.argv = ["monailabel", "start_server", *argv, "--uvicorn_app", "segvol_server:app"]
    Main().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
