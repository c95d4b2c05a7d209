"""The demo's HTTP server: the standard library's ThreadingHTTPServer, one page, a small JSON API.

Routes:
    GET  /                      the page (static/index.html)
    GET  /static/NAME           its script and style sheet
    GET  /examples/NAME         bundled example images; /examples/examples.json lists them
    GET  /api/info              model, limits, settings ranges (JSON)
    GET  /api/gates.png         the run's gate plot (404 without one)
    GET  /v1/models             the served model, OpenAI style (:mod:`pill.web.openai_api`)
    POST /v1/chat/completions   OpenAI Chat Completions (JSON, or SSE with ``stream: true``)
    POST /api/upload/MODALITY   body: one file of a modality the model reads (``image``, ...) ->
                                {input_id, modality, name, ...what the modality describes}
    POST /api/image             the same for an image, its id also as ``image_id``
    POST /api/chat              JSON {question, inputs?: {modality: input_id}, files?: {modality:
                                {name, data: base64}}, history?, settings?} -> text/event-stream of
                                ``queued``, ``start``, ``notice``, ``token``, then ``done`` or ``error``

Errors before an answer starts are JSON ``{"error": message}`` with a 4xx/5xx status; errors
while answering arrive as an ``error`` event. Either way the server keeps serving.

A POST whose ``Origin`` header names another host than its ``Host`` header is refused (403):
a page elsewhere cannot make a visitor's browser use the model; clients that send no Origin
(scripts, curl) are served. Uploads and questions take a place in the queue before their body
is read, so what arrives beyond it is answered 503 without being decoded.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

from . import openai_api
from .app import ClientGone, DemoApp, Limits, RequestError, too_large_message

log = logging.getLogger("pill.web")

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
EXAMPLES_DIR = HERE / "examples"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", ".json": "application/json",
                 ".svg": "image/svg+xml"}
MAX_JSON_BYTES = 1 << 20
DRAIN_LIMIT = 64 << 20  # read and drop at most this much of a refused upload, so the browser sees the reply
# No inline script or style, no outside hosts: the page works offline and injected markup cannot run.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"}


def _files(folder: Path) -> dict[str, Path]:
    """Servable files by name; requests can name nothing else (no path traversal)."""
    return {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES} if folder.is_dir() else {}


def same_host(origin: str, host: str) -> bool:
    """Whether the ``Origin`` header ``origin`` (``http://name:port``) names the host and port of the
    ``Host`` header ``host`` (``name:port``); ``null`` and other schemes never do."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host.strip().lower()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class DemoServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that carries the :class:`DemoApp` its handlers use."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: DemoApp, host: str = "127.0.0.1", port: int = 7860, api_key: Optional[str] = None):
        self.app = app
        self.api_key = api_key  # required as "Authorization: Bearer KEY" by /v1/ routes when set
        self.started = int(time.time())
        self.static = _files(STATIC_DIR)
        self.examples = _files(EXAMPLES_DIR)
        # Bound to loopback, only loopback names are accepted in the Host header: a web page
        # elsewhere cannot reach the model by pointing its own host name at 127.0.0.1.
        self.loopback_only = is_loopback(host)
        if ":" in host:
            self.address_family = socket.AF_INET6
        # The listen backlog holds the connections that arrive faster than they are accepted; the
        # standard library's 5 resets (or stalls) a burst of browsers, each of which opens several
        # connections. Room for every place in the queue several times over; the kernel caps it.
        self.request_queue_size = min(socket.SOMAXCONN, max(128, 8 * (app.limits.max_waiting + 1)))
        super().__init__((host, port), DemoHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "pill-demo"
    timeout = 60  # seconds a socket may stall in a read or write (slow or vanished clients)
    sys_version = ""

    # -- plumbing ---------------------------------------------------------------------------
    def log_message(self, fmt, *args):  # quiet unless pill.web logs at DEBUG
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, content_type: str, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str, e: Optional[RequestError] = None) -> None:
        if urlsplit(self.path).path.startswith("/v1/"):  # the API answers in OpenAI's error shape
            self._json(status, openai_api.as_api_error(e or RequestError(status, message)).body())
        else:
            self._json(status, {"error": message})

    def _key_ok(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and secrets.compare_digest(given[7:].strip().encode(), key.encode())

    def _host_ok(self) -> bool:
        if not self.server.loopback_only:
            return True
        host = self.headers.get("Host", "")
        name = urlsplit(f"//{host}").hostname or ""
        return is_loopback(name)

    def _origin_ok(self) -> bool:
        """No Origin (a script, not a browser), or one that names this very host."""
        origin = self.headers.get("Origin")
        return origin is None or same_host(origin, self.headers.get("Host", ""))

    def _body(self, limit: int, what: str) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "the request has no Content-Length")
        n = int(length)
        if n > limit:
            raise RequestError(413, too_large_message(n, limit, what))
        self._body_read = True
        return self.rfile.read(n)

    def _drain_unread(self) -> None:
        """Before a refusal: read the unread body of a POST away, so the client reads the reply."""
        length = self.headers.get("Content-Length", "")
        if self.command == "POST" and not self._body_read:
            self._body_read = True
            if length.isdigit():
                self._drain(int(length))
            else:
                self.close_connection = True

    def _drain(self, n: int) -> None:
        """Read a refused body away (up to DRAIN_LIMIT) so that the browser reads the 413, not a reset."""
        left = min(n, DRAIN_LIMIT)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        if n > DRAIN_LIMIT:
            self.close_connection = True

    def _dispatch(self, routes: dict) -> None:
        path = urlsplit(self.path).path
        self._body_read = False
        try:
            if not self._host_ok():
                raise RequestError(403, "unexpected Host header; open the demo at http://127.0.0.1:PORT/")
            if self.command == "POST" and not self._origin_ok():
                raise RequestError(403, f"requests from another site (Origin {self.headers.get('Origin')}) "
                                        "are refused; open the demo at its own address")
            if path.startswith("/v1/") and not self._key_ok():
                raise openai_api.ApiError(401, "invalid or missing API key: send Authorization: Bearer KEY",
                                          code="invalid_api_key")
            for route, handler in routes.items():  # "/x/" matches its whole folder, other routes one path
                if path == route or (len(route) > 1 and route.endswith("/") and path.startswith(route)):
                    return handler(path[len(route):] if route.endswith("/") else path)
            raise RequestError(404, f"no such page: {path}")
        except RequestError as e:
            self._drain_unread()
            self._error(e.status, str(e), e)
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            log.info("client went away during %s %s", self.command, path)
        except Exception as e:  # one broken request must never stop the server
            log.exception("error in %s %s", self.command, path)
            try:
                self._error(500, f"internal error: {type(e).__name__}: {e}")
            except OSError:
                pass

    # -- routes -----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch({"/": lambda _: self._file(self.server.static, "index.html"),
                        "/static/": lambda name: self._file(self.server.static, name),
                        "/examples/": lambda name: self._file(self.server.examples, name),
                        "/api/info": lambda _: self._json(200, self.server.app.public_info()),
                        "/api/gates.png": self._gates,
                        "/v1/models": lambda _: self._json(200, openai_api.models_reply(self.server.app.info,
                                                                                        self.server.started))})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._dispatch({"/api/image": lambda _: self._upload("image", id_as="image_id"), "/api/upload/": self._upload,
                        "/api/chat": self._chat, "/v1/chat/completions": self._completions})

    def _file(self, files: dict[str, Path], name: str) -> None:
        path = files.get(name)
        if path is None:
            raise RequestError(404, f"no such file: {name}")
        self._send(200, path.read_bytes(), CONTENT_TYPES[path.suffix])

    def _gates(self, _path) -> None:
        if self.server.app.gate_png is None:
            raise RequestError(404, "this model has no gate plot")
        self._send(200, self.server.app.gate_png, "image/png")

    def _upload(self, name: str, id_as: str = "") -> None:
        app = self.server.app
        m = app.served(unquote(name))
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        # <mime>/* or octet-stream only: both need a CORS preflight, so other sites cannot post here.
        if not app.accepts(m.name, ctype):
            kinds = f"{m.mime}/* or application/octet-stream" if m.mime else "application/octet-stream"
            raise RequestError(415, f"send the {m.label} file itself (Content-Type {kinds})")
        limit = app.limits.upload_bytes(m.name)
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:  # 413 before 503: waiting will not help
            raise RequestError(413, too_large_message(int(length), limit, f"{m.label} file"))
        with app.admission():  # before the body is read: beyond the queue nothing is read or decoded
            data = self._body(limit, f"{m.label} file")
            filename = unquote(self.headers.get("X-File-Name", ""))[:200] or "upload"
            reply = app.add_input(m.name, data, filename)
        self._json(200, {id_as: reply["input_id"], **reply} if id_as else reply)

    def _chat(self, _path) -> None:
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "send the question as JSON (Content-Type application/json)")
        app = self.server.app
        with app.admission():  # files sent along are decoded within it
            self._answer(self._body(app.request_bytes(MAX_JSON_BYTES), "request"))

    def _answer(self, body: bytes) -> None:
        app = self.server.app
        request = app.parse_question(body)
        started = False

        def emit(event: str, data) -> None:
            nonlocal started
            if not started:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Accel-Buffering", "no")
                for k, v in SECURITY_HEADERS.items():
                    self.send_header(k, v)
                self.end_headers()
                started = True
            try:
                self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
            except OSError as e:
                raise ClientGone() from e

        try:
            answer = app.answer(request, emit)
        except ClientGone:
            log.info("client went away; answer abandoned")
            return
        except RequestError as e:
            if not started:
                raise
            emit("error", {"message": str(e)})
            return
        except Exception as e:
            log.exception("generation failed")
            message = f"the model failed on this question: {type(e).__name__}: {e}"
            if not started:
                raise RequestError(500, message) from e
            emit("error", {"message": message})
            return
        emit("done", {"answer": answer})
        self.close_connection = True


    def _completions(self, _path) -> None:
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            raise openai_api.ApiError(415, "send the request as JSON (Content-Type application/json)")
        app = self.server.app
        limit = MAX_JSON_BYTES + openai_api.MAX_IMAGES * (4 * (app.limits.upload_bytes("image") + 2) // 3 + 64)
        with app.admission():  # images are decoded within it
            request = openai_api.parse_request(self._body(limit, "request"), app, openai_api.model_id(app.info))
            cid, created, model = openai_api.completion_id(), openai_api.now(), openai_api.model_id(app.info)
            if not request["stream"]:
                text, finish, usage = openai_api.run(app, request)
                self._json(200, openai_api.reply(cid, model, created, text, finish, usage))
                return
            started = False

            def send(obj) -> None:
                nonlocal started
                if not started:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                    self.send_header("Cache-Control", "no-store")
                    for k, v in SECURITY_HEADERS.items():
                        self.send_header(k, v)
                    self.end_headers()
                    started = True
                    send(openai_api.chunk(cid, model, created, {"role": "assistant", "content": ""}))
                try:
                    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                    self.wfile.write(b"data: " + data + b"\n\n")
                    self.wfile.flush()
                except OSError as e:
                    raise ClientGone() from e

            try:
                def piece(text: str) -> None:
                    send(openai_api.chunk(cid, model, created, {"content": text}))

                text, finish, usage = openai_api.run(app, request, on_piece=piece)
            except RequestError as e:
                if not started:
                    raise
                send(openai_api.as_api_error(e).body())
                send(b"[DONE]")
                return
            except ClientGone:
                log.info("client went away; answer abandoned")
                return
            except Exception as e:
                log.exception("generation failed")
                error = openai_api.ApiError(500, f"the model failed: {type(e).__name__}: {e}")
                if not started:
                    raise error from e
                send(error.body())
                send(b"[DONE]")
                return
            send(openai_api.chunk(cid, model, created, {}, finish))
            if request["include_usage"]:
                send(openai_api.chunk(cid, model, created, {}, usage=usage))
            send(b"[DONE]")
            self.close_connection = True


def return_large_buffers_to_the_os(threshold: int = 4 << 20) -> bool:
    """On glibc, serve allocations of ``threshold`` bytes and more from their own mappings, which go
    back to the operating system when freed. glibc raises that threshold on its own after such a
    buffer is freed, after which decoded uploads (64 MB for a 4096 x 4096 image) come from the
    per-thread heaps and stay there: 9 uploads decoded one after another in 9 handler threads
    then held 1.4 GB instead of 0.23 GB. Process-wide, so :func:`serve` calls it, not
    :func:`make_server`. Returns whether it applied (False off glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD (fixing it also stops its adjustment)


def make_server(vlm_or_app, host: str = "127.0.0.1", port: int = 7860, info: Optional[dict] = None,
                limits: Optional[Limits] = None, api_key: Optional[str] = None) -> DemoServer:
    """A bound, not yet serving, demo server; ``port=0`` picks a free port (see ``.url``).

    ``vlm_or_app``: a :class:`~pill.vlm.PillVLM` (wrapped in a :class:`DemoApp` with ``info`` and
    ``limits``) or a ready :class:`DemoApp`. ``api_key``: required by the ``/v1/`` API as
    ``Authorization: Bearer KEY`` (None: no key).
    """
    app = vlm_or_app if isinstance(vlm_or_app, DemoApp) else DemoApp(vlm_or_app, info, limits)
    return DemoServer(app, host, port, api_key)


def serve(vlm, host: str = "127.0.0.1", port: int = 7860, info: Optional[dict] = None,
          limits: Optional[Limits] = None, ready=None, api_key: Optional[str] = None) -> None:
    """Serve the demo until interrupted. ``ready(server)`` is called once it listens."""
    return_large_buffers_to_the_os()
    server = make_server(vlm, host, port, info, limits, api_key)
    if not server.loopback_only:
        log.warning("serving on %s: anyone who can reach this address can use the model", host)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def serve_in_thread(server: DemoServer) -> threading.Thread:
    """Start ``server.serve_forever`` in a daemon thread (tests); stop with ``server.shutdown()``."""
    t = threading.Thread(target=server.serve_forever, name="pill-web", daemon=True)
    t.start()
    return t
