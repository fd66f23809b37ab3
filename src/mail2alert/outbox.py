"""The durable outbox: SQLite in WAL mode, the one place where accepted mail lives.

A message is answered 250 only after :meth:`Outbox.put` has committed it with
``synchronous=FULL`` (so it survives a power cut, as a Postfix queue file does). Intake commits
through :class:`GroupCommitter`, which puts every message that arrived during one fsync into
the next transaction: one fsync serves many SMTP sessions.

Tables::

    messages    one row per accepted message: envelope, subject, routing outcome and reason;
                ``raw`` is kept only while the message is held for GoCD data
    items       one row per thing to deliver: bytes, state (pending/done/dead), attempts,
                next try, last error
    recipients  per item and recipient: pending/done/dead and the server's last answer
    history     per GoCD pipeline/stage the last result (passed/failed), for event correction
    seen_events GoCD stage events already accepted, to deliver each only once
    mail_threads per pipeline/stage the Message-ID of its BREAKS mail, for the FIXED reply
    chat_threads per pipeline/stage and chat action the Slack thread of its BREAKS post

Delivery state (done, retry later) is written with ``synchronous=NORMAL``: a power cut may
forget that an item was delivered and send it again, but never lose it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mail2alert.errors import OutboxError
from mail2alert.model import Decision, Envelope, Outgoing

DB_NAME = "outbox.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    received REAL NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,
    subject TEXT NOT NULL,
    manager TEXT,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    raw BLOB
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    data BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS items_due ON items (state, next_try);
CREATE INDEX IF NOT EXISTS items_message ON items (message_id);
CREATE TABLE IF NOT EXISTS recipients (
    item_id INTEGER NOT NULL,
    rcpt TEXT NOT NULL,
    state TEXT NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (item_id, rcpt)
);
CREATE TABLE IF NOT EXISTS history (
    pipeline TEXT NOT NULL,
    stage TEXT NOT NULL,
    result TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (pipeline, stage)
);
CREATE TABLE IF NOT EXISTS mail_threads (
    pipeline TEXT NOT NULL,
    stage TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (pipeline, stage)
);
CREATE TABLE IF NOT EXISTS chat_threads (
    pipeline TEXT NOT NULL,
    stage TEXT NOT NULL,
    action TEXT NOT NULL,
    channel TEXT NOT NULL,
    ts TEXT NOT NULL,
    PRIMARY KEY (pipeline, stage, action)
);
CREATE TABLE IF NOT EXISTS seen_events (
    key TEXT PRIMARY KEY,
    queue_id TEXT NOT NULL,
    at REAL NOT NULL
);
"""


def new_queue_id() -> str:
    """A short, unique, roughly time-ordered queue id, like Postfix's (e.g. ``19C2F0A3B7E1``)."""
    return f"{int(time.time() * 1000) & 0xFFFFFFFF:08X}{secrets.token_hex(3).upper()}"


@dataclass(frozen=True)
class Accepted:
    """One received message and what it turned into, ready to be committed."""

    queue_id: str
    received: float
    envelope: Envelope
    subject: str
    decision: Decision
    items: tuple[Outgoing, ...]
    raw: bytes | None = None
    history: tuple[str, str, str] | None = None
    """``(pipeline, stage, result)`` to remember for the event correction, lower case."""
    event_key: str | None = None
    """Identifies a GoCD event; a second one within ``event_window`` seconds is a duplicate."""
    event_window: float = 0.0
    thread: tuple[str, str, str] | None = None
    """``(pipeline, stage, Message-ID)`` of a BREAKS mail, or with an empty id: thread ended."""
    group: str | None = None
    """The pipeline group of a stage mail, as routing knew it (for display)."""


@dataclass(frozen=True)
class Item:
    """An outgoing item as stored, with the recipients still to be served."""

    id: int
    message_id: str
    kind: str
    mail_from: str
    data: bytes
    attempts: int
    created: float
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class RecipientResult:
    """What the upstream server said about one recipient: done, retry (4xx) or dead (5xx)."""

    rcpt: str
    state: str
    reason: str = ""


class Outbox:
    """A connection to the outbox database. Not thread-safe: one per thread."""

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.path = data_dir / DB_NAME
        self._lock: int | None = None
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            # The connection may be opened by one thread and then used by one other only.
            self.db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open the outbox in {data_dir}: {exc}") from None

    def close(self) -> None:
        """Close the connection (a WAL checkpoint happens when the last one closes)."""
        self.db.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any error.

        Writers (intake processes, the dispatcher, commands) take turns on a file lock first:
        the kernel wakes the next one the moment the lock is free, where SQLite's own busy
        handler would sleep for milliseconds at a time, in every SMTP session's reply.
        """
        if self._lock is None:
            self._lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def put(self, batch: Sequence[Accepted]) -> dict[str, str]:
        """Commit messages and their items in one transaction (durable when this returns).

        Returns ``{queue id: original queue id}`` for the GoCD events that were duplicates:
        those are recorded, but nothing is sent for them.
        """
        duplicates: dict[str, str] = {}
        try:
            with self.transaction() as db:
                for a in batch:
                    original = self._seen_before(db, a)
                    if original is not None:
                        duplicates[a.queue_id] = original
                    self._insert_message(db, a, duplicate_of=original)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot commit to the outbox: {exc}") from exc
        return duplicates

    @staticmethod
    def _seen_before(db: sqlite3.Connection, a: Accepted) -> str | None:
        if a.event_key is None:
            return None
        row = db.execute(
            "SELECT queue_id, at FROM seen_events WHERE key=?", (a.event_key,)
        ).fetchone()
        if row is not None and a.received - row[1] < a.event_window:
            return str(row[0])
        db.execute(
            "INSERT OR REPLACE INTO seen_events VALUES (?,?,?)",
            (a.event_key, a.queue_id, a.received),
        )
        return None

    def _insert_message(
        self, db: sqlite3.Connection, a: Accepted, *, duplicate_of: str | None = None
    ) -> None:
        d = a.decision
        outcome: str = d.outcome
        reason = d.reason
        if duplicate_of is not None:
            outcome, reason = "duplicate", f"same GoCD event as {duplicate_of}: delivered once"
        db.execute(
            "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)",
            (
                a.queue_id,
                a.received,
                a.envelope.mail_from,
                json.dumps(a.envelope.rcpt_tos),
                a.subject,
                d.manager,
                outcome,
                reason,
                a.raw,
            ),
        )
        if duplicate_of is not None:
            return
        for item in a.items:
            self._insert_item(db, a.queue_id, a.received, item)
        if a.history is not None:
            db.execute("INSERT OR REPLACE INTO history VALUES (?,?,?,?)", (*a.history, a.received))
        if a.thread is not None and a.thread[2]:
            db.execute("INSERT OR REPLACE INTO mail_threads VALUES (?,?,?)", a.thread)
        elif a.thread is not None:
            db.execute(
                "DELETE FROM mail_threads WHERE pipeline=? AND stage=?", (a.thread[0], a.thread[1])
            )

    def held(self) -> list[tuple[str, float, Envelope, bytes]]:
        """Messages held for GoCD data: (queue id, received, envelope, raw bytes)."""
        rows = self.db.execute(
            "SELECT id, received, mail_from, rcpt_tos, raw FROM messages"
            " WHERE outcome='hold' ORDER BY received"
        ).fetchall()
        return [
            (qid, at, Envelope(sender, tuple(json.loads(rcpts))), bytes(raw))
            for qid, at, sender, rcpts, raw in rows
        ]

    def release(self, accepted: Accepted) -> None:
        """Replace a held message's outcome with a new decision and queue its items."""
        with self.transaction() as db:
            db.execute("DELETE FROM messages WHERE id=? AND outcome='hold'", (accepted.queue_id,))
            original = self._seen_before(db, accepted)
            self._insert_message(db, accepted, duplicate_of=original)

    def seed_history(self, results: dict[tuple[str, str], str], at: float) -> None:
        """Remember results from cctray.xml for stages mail2alert has not seen itself."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO history VALUES (?,?,?,?)",
                [(p, s, r, at) for (p, s), r in results.items()],
            )

    def last_result(self, pipeline: str, stage: str) -> str | None:
        """The last known result of a stage: passed, failed, or None."""
        row = self.db.execute(
            "SELECT result FROM history WHERE pipeline=? AND stage=?", (pipeline, stage)
        ).fetchone()
        return None if row is None else str(row[0])

    def chat_thread(self, key: tuple[str, str, str]) -> tuple[str, str] | None:
        """The Slack (channel, ts) of the BREAKS post for (pipeline, stage, action)."""
        row = self.db.execute(
            "SELECT channel, ts FROM chat_threads WHERE pipeline=? AND stage=? AND action=?", key
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def set_chat_thread(self, key: tuple[str, str, str], channel: str, ts: str) -> None:
        """Remember the Slack thread a BREAKS post started."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO chat_threads VALUES (?,?,?,?,?)", (*key, channel, ts)
            )

    def drop_chat_thread(self, key: tuple[str, str, str]) -> None:
        """Forget a Slack thread once its FIXED reply is posted."""
        with self.transaction() as db:
            db.execute("DELETE FROM chat_threads WHERE pipeline=? AND stage=? AND action=?", key)

    def purge(self, now: float, *, keep: float = 7 * 86400) -> None:
        """Forget delivered items and old records; pending, dead and held ones stay."""
        with self.transaction() as db:
            db.execute("DELETE FROM seen_events WHERE at < ?", (now - 86400,))
            old = now - keep
            db.execute(
                "DELETE FROM recipients WHERE item_id IN"
                " (SELECT id FROM items WHERE state='done' AND created < ?)",
                (old,),
            )
            db.execute("DELETE FROM items WHERE state='done' AND created < ?", (old,))
            db.execute(
                "DELETE FROM messages WHERE received < ? AND outcome != 'hold'"
                " AND id NOT IN (SELECT message_id FROM items)",
                (old,),
            )

    @staticmethod
    def _insert_item(db: sqlite3.Connection, queue_id: str, now: float, item: Outgoing) -> None:
        cursor = db.execute(
            "INSERT INTO items (message_id, kind, mail_from, data, state, created, next_try)"
            " VALUES (?,?,?,?,'pending',?,?)",
            (queue_id, item.kind, item.mail_from, item.data, now, now),
        )
        db.executemany(
            "INSERT OR IGNORE INTO recipients (item_id, rcpt, state) VALUES (?,?,'pending')",
            [(cursor.lastrowid, r) for r in item.recipients],
        )

    def due(self, now: float, limit: int, exclude: Sequence[int] = ()) -> list[Item]:
        """Pending items whose next try has come, oldest first."""
        rows = self.db.execute(
            "SELECT id, message_id, kind, mail_from, data, attempts, created FROM items"
            " WHERE state='pending' AND next_try<=? ORDER BY next_try, id LIMIT ?",
            (now, limit + len(exclude)),
        ).fetchall()
        skip = set(exclude)
        items: list[Item] = []
        for row in rows:
            if row[0] in skip:
                continue
            rcpts = tuple(
                r
                for (r,) in self.db.execute(
                    "SELECT rcpt FROM recipients"
                    " WHERE item_id=? AND state='pending' ORDER BY rowid",
                    (row[0],),
                )
            )
            item_id, message_id, kind, mail_from, data, attempts, created = row
            items.append(Item(item_id, message_id, kind, mail_from, data, attempts, created, rcpts))
            if len(items) >= limit:
                break
        return items

    def next_due(self, exclude: Sequence[int] = ()) -> float | None:
        """When the next pending item (not in ``exclude``) is due, or None if there is none."""
        marks = ",".join("?" * len(exclude))
        row = self.db.execute(
            f"SELECT MIN(next_try) FROM items WHERE state='pending' AND id NOT IN ({marks})",  # noqa: S608 - only placeholders are interpolated
            tuple(exclude),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def record(
        self, results: Sequence[tuple[Item, Sequence[RecipientResult], float | None, str]]
    ) -> None:
        """Store delivery attempts: per recipient outcome, then the item's new state.

        Each result is (item, recipient results, next try or None, error). An item is done
        when no recipient is left pending, dead when all that are left are dead, and else
        pending again at ``next try``.
        """
        with self.transaction() as db:
            for item, rcpt_results, next_try, error in results:
                db.executemany(
                    "UPDATE recipients SET state=?, last_error=? WHERE item_id=? AND rcpt=?",
                    [(r.state, r.reason, item.id, r.rcpt) for r in rcpt_results],
                )
                if next_try is None:
                    db.execute(
                        "UPDATE recipients SET state='dead', last_error=?"
                        " WHERE item_id=? AND state='pending'",
                        (error, item.id),
                    )
                states = {
                    s
                    for (s,) in db.execute(
                        "SELECT state FROM recipients WHERE item_id=?", (item.id,)
                    )
                }
                if "pending" in states:
                    db.execute(
                        "UPDATE items SET attempts=attempts+1, next_try=?, last_error=? WHERE id=?",
                        (next_try, error, item.id),
                    )
                    continue
                final = "dead" if "dead" in states else "done"
                # A delivered item's bytes are not needed any more; its row stays as a record.
                db.execute(
                    "UPDATE items SET state=?, attempts=attempts+1, last_error=?,"
                    " data=CASE WHEN ?='done' THEN x'' ELSE data END WHERE id=?",
                    (final, error, final, item.id),
                )


class GroupCommitter:
    """Commits accepted messages from a writer thread, many per fsync.

    :meth:`put` returns once the message is durable; the event loop is never blocked by
    SQLite or fsync.
    """

    def __init__(self, data_dir: Path) -> None:
        self._outbox = Outbox(data_dir, durable=True)
        self._queue: queue.SimpleQueue[tuple[Accepted, asyncio.Future[str | None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()

    async def put(self, accepted: Accepted) -> str | None:
        """Return once ``accepted`` is committed; raise OutboxError if it could not be.

        The result is the queue id of the original when this was a duplicate GoCD event.
        """
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._queue.put((accepted, future))
        return await future

    def close(self) -> None:
        """Finish what was queued, then stop the writer thread."""
        self._queue.put(None)
        self._thread.join()
        self._outbox.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < 512:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                batch.append(more)
            error: BaseException | None = None
            duplicates: dict[str, str] = {}
            try:
                duplicates = self._outbox.put([a for a, _ in batch])
            except OutboxError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one batch
                # Whatever went wrong, these senders get a 451 and retry; the thread goes on.
                error = OutboxError(f"cannot commit to the outbox: {type(exc).__name__}: {exc}")
            settled = [(f, duplicates.get(a.queue_id)) for a, f in batch]
            batch[0][1].get_loop().call_soon_threadsafe(_settle, settled, error)


def _settle(
    settled: list[tuple[asyncio.Future[str | None], str | None]], error: BaseException | None
) -> None:
    for future, duplicate_of in settled:
        if future.done():
            continue
        if error is None:
            future.set_result(duplicate_of)
        else:
            future.set_exception(error)


def read_stage_table(data_dir: Path, table: str) -> dict[tuple[str, str], str]:
    """A per-stage table (history, mail_threads) of a data dir, read-only; {} without one."""
    path = data_dir / DB_NAME
    if not path.exists():
        return {}
    column = StageView.COLUMNS[table]
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute(f"SELECT pipeline, stage, {column} FROM {table}").fetchall()  # noqa: S608 - names from StageView.COLUMNS
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot read {table} in {path}: {exc}") from None
    return {(str(p), str(s)): str(r) for p, s, r in rows}


class StageView(Mapping[tuple[str, str], str]):
    """A per-stage table of the outbox as a read-only mapping, for routing's :class:`Context`.

    ``history`` gives the last result per stage, ``mail_threads`` the Message-ID a FIXED mail
    answers. Each look-up reads the database, so routing sees the latest committed state.
    """

    COLUMNS: ClassVar[dict[str, str]] = {"history": "result", "mail_threads": "message_id"}

    def __init__(self, outbox: Outbox, table: str) -> None:
        self._db = outbox.db
        self._table = table
        self._column = self.COLUMNS[table]

    def __getitem__(self, key: tuple[str, str]) -> str:
        row = self._db.execute(
            f"SELECT {self._column} FROM {self._table} WHERE pipeline=? AND stage=?",  # noqa: S608 - names from COLUMNS
            key,
        ).fetchone()
        if row is None:
            raise KeyError(key)
        return str(row[0])

    def __iter__(self) -> Iterator[tuple[str, str]]:
        rows = self._db.execute(f"SELECT pipeline, stage FROM {self._table}").fetchall()  # noqa: S608
        return iter([(str(p), str(s)) for p, s in rows])

    def __len__(self) -> int:
        return int(self._db.execute(f"SELECT COUNT(*) FROM {self._table}").fetchone()[0])  # noqa: S608
