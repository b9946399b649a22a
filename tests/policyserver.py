"""An HTTPS server for MTA-STS policies in tests: ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
on a loopback address, port 443 by default (tests run as root), with a trustme certificate for
every ``mta-sts.<domain>`` it serves::

    with PolicyServer("127.0.21.1", ca, {"a.test": b"version: STSv1\\n..."}) as web:
        zone.add("mta-sts.a.test.", "A", web.host)

``policies`` maps a domain to its policy text, looked up by the Host header; ``status`` and
``content_type`` script a bad answer; ``hits`` counts requests by domain.
"""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Iterator
from types import TracebackType

import pytest
import trustme

__all__ = ["PolicyServer", "serving"]


class PolicyServer:
    def __init__(self, host: str, ca: trustme.CA, policies: dict[str, bytes], port: int = 443) -> None:
        self.host = host
        self.port = port
        self.policies = policies
        self.status = 200
        self.content_type = "text/plain"
        self.location = ""  # with a 3xx status: where it redirects
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*[f"mta-sts.{d}" for d in policies]).configure_cert(self._context)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> PolicyServer:
        if self._server is not None:
            return self
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = (self.headers.get("Host") or "").partition(":")[0].lower()
                domain = name.removeprefix("mta-sts.")
                with owner.lock:
                    owner.hits[domain] = owner.hits.get(domain, 0) + 1
                    body = owner.policies.get(domain)
                    status, ctype, location = owner.status, owner.content_type, owner.location
                if body is None or self.path != "/.well-known/mta-sts.txt":
                    self.send_error(404)
                    return
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def serving(host: str, ca: trustme.CA, policies: dict[str, bytes]) -> Iterator[PolicyServer]:
    """A started PolicyServer on ``host``:443 for a test (skipped where port 443 needs root)."""
    server = PolicyServer(host, ca, policies)
    try:
        server.start()
    except PermissionError:
        pytest.skip("the MTA-STS policy server needs port 443 (run the tests as root)")
    with server:
        yield server
