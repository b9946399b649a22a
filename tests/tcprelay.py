"""A TCP relay on 127.0.0.1 between a client under test and a real server (Redis), for tests that
need what a network does to a connection: a reply lost, a client's writes never arriving. Each
chunk read is judged by ``verdict`` (a subclass's), with a state of its connection's own."""

from __future__ import annotations

import contextlib
import socket
import threading
from enum import Enum
from typing import Self

__all__ = ["TcpRelay", "Verdict"]


class Verdict(Enum):
    FORWARD = "forward"
    DROP = "drop"  # this chunk goes nowhere; the connection stays
    CUT = "cut"  # this chunk goes nowhere, and both sides of the connection are closed


class TcpRelay:
    """127.0.0.1:<port> -> 127.0.0.1:<target_port>, a thread a direction a connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def verdict(self, data: bytes, up: bool, state: dict[str, object]) -> Verdict:
        """What becomes of ``data`` (``up``: from the client); ``state`` is its connection's."""
        return Verdict.FORWARD

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is gone (the test's end)
                client.close()
                continue
            state: dict[str, object] = {}
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, up, state), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool, state: dict[str, object]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                verdict = self.verdict(data, up, state)
                if verdict is Verdict.CUT:
                    break
                if verdict is Verdict.FORWARD:
                    dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # a FIN now, whatever the other direction's thread does
            s.close()

    def close(self) -> None:
        self.listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
