"""Threads or asyncio tasks for the worker's conversations (issue 17.3): CPU and memory per
conversation at N concurrent conversations in one process, both around the same sans-IO client
(common/smtp/client.py).

- ``threads``: what the worker does today: a thread per conversation, each driving the client
  through the blocking driver (worker/smtpclient.py ``SMTPConnection``).
- ``asyncio``: one event loop, a task per conversation, the client driven through asyncio streams
  (the ~30-line driver below, what an asyncio worker would use).

The remote is a loopback sink in a process of its own (its CPU is not counted) that answers each
DATA after ``--delay`` seconds, as a remote MX does: the conversations overlap and wait, which is
what the worker's conversations do. Every conversation opens, waits until all N are open (memory is
sampled then: N live conversations), sends ``--messages`` messages and quits. Bounded: N <= 2,000,
a deadline on the whole run.

    python -m bench.conversations --n 100 --n 1000 --runs 3

Prints one line per (mode, N, run) and a median table: CPU ms per conversation and per message
(user + system of this process during the conversations), RSS KiB per live conversation (RSS with
all N open minus RSS before), wall seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.smtp.client import Client, ClientEvent, Closed, Ready, TransactionDone
from worker.smtpclient import SMTPConnection

MAX_N = 2000
DEADLINE = 300.0  # seconds a whole run may take
BODY = b"Subject: bench\r\n\r\n" + b"x" * 2000 + b"\r\n"


# -- the sink (its own process) ----------------------------------------------------------------------
async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    writer.write(b"220 sink.test ESMTP\r\n")
    in_data = False
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(b"250 2.0.0 Ok\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n")
            elif verb == b"DATA":
                in_data = True
                writer.write(b"354 go\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:  # MAIL, RCPT, RSET, NOOP
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
    finally:
        writer.close()


def _sink(port: multiprocessing.Queue[int], delay: float) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _serve_one(r, w, delay), "127.0.0.1", 0, backlog=4096)
        port.put(server.sockets[0].getsockname()[1])
        await asyncio.sleep(DEADLINE)

    asyncio.run(main())


# -- measuring ---------------------------------------------------------------------------------------
def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


@dataclass
class Result:
    mode: str
    n: int
    messages: int
    cpu: float  # seconds
    rss_kib: int  # with all n open, minus before
    wall: float
    sent: int

    def line(self) -> str:
        return (
            f"{self.mode:8} n={self.n:5}  cpu/conv {1000 * self.cpu / self.n:6.2f} ms  "
            f"cpu/msg {1000 * self.cpu / max(1, self.sent):5.2f} ms  rss/conv {self.rss_kib / self.n:6.1f} KiB  "
            f"wall {self.wall:5.2f} s  sent {self.sent}"
        )


def run_threads(port: int, n: int, messages: int) -> Result:
    opened = threading.Barrier(n + 1, timeout=DEADLINE)
    go = threading.Event()
    sent = [0] * n

    def conversation(k: int) -> None:
        conn = SMTPConnection(helo_name="bench.test", connect_timeout=30.0, timeout=60.0)
        try:
            conn.open("127.0.0.1", port, try_tls=False)
        finally:
            opened.wait()
        go.wait(DEADLINE)
        for _ in range(messages):
            result = conn.send("a@bench.test", [f"u{k}@sink.test"], BODY)
            sent[k] += sum(1 for r in result.replies.values() if r.positive)
        conn.quit()

    before, cpu0, t0 = _rss_kib(), _cpu(), time.monotonic()
    threads = [threading.Thread(target=conversation, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    opened.wait()
    rss = _rss_kib() - before
    go.set()
    for t in threads:
        t.join(DEADLINE)
    return Result("threads", n, messages, _cpu() - cpu0, rss, time.monotonic() - t0, sum(sent))


async def _pump(client: Client, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> ClientEvent:
    """The asyncio driver of the sans-IO client: what smtpclient._pump does with a socket."""
    while True:
        out = client.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        event = client.next_event()
        if event is not None:
            return event
        data = await reader.read(65536)
        if data:
            client.receive_data(data)
        else:
            client.eof()


async def _async_conversation(port: int, k: int, messages: int, opened: asyncio.Barrier, sent: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client("bench.test", f"sink.test[127.0.0.1]:{port}", try_tls=False)
    event = await _pump(client, reader, writer)
    assert isinstance(event, Ready), event
    await opened.wait()
    for _ in range(messages):
        client.start_transaction("a@bench.test", [f"u{k}@sink.test"], BODY, [])
        event = await _pump(client, reader, writer)
        while not isinstance(event, (TransactionDone, Closed)):  # as SMTPConnection.send
            event = await _pump(client, reader, writer)
        assert isinstance(event, TransactionDone), event
        sent[k] += sum(1 for r in event.result.replies.values() if r.positive)
        while not client.ready and not client.closed:
            await _pump(client, reader, writer)
    client.quit()
    while not isinstance(await _pump(client, reader, writer), Closed):
        pass
    writer.close()


def run_asyncio(port: int, n: int, messages: int) -> Result:
    sent = [0] * n
    out: dict[str, float | int] = {}

    async def main() -> None:
        opened = asyncio.Barrier(n + 1)
        tasks = [asyncio.create_task(_async_conversation(port, k, messages, opened, sent)) for k in range(n)]
        await asyncio.wait_for(opened.wait(), DEADLINE)
        out["rss"] = _rss_kib() - before
        await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)

    before, cpu0, t0 = _rss_kib(), _cpu(), time.monotonic()
    asyncio.run(main())
    return Result("asyncio", n, messages, _cpu() - cpu0, int(out["rss"]), time.monotonic() - t0, sum(sent))


def measure(mode: str, n: int, messages: int, delay: float) -> Result:
    """One run in a fresh process (so that one run's memory does not flatter the next)."""
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    sink = multiprocessing.Process(target=_sink, args=(ports, delay), daemon=True)
    sink.start()
    try:
        port = ports.get(timeout=30)
        results: multiprocessing.Queue[Result] = multiprocessing.Queue()
        runner = multiprocessing.Process(target=_child, args=(results, mode, port, n, messages), daemon=True)
        runner.start()
        got = results.get(timeout=DEADLINE)
        runner.join(30)
        return got
    finally:
        sink.kill()
        sink.join()


def _child(results: multiprocessing.Queue[Result], mode: str, port: int, n: int, messages: int) -> None:
    run: Callable[[int, int, int], Result] = run_threads if mode == "threads" else run_asyncio
    results.put(run(port, n, messages))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, action="append", help="concurrent conversations (repeat); default 100, 1000")
    p.add_argument("--messages", type=int, default=5, help="messages per conversation")
    p.add_argument("--delay", type=float, default=0.05, help="seconds the sink takes to answer a DATA")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mode", choices=["threads", "asyncio"], action="append")
    a = p.parse_args()
    sizes = a.n or [100, 1000]
    if any(not 0 < n <= MAX_N for n in sizes):
        p.error(f"--n must be 1..{MAX_N}")
    modes = a.mode or ["threads", "asyncio"]
    print(f"# {os.cpu_count()} CPUs, {a.messages} messages per conversation, sink DATA delay {a.delay}s")
    table: dict[tuple[str, int], list[Result]] = {}
    for n in sizes:
        for _ in range(a.runs):
            for mode in modes:
                r = measure(mode, n, a.messages, a.delay)
                table.setdefault((mode, n), []).append(r)
                print(r.line(), flush=True)
    print("\n| conversations | mode | CPU ms / conversation | CPU ms / message | RSS KiB / conversation | wall s |")
    print("|---|---|---|---|---|---|")
    for (mode, n), rs in table.items():
        cpu = statistics.median(r.cpu for r in rs)
        print(
            f"| {n} | {mode} | {1000 * cpu / n:.2f} | {1000 * cpu / (n * a.messages):.2f} "
            f"| {statistics.median(r.rss_kib for r in rs) / n:.1f} | {statistics.median(r.wall for r in rs):.2f} |"
        )


if __name__ == "__main__":
    main()
