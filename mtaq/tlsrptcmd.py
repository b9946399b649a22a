"""`mtaq tlsrpt send [--date D]`: the TLS-RPT reports (RFC 8460) of one UTC day, now (the workers
also send yesterday's once a day, worker/tlsrpt.py ``send_daily``)."""

from __future__ import annotations

import datetime
import time
from typing import Any

from common.mx import make_resolver
from common.redisconn import connect
from common.settings import Settings
from common.spool import Spool
from mtaq.opscmd import REDIS_SETTINGS, add_settings
from worker.tlspolicy import TrustAnchors
from worker.tlsrpt import send_reports

__all__ = ["TLSRPTUsage", "add_tlsrpt_parser", "cmd_tlsrpt"]


class TLSRPTUsage(Exception):
    """A bad argument: one line on stderr, exit 2."""


def add_tlsrpt_parser(sub: Any) -> None:
    p = sub.add_parser("tlsrpt", help="TLS-RPT (RFC 8460) reports to the domains that ask for them")
    acts = p.add_subparsers(dest="tlsrpt_action", required=True)
    send = acts.add_parser("send", help="send one day's reports now (default: yesterday, UTC)")
    send.add_argument("--date", default=None, help="the UTC day, YYYY-MM-DD")
    add_settings(send, (*REDIS_SETTINGS, "hostname", "dns_servers", "tls_ca_file", "relayhost"), nested=True)


def cmd_tlsrpt(settings: Settings, date: str | None) -> int:
    now = time.time()
    day = date or (datetime.datetime.fromtimestamp(now, datetime.UTC) - datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    try:
        datetime.date.fromisoformat(day)
    except ValueError:
        raise TLSRPTUsage(f"--date {day!r} is not a day: say YYYY-MM-DD") from None
    r = connect(settings)
    spool = Spool.from_settings(settings, r)
    resolver = make_resolver(settings.dns_server_list)
    context = TrustAnchors(settings.tls_ca_file).context()
    sent = send_reports(day, r, resolver, settings.hostname, now, queue=spool.commit, context=context)
    if not sent:
        print(f"mtaq tlsrpt: no report for {day} (no policy domain counted, or none publishes _smtp._tls)")
    for s in sent:
        where = ", ".join([*(f"mailto:{a}" for a in s.mailto), *s.https])
        print(f"{day} {s.domain}: {where}")
        for problem in s.problems:
            print(f"  not taken: {problem}")
    return 1 if any(s.problems for s in sent) else 0
