"""The durable outbox: SQLite in WAL mode, the one place where accepted mail lives.

A message is answered 250 only after :meth:`Outbox.put` has committed it with
``synchronous=FULL`` (so it survives a power cut, as a Postfix queue file does). Intake commits
through :class:`GroupCommitter`, which puts every message that arrived during one fsync into
the next transaction: one fsync serves many SMTP sessions.

Tables::

    messages    one row per accepted message: envelope, subject, routing outcome and reason;
                ``raw`` is kept only while the message is held for GoCD data
    items       one row per thing to deliver: bytes, state (pending/done/dead), attempts,
                next try, last error; ``waiting`` names the destination it waits for when
                that destination could not be reached (the item's own attempts do not count)
    recipients  per item and recipient: pending/done/dead and the server's last answer
    history     per GoCD pipeline/stage the last result (passed/failed), for event correction
    seen_events GoCD stage events already accepted, to deliver each only once
    mail_threads per pipeline/stage the Message-ID of its BREAKS mail, for the FIXED reply
    chat_threads per pipeline/stage and chat action the Slack thread of its BREAKS post

Delivery state (done, retry later) is written with ``synchronous=NORMAL``: a power cut may
forget that an item was delivered and send it again, but never lose it.

Text that is not valid Unicode (an address of non-UTF-8 bytes, which aiosmtpd hands over
with surrogate escapes) is stored as the BLOB of its bytes and read back as the same text:
such a message is kept like any other, byte for byte.

Every SQLite or file-system failure is raised as :class:`~mail2alert.errors.OutboxError`;
:class:`~mail2alert.errors.OutboxFull` when the file system has no space left.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mail2alert.errors import OutboxError, OutboxFull
from mail2alert.managers.memory import Claim, Note
from mail2alert.model import Decision, Envelope, Outgoing

DB_NAME = "outbox.sqlite3"

log = logging.getLogger(__name__)

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
    last_error TEXT NOT NULL DEFAULT '',
    waiting TEXT NOT NULL DEFAULT ''
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


def storable(text: str) -> str | bytes:
    """``text`` as SQLite can keep it: itself, or the bytes of a surrogate-escaped string."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")
    return text


#: Blobs bigger than this are written through a blob handle, not bound: SQLite keeps a copy of
#: what was bound to a cached statement until that statement runs again, which kept two 31 MB
#: copies of the last big message in memory for good.
BIG_BLOB = 1024 * 1024


def _insert(
    db: sqlite3.Connection, sql: str, params: Sequence[object], column: tuple[str, str]
) -> int:
    """Run an INSERT whose ``{blob}`` placeholder takes its one blob (the last of ``params``,
    for ``column`` = (table, column)); the new row's rowid."""
    *others, blob = params
    if not (isinstance(blob, bytes) and len(blob) > BIG_BLOB):
        rowid = db.execute(sql.format(blob="?"), (*others, blob)).lastrowid
        assert rowid is not None
        return rowid
    rowid = db.execute(sql.format(blob="zeroblob(?)"), (*others, len(blob))).lastrowid
    assert rowid is not None
    table, name = column
    with db.blobopen(table, name, rowid) as handle:
        handle.write(blob)
    return rowid


def _marks(values: Sequence[object]) -> str:
    """One ``?`` placeholder per value, comma-separated, for ``IN (...)``."""
    return ",".join("?" * len(values))


def loaded(value: str | bytes) -> str:
    """What :func:`storable` kept, as the text it was."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def storage_error(exc: BaseException, doing: str) -> OutboxError:
    """The outbox error for a failure while ``doing`` (OutboxFull when the disk is full)."""
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.Error)
        and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    )
    kind = OutboxFull if full else OutboxError
    return kind(f"cannot {doing}: {exc}")


#: The tables notes are kept in: the SQL that keeps one (``{verb}``: REPLACE or IGNORE) and
#: the SQL that forgets one.
_NOTES: Mapping[str, tuple[str, str]] = {
    "history": (
        "INSERT OR {verb} INTO history VALUES (?,?,?,?)",
        "DELETE FROM history WHERE pipeline=? AND stage=?",
    ),
    "mail_threads": (
        "INSERT OR {verb} INTO mail_threads VALUES (?,?,?)",
        "DELETE FROM mail_threads WHERE pipeline=? AND stage=?",
    ),
}


def _keep(db: sqlite3.Connection, note: Note, at: float, *, known_wins: bool = False) -> None:
    """Keep (or, with an empty value, forget) one note; with ``known_wins``, only where
    nothing is known yet. Raises ValueError for a table notes are not kept in."""
    try:
        keep, forget = _NOTES[note.table]
    except KeyError:
        raise ValueError(f"no outbox table for notes {note.table!r}") from None
    keep = keep.format(verb="IGNORE" if known_wins else "REPLACE")
    if not note.value:
        if not known_wins:
            db.execute(forget, note.key)
    elif note.table == "history":
        db.execute(keep, (*note.key, note.value, at))
    else:
        db.execute(keep, (*note.key, note.value))


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
    notes: tuple[Note, ...] = ()
    """What the deciding manager keeps once this is committed (an empty value forgets)."""
    claim: Claim | None = None
    """A second message with this claim's key within its window is a duplicate."""
    label: str | None = None
    """Where the message belongs by its manager's snapshot, as routing knew it (display)."""


@dataclass
class Committed:
    """What :meth:`Outbox.put` did with a batch, by queue id."""

    duplicates: dict[str, str] = field(default_factory=dict)
    """Duplicate GoCD events -> the queue id of the original: recorded, nothing sent."""
    failed: dict[str, OutboxError] = field(default_factory=dict)
    """Messages that could not be written (the others were committed)."""


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
    due: float = 0.0
    """When it was due: its arrival, the end of its back-off, or an operator's retry."""


@dataclass(frozen=True)
class RecipientResult:
    """What the upstream server said about one recipient: done, retry (4xx) or dead (5xx)."""

    rcpt: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Result:
    """What one delivery attempt of an item comes to, as the outbox records it.

    ``next_try`` None means give up: whatever is still pending is dead. ``waiting`` names the
    destination the item waits for when that destination could not be reached: such an
    attempt was no answer about the item, so it does not count among the item's attempts.
    """

    item: Item
    recipients: tuple[RecipientResult, ...]
    next_try: float | None
    error: str
    waiting: str = ""


class Outbox:
    """A connection to the outbox database, used by one thread at a time.

    It may be opened in one thread and handed to another (``check_same_thread`` is off for
    that), but two threads must never use it at once: each component owns its own.
    """

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
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(items)")}
            if "waiting" not in columns:  # an outbox made before destinations could be down
                self.db.execute("ALTER TABLE items ADD COLUMN waiting TEXT NOT NULL DEFAULT ''")
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open the outbox in {data_dir}: {exc}") from None

    def close(self) -> None:
        """Close the connection (a WAL checkpoint happens when the last one closes)."""
        self.db.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def notes(self) -> dict[str, dict[tuple[str, str], str]]:
        """Every note kept so far, by table and key (for routing's in-memory snapshot)."""
        return read_notes(self.db)

    def version(self) -> int:
        """A number that changes whenever another connection commits (``data_version``)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def transaction(self, doing: str = "write to the outbox") -> Iterator[sqlite3.Connection]:
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
                self.db.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (a full disk): a transaction left open would make
                # every later BEGIN fail, and the connection useless until a restart.
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(exc, doing) from exc
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def put(self, batch: Sequence[Accepted]) -> Committed:
        """Commit messages and their items in one transaction (durable when this returns).

        Each message is written in a savepoint of its own: one that cannot be written fails
        alone (it is in :attr:`Committed.failed`) and the others are committed. Raises
        OutboxError when the transaction as a whole fails (OutboxFull for a full disk).
        """
        committed = Committed()
        with self.transaction("commit to the outbox") as db:
            for a in batch:
                db.execute("SAVEPOINT message")
                try:
                    original = self._seen_before(db, a)
                    self._insert_message(db, a, duplicate_of=original)
                except (sqlite3.Error, ValueError, OverflowError) as exc:
                    error = storage_error(exc, f"commit {a.queue_id} to the outbox")
                    if isinstance(error, OutboxFull):
                        raise  # no message of this batch can be written, nor the next
                    db.execute("ROLLBACK TO message")
                    db.execute("RELEASE message")
                    committed.failed[a.queue_id] = error
                    continue
                db.execute("RELEASE message")
                if original is not None:
                    committed.duplicates[a.queue_id] = original
        return committed

    @staticmethod
    def _seen_before(db: sqlite3.Connection, a: Accepted) -> str | None:
        if a.claim is None:
            return None
        row = db.execute(
            "SELECT queue_id, at FROM seen_events WHERE key=?", (a.claim.key,)
        ).fetchone()
        if row is not None and a.received - row[1] < a.claim.window:
            return str(row[0])
        db.execute(
            "INSERT OR REPLACE INTO seen_events VALUES (?,?,?)",
            (a.claim.key, a.queue_id, a.received),
        )
        return None

    def _insert_message(
        self, db: sqlite3.Connection, a: Accepted, *, duplicate_of: str | None = None
    ) -> None:
        d = a.decision
        outcome: str = d.outcome
        reason = d.reason
        if duplicate_of is not None:
            outcome, reason = "duplicate", f"same event as {duplicate_of}: delivered once"
        _insert(
            db,
            "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,{blob})",
            (
                a.queue_id,
                a.received,
                storable(a.envelope.mail_from),
                json.dumps(a.envelope.rcpt_tos),
                storable(a.subject),
                d.manager,
                outcome,
                reason,
                a.raw,
            ),
            ("messages", "raw"),
        )
        if duplicate_of is not None:
            return
        for item in a.items:
            self._insert_item(db, a.queue_id, a.received, item)
        for note in a.notes:
            _keep(db, note, a.received)

    def held(self) -> list[tuple[str, float, Envelope, bytes]]:
        """Messages held for GoCD data: (queue id, received, envelope, raw bytes)."""
        rows = self.db.execute(
            "SELECT id, received, mail_from, rcpt_tos, raw FROM messages"
            " WHERE outcome='hold' ORDER BY received"
        ).fetchall()
        return [
            (qid, at, Envelope(loaded(sender), tuple(json.loads(rcpts))), bytes(raw))
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
        self.learn([Note("history", key, result) for key, result in results.items()], at)

    def learn(self, notes: Sequence[Note], at: float) -> None:
        """Keep notes learnt from outside, only where nothing is known yet."""
        with self.transaction() as db:
            for note in notes:
                _keep(db, note, at, known_wins=True)

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
        item_id = _insert(
            db,
            "INSERT INTO items (message_id, kind, mail_from, state, created, next_try, data)"
            " VALUES (?,?,?,'pending',?,?,{blob})",
            (queue_id, item.kind, storable(item.mail_from), now, now, item.data),
            ("items", "data"),
        )
        db.executemany(
            "INSERT OR IGNORE INTO recipients (item_id, rcpt, state) VALUES (?,?,'pending')",
            [(item_id, storable(r)) for r in item.recipients],
        )

    _ITEM = "SELECT id, message_id, kind, mail_from, data, attempts, created, next_try FROM items"

    def _items(self, rows: list[Any]) -> list[Item]:
        items: list[Item] = []
        for item_id, message_id, kind, mail_from, data, attempts, created, next_try in rows:
            rcpts = tuple(
                loaded(r)
                for (r,) in self.db.execute(
                    "SELECT rcpt FROM recipients"
                    " WHERE item_id=? AND state='pending' ORDER BY rowid",
                    (item_id,),
                )
            )
            items.append(
                Item(
                    item_id,
                    message_id,
                    kind,
                    loaded(mail_from),
                    data,
                    attempts,
                    created,
                    rcpts,
                    next_try,
                )
            )
        return items

    def due(self, now: float, limit: int, exclude: Sequence[int] = ()) -> list[Item]:
        """Pending items whose next try has come, oldest first, none in ``exclude`` (those
        under way: their data is not read again) and none that wait for a destination (see
        :meth:`probe`)."""
        rows = self.db.execute(
            f"{self._ITEM} WHERE state='pending' AND next_try<=? AND waiting=''"
            f" AND id NOT IN ({_marks(exclude)}) ORDER BY next_try, id LIMIT ?",
            (now, *exclude, limit),
        ).fetchall()
        return self._items(rows)

    def probe(self, destination: str, exclude: Sequence[int] = ()) -> Item | None:
        """The item that has waited longest for ``destination`` (not in ``exclude``), to try
        it with."""
        rows = self.db.execute(
            f"{self._ITEM} WHERE state='pending' AND waiting=?"
            f" AND id NOT IN ({_marks(exclude)}) ORDER BY id LIMIT 1",
            (destination, *exclude),
        ).fetchall()
        items = self._items(rows)
        return items[0] if items else None

    def waiting_for(self) -> dict[str, int]:
        """The destinations items wait for, with how many wait for each."""
        rows = self.db.execute(
            "SELECT waiting, COUNT(*) FROM items WHERE state='pending' AND waiting!=''"
            " GROUP BY waiting"
        ).fetchall()
        return {str(d): int(n) for d, n in rows}

    def next_due(self, exclude: Sequence[int] = ()) -> float | None:
        """When the next pending item (not in ``exclude``, not waiting) is due, or None."""
        where = f"state='pending' AND waiting='' AND id NOT IN ({_marks(exclude)})"
        row = self.db.execute(
            f"SELECT MIN(next_try) FROM items WHERE {where}",  # noqa: S608 - only placeholders are interpolated
            tuple(exclude),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def release_waiting(self, destination: str, now: float) -> int:
        """``destination`` answers again: every item waiting for it is due now. How many."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE items SET waiting='', next_try=? WHERE state='pending' AND waiting=?",
                (now, destination),
            )
            return cursor.rowcount

    def record(self, results: Sequence[Result]) -> None:
        """Store delivery attempts: per recipient outcome, then the item's new state.

        An item is done when no recipient is left pending, dead when all that are left are
        dead, and else pending again at ``next_try``; an item left waiting for its
        destination keeps its count of attempts.
        """
        with self.transaction() as db:
            for result in results:
                self._record(db, result)

    @staticmethod
    def _record(db: sqlite3.Connection, result: Result) -> None:
        item, error = result.item, result.error
        db.executemany(
            "UPDATE recipients SET state=?, last_error=? WHERE item_id=? AND rcpt=?",
            [(r.state, r.reason, item.id, storable(r.rcpt)) for r in result.recipients],
        )
        if result.next_try is None:
            db.execute(
                "UPDATE recipients SET state='dead', last_error=?"
                " WHERE item_id=? AND state='pending'",
                (error, item.id),
            )
        rows = db.execute("SELECT state FROM recipients WHERE item_id=?", (item.id,))
        states = {s for (s,) in rows}
        counted = 0 if result.waiting else 1
        if "pending" in states:
            db.execute(
                "UPDATE items SET attempts=attempts+?, next_try=?, last_error=?, waiting=?"
                " WHERE id=?",
                (counted, result.next_try, error, result.waiting, item.id),
            )
            return
        final = "dead" if "dead" in states else "done"
        # A delivered item's bytes are not needed any more; its row stays as a record.
        db.execute(
            "UPDATE items SET state=?, attempts=attempts+?, last_error=?, waiting='',"
            " data=CASE WHEN ?='done' THEN x'' ELSE data END WHERE id=?",
            (final, counted, error, final, item.id),
        )

    def expire_waiting(self, destination: str, before: float, reason: str) -> list[str]:
        """Items that waited for ``destination`` since before ``before`` are dead, with
        ``reason``; the queue ids of their messages."""
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, message_id FROM items"
                " WHERE state='pending' AND waiting=? AND created < ?",
                (destination, before),
            ).fetchall()
            for item_id, _ in rows:
                db.execute(
                    "UPDATE recipients SET state='dead', last_error=?"
                    " WHERE item_id=? AND state='pending'",
                    (reason, item_id),
                )
                db.execute(
                    "UPDATE items SET state='dead', waiting='', last_error=? WHERE id=?",
                    (reason, item_id),
                )
        return [str(qid) for _, qid in rows]


class GroupCommitter:
    """Commits accepted messages from a writer thread, many per fsync.

    :meth:`put` returns once the message is durable; the event loop is never blocked by
    SQLite or fsync.
    """

    def __init__(
        self, data_dir: Path, *, on_death: Callable[[BaseException], None] | None = None
    ) -> None:
        """``on_death`` is called, from the writer thread, if that thread ends by an error."""
        self._outbox = Outbox(data_dir, durable=True)
        self._queue: queue.SimpleQueue[tuple[Accepted, asyncio.Future[str | None]] | None] = (
            queue.SimpleQueue()
        )
        self._on_death = on_death
        self._thread = threading.Thread(target=self._guarded, name="outbox-writer", daemon=True)
        self._thread.start()

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported to the service, which stops
            # Each batch is guarded in _run; what ends the thread (MemoryError, a bug in the
            # loop itself) would leave intake answering 451 for ever: say so, and let go.
            log.critical("the outbox writer thread stopped: %s: %s", type(exc).__name__, exc)
            if self._on_death is not None:
                self._on_death(exc)

    async def put(self, accepted: Accepted) -> str | None:
        """Return once ``accepted`` is committed; raise OutboxError if it could not be.

        The result is the queue id of the original when this was a duplicate GoCD event.
        """
        if not self._thread.is_alive():
            # Only something like MemoryError ends it; never leave a sender waiting for it.
            raise OutboxError("the outbox writer thread has stopped; restart mail2alert")
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
            error: OutboxError | None = None
            committed = Committed()
            try:
                committed = self._outbox.put([a for a, _ in batch])
            except OutboxError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one batch
                # Whatever went wrong, these senders get a 451 and retry; the thread goes on.
                error = OutboxError(f"cannot commit to the outbox: {type(exc).__name__}: {exc}")
            settled = [
                (
                    f,
                    committed.duplicates.get(a.queue_id),
                    error or committed.failed.get(a.queue_id),
                )
                for a, f in batch
            ]
            batch[0][1].get_loop().call_soon_threadsafe(_settle, settled)
            # Let go of the messages before waiting for the next: a big one would stay in
            # memory for as long as the wait lasts.
            del first, batch, settled


def _settle(
    settled: list[tuple[asyncio.Future[str | None], str | None, OutboxError | None]],
) -> None:
    for future, duplicate_of, error in settled:
        if future.done():
            continue
        if error is None:
            future.set_result(duplicate_of)
        else:
            future.set_exception(error)


def read_notes_of(data_dir: Path) -> dict[str, dict[tuple[str, str], str]]:
    """Every note kept in a data dir's outbox, read-only, by table and key; {} without one."""
    path = data_dir / DB_NAME
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return read_notes(db)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot read the notes in {path}: {exc}") from None


#: The tables notes are kept in, and each one's value column.
NOTE_COLUMNS: Mapping[str, str] = {"history": "result", "mail_threads": "message_id"}


def read_notes(db: sqlite3.Connection) -> dict[str, dict[tuple[str, str], str]]:
    """Every note of the outbox ``db`` is a connection to, by table and key."""
    return {
        table: {
            (str(a), str(b)): str(value)
            for a, b, value in db.execute(f"SELECT pipeline, stage, {column} FROM {table}")  # noqa: S608 - names from NOTE_COLUMNS
        }
        for table, column in NOTE_COLUMNS.items()
    }
