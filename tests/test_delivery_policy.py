"""Fast specifications of delivery's pure parts: the judge of an attempt, back-off, a
destination's up/down state, the restart policy of background tasks, and the outbox's
per-message isolation. No sockets, no sleeps (the supervised loop waits milliseconds)."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from pathlib import Path

import pytest

from mail2alert.background import RestartPolicy, is_disk_full, is_storage_error, supervised
from mail2alert.dispatcher import Destination, backoff, destination_of, judge
from mail2alert.errors import OutboxError, OutboxFull
from mail2alert.model import Decision, Envelope, Outgoing
from mail2alert.outbox import (
    Accepted,
    Item,
    Outbox,
    RecipientResult,
    Result,
    loaded,
    storable,
    storage_error,
)
from mail2alert.settings import Delivery
from mail2alert.transports import Attempt

DELIVERY = Delivery(retry_initial=60.0, retry_max=3600.0, give_up_after=5 * 86400.0)
NOW = 1_000_000.0


def item(*, created: float = NOW - 10, attempts: int = 0, due: float | None = None) -> Item:
    return Item(
        7,
        "Q1",
        "smtp",
        "go@example.com",
        b"Subject: x\r\n\r\nbody\r\n",
        attempts,
        created,
        ("a@example.com", "b@example.com"),
        created if due is None else due,
    )


# -- back-off ----------------------------------------------------------------------------


def test_backoff_doubles_from_retry_initial_up_to_retry_max() -> None:
    waits = [backoff(n, DELIVERY) for n in range(1, 10)]
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


# -- the judge of one attempt -------------------------------------------------------------


def test_every_recipient_accepted_makes_the_item_done() -> None:
    attempt = Attempt(tuple(RecipientResult(r, "done") for r in item().recipients))
    result = judge(item(), attempt, now=NOW, delivery=DELIVERY, via="up")
    assert (result.next_try, result.error, result.waiting) == (0.0, "", "")


def test_a_4xx_about_the_item_backs_it_off_by_its_own_attempts() -> None:
    attempt = Attempt((), "451 4.3.0 later")
    result = judge(item(attempts=2), attempt, now=NOW, delivery=DELIVERY, via="up")
    assert result.next_try == NOW + 240
    assert result.error == "451 4.3.0 later"
    assert result.waiting == ""


def test_a_permanent_refusal_gives_the_item_up() -> None:
    attempt = Attempt((), "554 5.7.1 no", permanent=True)
    result = judge(item(), attempt, now=NOW, delivery=DELIVERY, via="up")
    assert result.next_try is None


def test_a_429_retry_after_is_waited_instead_of_the_back_off() -> None:
    attempt = Attempt((), "Slack: rate limited (429)", retry_after=7.0)
    result = judge(item(attempts=5), attempt, now=NOW, delivery=DELIVERY, via="chat")
    assert result.next_try == NOW + 7.0


def test_one_refused_recipient_is_dead_and_the_other_still_pending() -> None:
    attempt = Attempt(
        (
            RecipientResult("a@example.com", "dead", "550 gone"),
            RecipientResult("b@example.com", "pending", "450 later"),
        )
    )
    result = judge(item(), attempt, now=NOW, delivery=DELIVERY, via="up")
    assert result.recipients == attempt.recipients
    assert result.next_try == NOW + 60
    assert result.error == "b@example.com: 450 later"


def test_an_item_past_give_up_after_is_dead_with_its_age_in_the_reason() -> None:
    old = item(created=NOW - 6 * 86400)
    result = judge(old, Attempt((), "451 later"), now=NOW, delivery=DELIVERY, via="up")
    assert result.next_try is None
    assert result.error == "gave up after 6d: 451 later"


def test_an_unreached_destination_leaves_the_item_waiting_for_it_until_the_next_probe() -> None:
    down = Destination("smtp", failures=1, down_since=NOW, next_probe=NOW + 60)
    result = judge(
        item(attempts=3),
        Attempt((), "cannot connect"),
        now=NOW,
        delivery=DELIVERY,
        via="up",
        waiting=down,
    )
    assert result == Result(item(attempts=3), (), NOW + 60, "cannot connect", "smtp", at=NOW)


def test_a_result_keeps_when_the_attempt_was_made_and_the_answer_to_it() -> None:
    sent = Attempt((RecipientResult("a@example.com", "done"),), reply="250 2.0.0 Ok: queued")
    result = judge(item(), sent, now=NOW, delivery=DELIVERY, via="up")
    assert (result.at, result.answer) == (NOW, "250 2.0.0 Ok: queued")


def test_waiting_for_the_destination_still_ends_at_give_up_after() -> None:
    down = Destination("smtp", failures=1, down_since=NOW, next_probe=NOW + 60)
    old = item(created=NOW - 6 * 86400)
    result = judge(
        old, Attempt((), "cannot connect"), now=NOW, delivery=DELIVERY, via="up", waiting=down
    )
    assert result.next_try is None
    assert result.waiting == ""


# -- a destination, up or down ------------------------------------------------------------


def test_the_first_unreached_attempt_marks_the_destination_down_until_a_probe() -> None:
    d = Destination("smtp")
    assert d.unreachable(NOW, "refused", DELIVERY, probe=False) is True
    assert (d.down, d.down_since, d.next_probe, d.error) == (True, NOW, NOW + 60, "refused")


def test_each_failed_probe_doubles_the_wait_before_the_next() -> None:
    d = Destination("smtp")
    d.unreachable(NOW, "refused", DELIVERY, probe=False)
    probes = []
    for n in range(4):
        at = d.next_probe
        assert d.may_probe(at)
        d.probing = True
        assert not d.may_probe(at), "one probe at a time"
        d.unreachable(at, "refused", DELIVERY, probe=True)
        probes.append(d.next_probe - at)
        assert n + 2 == d.failures
    assert probes == [120, 240, 480, 960]


def test_a_failed_free_probe_does_not_push_the_next_probe_back() -> None:
    d = Destination("smtp")
    d.unreachable(NOW, "refused", DELIVERY, probe=False)
    d.unreachable(NOW + 30, "refused", DELIVERY, probe=False)
    assert (d.failures, d.next_probe) == (1, NOW + 60)


def test_while_down_only_mail_that_became_due_since_is_tried() -> None:
    d = Destination("smtp")
    d.unreachable(NOW, "refused", DELIVERY, probe=False)
    assert not d.lets_through(item(created=NOW - 5))
    assert d.lets_through(item(created=NOW + 1)), "new mail is a free probe"
    assert d.lets_through(item(created=NOW - 5, due=NOW + 2)), "so is an operator's retry"


def test_an_answer_brings_the_destination_up_and_says_it_was_down() -> None:
    d = Destination("smtp")
    assert d.answered() is False
    d.unreachable(NOW, "refused", DELIVERY, probe=False)
    assert d.answered() is True
    assert (d.down, d.error) == (False, "")
    assert d.lets_through(item(created=NOW - 5))


def test_mail_goes_to_the_smtp_destination_and_each_chat_action_is_its_own() -> None:
    chat = Item(1, "Q", "chat", "", b"{}", 0, NOW, ("a1b2c3",))
    assert destination_of(item()) == "smtp"
    assert destination_of(chat) == "chat:a1b2c3"


# -- restarting background tasks -----------------------------------------------------------


def test_a_task_that_keeps_failing_with_a_bug_makes_the_service_fail_after_its_attempts() -> None:
    policy = RestartPolicy(initial=0.001, maximum=0.001, attempts=3)
    reasons: list[str] = []
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise KeyError("bug")

    async def main() -> None:
        await supervised("poller", broken, stop=asyncio.Event(), fail=reasons.append, policy=policy)

    asyncio.run(main())
    assert runs == 3
    assert reasons == ["poller failed 3 times in a row: KeyError: 'bug'"]


def test_storage_errors_are_retried_until_the_storage_recovers() -> None:
    policy = RestartPolicy(initial=0.001, maximum=0.001, attempts=3)
    stop = asyncio.Event()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 10:
            raise sqlite3.OperationalError("database or disk is full")
        await stop.wait()

    async def main() -> None:
        task = asyncio.create_task(
            supervised("recorder", flaky, stop=stop, fail=pytest.fail, policy=policy)
        )
        for _ in range(10_000):  # bounded: each turn waits a millisecond
            if runs > 10:
                break
            await asyncio.sleep(0.001)
        stop.set()
        await task

    asyncio.run(main())
    assert runs == 11


def test_a_task_that_returns_before_stop_is_restarted_as_a_failure() -> None:
    policy = RestartPolicy(initial=0.001, maximum=0.001, attempts=2)
    reasons: list[str] = []

    async def quits() -> None:
        return None

    asyncio.run(
        supervised("watch", quits, stop=asyncio.Event(), fail=reasons.append, policy=policy)
    )
    assert reasons == ["watch failed 2 times in a row: RuntimeError: it stopped by itself"]


def test_a_run_that_was_healthy_long_enough_starts_the_count_of_failures_afresh() -> None:
    policy = RestartPolicy(attempts=3, healthy_after=60)
    assert policy.failures_after(2, ran_for=59) == 3
    assert policy.failures_after(2, ran_for=60) == 1
    assert policy.gives_up(3, KeyError())
    assert not policy.gives_up(99, OSError(errno.EIO, "I/O error"))


def test_restart_waits_double_up_to_the_maximum() -> None:
    policy = RestartPolicy(initial=0.5, maximum=30)
    assert [policy.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_a_full_disk_is_told_apart_from_other_storage_errors() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert is_disk_full(full)
    assert is_disk_full(OSError(errno.ENOSPC, "No space left"))
    assert not is_disk_full(OSError(errno.EROFS, "Read-only file system"))
    assert is_storage_error(OutboxError("x"))
    assert not is_storage_error(KeyError())
    assert isinstance(storage_error(full, "commit"), OutboxFull)
    assert type(storage_error(sqlite3.OperationalError("readonly"), "commit")) is OutboxError


# -- the outbox -----------------------------------------------------------------------------


def accepted(queue_id: str, *, received: float = NOW, sender: str = "go@example.com") -> Accepted:
    envelope = Envelope(sender, ("ops@example.com",))
    out = Outgoing(sender, ("ops@example.com",), b"Subject: x\r\n\r\nbody\r\n")
    return Accepted(queue_id, received, envelope, "x", Decision("relay", None, "r"), (out,))


def test_a_message_that_cannot_be_written_fails_alone_in_its_group_commit(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    # An arrival time SQLite cannot store stands for any message that fails to be written.
    batch = [accepted("A"), accepted("BAD", received=2**80), accepted("C")]
    committed = outbox.put(batch)
    assert list(committed.failed) == ["BAD"]
    assert "BAD" in str(committed.failed["BAD"])
    assert sorted(i.message_id for i in outbox.due(NOW, 10)) == ["A", "C"]


def test_an_address_that_is_not_utf8_is_kept_byte_for_byte(tmp_path: Path) -> None:
    sender = b"caf\xe9@example.com".decode("utf-8", "surrogateescape")
    outbox = Outbox(tmp_path)
    assert outbox.put([accepted("Q", sender=sender)]).failed == {}
    (due,) = outbox.due(NOW, 10)
    assert due.mail_from == sender
    assert loaded(storable(sender)) == sender
    assert storable("plain") == "plain"


def test_items_waiting_for_a_destination_are_not_due_until_it_answers(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.put([accepted("A"), accepted("B")])
    first, second = outbox.due(NOW, 10)
    outbox.record([Result(x, (), NOW + 60, "refused", "smtp") for x in (first, second)])
    assert outbox.due(NOW + 3600, 10) == []
    assert outbox.waiting_for() == {"smtp": 2}
    probe = outbox.probe("smtp")
    assert probe is not None
    assert (probe.message_id, probe.attempts) == ("A", 0)
    assert outbox.release_waiting("smtp", NOW + 1) == 2
    assert [i.message_id for i in outbox.due(NOW + 1, 10)] == ["A", "B"]


def test_items_that_waited_past_give_up_after_are_dead(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.put([accepted("OLD", received=NOW - 10), accepted("NEW", received=NOW)])
    old, new = outbox.due(NOW, 10)
    outbox.record([Result(x, (), NOW + 60, "refused", "smtp") for x in (old, new)])
    assert outbox.expire_waiting("smtp", NOW - 5, "gave up after 5d: refused") == ["OLD"]
    assert outbox.waiting_for() == {"smtp": 1}
