"""The `mtaq` command: run (all in one), ingress, worker, exporter, queue (mailq), health, passwd,
dkim, suppress, events."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Sequence

import redis

from common import metrics
from common.address import CannotBind, bind_listener
from common.classify import BadRules, use_rules
from common.dkimkeys import KeyTableError, load_table
from common.logging import setup_logging
from common.redisconn import NoRedis, connect
from common.settings import Settings, add_arguments, hostname_problem
from common.store import open_layout_gate
from common.transport import TransportTable, TransportTableError
from ingress.auth import set_password
from mtaq.dkimcmd import add_dkim_parser, cmd_dkim
from mtaq.opscmd import OneLineParser, add_exporter_parser, add_health_parser, cmd_exporter, cmd_health, serve_monitor
from mtaq.queuecmd import QueueUsage, add_queue_parser, cmd_queue
from mtaq.runtime.embedded import EmbeddedRedis, EmbeddedRedisError
from mtaq.runtime.lifeline import SUPERVISOR_ENV, die_with_supervisor
from mtaq.runtime.supervise import EXIT_FATAL, Child, Supervisor
from mtaq.suppresscmd import add_suppress_parser, cmd_events, cmd_suppress
from mtaq.tlsrptcmd import TLSRPTUsage, add_tlsrpt_parser, cmd_tlsrpt
from worker.smarthost import SmarthostError, smarthost_from_settings
from worker.webhook import SecretError
from worker.webhook import check_settings as check_webhook

__all__ = ["main"]

log = logging.getLogger("mtaq")


def warn_hostname(settings: Settings) -> None:
    problem = hostname_problem(settings.hostname)
    if problem:
        log.warning("%s", problem)


def cmd_run(settings: Settings) -> int:
    setup_logging("run", settings.log_level, settings.log_format)
    # redis-server and the children run in their own sessions, so a terminal's Ctrl-C reaches this
    # process only: the supervisor stops the ingress and the workers (they finish what is in flight,
    # and need Redis for it), and only then, in `finally`, Redis. The supervisor also restarts Redis
    # if it dies (EmbeddedRedis.watch).
    embedded = None if settings.redis_url or settings.redis_sentinels else EmbeddedRedis.from_settings(settings)
    try:
        if embedded is not None:
            embedded.lock()  # another run on this data_dir: one line, before anything starts
        bind_listener(*settings.listen_addr).close()  # the port in use: the same, before Redis starts
        if settings.dkim_keys:
            load_table(settings.dkim_keys)  # a bad key: the same (the children would each say it)
        if settings.transport_table:
            TransportTable(settings.transport_table)  # and a bad route
        smarthost_from_settings(settings)  # and relayhost credentials that cannot be read
        warn_hostname(settings)
        if embedded is not None:
            embedded.start()
            log.info("embedded redis-server on %s (AOF, appendfsync %s)", embedded.socket, settings.redis_appendfsync)
            settings = settings.replace(redis_url=embedded.url)
            # this Redis is ours alone, and every process on it is started here, of this version:
            # the layout gate opens now, not once the first worker has registered (new mail in the
            # meantime would be written in the older layout)
            open_layout_gate(settings.redis_url)
        if settings.metrics_listen:
            serve_monitor(settings)
        # the children count into Redis (common/metrics.py); this process alone serves the listener
        env = {**os.environ, **settings.replace(processes=settings.processes or 1, metrics_listen="").to_env()}
        me = [sys.executable, "-m", "mtaq"]
        children = [Child("ingress", argv=[*me, "ingress"], env=env)]
        children += [Child(f"worker-{i + 1}", argv=[*me, "worker"], env=env) for i in range(settings.workers)]
        log.info("mtaq: SMTP on %s, %d worker(s); Ctrl-C stops", settings.listen, settings.workers)
        return Supervisor(
            children, stop_timeout=settings.stop_timeout, watch=embedded.watch if embedded is not None else None
        ).run()
    finally:
        if embedded is not None:  # last: the children are gone
            was_running = embedded.proc is not None
            embedded.stop()
            if was_running:
                log.info("embedded redis-server stopped; queue kept in %s", settings.data_dir)


def cmd_ingress(settings: Settings) -> int:
    if SUPERVISOR_ENV not in os.environ:  # under `mtaq run`, the run has said it
        setup_logging("ingress", settings.log_level, settings.log_format)
        warn_hostname(settings)
    metrics.attach(connect(settings))
    if settings.metrics_listen:
        try:
            serve_monitor(settings)  # in the parent: forked ingress children count into Redis
        except OSError as e:
            raise CannotBind.because(settings.metrics_listen, e) from None
    from mtaq.runtime.prefork import run_ingress  # the role's code only where it runs (see main)

    return run_ingress(settings)


def cmd_worker(settings: Settings, burst: bool = False) -> int:
    if SUPERVISOR_ENV not in os.environ:
        setup_logging("worker", settings.log_level, settings.log_format)
        warn_hostname(settings)
    metrics.attach(connect(settings))
    from worker.process import main as worker_main  # the role's code only where it runs (see main)

    return worker_main(settings, burst=burst)


def cmd_passwd(settings: Settings, user: str) -> int:
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
    p = OneLineParser(prog="mtaq", description="mtaq mail transfer agent")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="all in one: embedded Redis, one ingress, N workers")
    add_arguments(run, "run")
    ing = sub.add_parser("ingress", help="the SMTP server")
    add_arguments(ing, "ingress")
    wrk = sub.add_parser("worker", help="an RQ delivery worker (with the retry scheduler)")
    add_arguments(wrk, "worker")
    wrk.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    add_exporter_parser(sub)
    add_queue_parser(sub)
    add_health_parser(sub)
    add_suppress_parser(sub)
    ev = sub.add_parser("events", help="the webhook sender alone (else the workers run it): events POSTed, signed")
    add_arguments(ev, "events")
    add_tlsrpt_parser(sub)
    pw = sub.add_parser("passwd", help="add or change an AUTH user (password read from stdin or prompt)")
    add_arguments(pw, "passwd")
    pw.add_argument(
        "--auth-file", "--auth_file", dest="auth_file", default=None, help="the credentials file the ingress reads"
    )
    pw.add_argument("user", help="the user name clients give to AUTH")
    add_dkim_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # The ingress's and the worker's code are imported by their commands (cmd_ingress, cmd_worker),
    # not here: every `mtaq queue ...` an operator types, and each of the others, starts ~0.1 s
    # sooner without them.
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_args(args)
    except ValueError as e:
        print(f"mtaq: {e}", file=sys.stderr)
        return 2
    if args.command in ("ingress", "worker", "events"):
        die_with_supervisor()  # started by `mtaq run`: do not outlive it
    try:
        if args.command in ("run", "worker", "events"):
            check_webhook(settings)  # a missing secret file: one line before anything starts
        if settings.bounce_rules:
            use_rules(settings.bounce_rules)  # BadRules: one line, before anything starts
        if args.command == "run":
            return cmd_run(settings)
        if args.command == "ingress":
            return cmd_ingress(settings)
        if args.command == "worker":
            return cmd_worker(settings, args.burst)
        if args.command == "passwd":
            return cmd_passwd(settings, args.user)
        if args.command == "dkim":
            return cmd_dkim(settings, args)
        if args.command == "exporter":
            return cmd_exporter(settings)
        if args.command == "health":
            return cmd_health(settings, args.check, args.json)
        if args.command == "suppress":
            return cmd_suppress(settings, args)
        if args.command == "events":
            return cmd_events(settings)
        if args.command == "tlsrpt":
            return cmd_tlsrpt(settings, args.date)
        return cmd_queue(settings, args)
    except QueueUsage as e:
        print(f"mtaq queue: {e}", file=sys.stderr)
        return 2
    except (SecretError, BadRules) as e:
        print(f"mtaq: {e}", file=sys.stderr)
        return EXIT_FATAL  # a restart cannot help: the file must be fixed
    except TLSRPTUsage as e:
        print(f"mtaq tlsrpt: {e}", file=sys.stderr)
        return 2
    except (CannotBind, KeyTableError, TransportTableError, SmarthostError) as e:
        print(f"mtaq: {e}", file=sys.stderr)
        return EXIT_FATAL  # the supervisor does not restart a child that says this
    except NoRedis as e:
        print(f"mtaq: {e}", file=sys.stderr)
        return 3 if args.command in ("queue", "health", "suppress") else 1
    except EmbeddedRedisError as e:
        print(f"mtaq: {e}", file=sys.stderr)
        return 1
    except redis.ConnectionError as e:  # a worker whose Redis went away for good (RQ retries first)
        print(f"mtaq: lost Redis: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
