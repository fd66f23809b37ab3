"""The outbox keeps what it must and forgets what it may; its writer survives any batch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from mail2alert.errors import OutboxError, OutboxFull
from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.managers.base import Context
from mail2alert.managers.memory import Claim, Note
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.model import Decision, Envelope, Outgoing
from mail2alert.outbox import DB_NAME, Accepted, GroupCommitter, Outbox, RecipientResult, Result
from mail2alert.planning import accept
from mail2alert.routing import Manager, Rule

DAY = 86400.0


def accepted(queue_id: str, at: float, *, event_key: str | None = None) -> Accepted:
    return Accepted(
        queue_id,
        at,
        Envelope("go@example.com", ("ops@example.com",)),
        "subject",
        Decision("relay", None, "test"),
        (Outgoing("go@example.com", ("ops@example.com",), b"Subject: x\r\n\r\nbody\r\n"),),
        claim=Claim(event_key, 600.0) if event_key else None,
    )


def deliver_all(outbox: Outbox, now: float) -> None:
    for item in outbox.due(now, 100):
        outbox.record(
            [Result(item, tuple(RecipientResult(r, "done") for r in item.recipients), 0.0, "")]
        )


def put_twice(committer: GroupCommitter) -> tuple[OutboxError | None, str | None]:
    """Put FIRST, then SECOND, through ``committer``, and close it: what putting FIRST raised
    (None if it went in), and what putting SECOND returned."""

    async def both() -> tuple[OutboxError | None, str | None]:
        try:
            await committer.put(accepted("FIRST", 1.0))
        except OutboxError as exc:
            first: OutboxError | None = exc
        else:
            first = None
        return first, await committer.put(accepted("SECOND", 2.0))

    try:
        return asyncio.run(both())
    finally:
        committer.close()


def test_purge_forgets_delivered_mail_after_a_week_and_keeps_what_is_pending(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path)
    outbox.put([accepted("OLD-DONE", 0.0), accepted("NEW-DONE", 6 * DAY)])
    deliver_all(outbox, 7 * DAY)
    outbox.put([accepted("OLD-PENDING", 0.0, event_key="gocd#0:p/1/s/1:failed")])
    outbox.purge(8 * DAY)
    messages = {m.id for m in outbox.messages()}
    items = {m for m in messages if outbox.items_of(m)}
    seen = outbox.claims()
    outbox.close()
    assert messages == {"NEW-DONE", "OLD-PENDING"}
    assert items == {"NEW-DONE", "OLD-PENDING"}
    assert seen == 0


def test_a_batch_that_fails_unexpectedly_gets_an_outbox_error_and_the_writer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_put = Outbox.put
    calls = 0

    def flaky_put(self: Outbox, batch: list[Accepted]) -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a bug, not an SQLite error")
        return real_put(self, batch)

    monkeypatch.setattr(Outbox, "put", flaky_put)
    committer = GroupCommitter(tmp_path)

    first, second = put_twice(committer)
    assert isinstance(first, OutboxError)
    assert "ValueError: a bug" in str(first)
    assert second is None
    outbox = Outbox(tmp_path)
    assert [m.id for m in outbox.messages()] == ["SECOND"]
    outbox.close()


def test_intake_answers_only_after_its_fsync_and_other_writers_commit_during_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group commit writes its rows under the writers' lock and syncs the WAL after it:
    delivery (any other writer) commits while the disk works, and the sender hears nothing
    before the sync has returned."""
    real_sync = os.fdatasync
    syncing, go_on = threading.Event(), threading.Event()

    def slow_sync(fd: int) -> None:
        syncing.set()
        go_on.wait(10)
        real_sync(fd)

    committer = GroupCommitter(tmp_path)
    monkeypatch.setattr(os, "fdatasync", slow_sync)

    async def scenario() -> tuple[bool, list[str], str | None]:
        put = asyncio.ensure_future(committer.put(accepted("DURABLE", 1.0)))
        await asyncio.get_running_loop().run_in_executor(None, syncing.wait, 10)
        await asyncio.sleep(0.05)  # give a wrongly early answer the time to arrive
        answered_early = put.done()

        def record_meanwhile() -> list[str]:
            other = Outbox(tmp_path, durable=False)
            try:
                with other.transaction("record a result meanwhile") as db:
                    db.execute("INSERT INTO counters VALUES ('during', '{}', 1)")
                return [m.id for m in other.messages()]
            finally:
                other.close()

        loop = asyncio.get_running_loop()
        # While the fsync is held, the other writer must get through (not wait for it).
        seen = await asyncio.wait_for(loop.run_in_executor(None, record_meanwhile), 5)
        go_on.set()
        return answered_early, seen, await put

    try:
        answered_early, seen_during_sync, duplicate_of = asyncio.run(scenario())
    finally:
        go_on.set()
        committer.close()
    assert not answered_early
    assert seen_during_sync == ["DURABLE"]
    assert duplicate_of is None


@pytest.mark.parametrize(
    ("errno_", "error"), [(errno.EIO, OutboxError), (errno.ENOSPC, OutboxFull)]
)
def test_a_failed_fsync_fails_the_batch_and_the_writer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int, error: type[OutboxError]
) -> None:
    """The rows are written but not known to be on disk: the sender is told to retry (452 for
    a full disk), and the next batch is committed as usual."""
    real_sync = os.fdatasync
    failures = [OSError(errno_, os.strerror(errno_))]

    def failing_sync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", failing_sync)
    committer = GroupCommitter(tmp_path)

    first, second = put_twice(committer)
    assert type(first) is error, first
    assert "sync the outbox to disk" in str(first)
    assert second is None


def test_an_outbox_of_the_first_schema_keeps_its_notes_and_threads_when_opened(
    tmp_path: Path,
) -> None:
    # The tables as the first schema made them: the file of an outbox from before notes
    # were generic. Written with SQL here because no code writes that schema any more.
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as old, old:
        old.executescript(
            """
            CREATE TABLE history (pipeline TEXT NOT NULL, stage TEXT NOT NULL,
                result TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (pipeline, stage));
            CREATE TABLE mail_threads (pipeline TEXT NOT NULL, stage TEXT NOT NULL,
                message_id TEXT NOT NULL, PRIMARY KEY (pipeline, stage));
            CREATE TABLE chat_threads (pipeline TEXT NOT NULL, stage TEXT NOT NULL,
                action TEXT NOT NULL, channel TEXT NOT NULL, ts TEXT NOT NULL,
                PRIMARY KEY (pipeline, stage, action));
            INSERT INTO history VALUES ('app', 'build', 'failed', 5.0);
            INSERT INTO mail_threads VALUES ('app', 'build', '<breaks@example.com>');
            INSERT INTO chat_threads VALUES ('app', 'build', 'slack:#ci', 'C1', '17.5');
            """
        )

    for _ in range(2):  # the second open finds it up to date
        outbox = Outbox(tmp_path)
        try:
            assert outbox.notes() == {
                "history": {("app", "build"): "failed"},
                "mail_threads": {("app", "build"): "<breaks@example.com>"},
            }
            assert outbox.chat_thread(("app", "build", "slack:#ci")) == ("C1", "17.5")
        finally:
            outbox.close()


def test_notes_of_any_space_and_key_length_are_kept_and_forgotten(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    try:
        outbox.learn([Note("teams", ("job", "app", "x"), "team-a")], 1.0)
        outbox.learn([Note("teams", ("job", "app", "x"), "team-b")], 2.0)  # known wins
        assert outbox.notes() == {"teams": {("job", "app", "x"): "team-a"}}
        forget = accepted("FORGET", 3.0)
        outbox.put([dataclasses.replace(forget, notes=(Note("teams", ("job", "app", "x"), ""),))])
        assert outbox.notes() == {}
    finally:
        outbox.close()


def test_a_duplicate_still_relays_the_copy_for_recipients_its_manager_did_not_take(
    tmp_path: Path,
) -> None:
    """A claim is the deciding manager's: it suppresses what the manager made of a second
    copy of an event, never the unchanged copy for someone else the message was addressed to
    (a GoCD user's address may be a list: ``mail2alert@``, ``bob@``)."""
    gocd = MANAGER_TYPES["gocd"]
    any_stage = gocd.functions["pipelines.any"]
    rule = Rule(any_stage, (), any_stage.compile(()), ("mailto:team@example.com",))
    manager = Manager(gocd, 0, wants_to=("mail2alert@example.com",), rules=(rule,))
    ours = Envelope("go@example.com", ("mail2alert@example.com",))
    listed = Envelope("go@example.com", ("mail2alert@example.com", "bob@example.com"))
    data = gocd_stage_mail(to="mail2alert@example.com, bob@example.com")
    first = accept("FIRST", ours, data, [manager], Context(), received_at=1.0)
    second = accept("SECOND", listed, data, [manager], Context(), received_at=2.0)
    outbox = Outbox(tmp_path)
    try:
        outbox.put([first])
        committed = outbox.put([second])
        items = outbox.items_of("SECOND")
        recipients = [r.rcpt for r in outbox.recipients_of("SECOND")]
        stored = outbox.message("SECOND")
    finally:
        outbox.close()

    assert committed.duplicates == {"SECOND": "FIRST"}
    assert [(i.kind, i.data.endswith(data)) for i in items] == [("smtp", True)]
    assert recipients == ["bob@example.com"]
    assert stored is not None
    assert (stored.outcome, stored.reason) == (
        "duplicate",
        "same event as FIRST: delivered once; relayed unchanged to bob@example.com",
    )
