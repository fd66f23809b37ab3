"""End to end: storage faults on a real small file system.

The data-dir is a 4 MiB tmpfs mounted for each test (the tests run as root). Filling it with a
file until the kernel says ENOSPC makes every write that needs a new block fail, as on a full
disk: SQLite appends each transaction to its WAL, so as long as no checkpoint has rewound the
WAL (none happens below 1000 pages), every commit needs new blocks and fails.

mail2alert runs in a thread (its log goes to caplog); the capture server plays ``remote-smtp``.

Why there is no read-only test: Linux refuses ``mount -o remount,ro`` (EBUSY, "mount point is
busy") while any file on the file system is open for writing, and mail2alert keeps its outbox
open for writing for as long as it runs (bind mounts and ``chattr +i`` do not help either: the
open descriptors keep writing). A disk only turns read-only under a running process through a
forced remount after an I/O error, which cannot be undone without unmounting. The behaviour
that test was to prove (a delivery whose result cannot be recorded is kept in memory, not sent
again, and recorded once storage is back) is proven here with a full disk instead.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mail2alert.components import Intake
from mail2alert.testing import CaptureServer
from tests.helpers import Relay, compose, field_value, relay, tmpfs, wait_until

#: The size of the data-dir's file system.
DISK_SIZE = 4 * 1024 * 1024


def managers() -> list[dict[str, Any]]:
    """No manager: every message is relayed unchanged, one item each."""
    return []


def relayed(message_id: str, body: str = "The disk is fine.\n") -> bytes:
    """A message that is relayed as it is."""
    return compose(
        sender="Someone <someone@example.net>",
        subject="weekly report",
        message_id=message_id,
        body=body,
    )


def message_ids(upstream: CaptureServer) -> Counter[str]:
    """How often each Message-ID arrived upstream."""
    return Counter(field_value(m.data, "message-id") for m in upstream.messages)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted at ``tmp_path/data``, unmounted (lazily) afterwards."""
    with tmpfs(tmp_path / "data", f"size={DISK_SIZE},mode=0700") as disk:
        yield disk


def fill(disk: Path) -> Path:
    """Write a file on ``disk`` until the kernel says ENOSPC; the file."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        # Each write fills the disk further (a short write on the last bytes), so this ends
        # long before the bound.
        for _ in range(4 * DISK_SIZE // len(chunk)):
            try:
                out.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        else:
            raise AssertionError(f"{disk} never became full")
    assert os.statvfs(disk).f_bavail == 0
    return filler


def test_a_message_bigger_than_the_space_left_is_refused_with_452_and_accepted_once_there_is_room(
    tmp_path: Path, upstream: CaptureServer, small_disk: Path
) -> None:
    """On a full data-dir intake answers 452 4.3.1 (the sender keeps the message and retries)
    and keeps nothing of it; once there is room again, the same message is accepted and
    delivered."""
    big_id = email.utils.make_msgid(domain="full.test.example.com")
    body = ("x" * 76 + "\n") * 4000  # about 300 KB
    big = relayed(big_id, body=body)
    with relay(tmp_path, upstream, managers(), data_dir=small_disk) as mail2alert:
        filler = fill(small_disk)

        refused = mail2alert.send(big, mail_from="someone@example.net")

        filler.unlink()
        accepted = mail2alert.send(big, mail_from="someone@example.net")
        (got,) = upstream.wait_for(1)
        mail2alert.outbox.wait_state(accepted.queue_id, "done")
        stored = mail2alert.outbox.queue_ids()
    assert (refused.code, refused.text[:5]) == (452, "4.3.1"), refused
    assert accepted.code == 250
    assert stored == [accepted.queue_id]
    assert field_value(got.data, "message-id") == big_id
    assert len(upstream.messages) == 1


def test_delivery_resumes_by_itself_after_the_disk_was_full_and_sends_nothing_twice(
    tmp_path: Path,
    upstream: CaptureServer,
    small_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delivery made while its result cannot be recorded (the disk is full) is kept in
    memory: the dispatcher logs an ERROR, sends nothing new, records the result once there is
    room, and then delivers the rest, without a restart; every message arrives exactly once."""
    caplog.set_level(logging.INFO)
    upstream.stop()
    ids = [email.utils.make_msgid(domain="backlog.test.example.com") for _ in range(5)]
    with relay(tmp_path, upstream, managers(), data_dir=small_disk) as mail2alert:
        queue_ids = [
            mail2alert.send(relayed(i), mail_from="someone@example.net").queue_id for i in ids
        ]
        for queue_id in queue_ids:
            mail2alert.outbox.wait_attempted(queue_id)
        filler = fill(small_disk)
        upstream.start()

        late_id = email.utils.make_msgid(domain="late.test.example.com")
        refused = mail2alert.send(relayed(late_id), mail_from="someone@example.net")
        upstream.wait_for(1, timeout=15)
        wait_until(
            lambda: any(
                r.levelno == logging.ERROR and "cannot write to the outbox" in r.getMessage()
                for r in caplog.records
            ),
            what="an ERROR that the outbox cannot be written",
        )
        delivered_while_full = len(upstream.messages)

        filler.unlink()
        for queue_id in queue_ids:
            mail2alert.outbox.wait_state(queue_id, "done", timeout=45)
        late = mail2alert.send(relayed(late_id), mail_from="someone@example.net")
        mail2alert.outbox.wait_state(late.queue_id, "done")
    assert refused.code in (451, 452), refused
    assert delivered_while_full == 1
    assert message_ids(upstream) == dict.fromkeys([*ids, late_id], 1)


def observe(happened: Callable[[], bool], seconds: float) -> bool:
    """Watch for ``happened`` over a bounded window; whether it did (ends as soon as it does).

    To show that something does not happen, a test must look for a while: this is that
    while, cut short by what it looks for.
    """
    try:
        wait_until(happened, timeout=seconds, what="")
    except TimeoutError:
        return False
    return True


def outbox_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(level, text) of what the dispatcher logged about the outbox, in order."""
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "mail2alert.dispatcher" and "the outbox" in r.getMessage()
    ]


def full_while_results_are_recorded(
    mail2alert: Relay, upstream: CaptureServer, disk: Path, caplog: pytest.LogCaptureFixture
) -> tuple[list[str], list[str], Path]:
    """Three messages wait for an upstream that answers 421; then the disk is full, and the
    next probe's result cannot be recorded. (Message-IDs, queue ids, the filler file.)"""
    # Three 421s for the first attempts, one for the probe made once the disk is full; the
    # upstream accepts whatever comes after.
    upstream.refuse_data(*["421 4.3.2 shutting down"] * 4)
    ids = [email.utils.make_msgid(domain="probes.test.example.com") for _ in range(3)]
    queue_ids: list[str] = []
    # One after the other: each is accepted once the destination is down, so it is tried at
    # once (a free probe) and refused; one accepted while the first was in flight would wait
    # untried instead.
    for message_id in ids:
        reply = mail2alert.send(relayed(message_id), mail_from="someone@example.net")
        mail2alert.outbox.wait_attempted(reply.queue_id)
        queue_ids.append(reply.queue_id)
    filler = fill(disk)
    upstream.wait_refused(4, timeout=15)
    wait_until(
        lambda: any(level == "ERROR" for level, _ in outbox_lines(caplog)),
        what="an ERROR that the outbox cannot be written",
    )
    return ids, queue_ids, filler


def test_a_full_disk_is_logged_at_error_once_and_its_end_once(
    tmp_path: Path,
    upstream: CaptureServer,
    small_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While results cannot be recorded the dispatcher says so at ERROR once, and says that
    the outbox can be used again only when it really can, once."""
    caplog.set_level(logging.INFO)
    with relay(tmp_path, upstream, managers(), data_dir=small_disk) as mail2alert:
        ids, queue_ids, filler = full_while_results_are_recorded(
            mail2alert, upstream, small_disk, caplog
        )
        # While the disk stays full, look (a few seconds) for a claim that it is usable.
        claimed = observe(lambda: len(outbox_lines(caplog)) > 1, 5)
        lines_while_full = outbox_lines(caplog)

        filler.unlink()
        for queue_id in queue_ids:
            mail2alert.outbox.wait_state(queue_id, "done", timeout=45)
    assert not claimed, lines_while_full
    lines = outbox_lines(caplog)
    assert [level for level, _ in lines] == ["ERROR", "WARNING"], lines
    assert "cannot write to the outbox" in lines[0][1]
    assert "can be used again" in lines[1][1]
    assert message_ids(upstream) == dict.fromkeys(ids, 1)


def test_once_results_cannot_be_recorded_the_dispatcher_sends_nothing_new(
    tmp_path: Path,
    upstream: CaptureServer,
    small_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the first result that could not be recorded (the disk is full), no other
    attempt reaches the upstream until the disk has room again: not even the next probe of a
    destination that is down. Then everything is delivered, once."""
    caplog.set_level(logging.INFO)
    with relay(tmp_path, upstream, managers(), data_dir=small_disk) as mail2alert:
        ids, queue_ids, filler = full_while_results_are_recorded(
            mail2alert, upstream, small_disk, caplog
        )
        # The next probe is due 2 s after the last; look a few seconds for any attempt.
        sent = observe(lambda: upstream.refused + len(upstream.messages) > 4, 5)
        attempts_while_full = upstream.refused + len(upstream.messages)

        filler.unlink()
        for queue_id in queue_ids:
            mail2alert.outbox.wait_state(queue_id, "done", timeout=45)
    assert not sent, f"{attempts_while_full - 4} attempts after the ERROR, on a full disk"
    assert message_ids(upstream) == dict.fromkeys(ids, 1)


def test_when_the_outbox_writer_thread_dies_the_service_stops_as_failed(
    tmp_path: Path, upstream: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Intake that can no longer commit must not go on answering 451 for ever: the writer's
    death is logged once, at CRITICAL, and the service stops with a failure (``serve`` then
    exits 1, for its supervisor to restart it)."""
    with relay(tmp_path, upstream, managers()) as mail2alert:
        service = mail2alert.service.service
        loop = mail2alert.service._loop
        assert loop is not None
        # Something that is no accepted message breaks the writer's loop itself, outside
        # the guard of each batch, as a bug there would.
        future = asyncio.run_coroutine_threadsafe(_created_future(), loop).result(5)
        service.component(Intake).committer._queue.put((object(), future))
        wait_until(lambda: not mail2alert.service._thread.is_alive(), what="the service to stop")

    assert service.failure == "the outbox writer stopped: AttributeError"
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert [r.getMessage().split(":")[0] for r in critical] == ["the outbox writer thread stopped"]


async def _created_future() -> asyncio.Future[str | None]:
    return asyncio.get_running_loop().create_future()
