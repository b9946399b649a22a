"""What DKIM signing costs per message: ``python -m bench.signing [--seconds S] [--ingress N]``.

Signs a 4 KiB message (the size of the throughput benchmark's) the way mtaq does, with one
RSA-2048 key, one Ed25519 key, and both, for ``--seconds`` each (bounded: at most 20,000 messages
a case), and prints the CPU time per message (process time, so other load on the machine does not
count) of each share: the ingress's (ingress/signing.py: Message-ID and Date added, From: parsed,
keys looked up, the signatures prepared up to the private key's operation) and the worker's
(worker/signing.py: the signatures finished at delivery); beside dkimpy's own ``dkim.sign`` when
it is installed (why common/dkim.py does not use it).

``--ingress N`` also measures it in a running ingress: a redis-server, `mtaq ingress` (one
process, or ``--processes``; no worker: only the ingress's own work is counted) and Postfix's
``smtp-source -d`` sending N 4 KiB messages over 20 sessions, without and then with an RSA-2048 key
for the sender's domain, ``--rounds`` times interleaved; it prints the ingress process tree's CPU
per message (/proc, bench/measure.py), which other load on the machine changes far less than it
changes rates, and the rate (run it under the bench lock for that one).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bench.measure import cpu_seconds, tree
from bench.systems import free_port, wait_port
from common.dkimkeys import KeyTable
from common.envelope import Envelope
from ingress.signing import TrustedMail
from mtaq.runtime.embedded import RedisProcess
from worker.signing import DeliverySigner

MAX_MESSAGES = 20_000


def message(size: int = 4096) -> bytes:
    head = b"From: App <app@news.example.com>\r\nTo: <user@example.org>\r\nSubject: your receipt\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 2] + b"\r\n"
    return head + body


def per_message(run: Callable[[], object], seconds: float) -> tuple[float, int]:
    """(CPU milliseconds per call, calls made) over ``seconds`` of wall time: one call at least,
    MAX_MESSAGES at most."""
    n = 0
    cpu0, end = time.process_time(), time.monotonic() + seconds
    while n == 0 or (n < MAX_MESSAGES and time.monotonic() < end):
        run()
        n += 1
    return (time.process_time() - cpu0) * 1000 / n, n


def _write(folder: Path, name: str, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (folder / name).write_bytes(pem)
    return pem


def _prepare(prep: TrustedMail, msg: bytes) -> Callable[[], object]:
    return lambda: prep.prepare(msg, queue_id="Q", when=time.time(), body_8bit=False)


def _finish(keys: KeyTable, prep: TrustedMail, msg: bytes) -> Callable[[], object]:
    prepared = prep.prepare(msg, queue_id="Q", when=time.time(), body_8bit=False)
    env = Envelope(id="Q", sender="", recipients=[], dkim=prepared.pending)
    signer = DeliverySigner(keys)
    return lambda: signer.signed(env, prepared.data, time.time())


def _dkimpy(msg: bytes, key: bytes, algorithm: bytes) -> Callable[[], object]:
    import dkim as dkimpy  # a test dependency: the comparison is skipped without it

    relaxed = (b"relaxed", b"relaxed")
    return lambda: dkimpy.sign(msg, b"s", b"example.com", key, signature_algorithm=algorithm, canonicalize=relaxed)


def ingress_cpu_ms(messages: int, keys: Path | None, folder: Path, processes: int = 1) -> tuple[float, float]:
    """(CPU ms per message, messages a second) of `mtaq ingress` (``processes`` of them on one
    socket) taking ``messages`` from smtp-source -d. The rate is the wall clock's: only under the
    bench lock (`flock /work/bench.lock`) on an otherwise quiet machine does it mean anything."""
    redis_port, port = free_port(), free_port()
    redis = RedisProcess(folder / "redis", host="127.0.0.1", port=redis_port)
    (folder / "redis").mkdir(exist_ok=True)
    redis.start(10.0)
    env = dict(
        os.environ,
        MTAQ_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        MTAQ_LISTEN=f"127.0.0.1:{port}",
        MTAQ_HOSTNAME="mtaq-bench.test",
        MTAQ_PROCESSES=str(processes),
        MTAQ_IN_FLOW_DELAY="0",  # no worker here: nothing would ever catch up
        MTAQ_DKIM_KEYS=str(keys) if keys is not None else "",
    )
    with open(folder / "ingress.log", "ab") as log:
        ingress = subprocess.Popen([sys.executable, "-m", "mtaq", "ingress"], env=env, stdout=log, stderr=log)
    try:
        wait_port(port, proc=ingress)
        before = cpu_seconds(tree([ingress.pid]))
        source = ["smtp-source", "-d", "-s", "20", "-m", str(messages), "-l", "4096", "-M", "smtp-source.test"]
        source += ["-f", "load@loadgen.test", "-t", "u@a.test", f"127.0.0.1:{port}"]
        t0 = time.monotonic()
        subprocess.run(source, check=True, capture_output=True, timeout=600)
        seconds = time.monotonic() - t0
        return (cpu_seconds(tree([ingress.pid])) - before) * 1000 / messages, messages / seconds
    finally:
        ingress.terminate()
        ingress.wait(30)
        redis.stop()


def ingress_ab(messages: int, rounds: int, processes: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        _write(folder, "rsa.pem", rsa.generate_private_key(65537, 2048))
        (folder / "table").write_text("loadgen.test r rsa.pem\n")
        print(
            f"mtaq ingress x {processes}, smtp-source -d, {messages} x 4 KiB, 20 sessions:"
            " ingress CPU ms per message, msgs/s"
        )
        for i in range(rounds):
            for name, keys in (("unsigned", None), ("RSA-2048", folder / "table")):
                run = folder / f"{i}-{name}"
                run.mkdir()
                ms, rate = ingress_cpu_ms(messages, keys, run, processes)
                print(f"  round {i + 1} {name:9} {ms:.3f} ms  {rate:6.0f} msgs/s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per case (default 3)")
    p.add_argument("--ingress", type=int, default=0, help="also measure a running ingress with this many messages")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of --ingress (default 2)")
    p.add_argument("--processes", type=int, default=1, help="ingress processes of --ingress (default 1)")
    args = p.parse_args()
    if args.ingress:
        ingress_ab(args.ingress, args.rounds, args.processes)
    msg = message()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        rsa_pem = _write(folder, "rsa.pem", rsa.generate_private_key(65537, 2048))
        ed_key = ed25519.Ed25519PrivateKey.generate()
        _write(folder, "ed.pem", ed_key)
        cases = {
            "RSA-2048": "example.com r rsa.pem\n",
            "Ed25519": "example.com e ed.pem\n",
            "RSA-2048 + Ed25519": "example.com r rsa.pem\nexample.com e ed.pem\n",
        }
        print(f"{len(msg)}-octet message, CPU ms per message (messages signed): at the ingress, at the worker")
        ms, n = per_message(_prepare(TrustedMail("mx.example.net", None), msg), args.seconds)
        print(f"  {'no key (headers only)':24} {ms:7.3f} ms  ({n})")
        for name, table in cases.items():
            (folder / "table").write_text(table)
            keys = KeyTable(str(folder / "table"))
            prep = TrustedMail("mx.example.net", keys)
            ms, n = per_message(_prepare(prep, msg), args.seconds)
            wms, wn = per_message(_finish(keys, prep, msg), args.seconds)
            print(f"  {name:24} {ms:7.3f} ms  ({n}), {wms:7.3f} ms  ({wn})")
        if importlib.util.find_spec("dkim") is None:
            return
        raw = ed_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        for name, key, alg in (
            ("RSA-2048", rsa_pem, b"rsa-sha256"),
            ("Ed25519", base64.b64encode(raw), b"ed25519-sha256"),
        ):
            ms, n = per_message(_dkimpy(msg, key, alg), args.seconds)
            print(f"  dkimpy.sign {name:12} {ms:7.3f} ms  ({n})")


if __name__ == "__main__":
    main()
