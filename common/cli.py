"""The `mtaq` command: run (all in one), ingress, worker, queue (mailq), passwd."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import logging
import os
import sys
from collections.abc import Sequence

from common.settings import Settings, add_arguments

__all__ = ["main"]

log = logging.getLogger("mtaq")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these exact settings."""
    env = dict(os.environ)
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        env[f"MTAQ_{f.name.upper()}"] = ("yes" if value else "no") if isinstance(value, bool) else str(value)
    return env


def cmd_run(settings: Settings) -> int:
    from common.embedded import EmbeddedRedis
    from common.logging import setup_logging
    from common.supervise import Child, Supervisor

    setup_logging("run", settings.log_level, settings.log_format)
    # redis-server and the children run in their own sessions, so a terminal's Ctrl-C reaches this
    # process only: the supervisor stops the ingress and the workers (they finish what is in flight,
    # and need Redis for it), and only then, in `finally`, Redis. The supervisor also restarts Redis
    # if it dies (EmbeddedRedis.watch).
    embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir, appendfsync=settings.redis_appendfsync)
    try:
        if embedded is not None:
            embedded.start()
            log.info("embedded redis-server on %s (AOF, appendfsync %s)", embedded.socket, settings.redis_appendfsync)
            settings = settings.replace(redis_url=embedded.url)
        if settings.metrics_listen:
            serve_monitor(settings)
        # the children count into Redis; this process alone serves the listener
        env = settings_env(settings.replace(processes=settings.processes or 1, metrics_listen=""))
        me = [sys.executable, "-m", "common.cli"]
        children = [Child("ingress", argv=[*me, "ingress"], env=env)]
        children += [Child(f"worker-{i + 1}", argv=[*me, "worker"], env=env) for i in range(settings.workers)]
        log.info("mtaq: SMTP on %s, %d worker(s); Ctrl-C stops", settings.listen, settings.workers)
        return Supervisor(
            children, stop_timeout=settings.shutdown_grace + 10, watch=embedded.watch if embedded is not None else None
        ).run()
    finally:
        if embedded is not None and embedded.proc is not None:  # last: the children are gone
            embedded.stop()
            log.info("embedded redis-server stopped; queue kept in %s", settings.data_dir)


def serve_monitor(settings: Settings) -> None:
    from common.exporter import Monitor, serve_in_thread
    from common.redisconn import connect

    serve_in_thread(
        settings.metrics_listen,
        Monitor(connect(settings), settings.queue_name, settings.relayhost, settings.hostname),
    )


def attach_metrics(settings: Settings) -> None:
    from common import metrics
    from common.redisconn import connect

    metrics.attach(connect(settings))


def cmd_ingress(settings: Settings) -> int:
    from ingress.process import main as ingress_main

    attach_metrics(settings)
    if settings.metrics_listen:
        serve_monitor(settings)
    return ingress_main(settings)


def cmd_worker(settings: Settings, burst: bool = False) -> int:
    from worker.process import main as worker_main

    attach_metrics(settings)
    return worker_main(settings, burst=burst)


def cmd_exporter(settings: Settings) -> int:
    import threading

    from common.logging import setup_logging

    setup_logging("exporter", settings.log_level, settings.log_format)
    if not settings.metrics_listen:
        print("mtaq exporter: say where to listen: --metrics-listen HOST:PORT", file=sys.stderr)
        return 2
    serve_monitor(settings)
    threading.Event().wait()
    return 0


def cmd_health(settings: Settings, checks: list[str], as_json: bool) -> int:
    import json

    from common.exporter import Monitor
    from common.health import run_checks
    from common.redisconn import connect

    r = connect(settings, timeout=5.0)
    mon = Monitor(r, settings.queue_name, settings.relayhost, settings.hostname)
    results = run_checks(settings, r, mon.workers, checks)
    if as_json:
        print(json.dumps({"ok": all(c.ok for c in results), "checks": [c.to_json() for c in results]}, indent=1))
    else:
        for c in results:
            print(c.line(), file=sys.stdout if c.ok else sys.stderr)
    if not results[0].ok and results[0].name == "redis":
        return 3
    return 0 if all(c.ok for c in results) else 1


def cmd_passwd(settings: Settings, user: str) -> int:
    from ingress.auth import set_password

    if not settings.auth_file:
        print("mtaq passwd: say where the credentials live: --auth-file PATH (or MTAQ_AUTH_FILE)", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {user}: ")
        if password != getpass.getpass("again: "):
            print("mtaq passwd: the passwords differ; nothing changed", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("mtaq passwd: empty password refused", file=sys.stderr)
        return 1
    set_password(settings.auth_file, user, password)
    print(f"mtaq passwd: {user} set in {settings.auth_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtaq", description="mtaq mail transfer agent")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="all in one: embedded Redis, one ingress, N workers")
    add_arguments(run, "run")
    ing = sub.add_parser("ingress", help="the SMTP server")
    add_arguments(ing, "ingress")
    wrk = sub.add_parser("worker", help="an RQ delivery worker (with the retry scheduler)")
    add_arguments(wrk, "worker")
    wrk.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    exp = sub.add_parser("exporter", help="Prometheus metrics and the status page for a deployment")
    add_arguments(exp, "exporter")
    hl = sub.add_parser("health", help="exit 0 only when Redis answers, the ingress greets 220 and a worker is alive")
    add_arguments(hl, "health")
    hl.add_argument(
        "--check",
        action="append",
        choices=["redis", "ingress", "worker", "metrics"],
        help="run only these checks (repeat; default: redis, ingress, worker)",
    )
    hl.add_argument("--json", action="store_true", help="the results as one JSON object")
    q = sub.add_parser("queue", help="show the queue, like mailq; flush or delete")
    add_arguments(q, "queue")
    q.add_argument("action", nargs="?", default="list", choices=["list", "stats", "flush", "sweep", "delete"])
    q.add_argument("ids", nargs="*", help="queue ids for delete")
    pw = sub.add_parser("passwd", help="add or change an AUTH user (password read from stdin or prompt)")
    add_arguments(pw, "passwd")
    pw.add_argument("--auth-file", "--auth_file", dest="auth_file", default=None)
    pw.add_argument("user")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_args(args)
    except ValueError as e:
        print(f"mtaq: {e}", file=sys.stderr)
        return 2
    from common.redisconn import NoRedis

    try:
        if args.command == "run":
            return cmd_run(settings)
        if args.command == "ingress":
            return cmd_ingress(settings)
        if args.command == "worker":
            return cmd_worker(settings, args.burst)
        if args.command == "exporter":
            return cmd_exporter(settings)
        if args.command == "health":
            return cmd_health(settings, args.check or ["redis", "ingress", "worker"], args.json)
        if args.command == "passwd":
            return cmd_passwd(settings, args.user)
        from common.queuecli import cmd_queue

        return cmd_queue(settings, args.action, args.ids)
    except NoRedis as e:
        print(f"mtaq: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
