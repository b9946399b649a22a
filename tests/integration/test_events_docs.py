"""The README's sample event and ten-line webhook receiver are what mtaq sends and what works: the
receiver (run on loopback) accepts a body signed as worker/webhook.py signs it and refuses others."""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common.events import SIGNATURE_HEADER, Event, sign

ROOT = Path(__file__).resolve().parents[2]
KEY = b"docs-secret"


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Delivery events and suppression")
    return text[start : text.index("\n## ", start + 10)]


def _block(lang: str, text: str) -> str:
    m = re.search(rf"```{lang}\n(.*?)```", text, re.S)
    assert m is not None
    return m.group(1)


def test_the_sample_event_has_every_field() -> None:
    sample = json.loads(_block("json", _section()))
    ev = Event.from_fields({k: str(v) for k, v in sample.items()})
    assert ev.to_json_obj() == sample


def test_the_ten_line_receiver_checks_the_signature() -> None:
    code = _block("python", _section())
    assert len(code.splitlines()) <= 10
    assert code in (ROOT / "docs" / "events.md").read_text()  # one receiver, shown twice
    code = code.replace('open("/etc/mtaq/webhook.secret", "rb").read().strip()', repr(KEY))
    code = code.replace('hs.HTTPServer(("127.0.0.1", 8080), Hook).serve_forever()', "")
    ns: dict[str, Any] = {}
    exec(compile(code, "README receiver", "exec"), ns)
    server = http.server.HTTPServer(("127.0.0.1", 0), ns["Hook"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    body = json.dumps([{"id": "1", "type": "delivery", "recipient": "a@b", "classification": ""}]).encode()

    def post(signature: str) -> int:
        req = urllib.request.Request(url, data=body, headers={SIGNATURE_HEADER: signature}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    try:
        assert post(sign(KEY, body)) == 204
        assert post(sign(b"wrong", body)) == 401
        assert post("") == 401
    finally:
        server.shutdown()
        server.server_close()
