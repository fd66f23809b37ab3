"""Delivery while operators and the disk act on the outbox, specified: a result that comes
back after its message was deleted, a delete while an item waits for a connection, a
destination that answers while a result is on its way to the disk, a full disk between two
transactions, a stop in the middle of a recording, a held message deleted or released, and
a claim as long as its window. A real SQLite outbox, a recording transport and a fake clock;
no sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from mail2alert.dispatcher import STALE_CLAIM, Dispatcher
from mail2alert.errors import OutboxFull
from mail2alert.gocd.model import PipelineGroups
from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.managers.base import Context
from mail2alert.managers.memory import Claim
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.model import Decision, Envelope, Outgoing
from mail2alert.outbox import Accepted, Item, Outbox, RecipientResult
from mail2alert.planning import accept
from mail2alert.routing import Manager, Rule
from mail2alert.settings import Delivery, HostPort
from mail2alert.testing import FakeClock, RecordingTransport
from mail2alert.transports import Attempt

T0 = 1_000_000.0
DAY = 86400.0
OPS = "ops@example.com"


def mail(name: str) -> bytes:
    return f"Subject: {name}\r\n\r\nx\r\n".encode()


def accepted(queue_id: str, at: float = T0, *, data: bytes | None = None) -> Accepted:
    """A message routed to ops@, its one item ``data`` (its subject is its queue id)."""
    item = Outgoing("go@example.com", (OPS,), data if data is not None else mail(queue_id))
    envelope = Envelope("go@example.com", (OPS,))
    return Accepted(queue_id, at, envelope, queue_id, Decision("deliver", None, "test"), (item,))


def delivered(item: Item) -> Attempt:
    return Attempt(tuple(RecipientResult(r, "done") for r in item.recipients), reply="250 ok")


def deferred(item: Item) -> Attempt:
    return Attempt(tuple(RecipientResult(r, "pending", "451 try later") for r in item.recipients))


def refused_connection(item: Item) -> Attempt:
    return Attempt((), "connection refused", unreachable=True)


def subject_of(item: Item) -> str:
    return item.data.split(b"\r\n")[0].split(b": ")[1].decode()


class Gated(RecordingTransport):
    """Answers as told, each item once the gate of its subject is open."""

    def __init__(self, answer: Callable[[Item], Attempt] = delivered) -> None:
        super().__init__(otherwise=answer)
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.answers: dict[str, Callable[[Item], Attempt]] = {}

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def began(self, name: str) -> asyncio.Event:
        return self.started.setdefault(name, asyncio.Event())

    async def send(self, item: Item) -> Attempt:
        name = subject_of(item)
        self.began(name).set()
        await self.gate(name).wait()
        if name in self.answers:
            self.sent.append(item)
            return self.answers.pop(name)(item)
        return await super().send(item)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition`` holds: nothing signals these states, so polling is the way."""
    try:
        async with asyncio.timeout(5):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"waited 5 s for {what}") from None


def dispatcher_of(
    tmp_path: Path, transport: RecordingTransport, clock: FakeClock, **delivery: Any
) -> Dispatcher:
    """A dispatcher on the outbox of ``tmp_path`` that sends mail through ``transport``."""
    settings = Delivery(retry_initial=60.0, retry_max=3600.0, **{"connections": 1, **delivery})
    return Dispatcher(
        tmp_path,
        HostPort("mx.example.com", 25),
        settings,
        connect=lambda: transport,
        chat_transport=RecordingTransport(),
        clock=clock,
    )


async def being_sent(outbox: Outbox, dispatcher: Dispatcher, smtp: Gated, name: str) -> None:
    """Queue the message ``name`` and wait until its attempt has begun (it waits at its gate)."""
    outbox.put([accepted(name)])
    dispatcher.wake()
    async with asyncio.timeout(5):
        await smtp.began(name).wait()


@asynccontextmanager
async def delivering(
    tmp_path: Path, transport: RecordingTransport, **delivery: Any
) -> AsyncIterator[tuple[Outbox, Dispatcher, FakeClock]]:
    """A dispatcher on the outbox of ``tmp_path``, and the outbox as an operator's command
    sees it."""
    clock = FakeClock(T0)
    dispatcher = dispatcher_of(tmp_path, transport, clock, **delivery)
    outbox = Outbox(tmp_path)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield outbox, dispatcher, clock
    finally:
        for gate in getattr(transport, "gates", {}).values():
            gate.set()
        stop.set()
        async with asyncio.timeout(10):
            await task
        outbox.close()


def deliveries(outbox: Outbox) -> dict[str, float]:
    return {dict(c.labels)["result"]: c.value for c in outbox.counters() if c.name == "deliveries"}


# -- a result whose message is gone --------------------------------------------------------------


def test_the_late_result_of_a_deleted_item_is_not_taken_for_a_new_item_with_its_id(
    tmp_path: Path,
) -> None:
    """Item ids are SQLite row ids: a new message may get the id of the newest item, deleted
    by ``queue delete`` while it was tried. The old attempt's 250 must not mark the new item
    delivered (it would never be sent)."""

    async def scenario() -> tuple[list[str], str]:
        smtp = Gated()
        async with delivering(tmp_path, smtp) as (outbox, dispatcher, _clock):
            await being_sent(outbox, dispatcher, smtp, "OLD")
            outbox.delete(["OLD"])
            outbox.put([accepted("NEW")])
            smtp.gate("OLD").set()
            smtp.gate("NEW").set()
            await until(lambda: len(smtp.sent) == 2, "both to be sent")
            async with asyncio.timeout(5):
                await dispatcher.idle()
            return [subject_of(s) for s in smtp.sent], outbox.items_of("NEW")[0].state

    sent, state = asyncio.run(scenario())
    assert sent == ["OLD", "NEW"]
    assert state == "done"


def test_a_4xx_for_an_item_deleted_while_it_was_tried_counts_no_delivery(tmp_path: Path) -> None:
    async def scenario() -> dict[str, float]:
        smtp = Gated(deferred)
        async with delivering(tmp_path, smtp) as (outbox, dispatcher, _clock):
            await being_sent(outbox, dispatcher, smtp, "A")
            outbox.delete(["A"])
            smtp.gate("A").set()
            await until(lambda: len(smtp.sent) == 1, "the attempt")
            async with asyncio.timeout(5):
                await dispatcher.idle()
            return deliveries(outbox)

    assert asyncio.run(scenario()) == {}


# -- a delete while an item waits for a connection ---------------------------------------------


@pytest.mark.parametrize("deleted", [True, False])
def test_an_item_taken_a_while_ago_is_looked_up_again_and_sent_only_if_still_pending(
    tmp_path: Path, deleted: bool
) -> None:
    """An item taken for delivery waits for a free connection (here the one connection is
    busy with a slow destination); ``queue delete`` meanwhile means it is not sent."""

    async def scenario() -> list[str]:
        smtp = Gated()
        async with delivering(tmp_path, smtp) as (outbox, dispatcher, clock):
            await being_sent(outbox, dispatcher, smtp, "A")
            outbox.put([accepted("B")])
            dispatcher.wake()
            (b,) = outbox.items_of("B")
            await until(lambda: b.id in dispatcher._inflight, "B to be taken")
            if deleted:
                outbox.delete(["B"])
            clock.advance(STALE_CLAIM + 1)
            smtp.gate("A").set()
            smtp.gate("B").set()
            await until(lambda: b.id not in dispatcher._inflight, "B to be done with")
            async with asyncio.timeout(5):
                await dispatcher.idle()
            return [subject_of(s) for s in smtp.sent]

    assert asyncio.run(scenario()) == (["A"] if deleted else ["A", "B"])


# -- the destination answers while a result is on its way to the disk ----------------------------


def test_an_item_judged_waiting_just_before_the_destination_answered_is_delivered(
    tmp_path: Path,
) -> None:
    """X is taken while the smarthost is up; before a connection is free it goes down, so X
    is judged waiting, untried. The smarthost answers again while that result waits for the
    disk (full for a moment), after the items waiting for it were released: X must not be
    left waiting for a destination that is up, which nothing probes."""

    async def scenario() -> tuple[list[str], str, str]:
        smtp = Gated()
        smtp.answers = {"P": refused_connection}
        async with delivering(tmp_path, smtp, connections=2) as (outbox, dispatcher, clock):
            for name in ("P", "B"):
                await being_sent(outbox, dispatcher, smtp, name)
            outbox.put([accepted("X")])
            dispatcher.wake()
            (x,) = outbox.items_of("X")
            await until(lambda: x.id in dispatcher._inflight, "X to be taken")
            real = dispatcher._outbox.record
            full: list[list[str]] = []

            def record(results: Any) -> None:
                names = [r.item.message_id for r in results]
                if "X" in names and not full:
                    full.append(names)
                    raise OutboxFull("cannot write to the outbox: the disk is full")
                real(results)

            dispatcher._outbox.record = record  # type: ignore[method-assign]
            clock.advance(10)
            smtp.gate("P").set()  # refused: the smarthost is down from now; X's turn comes
            await until(
                lambda: full == [["X"]], "X's result, judged waiting, to meet the full disk"
            )
            released = dispatcher._outbox.release_waiting
            releases: list[str] = []  # what X waited for at each release

            def release(destination: str, now: float) -> int:
                releases.append(outbox.items_of("X")[0].waiting)
                return released(destination, now)

            dispatcher._outbox.release_waiting = release  # type: ignore[method-assign]
            smtp.gate("B").set()  # delivered: the smarthost answers again
            await until(lambda: bool(releases), "the release of what waits")
            assert releases[0] == ""  # released before X's result was written
            smtp.gate("X").set()
            for _ in range(40):  # the recorder tries again after half a second
                clock.advance(1)
                dispatcher.wake()
                if "X" in [subject_of(s) for s in smtp.sent]:
                    break
                await asyncio.sleep(0.05)
            async with asyncio.timeout(5):
                await dispatcher.idle()
            (after,) = outbox.items_of("X")
            return [subject_of(s) for s in smtp.sent], after.state, after.waiting

    sent, state, waiting = asyncio.run(scenario())
    assert "X" in sent
    assert (state, waiting) == ("done", "")


# -- the disk fails between two transactions; a stop in the middle of a recording ---------------


def test_a_result_recorded_before_the_disk_filled_is_not_recorded_again(tmp_path: Path) -> None:
    """The results were committed; the expiry of waiting items that follows found the disk
    full. The results are not written a second time (one attempt in the history, one
    delivery counted)."""

    async def scenario() -> int:
        smtp = Gated(refused_connection)
        smtp.gate("A").set()
        async with delivering(tmp_path, smtp) as (outbox, dispatcher, _clock):
            real = dispatcher._outbox.expire_waiting
            full: list[bool] = []

            def expire_once(*args: Any, **kwargs: Any) -> list[str]:
                if not full:
                    full.append(True)
                    raise OutboxFull("cannot write to the outbox: database or disk is full")
                return real(*args, **kwargs)

            dispatcher._outbox.expire_waiting = expire_once  # type: ignore[method-assign]
            outbox.put([accepted("A")])
            dispatcher.wake()
            await until(lambda: bool(full), "the expiry to fail")
            async with asyncio.timeout(5):
                await dispatcher.idle()
            return len(outbox.attempts_of("A"))

    assert asyncio.run(scenario()) == 1


def test_a_stop_requested_while_a_result_waits_for_the_writers_lock_records_it_once(
    tmp_path: Path,
) -> None:
    """SIGTERM while another writer holds the writers' lock and a result waits for it: the
    result is recorded once the lock is free (the stop is acted on after), and only once."""
    other = Outbox(tmp_path)
    other.put([accepted("A")])
    clock = FakeClock(T0)
    smtp = Gated()

    async def scenario() -> None:
        dispatcher = dispatcher_of(tmp_path, smtp, clock, timeout=0.1)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def write_while_stopping() -> None:  # intake, or a `queue` command, writing
            with other.write_lock():
                loop.call_soon_threadsafe(smtp.gate("A").set)  # delivered; its result waits
                loop.call_soon_threadsafe(stop.set)
                time.sleep(0.3)  # past the drain deadline (timeout 0.1 s)

        task = asyncio.create_task(dispatcher.run(stop))
        async with asyncio.timeout(5):
            await smtp.began("A").wait()
        locker = threading.Thread(target=write_while_stopping, daemon=True)
        locker.start()
        async with asyncio.timeout(10):
            await task
        locker.join()

    asyncio.run(scenario())
    attempts, counted = other.attempts_of("A"), deliveries(other)
    other.close()
    assert len(attempts) == 1
    assert counted == {"sent": 1.0}


def stopped_with_a_full_disk(tmp_path: Path, *, full_after_stop: bool) -> Outbox:
    """A is delivered while the disk is full, so its result cannot be recorded; then a stop,
    whose drain deadline (timeout 0.1 s) passes before the recorder tries again (0.5 s). The
    disk has room again when the stop comes, unless ``full_after_stop``."""
    other = Outbox(tmp_path)
    other.put([accepted("A")])
    clock = FakeClock(T0)
    smtp = Gated()

    async def scenario() -> None:
        dispatcher = dispatcher_of(tmp_path, smtp, clock, timeout=0.1)
        real = dispatcher._outbox.record
        full = [True]

        def record(results: Any) -> None:
            if full[0]:
                raise OutboxFull("cannot write to the outbox: the disk is full")
            real(results)

        dispatcher._outbox.record = record  # type: ignore[method-assign]
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        smtp.gate("A").set()
        await until(lambda: bool(dispatcher._storage_failures), "the full disk")
        full[0] = full_after_stop
        stop.set()
        async with asyncio.timeout(10):
            await task

    asyncio.run(scenario())
    return other


def test_a_result_the_full_disk_kept_out_is_recorded_once_by_the_stop(tmp_path: Path) -> None:
    other = stopped_with_a_full_disk(tmp_path, full_after_stop=False)
    attempts, counted, (item,) = other.attempts_of("A"), deliveries(other), other.items_of("A")
    other.close()
    assert len(attempts) == 1
    assert counted == {"sent": 1.0}
    assert item.state == "done"


def test_a_result_the_disk_never_took_is_said_at_the_stop_and_the_item_stays_pending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = stopped_with_a_full_disk(tmp_path, full_after_stop=True)
    attempts, (item,) = other.attempts_of("A"), other.items_of("A")
    other.close()
    assert attempts == []
    assert item.state == "pending"  # sent again after the restart: at least once
    assert "1 delivery results could not be recorded; they will be sent again" in caplog.text


# -- held mail -----------------------------------------------------------------------------------


def test_a_held_message_deleted_before_it_is_released_stays_deleted(tmp_path: Path) -> None:
    holds, command = Outbox(tmp_path), Outbox(tmp_path)
    raw = b"Subject: pipeline failed\r\n\r\nx\r\n"
    held = dataclasses.replace(
        accepted("H"), decision=Decision("hold", None, "waiting"), items=(), raw=raw
    )
    try:
        holds.put([held])
        assert len(holds.held()) == 1  # the holds read it: it is to be released
        command.delete(["H"])
        routed = dataclasses.replace(held, decision=Decision("deliver", None, "routed"), raw=None)
        routed = dataclasses.replace(routed, items=(Outgoing("go@example.com", (OPS,), raw),))
        assert holds.release(routed) is None
        assert command.items_of("H") == []
        assert command.message("H") is None
    finally:
        holds.close()
        command.close()


@pytest.mark.parametrize("gocd_answered", [True, False])
def test_the_copy_for_a_recipient_no_manager_took_is_queued_once_across_hold_and_release(
    tmp_path: Path, gocd_answered: bool
) -> None:
    """A stage mail to the gocd manager and to bob@: bob's unchanged copy is queued when the
    mail is held (GoCD not read yet), and not again when it is released, whether GoCD
    answered or hold-max passed."""
    gocd = MANAGER_TYPES["gocd"]
    in_group = gocd.functions["pipelines.in_group"]
    rule = Rule(in_group, ("prod",), in_group.compile(("prod",)), ("mailto:team@example.com",))
    manager = Manager(gocd, 0, wants_to=("mail2alert@example.com",), rules=(rule,))
    envelope = Envelope("go@example.com", ("mail2alert@example.com", "bob@example.com"))
    data = gocd_stage_mail(to="mail2alert@example.com, bob@example.com")
    held = accept("H", envelope, data, [manager], Context(), received_at=T0)
    assert held.decision.outcome == "hold"
    outbox = Outbox(tmp_path)
    try:
        outbox.put([held])
        (one,) = outbox.held()
        found = re.search(rb"Stage \[([^/]+)/", one.raw)
        assert found is not None
        groups = PipelineGroups({"prod": (found.group(1).decode(),)})
        context = Context(snapshot=groups) if gocd_answered else Context()
        again = accept(
            "H",
            one.envelope,
            one.raw,
            [manager],
            context,
            received_at=one.received,
            stop_holding=not gocd_answered,
        )
        assert outbox.release(again) is not None
        to_bob = [r for r in outbox.recipients_of("H") if r.rcpt == "bob@example.com"]
        to_team = [r for r in outbox.recipients_of("H") if r.rcpt == "team@example.com"]
    finally:
        outbox.close()
    assert len(to_bob) == 1
    assert len(to_team) == (1 if gocd_answered else 0)


# -- claims --------------------------------------------------------------------------------------


def test_a_claim_is_kept_for_its_whole_window_however_long(tmp_path: Path) -> None:
    """``duplicate-window: 2d``: the same event a day and a half later is a duplicate."""
    claim = Claim("gocd#0:p/1/s/1:failed", 2 * DAY)
    outbox = Outbox(tmp_path)
    try:
        outbox.put([dataclasses.replace(accepted("FIRST", 0.0), claim=claim)])
        outbox.purge(1.5 * DAY)
        again = outbox.put([dataclasses.replace(accepted("AGAIN", 1.5 * DAY), claim=claim)])
        outbox.purge(2.5 * DAY)
        assert outbox.claims() == 0  # past its window: forgotten
    finally:
        outbox.close()
    assert again.duplicates == {"AGAIN": "FIRST"}


def test_a_claim_kept_by_an_older_version_is_forgotten_after_a_day(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    try:
        with outbox.transaction() as db:
            db.execute("INSERT INTO seen_events (key, queue_id, at) VALUES ('k', 'Q', 0)")
        outbox.purge(DAY - 1)
        assert outbox.claims() == 1
        outbox.purge(DAY + 1)
        assert outbox.claims() == 0
    finally:
        outbox.close()
