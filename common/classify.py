"""Bounce classification: what a failed delivery means for the sender, as one word an application
can act on (``InvalidRecipient``: stop sending there; ``RateLimited``: slow down ...), from the
enhanced status code and the reply text.

The rules are data (common/classify_rules.toml, format described at its top): an operator edits
them, tests/data/bounce_corpus.txt holds real-world replies with the class each must get. Pure:
``Classifier.classify(dsn, reply)`` reads nothing but its rules.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from enum import Enum
from functools import cache, lru_cache
from pathlib import Path

__all__ = ["DEFAULT_RULES", "BadRules", "BounceClass", "Classifier", "classify", "default_classifier", "use_rules"]

DEFAULT_RULES = Path(__file__).with_name("classify_rules.toml")


class BounceClass(str, Enum):
    INVALID_RECIPIENT = "InvalidRecipient"
    MAILBOX_FULL = "MailboxFull"
    MESSAGE_TOO_LARGE = "MessageTooLarge"
    SPAM_BLOCK = "SpamBlock"
    SPAM_CONTENT = "SpamContent"
    POLICY_RELATED = "PolicyRelated"
    AUTHENTICATION_FAILURE = "AuthenticationFailure"
    RATE_LIMITED = "RateLimited"
    DNS_FAILURE = "DNSFailure"
    TLS_FAILURE = "TLSFailure"
    CONNECTION_FAILURE = "ConnectionFailure"
    TIMEOUT = "Timeout"
    OTHER = "Other"


class BadRules(ValueError):
    """The rules file cannot be used; the message is one line naming the file and the rule."""


_CODE = re.compile(r"([245x])\.(\d{1,3}|x)\.(\d{1,3}|x)")
_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
# worker/relay.py puts "host H said: " before a remote reply: the host's name is not its wording
# (a host called spamtrap.example must not make every reply SpamContent)
_HOST_SAID = re.compile(r"^host \S+ said: ")


@dataclass(frozen=True, slots=True)
class _Rule:
    klass: BounceClass
    codes: tuple[tuple[str, str, str], ...]
    text: tuple[re.Pattern[str], ...]

    def matches(self, code: tuple[str, str, str] | None, text: str) -> bool:
        if self.codes and (code is None or not any(_code_matches(c, code) for c in self.codes)):
            return False
        return not self.text or any(p.search(text) for p in self.text)


def _code_matches(pattern: tuple[str, str, str], code: tuple[str, str, str]) -> bool:
    return all(p in ("x", c) for p, c in zip(pattern, code, strict=True))


class Classifier:
    def __init__(self, rules: list[_Rule], source: str = "") -> None:
        self.rules = rules
        self.source = source

    @classmethod
    def load(cls, path: str | Path = DEFAULT_RULES) -> Classifier:
        """Read a rules file; BadRules (one line) when it cannot be used."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise BadRules(f"classification rules {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise BadRules(f"classification rules {path}: {e}") from None
        return cls(_parse(data, str(path)), str(path))

    def classify(self, dsn: str, reply: str) -> BounceClass:
        """The class of a failure given its enhanced status code (``"5.1.1"``; "" when none) and
        its reply text. A code missing from ``dsn`` is looked for in the text."""
        text = _HOST_SAID.sub("", reply.strip())
        found = _CODE.fullmatch(dsn.strip()) if dsn else None
        code = found.groups() if found else None
        if code is None:
            m = _ENHANCED.search(text)
            code = m.groups() if m else None
        for rule in self.rules:
            if rule.matches(code, text):  # type: ignore[arg-type]
                return rule.klass
        return BounceClass.OTHER


def _parse(data: dict[str, object], source: str) -> list[_Rule]:
    raw = data.get("rule")
    if not isinstance(raw, list) or not raw:
        raise BadRules(f"classification rules {source}: no [[rule]] tables")
    rules: list[_Rule] = []
    for n, item in enumerate(raw, 1):
        where = f"classification rules {source}, rule {n}"
        if not isinstance(item, dict):
            raise BadRules(f"{where}: not a table")
        unknown = set(item) - {"class", "codes", "text"}
        if unknown:
            raise BadRules(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (class, codes, text)")
        try:
            klass = BounceClass(item.get("class"))
        except ValueError:
            names = ", ".join(c.value for c in BounceClass)
            raise BadRules(f"{where}: class {item.get('class')!r} is not one of {names}") from None
        codes = _strings(item.get("codes", []), where, "codes")
        texts = _strings(item.get("text", []), where, "text")
        if not codes and not texts:
            raise BadRules(f"{where}: give codes, text or both")
        parsed_codes: list[tuple[str, str, str]] = []
        for c in codes:
            m = _CODE.fullmatch(c.strip().lower())
            if m is None:
                raise BadRules(f"{where}: {c!r} is not an enhanced status code like 5.1.1 or x.7.x")
            parsed_codes.append(m.groups())  # type: ignore[arg-type]
        patterns: list[re.Pattern[str]] = []
        for t in texts:
            try:
                patterns.append(re.compile(t, re.IGNORECASE))
            except re.error as e:
                raise BadRules(f"{where}: text {t!r} is not a regular expression: {e}") from None
        rules.append(_Rule(klass, tuple(parsed_codes), tuple(patterns)))
    return rules


def _strings(value: object, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRules(f"{where}: {key} must be a list of strings")
    return list(value)


@cache
def default_classifier() -> Classifier:
    """The rules shipped beside this module, read once per process."""
    return Classifier.load(DEFAULT_RULES)


_chosen: list[Classifier] = []  # the operator's rules (setting bounce_rules), once use_rules ran


def use_rules(path: str) -> Classifier:
    """From now on this process classifies with the rules in ``path`` (BadRules, one line, if they
    cannot be used: the process should not start)."""
    chosen = Classifier.load(path)
    _chosen[:] = [chosen]
    classify.cache_clear()
    return chosen


@lru_cache(maxsize=4096)
def classify(dsn: str, reply: str) -> BounceClass:
    """The class by this process's rules (cached: the log line, the event and the metrics of one
    failure ask the same question, and a destination that refuses repeats its words)."""
    return (_chosen[0] if _chosen else default_classifier()).classify(dsn, reply)
