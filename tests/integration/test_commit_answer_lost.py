"""A group commit whose answer is lost: one real redis-server (no replicas required) applies the
MULTI/EXEC, and the connection breaks before its reply reaches the ingress (the chaos test's Redis
killed mid-commit: restarted from its AOF it had the batch, and the 451 its clients got made ten of
them send a second copy). Between the committer and Redis sits a TCP relay that forwards every
byte but drops the connection, unanswered, on the first reply that follows an EXEC."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import redis

from common.envelope import Envelope, Recipient
from common.redisconn import connect
from common.settings import Settings
from common.spool import Spool
from common.store import Message, msg_key
from ingress.commit import Committer
from tests.redisserver import RedisServer
from tests.tcprelay import TcpRelay, Verdict


class AnswerEater(TcpRelay):
    """127.0.0.1:<port> -> Redis; the first reply after the client sent EXEC is not relayed: both
    sides of that connection are closed instead (Redis has run the transaction)."""

    def __init__(self, target_port: int) -> None:
        self.armed = threading.Event()
        self.armed.set()
        self.eaten = threading.Event()
        super().__init__(target_port)

    def verdict(self, data: bytes, up: bool, state: dict[str, object]) -> Verdict:
        if up and b"EXEC" in data.upper():
            state["exec_sent"] = True
        if not up and state.get("exec_sent") and self.armed.is_set():
            self.armed.clear()
            self.eaten.set()
            return Verdict.CUT  # the answer goes nowhere
        return Verdict.FORWARD


@pytest.fixture
def eater(redis_server: RedisServer) -> Iterator[AnswerEater]:
    with AnswerEater(redis_server.port) as relay:
        yield relay


def _message(qid: str) -> Message:
    env = Envelope(id=qid, sender="a@client.test", recipients=[Recipient(f"u-{qid}@a.test")])
    return Message(env, b"Subject: lost answer\r\n\r\nbody\r\n")


def test_a_commit_redis_stored_whose_answer_was_lost_is_answered_250_and_stored_once(
    redis_server: RedisServer, eater: AnswerEater
) -> None:
    settings = Settings().replace(redis_url=f"redis://127.0.0.1:{eater.port}")
    # connect(): the client every mtaq process makes (one attempt a command, no retries of its own)
    spool = Spool.from_settings(settings, connect(settings, timeout=5))
    direct = redis.Redis(port=redis_server.port)

    async def go() -> list[object]:
        c = Committer(spool)
        return list(await asyncio.gather(*(c.submit(_message(f"LOST{i}")) for i in range(3)), return_exceptions=True))

    outcomes = asyncio.run(go())
    assert eater.eaten.is_set(), "the relay never dropped an EXEC's answer: the test tested nothing"
    assert outcomes == [None, None, None], f"a client was refused a message Redis had stored: {outcomes}"
    for i in range(3):
        assert direct.exists(msg_key(f"LOST{i}"))
    # stored once: each id once in the destination's pending list, the queue counted once
    pending = [k for k in direct.scan_iter("mtaq:pend:*")]
    ids = [x.decode() for k in pending for x in direct.lrange(k, 0, -1) if isinstance(x, bytes)]
    assert sorted(ids) == ["LOST0", "LOST1", "LOST2"], ids
    assert spool.store.queue_size() == 3
