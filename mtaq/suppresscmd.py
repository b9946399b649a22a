"""`mtaq suppress`: the suppression list (common/suppression.py) for an operator: list, add,
remove, import, export. Exit codes: 0 done, 1 not found or nothing to do, 2 usage, 3 Redis
unreachable. And `mtaq events`, the webhook sender as a process of its own (worker/webhook.py)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

import redis

from common.logging import setup_logging
from common.redisconn import connect
from common.settings import Settings
from common.suppression import SuppressionList, normalize
from mtaq.opscmd import REDIS_SETTINGS, add_settings
from worker.webhook import sender_from_settings

__all__ = ["add_suppress_parser", "cmd_events", "cmd_suppress"]


def add_suppress_parser(sub: Any) -> None:
    p = sub.add_parser(
        "suppress",
        help="the suppression list: addresses refused at RCPT after a hard bounce (list, add, remove, import, export)",
        description="Addresses on the list get 550 5.1.1 at RCPT from every ingress until their time is up. "
        "Exit codes: 0 done, 1 not found or nothing to do, 2 usage, 3 Redis unreachable.",
    )
    add_settings(p, (*REDIS_SETTINGS, "suppression_ttl"))
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    ls = acts.add_parser("list", help="every address suppressed now, since when and until when")
    ls.add_argument("--json", action="store_true", help="one JSON array")
    add = acts.add_parser("add", help="suppress an address")
    add.add_argument("address")
    add.add_argument("--ttl", type=float, metavar="S", help="seconds (default: suppression_ttl)")
    rm = acts.add_parser("remove", help="take an address off the list")
    rm.add_argument("address")
    im = acts.add_parser("import", help="suppress the addresses of a file, one a line ('-': standard input)")
    im.add_argument("file")
    im.add_argument("--ttl", type=float, metavar="S", help="seconds (default: suppression_ttl)")
    acts.add_parser("export", help="the addresses suppressed now, one a line (what import reads)")


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _valid(address: str) -> bool:
    local, at, domain = normalize(address).rpartition("@")
    return bool(at and local and domain and " " not in address.strip())


def cmd_suppress(
    settings: Settings, args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    action = args.action or "list"
    ttl = args.ttl if getattr(args, "ttl", None) is not None else settings.suppression_ttl
    if action in ("add", "import") and ttl <= 0:
        print(f"mtaq suppress {action}: the time must be more than 0 s (--ttl S)", file=err)
        return 2
    try:
        sl = SuppressionList(connect(settings, timeout=10.0))
        sl.redis.ping()
        if action == "list":
            entries = sl.entries()
            if args.json:
                rows = [{"address": e.address, "since": _when(e.since), "until": _when(e.until)} for e in entries]
                print(json.dumps(rows, indent=1), file=out)
            else:
                for e in entries:
                    print(f"{e.address:<50} since {_when(e.since)}  until {_when(e.until)}", file=out)
            return 0
        if action == "export":
            for e in sl.entries():
                print(e.address, file=out)
            return 0
        if action == "add":
            if not _valid(args.address):
                print(f"mtaq suppress add: {args.address!r} is not an address (local@domain)", file=err)
                return 2
            sl.add([args.address], ttl)
            print(f"{normalize(args.address)} suppressed until {_when(sl.clock() + ttl)}", file=out)
            return 0
        if action == "remove":
            if not sl.remove([args.address]):
                print(f"mtaq suppress remove: {normalize(args.address)} is not on the list", file=err)
                return 1
            print(f"{normalize(args.address)} removed", file=out)
            return 0
        return _import(sl, args.file, ttl, out, err)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        where = settings.redis_url or f"the embedded Redis in {settings.data_dir}"
        print(f"mtaq suppress: Redis unreachable at {where} ({e}); is it running? (--redis-url)", file=err)
        return 3


def _import(sl: SuppressionList, path: str, ttl: float, out: TextIO, err: TextIO) -> int:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except (OSError, UnicodeDecodeError) as e:
        print(f"mtaq suppress import: cannot read {path}: {getattr(e, 'strerror', None) or e}", file=err)
        return 1
    good: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not _valid(line):
            print(f"mtaq suppress import: {path}:{n}: {line!r} is not an address; nothing imported", file=err)
            return 2
        good.append(line)
    if not good:
        print(f"mtaq suppress import: no address in {path}", file=err)
        return 1
    print(f"{sl.add(good, ttl)} address(es) suppressed until {_when(sl.clock() + ttl)}", file=out)
    return 0


def cmd_events(settings: Settings) -> int:
    """`mtaq events`: send the webhook until SIGTERM/SIGINT (one sender per deployment: the lease)."""
    setup_logging("events", settings.log_level, settings.log_format)
    if not settings.events_webhook:
        print("mtaq events: say where to send: --events-webhook URL (or MTAQ_EVENTS_WEBHOOK)", file=sys.stderr)
        return 2
    sender = sender_from_settings(settings, connect(settings, timeout=30.0))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    sender.run(stopping)
    return 0
