"""A real HTTP file server on 127.0.0.1 for tests: a folder served by werkzeug, ranged GETs included.

``werkzeug.utils.send_file`` answers ``Range`` with 206 (416 past the end) and HEAD with the
size, as a static web server or a CDN does; the server runs on threads of the test process
(the loader's workers reach it over TCP like any other server) and logs each request.

Usage::

    with HttpFiles(folder) as http:
        read_bytes(f"{http.url}/dataset.json")
        assert http.requests[-1] == ("GET", "/dataset.json", "")
"""

from __future__ import annotations

import threading
from pathlib import Path

from werkzeug.serving import make_server
from werkzeug.utils import send_file
from werkzeug.wrappers import Request, Response


class HttpFiles:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @Request.application
    def _app(self, request: Request) -> Response:
        self.requests.append((request.method, request.path, request.headers.get("Range", "")))
        path = (self.folder / request.path.lstrip("/")).resolve()
        if not path.is_file() or self.folder not in path.parents:
            return Response("not found", status=404)
        return send_file(path, request.environ, conditional=True, etag=True, max_age=None)

    def __enter__(self) -> HttpFiles:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
