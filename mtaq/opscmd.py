"""`mtaq exporter` (metrics and the status page for a deployment) and `mtaq health`, and the flag
helper that gives each operator command only the settings it reads."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, NoReturn

from common.address import CannotBind
from common.logging import setup_logging
from common.redisconn import connect
from common.settings import Settings, hostname_problem
from mtaq.ops.exporter import Monitor, serve_in_thread
from mtaq.ops.health import CHECKS, DEFAULT_CHECKS, run_checks
from mtaq.runtime.supervise import EXIT_FATAL

__all__ = [
    "OneLineParser",
    "add_exporter_parser",
    "add_health_parser",
    "add_settings",
    "cmd_exporter",
    "cmd_health",
    "serve_monitor",
]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line with a hint, not the whole usage text (exit 2 as argparse does)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# where Redis is: every operator command needs these
REDIS_SETTINGS = (
    "redis_url",
    "data_dir",
    "queue_name",
    "redis_sentinels",
    "redis_sentinel_master",
    "redis_sentinel_password_file",
    "redis_password_file",
)


def add_settings(parser: argparse.ArgumentParser, names: Sequence[str], *, nested: bool = False) -> None:
    """A ``--name`` flag (and ``--name_with_underscores``) for each named setting, with its help,
    environment variable and default; defaults stay None so that the environment is not
    overridden by a flag that was not given. ``nested``: a sub-command's parser, whose flags must
    not reset what the parent's same flag set (argparse would write its None over it)."""
    unset: Any = argparse.SUPPRESS if nested else None
    by_name = {f.name: f for f in fields(Settings)}
    group = parser.add_argument_group("settings (each also MTAQ_<NAME> in the environment)")
    for name in names:
        f = by_name[name]
        flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
        help_text = f"{f.metadata['help']} [env MTAQ_{name.upper()}, default {f.default!r}]"
        if isinstance(f.default, bool):
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=unset, help=help_text)
        else:
            group.add_argument(*flags, dest=name, type=type(f.default), default=unset, help=help_text)


def _monitor(settings: Settings) -> Monitor:
    return Monitor(connect(settings, timeout=5.0), settings.queue_name, settings.relayhost, settings.hostname)


def serve_monitor(settings: Settings) -> None:
    serve_in_thread(settings.metrics_listen, _monitor(settings))


def add_exporter_parser(sub: Any) -> None:
    p = sub.add_parser(
        "exporter",
        help="Prometheus metrics and the status page for a deployment",
        description="Serve /metrics (Prometheus), / (the status page) and /healthz on metrics_listen; "
        "the numbers come from Redis, so one exporter serves a whole deployment.",
    )
    add_settings(p, (*REDIS_SETTINGS, "metrics_listen", "relayhost", "hostname", "log_level", "log_format"))


def cmd_exporter(settings: Settings) -> int:
    setup_logging("exporter", settings.log_level, settings.log_format)
    if not settings.metrics_listen:
        print("mtaq exporter: say where to listen: --metrics-listen HOST:PORT", file=sys.stderr)
        return 2
    try:
        serve_monitor(settings)
    except OSError as e:
        print(f"mtaq exporter: {CannotBind.because(settings.metrics_listen, e)}", file=sys.stderr)
        return EXIT_FATAL
    threading.Event().wait()  # the listener and the sampler run in daemon threads until a signal
    return 0


def add_health_parser(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="exit 0 only when Redis answers, the ingress greets 220 and a worker is alive",
        description="Each failed check prints one line on stderr. Exit codes: 0 healthy, 1 a check "
        "failed, 3 Redis unreachable.",
    )
    add_settings(p, (*REDIS_SETTINGS, "listen", "metrics_listen", "hostname"))
    p.add_argument(
        "--check",
        action="append",
        choices=CHECKS,
        help=f"run only this check (repeat it; default: {', '.join(DEFAULT_CHECKS)}); "
        "metrics asks metrics_listen for /metrics",
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")


def cmd_health(settings: Settings, checks: Sequence[str] | None, as_json: bool) -> int:
    mon = _monitor(settings)
    results = run_checks(
        settings, mon.redis, mon.workers, checks or DEFAULT_CHECKS, hostname_problem=hostname_problem(settings.hostname)
    )
    ok = all(c.ok for c in results)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [c.to_json() for c in results]}, indent=1))
    else:
        for c in results:
            print(c.line(), file=sys.stdout if c.ok else sys.stderr)
    if any(c.name == "redis" and not c.ok for c in results):
        return 3
    return 0 if ok else 1
