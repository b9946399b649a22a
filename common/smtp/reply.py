"""One SMTP reply: a basic code, an RFC 3463 enhanced status code and a text.

The ingress builds its catalogue of replies from it (ingress/replies.py) and writes them with
``to_bytes``; the client reads a server's reply into it with ``Reply.parse``. ``str()`` is the form
logs and DSNs show, ``550 5.1.1 no such user``, for both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.envelope import RcptState, outcome_of

__all__ = ["Reply"]

_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?: |$)")  # matched on text whose spaces are single


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str  # RFC 3463 "class.subject.detail", or "" where there is none (RFC 2034 §3)
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced and self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {self.enhanced} does not match class of {self.code}")

    @classmethod
    def parse(cls, code: int, raw: bytes | str) -> Reply:
        """A server's reply from its code and text (the lines' texts joined): whitespace runs
        become one space, as Postfix logs replies, and a leading enhanced code of the reply's own
        class is taken out of the text. One of another class stays in the text, not trusted."""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        text = " ".join(text.split())
        m = _ENHANCED.match(text)
        if m and text[0] == str(code)[0]:
            return cls(code, m.group(1), text[m.end() :])
        return cls(code, "", text)

    @property
    def dsn(self) -> str:
        """The enhanced status code, else one derived from the basic code (RFC 3463 §3.1)."""
        if self.enhanced:
            return self.enhanced
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def outcome(self) -> RcptState:
        """What this reply means for a recipient it decides: DELIVERED, BOUNCED or DEFERRED."""
        return outcome_of(self.code)

    def lines(self) -> list[str]:
        """The text lines, CR and LF never inside one (a reply can never inject a line)."""
        return [line.replace("\r", "") for line in self.text.split("\n")]

    def to_bytes(self) -> bytes:
        """Wire form: ``250-2.1.0 a\\r\\n250 2.1.0 b\\r\\n`` (RFC 5321 §4.2.1; the enhanced code on
        every line, RFC 2034 §4)."""
        lines = self.lines()
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)
