"""DKIM signatures on the reports mtaq writes itself (From: MAILER-DAEMON@hostname): signed when
a key of ``dkim_keys`` covers the hostname's domain (or a parent of it), as mail from a trusted
client is at the ingress (ingress/signing.py), with the same signer (common/dkim.py)."""

from __future__ import annotations

import dataclasses

from common import dkim
from common.dkimkeys import KeyTable
from common.store import Message

__all__ = ["ReportSigner"]


class ReportSigner:
    """``signer(report, now)``: the report signed, or as it was when no key covers its From:."""

    def __init__(self, keys: KeyTable | None) -> None:
        self.keys = keys

    def __call__(self, report: Message, now: float) -> Message:
        if self.keys is None:
            return report
        domain = dkim.from_domain(report.body)
        keys = self.keys.keys_for(domain) if domain else ()
        if not keys:
            return report
        body, converted = dkim.sign_7bit(report.body, keys, int(now))
        env = report.envelope
        if converted:
            env = dataclasses.replace(env, body_8bit=False)
        return Message(env, body)
