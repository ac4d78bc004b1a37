"""A local HTTP server that misbehaves on purpose, for the URL-fetching tests.

Paths: ``/file/NAME`` serves ``files[NAME]``; ``/redirect?to=URL`` answers 302 to ``URL`` (to itself without ``to``);
``/slow`` promises 60 bytes and sends one a second; ``/endless`` streams chunks with no length
and no end. ``hits`` records every path asked for, so a test can show a refused URL was never
requested.
"""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class HostileServer:
    base: str
    files: dict[str, bytes] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str) -> str:
        return self.base + path


@contextmanager
def hostile_server(host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None) -> Iterator[HostileServer]:
    """Serve on ``host`` at a free port until the block ends; over https with ``tls`` (cert, key)."""
    state = HostileServer("")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            state.hits.append(self.path)
            parts = urlsplit(self.path)
            if parts.path.startswith("/file/") and parts.path[6:] in state.files:
                body = state.files[parts.path[6:]]
                self._head(200, {"Content-Length": str(len(body))})
                self.wfile.write(body)
            elif parts.path == "/redirect":
                self._head(302, {"Location": parse_qs(parts.query).get("to", ["/redirect"])[0], "Content-Length": "0"})
            elif parts.path == "/slow":
                self._head(200, {"Content-Length": "60"})
                self._trickle(lambda: b"x", 1.0, 60)
            elif parts.path == "/endless":
                self._head(200, {"Transfer-Encoding": "chunked"})
                self._trickle(lambda: b"%x\r\n%s\r\n" % (4096, b"\0" * 4096), 0.0, 1 << 30)
            else:
                self._head(404, {"Content-Length": "0"})

        def _head(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()

        def _trickle(self, piece: Any, every_s: float, count: int) -> None:
            try:
                for _ in range(count):
                    if state.stop.is_set():
                        return
                    self.wfile.write(piece())
                    self.wfile.flush()
                    if every_s:
                        state.stop.wait(every_s)
            except OSError:  # the client gave up, which is what the tests want
                self.close_connection = True

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    state.base = f"{'https' if tls else 'http'}://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()


def self_signed(tmp: Path, address: str) -> tuple[Path, Path]:
    """A certificate and key for ``address`` (as an IP subjectAltName), made with openssl."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={address}",
                    "-addext", f"subjectAltName=IP:{address}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key
