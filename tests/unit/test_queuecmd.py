from __future__ import annotations

import io

import fakeredis
import pytest

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.store import Message, Store
from mtaq.queuecmd import format_queue


@pytest.fixture
def store() -> Store:
    s = Store(fakeredis.FakeRedis())
    env = Envelope(
        id="Q1",
        sender="a@x.test",
        recipients=[Recipient("b@y.test"), Recipient("c@z.test")],
        received_at=1_700_000_000.0,
    )
    s.commit([Message(env, b"x" * 2048)])
    return s


def test_empty_queue() -> None:
    out = io.StringIO()
    format_queue(Store(fakeredis.FakeRedis()), out)
    assert out.getvalue() == "Mail queue is empty\n"


def test_listing_shows_sender_pending_recipients_and_deferral_reason(store: Store) -> None:
    out = io.StringIO()
    format_queue(store, out)
    assert "Q1*" in out.getvalue()  # never tried yet: Postfix marks the active queue with *
    store.set_statuses(
        {
            "Q1": {
                0: RecipientStatus(
                    RcptState.DEFERRED, 1, "4.4.1", "connect to mx.y.test[127.0.0.2]:25: Connection refused"
                ),
                1: RecipientStatus(RcptState.DELIVERED, 1, "2.0.0", "250 ok"),
            }
        }
    )
    out = io.StringIO()
    format_queue(store, out)
    text = out.getvalue()
    assert "Q1 " in text and "a@x.test" in text and "2048" in text
    assert "(connect to mx.y.test[127.0.0.2]:25: Connection refused)" in text
    assert "b@y.test" in text and "c@z.test" not in text  # delivered recipients are not listed
    assert text.endswith("-- 2 Kbytes in 1 Request.\n")
