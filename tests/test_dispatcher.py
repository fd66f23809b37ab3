"""The dispatcher's policy, specified with a recording transport and a fake clock.

No socket is opened and nothing sleeps: the transport answers from a script, the clock moves
only when a test moves it, and the outbox is a real SQLite file. What each attempt comes to
(per recipient results, back-off, Retry-After, dead items, a destination that is down) is
read back through the outbox's API, as ``queue`` would show it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mail2alert.dispatcher import Dispatcher
from mail2alert.model import ChatPost, Decision, Envelope, Outgoing
from mail2alert.outbox import Accepted, Item, Outbox, RecipientResult, StoredItem
from mail2alert.settings import Delivery, HostPort
from mail2alert.testing import FakeClock, RecordingTransport
from mail2alert.transports import Attempt

DELIVERY = Delivery(retry_initial=60.0, retry_max=3600.0, give_up_after=5 * 86400.0)
MAIL = b"Subject: disk full\r\n\r\nbody\r\n"


def answer(**states: str) -> Callable[[Item], Attempt]:
    """A server's answer per recipient: ``done``, or ``4xx ...`` / ``5xx ...`` text."""

    def reply(item: Item) -> Attempt:
        results = []
        for rcpt in item.recipients:
            said = states.get(rcpt.split("@")[0], "done")
            state = "done" if said == "done" else "pending" if said[0] == "4" else "dead"
            results.append(RecipientResult(rcpt, state, "" if said == "done" else said))
        return Attempt(tuple(results))

    return reply


def unreachable(item: Item) -> Attempt:
    return Attempt((), "connection refused", unreachable=True)


@dataclass
class Bench:
    """A dispatcher on a real outbox, with a recording transport and a fake clock."""

    outbox: Outbox
    dispatcher: Dispatcher
    mail: RecordingTransport
    chat: RecordingTransport
    clock: FakeClock

    def put(self, queue_id: str, *rcpts: str, kind: str = "smtp", data: bytes = MAIL) -> None:
        """Commit a message with one item, received now, and tell the dispatcher."""
        item = Outgoing("go@example.com", rcpts, data, kind)
        self.outbox.put(
            [
                Accepted(
                    queue_id,
                    self.clock(),
                    Envelope("go@example.com", rcpts),
                    "disk full",
                    Decision("deliver", None, "test"),
                    (item,),
                )
            ]
        )
        self.dispatcher.wake()

    def later(self, seconds: float) -> None:
        """Let time pass, and let the dispatcher look again."""
        self.clock.advance(seconds)
        self.dispatcher.wake()

    async def attempts(self, transport: RecordingTransport, count: int) -> None:
        """Wait for ``count`` attempts through ``transport``, and their results on disk."""
        async with asyncio.timeout(10):
            await transport.wait_for(count)
            await self.dispatcher.idle()

    def item(self, queue_id: str) -> StoredItem:
        (item,) = self.outbox.items_of(queue_id)
        return item

    def recipients(self, queue_id: str) -> dict[str, tuple[str, str]]:
        return {r.rcpt: (r.state, r.last_error) for r in self.outbox.recipients_of(queue_id)}

    def due(self) -> list[str]:
        return [i.message_id for i in self.outbox.due(self.clock(), 10)]


@asynccontextmanager
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    mail = RecordingTransport(address="mx.example.com:25")
    chat = RecordingTransport(address="chat")
    clock = FakeClock()
    dispatcher = Dispatcher(
        tmp_path,
        HostPort("mx.example.com", 25),
        Delivery(**{**DELIVERY.__dict__, "connections": 1}),
        connect=lambda: mail,
        chat_transport=chat,
        clock=clock,
    )
    outbox = Outbox(tmp_path)
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    try:
        yield Bench(outbox, dispatcher, mail, chat, clock)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await running
        outbox.close()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_a_4xx_for_one_recipient_delivers_the_other_and_retries_only_it_after_the_back_off(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with bench(tmp_path) as b:
            b.mail.script(answer(bob="450 4.2.1 mailbox busy"))
            b.put("Q1", "ann@example.com", "bob@example.com")
            await b.attempts(b.mail, 1)

            assert b.recipients("Q1") == {
                "ann@example.com": ("done", ""),
                "bob@example.com": ("pending", "450 4.2.1 mailbox busy"),
            }
            item = b.item("Q1")
            assert (item.state, item.attempts) == ("pending", 1)
            assert item.next_try == b.clock() + DELIVERY.retry_initial
            b.clock.advance(DELIVERY.retry_initial - 1)
            assert b.due() == []

            b.later(1)
            assert b.due() == ["Q1"]
            await b.attempts(b.mail, 2)
            assert b.mail.sent[1].recipients == ("bob@example.com",)
            assert b.item("Q1").state == "done"

    run(scenario)


def test_the_back_off_doubles_with_each_attempt_of_the_item(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with bench(tmp_path) as b:
            busy = answer(ann="451 4.3.0 try later")
            b.mail.script(busy, busy, busy)
            b.put("Q1", "ann@example.com")
            waits = []
            for attempt in (1, 2, 3):
                await b.attempts(b.mail, attempt)
                waits.append(b.item("Q1").next_try - b.clock())
                b.later(waits[-1])
            assert waits == [60.0, 120.0, 240.0]

    run(scenario)


def test_a_5xx_makes_the_recipient_dead_with_the_servers_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with bench(tmp_path) as b:
            b.mail.script(answer(bob="550 5.1.1 no such user"))
            b.put("Q1", "bob@example.com")
            await b.attempts(b.mail, 1)
            assert b.item("Q1").state == "dead"
            assert b.recipients("Q1") == {"bob@example.com": ("dead", "550 5.1.1 no such user")}

    run(scenario)


def test_a_transient_failure_past_give_up_after_is_dead_with_its_age(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with bench(tmp_path) as b:
            b.mail.script(answer(ann="451 4.3.0 try later"))
            b.put("Q1", "ann@example.com")
            b.clock.advance(DELIVERY.give_up_after)  # the server was silent all that time
            await b.attempts(b.mail, 1)
            item = b.item("Q1")
            assert item.state == "dead"
            assert item.last_error.startswith("gave up after 5d: ")

    run(scenario)


def test_a_chat_post_goes_through_the_chat_transport_and_its_retry_after_is_kept(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with bench(tmp_path) as b:
            b.chat.script(lambda item: Attempt((), "429 rate limited", retry_after=120.0))
            post = ChatPost("slack:#ci", "disk full", "", "#d00").to_json().encode()
            b.put("Q1", "slack-ci", kind="chat", data=post)
            await b.attempts(b.chat, 1)

            assert b.mail.sent == []
            assert json.loads(b.chat.sent[0].data)["title"] == "disk full"
            assert b.item("Q1").next_try == b.clock() + 120.0
            b.later(120.0)
            await b.attempts(b.chat, 2)
            assert b.item("Q1").state == "done"

    run(scenario)


def test_while_the_upstream_is_down_items_wait_without_spending_attempts_and_new_mail_is_tried(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with bench(tmp_path) as b:
            b.mail.script(unreachable)
            b.put("OLD", "ann@example.com")
            await b.attempts(b.mail, 1)
            old = b.item("OLD")
            assert (old.attempts, old.waiting, old.last_error) == (0, "smtp", "connection refused")
            assert b.due() == []  # it waits for the destination, not for its own time

            # New mail is tried at once all the same; its answer brings the upstream back,
            # and what waited is due at once.
            b.later(10)
            b.put("NEW", "bob@example.com")
            await b.attempts(b.mail, 3)
            assert [s.recipients for s in b.mail.sent[1:]] == [
                ("bob@example.com",),
                ("ann@example.com",),
            ]
            assert (b.item("OLD").state, b.item("OLD").attempts) == ("done", 1)

    run(scenario)


def test_a_result_waits_for_a_writer_holding_the_writers_lock_and_is_written_once(
    tmp_path: Path,
) -> None:
    """Another writer (an intake process, a ``queue`` command) holds the writers' lock when
    the item's answer comes: the result is written once the writer lets go, and only once."""
    writer = Outbox(tmp_path)
    holding = threading.Event()
    let_go: list[float] = []

    def hold() -> None:
        with writer.write_lock():
            holding.set()
            time.sleep(0.2)  # the writer's transaction
            let_go.append(time.monotonic())

    def answer_while_the_lock_is_held(item: Item) -> Attempt:
        threading.Thread(target=hold, daemon=True).start()
        assert holding.wait(5)
        return answer()(item)

    async def scenario() -> None:
        async with bench(tmp_path) as b:
            real = b.dispatcher._outbox.record
            written: list[float] = []

            def record(results: Any) -> None:
                real(results)
                written.append(time.monotonic())

            b.dispatcher._outbox.record = record  # type: ignore[method-assign]
            b.mail.script(answer_while_the_lock_is_held)
            b.put("HELD", "ann@example.com")
            await b.attempts(b.mail, 1)
            assert len(written) == 1
            assert written[0] >= let_go[0]  # it waited for the writer
            assert (b.item("HELD").state, b.item("HELD").attempts) == ("done", 1)
            assert [c.value for c in b.outbox.counters() if c.name == "deliveries"] == [1.0]

    try:
        run(scenario)
    finally:
        writer.close()
