"""A counting aiosmtpd sink, run as its own process: the remote MX of the benchmark and, driven
directly by the load generator, the baseline (aiosmtpd accepting mail and storing nothing)."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


def publish(path: Path, n: int) -> None:
    tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")  # one per writing thread
    tmp.write_text(str(n))
    tmp.replace(path)  # atomic: the benchmark never reads a half-written file


class Counter:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.n = 0
        self.last = 0.0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        responses.insert(1, "250-PIPELINING")  # as Postfix's smtp-sink and real MX hosts do
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.n += 1
        now = time.monotonic()
        if now - self.last > 0.2:
            publish(self.out, self.n)
            self.last = now
        return "250 2.0.0 Ok"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count-file", type=Path, required=True)
    a = p.parse_args()
    handler = Counter(a.count_file)
    ctl = Controller(handler, hostname=a.host, port=a.port)
    ctl.start()
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop:
        publish(a.count_file, handler.n)
        time.sleep(0.1)
    ctl.stop()


if __name__ == "__main__":
    main()
