"""A bounded SMTP load generator: C concurrent connections send N messages in all, each connection
reusing its session for up to ``per_connection`` messages (MAIL/RCPT/DATA pipelined, RSET-free as
a real MTA client does). What smtp-source cannot do: many recipients per message, recipients
spread over several domains, pipelining. Every message carries ``X-Bench-Sent: <ns since the
epoch>``, taken just before its content is written, so the sink can tell arrival -> delivered
latency (bench/sinkdump.py). Prints nothing; returns figures (``progress`` counts as it goes).
Loopback only."""

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
    host: str,
    port: int,
    todo: list[int],
    body: bytes,
    rcpt_domains: list[str],
    recipients: int,
    per_connection: int,
    result: list[int],
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
                domain = rcpt_domains[n % len(rcpt_domains)]
                rcpts = "".join(f"RCPT TO:<u{n}.{i}@{domain}>\r\n" for i in range(recipients))
                writer.write(f"MAIL FROM:<load@loadgen.test>\r\n{rcpts}DATA\r\n".encode())
                codes = [(await _reply(reader))[0] for _ in range(2 + recipients)]
                if codes != [250] * (1 + recipients) + [354]:
                    result[1] += 1
                    writer.write(b"RSET\r\n")
                    await _reply(reader)
                    continue
                writer.write(b"X-Bench-Sent: %d\r\n" % time.time_ns() + body + b".\r\n")
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
    rcpt_domains: list[str] | None = None,
    recipients: int = 1,
    per_connection: int = 100,
    result: list[int] | None = None,
) -> LoadResult:
    """Send ``messages`` messages of about ``size`` octets, message n to domain n % len(domains);
    returns when every one has its reply. ``result`` ([sent, failed]) is updated as it goes."""
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: load\r\nFrom: load@loadgen.test\r\n\r\n" + line * max(1, size // len(line))
    todo = list(range(messages))[::-1]
    result = [0, 0] if result is None else result
    domains = rcpt_domains or ["sink.test"]

    async def main() -> None:
        await asyncio.gather(
            *(_client(host, port, todo, body, domains, recipients, per_connection, result) for _ in range(concurrency))
        )

    t0 = time.perf_counter()
    asyncio.run(main())
    return LoadResult(result[0], result[1], time.perf_counter() - t0)
