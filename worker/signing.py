"""DKIM at the worker (common/dkim.py signs, common/dkimkeys.py holds the keys):

- ``DeliverySigner`` finishes the signatures the ingress prepared for mail from trusted clients
  (``Envelope.dkim``, ingress/signing.py): the private key's operation over each digest, at
  delivery, so that the ingress's one event loop does not pay it for every message. RSA PKCS#1 v1.5
  and Ed25519 signatures are deterministic: a retry sends the same signature, octet for octet.
- ``ReportSigner`` signs the reports mtaq writes itself (From: MAILER-DAEMON@hostname) when a key
  of ``dkim_keys`` covers the hostname's domain (or a parent of it).
"""

from __future__ import annotations

import dataclasses

from common import dkim
from common.dkimkeys import KeyTable
from common.envelope import Envelope
from common.store import Message

__all__ = ["DeliverySigner", "ReportSigner", "Unsignable"]


class Unsignable(Exception):
    """A signature the ingress prepared cannot be made here: no key for its domain on this worker
    (a deployment whose workers lack the ingress's ``dkim_keys``). The message waits (deferred,
    4.3.5) rather than leave unsigned, as Postfix tempfails mail when its signing milter fails
    (``milter_default_action = tempfail``)."""


class DeliverySigner:
    """``signed(envelope, message, now)``: the message with the signatures its envelope asks for in
    front of it."""

    def __init__(self, keys: KeyTable | None) -> None:
        self.keys = keys

    def signed(self, env: Envelope, message: bytes, now: float) -> bytes:
        if not env.dkim:
            return message
        if self.keys is None:
            raise Unsignable("dkim_keys is not set on this worker")
        fields = []
        for pending in env.dkim:
            key = self.keys.key(pending.domain, pending.selector)
            if key is None or key.algorithm != pending.algorithm:
                return self._afresh(env, message, now)
            fields.append(dkim.finish(pending, key))
        return b"".join(fields) + message

    def _afresh(self, env: Envelope, message: bytes, now: float) -> bytes:
        """A key the ingress prepared for is gone from the table since (rotated out, replaced by
        another algorithm): sign with the keys its From: domain has now, as the ingress would."""
        assert self.keys is not None
        domain = dkim.from_domain(message)
        keys = self.keys.keys_for(domain) if domain else ()
        named = ", ".join(f"d={p.domain} s={p.selector}" for p in env.dkim)
        if not keys:
            raise Unsignable(f"no DKIM key for {named} in dkim_keys on this worker")
        fields = dkim.sign(message, keys, int(now))
        if not fields:  # the ingress could sign it; nothing here should make it unsignable
            raise Unsignable(f"the message cannot be signed again for {named}")
        return fields + message


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
