"""The local web app of the feedback loop: standard-library HTTP, one page, a small JSON API.

Routes (all answers JSON unless noted):

- ``GET /``, ``GET /static/<file>``: the page; only files inside ``static/`` are served.
- ``GET /api/state``: prompt, seed, status (``idle``/``training``/``error``), round, progress.
- ``GET /api/image``: the current image (PNG).
- ``POST /api/feedback``: body = the marks as an RGBA PNG of the image's size (green =
  liked, red = disliked); starts a training round (202), or 400 / 409 / 413 with a message.
- ``POST /api/save``: saves the LoRA and answers its folder (507 with a message when the disk is full).

It binds 127.0.0.1 unless told otherwise, refuses requests whose ``Host`` is not the
address it serves (DNS rebinding) and cross-origin POSTs (another site's page in the same
browser), and caps uploads at :data:`MAX_UPLOAD_BYTES`.
"""
from __future__ import annotations

import errno
import json
import logging
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from ..rewards.human import marks_from_canvas_png
from .session import FeedbackSession, SessionBusy

logger = logging.getLogger(__name__)

STATIC_DIR = (Path(__file__).parent / "static").resolve()
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


class FeedbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, session: FeedbackSession, host: str = "127.0.0.1", port: int = 8765):
        self.session = session
        super().__init__((host, port), FeedbackHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class FeedbackHandler(BaseHTTPRequestHandler):
    server: FeedbackServer
    server_version = "pxpo-feedback"

    def log_message(self, format, *args):
        logger.debug("%s - %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ answers
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    # ------------------------------------------------------------------ checks
    def _host_allowed(self) -> bool:
        """The Host header must name the address served (or a loopback name when bound to loopback)."""
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        bound = str(self.server.server_address[0]).lower()
        if bound in LOOPBACK_NAMES or bound.startswith("127."):
            return host in LOOPBACK_NAMES or host.startswith("127.")
        return True  # bound to a public address on purpose: any name may reach it

    def _same_origin(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is None:  # not sent by a browser's cross-site fetch, so not a forged request
            return True
        return urlsplit(origin).netloc.lower() == (self.headers.get("Host") or "").lower()

    # ------------------------------------------------------------------ routes
    def do_GET(self):
        if not self._host_allowed():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/api/state":
            return self._json(HTTPStatus.OK, self.server.session.state())
        if path == "/api/image":
            return self._send(HTTPStatus.OK, self.server.session.png, "image/png")
        return self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    do_HEAD = do_GET

    def do_POST(self):
        if not self._host_allowed():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        if not self._same_origin():
            return self._error(HTTPStatus.FORBIDDEN, "cross-origin requests are refused")
        path = urlsplit(self.path).path
        if path == "/api/feedback":
            return self._feedback()
        if path == "/api/save":
            return self._save()
        return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    def _static(self, name: str) -> None:
        target = (STATIC_DIR / name).resolve()
        if not target.is_relative_to(STATIC_DIR) or not target.is_file():
            return self._error(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        self._send(HTTPStatus.OK, target.read_bytes(), content_type)

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
            return None
        if int(length) > MAX_UPLOAD_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"upload of {int(length)} bytes is over the {MAX_UPLOAD_BYTES}-byte limit")
            self.close_connection = True
            return None
        return self.rfile.read(int(length))

    def _feedback(self) -> None:
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "image/png":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the marks as an image/png body")
        body = self._body()
        if body is None:
            return None
        session = self.server.session
        try:
            liked, disliked = marks_from_canvas_png(body)
            state = session.submit(liked, disliked)
        except SessionBusy as busy:
            return self._error(HTTPStatus.CONFLICT, str(busy))
        except ValueError as bad:
            return self._error(HTTPStatus.BAD_REQUEST, str(bad))
        return self._json(HTTPStatus.ACCEPTED, state)

    def _save(self) -> None:
        body = self._body()
        if body is None:
            return None
        try:
            folder = self.server.session.save()
        except SessionBusy as busy:
            return self._error(HTTPStatus.CONFLICT, str(busy))
        except OSError as failed:  # a full disk, a folder that cannot be written: say so, keep serving
            logger.error("saving the LoRA failed: %s", failed)
            return self._error(HTTPStatus.INSUFFICIENT_STORAGE if failed.errno in (errno.ENOSPC, errno.EDQUOT)
                               else HTTPStatus.INTERNAL_SERVER_ERROR, f"could not save: {failed}")
        return self._json(HTTPStatus.OK, {"saved": str(folder)})


def start_server(session: FeedbackSession, host: str = "127.0.0.1", port: int = 8765) -> FeedbackServer:
    """Serve ``session`` in a background thread (port 0 picks a free one); ``shutdown()`` stops it."""
    server = FeedbackServer(session, host, port)
    threading.Thread(target=server.serve_forever, name="pxpo-feedback-http", daemon=True).start()
    return server
