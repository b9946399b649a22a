"""A bounded SMTP load generator: C concurrent connections send N messages in all, each connection
reusing its session (MAIL/RCPT/DATA, RSET-free as a real MTA client does). Prints nothing; returns
figures. Loopback only."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

__all__ = ["LoadResult", "run_load"]


@dataclass
class LoadResult:
    sent: int
    failed: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def _client(
    host: str, port: int, todo: list[int], body: bytes, rcpt_domain: str, per_connection: int, result: list[int]
) -> None:
    while todo:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await _reply(reader)
            writer.write(b"EHLO loadgen.test\r\n")
            await _reply(reader)
            for _ in range(per_connection):
                if not todo:
                    break
                n = todo.pop()
                writer.write(f"MAIL FROM:<load@loadgen.test>\r\nRCPT TO:<u{n}@{rcpt_domain}>\r\nDATA\r\n".encode())
                codes = [(await _reply(reader))[0] for _ in range(3)]
                if codes != [250, 250, 354]:
                    result[1] += 1
                    writer.write(b"RSET\r\n")
                    await _reply(reader)
                    continue
                writer.write(body + b".\r\n")
                code, _ = await _reply(reader)
                result[0 if code == 250 else 1] += 1
            writer.write(b"QUIT\r\n")
            await writer.drain()
        finally:
            writer.close()


def run_load(
    host: str,
    port: int,
    *,
    messages: int,
    concurrency: int,
    size: int = 2000,
    rcpt_domain: str = "sink.test",
    per_connection: int = 100,
) -> LoadResult:
    """Send ``messages`` messages of about ``size`` octets; returns when every one has its reply."""
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: load\r\nFrom: load@loadgen.test\r\n\r\n" + line * max(1, size // len(line))
    todo = list(range(messages))
    result = [0, 0]

    async def main() -> None:
        await asyncio.gather(
            *(_client(host, port, todo, body, rcpt_domain, per_connection, result) for _ in range(concurrency))
        )

    t0 = time.perf_counter()
    asyncio.run(main())
    return LoadResult(result[0], result[1], time.perf_counter() - t0)
