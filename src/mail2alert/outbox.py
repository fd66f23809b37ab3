"""The durable outbox: SQLite in WAL mode, the one place where accepted mail lives.

A message is answered 250 only once it is on disk (so it survives a power cut, as a Postfix
queue file does). Intake commits through :class:`GroupCommitter`, which puts every message
that arrived during one fsync into the next transaction: one fsync serves many SMTP
sessions. It writes its rows under the writers' lock without an fsync and then syncs the WAL
(:meth:`Outbox.sync`) after letting go of it, so that delivery and the other intake process
write while the disk works; only then does it answer.

Tables::

    messages    one row per accepted message: envelope, subject, routing outcome and reason,
                and for the decision history its facts, each rule's verdict and its header
                section; ``raw`` is kept only while the message is held (its manager waits
                for data)
    items       one row per thing to deliver: bytes, state (pending/done/dead), attempts,
                next try, last error; ``waiting`` names the destination it waits for when
                that destination could not be reached (the item's own attempts do not count);
                ``log`` has a JSON line per attempt for the history (when, its result: sent,
                retry, dead or waiting, and what the other side answered), in the row the
                attempt updates anyway: a table of its own cost two more pages per commit
    recipients  per item and recipient: pending/done/dead and the server's last answer
    notes       what managers keep between messages (:class:`~mail2alert.managers.memory.Note`):
                per space (a manager type's name for a kind of note) and key, a value;
                the planner keeps the Message-ID of the mail that starts a conversation
                in the ``mail_threads`` space
    seen_events the claims of messages accepted lately, to deliver each event only once
    chat_threads per conversation and chat action the Slack thread its first post started
    counters    running totals for ``/metrics`` (:meth:`Outbox.counters`), by name and labels:
                kept in the transaction that decides or records what they count, so every
                process's counts add up, survive restarts and are never purged

Finished messages (nothing pending, dead or held) are kept for ``history.keep`` and at most
``history.max-messages`` of them (:meth:`Outbox.purge`); pending, dead and held ones stay.

Keys are stored as JSON arrays of their parts. ``PRAGMA user_version`` is the schema's
version: an outbox of an older one is brought up to date when it is opened.

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
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import queue
import re
import secrets
import sqlite3
import tempfile
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
    raw BLOB,
    facts TEXT NOT NULL DEFAULT '',
    facts_data TEXT,
    trace TEXT NOT NULL DEFAULT '[]',
    headers BLOB
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
    waiting TEXT NOT NULL DEFAULT '',
    log TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS items_due ON items (state, next_try);
CREATE INDEX IF NOT EXISTS items_message ON items (message_id);
-- Held messages are few among many: counted and listed without reading every message.
CREATE INDEX IF NOT EXISTS messages_held ON messages (outcome) WHERE outcome='hold';
CREATE TABLE IF NOT EXISTS recipients (
    item_id INTEGER NOT NULL,
    rcpt TEXT NOT NULL,
    state TEXT NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (item_id, rcpt)
);
CREATE TABLE IF NOT EXISTS notes (
    space TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (space, key)
);
CREATE TABLE IF NOT EXISTS chat_threads (
    key TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    ts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_events (
    key TEXT PRIMARY KEY,
    queue_id TEXT NOT NULL,
    at REAL NOT NULL,
    until REAL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (name, labels)
);
"""


#: Upper bounds (seconds) of the ``delivery_seconds`` counters: acceptance to delivery.
DELIVERY_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0)


@functools.lru_cache(maxsize=4096)
def _labels_text(labels: tuple[tuple[str, str], ...]) -> str:
    """Labels as the counters table keys them. Their values are bounded (managers, outcomes,
    rule numbers, channels), so a few texts serve every message: made once each."""
    return json.dumps(dict(labels), sort_keys=True)


class _Tally:
    """Counts to add when a transaction ends: one statement per counter, however many
    messages or results of the transaction counted it."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def add(self, name: str, by: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counts[key] = self.counts.get(key, 0.0) + by

    def merge(self, other: _Tally) -> None:
        for key, by in other.counts.items():
            self.counts[key] = self.counts.get(key, 0.0) + by

    def write(self, db: sqlite3.Connection) -> None:
        db.executemany(
            "INSERT INTO counters VALUES (?,?,?)"
            " ON CONFLICT (name, labels) DO UPDATE SET value=value+excluded.value",
            [(name, _labels_text(labels), by) for (name, labels), by in self.counts.items()],
        )


def channel_of(kind: str, data: bytes) -> str:
    """The channel an item goes out by: ``smtp``, or its chat action's scheme (``slack``,
    an Apprise scheme)."""
    if kind != "chat":
        return kind
    action = _chat_action(data)[0]
    return action.split(":", 1)[0].lower() if ":" in action else "chat"


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


def _json_of(data: Mapping[str, object]) -> str:
    """Facts as the history stores them: JSON, anything not plain written as its text."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)


def _answer_of(result: Result) -> str:
    """What the other side said to one attempt, in one line: its answer to the whole, each
    recipient's answer, or why the attempt failed."""
    parts = [result.answer] if result.answer else []
    parts += [f"{r.rcpt}: {r.reason}" for r in result.recipients if r.reason]
    if result.error and not any(result.error in part for part in parts):
        parts.append(result.error)
    return "; ".join(parts)


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


#: The page size of a new outbox: SQLite's smallest. Every transaction writes each page it
#: changed whole to the WAL (and a checkpoint writes it again to the database), and what a
#: commit changes is mostly the pages of its own messages: their rows, the overflow pages of
#: their bytes and history, the last leaves of the indexes. Per 1.5 KB message at three
#: messages per commit (bench/store_io.py) that came to 21.7 KB with 2 KiB pages, 14.9 with
#: 1 KiB and 11.5 with 512 bytes; beside a durable Postfix in bench/bench.py, 15.3 → 12.3 KB
#: at 10 sessions and 12.3 → 10.9 at 50, at the same speed. The history's scans of many
#: messages read more pages (bench/scrape.py at 100,000 messages: the 24-hour chart 154 →
#: 179 ms), and a 31 MB message takes 0.7 s to commit instead of 0.4. An outbox made before
#: keeps its page size.
PAGE_SIZE = 512

#: The least room in data-dir that readiness calls writable. A commit of a page or two can
#: fit in the unused end of a file's last block on a full disk, so that one row committed
#: says little about the next message.
READY_FREE = 256 * 1024

#: How much WAL (in bytes) a commit lets grow before it checkpoints it into the database:
#: 4 MiB, as SQLite's default of 1000 pages of 4 KiB was.
WAL_AUTOCHECKPOINT = 4 * 1024 * 1024

#: A WAL that grew past this (while a reader kept a checkpoint from finishing) is cut back to
#: it once it is checkpointed; below it the file is kept and written over, which needs no
#: change of its size, so an fsync of the WAL flushes no file-system metadata.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024

#: Columns added to a table after it was first made, with their definitions: an outbox made
#: before gets them when it is opened (items waiting for a destination; the decision history).
_ADDED_COLUMNS = {
    "items": (("waiting", "TEXT NOT NULL DEFAULT ''"), ("log", "TEXT NOT NULL DEFAULT ''")),
    # A claim's end (its window after ``at``); a claim kept before has none: a day.
    "seen_events": (("until", "REAL"),),
    "messages": (
        ("facts", "TEXT NOT NULL DEFAULT ''"),
        ("facts_data", "TEXT"),
        ("trace", "TEXT NOT NULL DEFAULT '[]'"),
        ("headers", "BLOB"),
    ),
}

#: The most messages :meth:`Outbox.purge` forgets in one transaction: a few milliseconds of
#: the writers' lock, which intake waits on.
PURGE_BATCH = 500

#: The version of the schema above (``PRAGMA user_version``); see :func:`_migrate`.
SCHEMA_VERSION = 1


def stored_key(key: Sequence[str]) -> str:
    """A key of several parts as the outbox stores it: one JSON array."""
    return json.dumps(list(key), ensure_ascii=False, separators=(",", ":"))


def _key_of(text: str) -> tuple[str, ...]:
    return tuple(str(part) for part in json.loads(text))


def _keep(db: sqlite3.Connection, note: Note, at: float, *, known_wins: bool = False) -> None:
    """Keep (or, with an empty value, forget) one note; with ``known_wins``, only where
    nothing is known yet."""
    key = stored_key(note.key)
    if not note.value:
        if not known_wins:
            db.execute("DELETE FROM notes WHERE space=? AND key=?", (note.table, key))
        return
    verb = "IGNORE" if known_wins else "REPLACE"
    db.execute(
        f"INSERT OR {verb} INTO notes VALUES (?,?,?,?)",  # noqa: S608 - one of two words
        (note.table, key, note.value, at),
    )


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an outbox of an older schema up to :data:`SCHEMA_VERSION`, in a transaction.

    Version 0 kept each kind of note in a table of its own, keyed by two columns, with the
    value third (and for ``history`` the time fourth), and chat threads keyed by three
    columns. Their rows move into ``notes`` and ``chat_threads``; the columns are read by
    position, as the old schema defined them.
    """
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for space in ("history", "mail_threads"):
        if space not in tables:
            continue
        for row in db.execute(f"SELECT * FROM {space}").fetchall():  # noqa: S608 - a fixed name
            at = float(row[3]) if len(row) > 3 else 0.0
            db.execute(
                "INSERT OR IGNORE INTO notes VALUES (?,?,?,?)",
                (space, stored_key((str(row[0]), str(row[1]))), str(row[2]), at),
            )
        db.execute(f"DROP TABLE {space}")
    columns = [row[1] for row in db.execute("PRAGMA table_info(chat_threads)")]
    if len(columns) == 5:
        old = db.execute("SELECT * FROM chat_threads").fetchall()
        db.execute("DROP TABLE chat_threads")
        db.execute(
            "CREATE TABLE chat_threads (key TEXT PRIMARY KEY, channel TEXT NOT NULL,"
            " ts TEXT NOT NULL)"
        )
        db.executemany(
            "INSERT OR IGNORE INTO chat_threads VALUES (?,?,?)",
            [(stored_key((str(a), str(b), str(c))), ch, ts) for a, b, c, ch, ts in old],
        )
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


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
    facts: str = ""
    """What the deciding manager's type read the alert as: ``route``'s facts line."""
    facts_data: Mapping[str, object] | None = None
    """The same facts as data (the history filters and charts by its plain values)."""
    trace: tuple[str, ...] = ()
    """Each rule's verdict, as ``route --trace`` prints it."""
    headers: bytes = b""
    """The header section as received (at most :data:`HEADERS_KEPT` bytes of it)."""


#: How much of a message's header section the history keeps.
HEADERS_KEPT = 32 * 1024


@dataclass(frozen=True)
class Held:
    """A message held until its manager has data (:meth:`Outbox.held`)."""

    row: int
    """Its place in the order messages were decided (later ones have greater rows)."""
    queue_id: str
    received: float
    envelope: Envelope
    raw: bytes


@dataclass(frozen=True)
class Released:
    """What :meth:`Outbox.release` did with a held message."""

    duplicate_of: str | None = None
    """The queue id of the original when it turned out to be a duplicate (nothing sent)."""


@dataclass
class Committed:
    """What :meth:`Outbox.put` did with a batch, by queue id."""

    duplicates: dict[str, str] = field(default_factory=dict)
    """Duplicates (a claim seen within its window) -> the queue id of the original:
    recorded, nothing sent."""
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
    answer: str = ""
    """The other side's answer to the whole attempt, when it gave one (``250 2.0.0 Ok``)."""
    at: float = 0.0
    """When the attempt was made (0: when it is recorded)."""


# -- what the outbox holds, as commands and tests read it ----------------------------------


@dataclass(frozen=True)
class StoredMessage:
    """A ``messages`` row: one accepted message and its routing outcome."""

    id: str
    received: float
    mail_from: str
    rcpt_tos: tuple[str, ...]
    subject: str
    manager: str | None
    outcome: str
    reason: str
    raw: bytes | None
    """The message itself, kept only while it is held."""


@dataclass(frozen=True)
class StoredItem:
    """An ``items`` row: one thing to deliver and how far it got."""

    id: int
    message_id: str
    kind: str
    mail_from: str
    data: bytes
    state: str
    attempts: int
    created: float
    next_try: float
    last_error: str
    waiting: str


@dataclass(frozen=True)
class StoredRecipient:
    """A ``recipients`` row: one recipient of an item and the server's last answer."""

    item_id: int
    rcpt: str
    state: str
    last_error: str


@dataclass(frozen=True)
class Entry:
    """One line of ``queue list``: a pending or dead item, or a held message."""

    queue_id: str
    item: int | None
    kind: str
    state: str
    created: float
    attempts: int
    next_try: float | None
    recipients: tuple[str, ...]
    sender: str
    last_error: str


@dataclass(frozen=True)
class Change:
    """What :meth:`Outbox.retry` or :meth:`Outbox.delete` did to one message."""

    queue_id: str
    pending: int = 0
    dead: int = 0
    done: int = 0
    recipients: int = 0
    held: bool = False

    @property
    def items(self) -> int:
        """How many items were changed."""
        return self.pending + self.dead + self.done


#: The item states ``queue list`` and ``queue retry`` deal with.
QUEUED = ("pending", "dead")


def _count_delivery_time(tally: _Tally, seconds: float) -> None:
    seconds = max(0.0, seconds)
    bound = next((b for b in DELIVERY_BUCKETS if seconds <= b), None)
    tally.add("delivery_seconds_bucket", le="+Inf" if bound is None else repr(bound))
    tally.add("delivery_seconds_sum", by=seconds)


#: A counter to add to: its name, its labels, and how much.
Counted = tuple[str, tuple[tuple[str, str], ...], int]


@dataclass(frozen=True)
class Counter:
    """One row of the ``counters`` table."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class Gauges:
    """What the outbox holds now, for ``/metrics``."""

    pending: int
    dead: int
    held: int
    oldest_pending: float | None
    """When the oldest pending item was accepted (epoch seconds), or None."""


def _message_of(row: Sequence[Any]) -> StoredMessage:
    qid, received, sender, rcpt_tos, subject, manager, outcome, reason, raw = row
    return StoredMessage(
        str(qid),
        float(received),
        loaded(sender),
        tuple(loaded(r) for r in json.loads(rcpt_tos)),
        loaded(subject),
        manager,
        str(outcome),
        str(reason),
        None if raw is None else bytes(raw),
    )


#: What the history says of a message now: ``held``; ``pending`` while an item is; ``dead``
#: when an item is; ``done`` when every item was delivered; ``none`` with nothing to deliver.
STATES = ("pending", "dead", "held", "done", "none")

#: A fact the history may be filtered by: a plain name (it goes into a JSON path).
_FACT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_HISTORY = (
    "SELECT m.id, m.received, m.mail_from, m.rcpt_tos, m.subject, m.manager, m.outcome,"
    " m.reason, NULL AS raw, m.facts_data, CASE WHEN m.outcome='hold' THEN 'held'"
    " WHEN EXISTS (SELECT 1 FROM items i WHERE i.message_id=m.id AND i.state='pending')"
    " THEN 'pending'"
    " WHEN EXISTS (SELECT 1 FROM items i WHERE i.message_id=m.id AND i.state='dead') THEN 'dead'"
    " WHEN EXISTS (SELECT 1 FROM items i WHERE i.message_id=m.id) THEN 'done'"
    " ELSE 'none' END AS state, m.rowid AS seq FROM messages m"
)


@dataclass(frozen=True)
class HistoryRow:
    """One line of the history: a message (without its bytes), its facts as data, and its
    state now."""

    message: StoredMessage
    facts: Mapping[str, object]
    state: str


@dataclass(frozen=True)
class Decided:
    """One message as the history keeps it: the stored message and how it was decided."""

    message: StoredMessage
    facts: str
    """The facts line, as ``route`` prints it (empty when no manager's type read any)."""
    facts_data: Mapping[str, object]
    trace: tuple[str, ...]
    """Each rule's verdict, as ``route --trace`` prints it."""
    headers: bytes
    """The header section as received (the first :data:`HEADERS_KEPT` bytes)."""


@dataclass(frozen=True)
class StoredAttempt:
    """One delivery attempt of an item (a line of its ``log``) and the answer to it."""

    item_id: int
    at: float
    result: str
    """``sent``, ``retry``, ``dead``, or ``waiting`` (its destination did not answer)."""
    answer: str


def _facts_of(text: str | None) -> Mapping[str, object]:
    if not text:
        return {}
    data = json.loads(text)
    return data if isinstance(data, dict) else {}


def _history_row(row: Sequence[Any]) -> HistoryRow:
    facts, state, _ = row[9:]
    return HistoryRow(_message_of(row[:9]), _facts_of(facts), str(state))


def _chat_action(data: bytes) -> tuple[str, ...]:
    """A chat item's destination as operators see it: the masked action, never its id."""
    try:
        return (str(json.loads(data)["action"]),)
    except (ValueError, KeyError, TypeError):
        return ("(chat)",)


class Outbox:
    """A connection to the outbox database, used by one thread at a time.

    It may be opened in one thread and handed to another (``check_same_thread`` is off for
    that), but two threads must never use it at once: each component owns its own.
    """

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.path = data_dir / DB_NAME
        self._lock: int | None = None
        self._wal: int | None = None  # for sync(): the WAL file, opened at the first call
        self._locked = 0  # how deep in write_lock(): the file lock is taken once, at depth 1
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            # The connection may be opened by one thread and then used by one other only.
            self.db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            # Only a new, empty database takes it; an older outbox keeps the size it has.
            self.db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            page = int(self.db.execute("PRAGMA page_size").fetchone()[0])
            self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT // page}")
            self.db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            # Debian's SQLite zero-fills every page it frees (built with SECURE_DELETE): a
            # delivered item's overflow pages were written once more, to the WAL and again at
            # the checkpoint, 1.5 KB per message (bench/README.md). FAST still zeroes what is
            # deleted from a b-tree page, which is written anyway, and leaves free pages as
            # they are until new mail takes them, as a deleted queue file leaves its blocks.
            self.db.execute("PRAGMA secure_delete=FAST")
            self.db.executescript(_SCHEMA)
            if self._missing_columns():
                with self.transaction("bring the outbox up to date") as db:
                    for table, column, kind in self._missing_columns():
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                with self.transaction("bring the outbox up to date") as db:
                    _migrate(db)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open the outbox in {data_dir}: {exc}") from None

    def _missing_columns(self) -> list[tuple[str, str, str]]:
        """Columns added to tables after their first version that this file lacks (checked
        again under the writers' lock: another process may be adding them)."""
        missing = []
        for table, added in _ADDED_COLUMNS.items():
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            missing += [(table, name, kind) for name, kind in added if name not in have]
        return missing

    def close(self) -> None:
        """Close the connection (a WAL checkpoint happens when the last one closes)."""
        self.db.close()
        for fd in (self._lock, self._wal):
            if fd is not None:
                os.close(fd)
        self._lock = self._wal = None

    def sync(self) -> None:
        """Make every transaction committed so far durable, this connection's and others':
        ``fdatasync`` the WAL. Raises OutboxError (OutboxFull for a full disk).

        A connection opened with ``durable=False`` commits without an fsync; this call after
        its commit gives the promise of ``durable=True``, but outside the writers' lock, so
        the others write while it waits for the disk. A transaction the WAL no longer holds
        was checkpointed into the database first, and a checkpoint syncs the database before
        the WAL may be written over.
        """
        wal = self.path.with_name(f"{DB_NAME}-wal")
        try:
            # The connection keeps its WAL while it is open; the check costs two system calls
            # and guards against syncing a file that is no longer the WAL.
            if self._wal is None or os.fstat(self._wal).st_ino != os.stat(wal).st_ino:
                if self._wal is not None:
                    os.close(self._wal)
                    self._wal = None
                self._wal = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            os.fdatasync(self._wal)
        except OSError as exc:
            raise storage_error(exc, "sync the outbox to disk") from exc

    def notes(self) -> dict[str, dict[tuple[str, ...], str]]:
        """Every note kept so far, by table and key (for routing's in-memory snapshot)."""
        return read_notes(self.db)

    def version(self) -> int:
        """A number that changes whenever another connection commits (``data_version``)."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the writers' file lock; :meth:`transaction` inside it does not take it again.

        Writers (intake processes, the dispatcher, commands) take turns on this lock: the
        kernel wakes the next one the moment the lock is free, where SQLite's own busy handler
        would sleep for milliseconds at a time, in every SMTP session's reply. Raises OSError.
        """
        if self._lock is None:
            self._lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        if self._locked == 0:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._locked += 1
        try:
            yield
        finally:
            self._locked -= 1
            if self._locked == 0:
                fcntl.flock(self._lock, fcntl.LOCK_UN)

    @contextmanager
    def transaction(self, doing: str = "write to the outbox") -> Iterator[sqlite3.Connection]:
        """One write transaction, under the writers' lock (:meth:`write_lock`); rolled back
        on any error."""
        try:
            with self.write_lock():
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    self.db.execute("COMMIT")
                except BaseException:
                    # Also after a failed COMMIT (a full disk): a transaction left open would
                    # make every later BEGIN fail, and the connection useless until a restart.
                    if self.db.in_transaction:
                        self.db.execute("ROLLBACK")
                    raise
        except (OSError, sqlite3.Error) as exc:
            raise storage_error(exc, doing) from exc

    def put(self, batch: Sequence[Accepted]) -> Committed:
        """Commit messages and their items in one transaction (durable when this returns on
        a connection opened with ``durable=True``; else once :meth:`sync` has).

        Each message is written in a savepoint of its own: one that cannot be written fails
        alone (it is in :attr:`Committed.failed`) and the others are committed. Raises
        OutboxError when the transaction as a whole fails (OutboxFull for a full disk).
        """
        committed = Committed()
        with self.transaction("commit to the outbox") as db:
            tally = _Tally()
            for a in batch:
                db.execute("SAVEPOINT message")
                counted = _Tally()  # added to the batch's only once the message is written
                try:
                    original = self._seen_before(db, a)
                    self._insert_message(db, a, counted, duplicate_of=original)
                except (sqlite3.Error, ValueError, OverflowError) as exc:
                    error = storage_error(exc, f"commit {a.queue_id} to the outbox")
                    if isinstance(error, OutboxFull):
                        raise  # no message of this batch can be written, nor the next
                    db.execute("ROLLBACK TO message")
                    db.execute("RELEASE message")
                    committed.failed[a.queue_id] = error
                    continue
                db.execute("RELEASE message")
                tally.merge(counted)
                if original is not None:
                    committed.duplicates[a.queue_id] = original
            tally.write(db)
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
            "INSERT OR REPLACE INTO seen_events (key, queue_id, at, until) VALUES (?,?,?,?)",
            (a.claim.key, a.queue_id, a.received, a.received + a.claim.window),
        )
        return None

    def _insert_message(
        self,
        db: sqlite3.Connection,
        a: Accepted,
        tally: _Tally,
        *,
        duplicate_of: str | None = None,
    ) -> None:
        d = a.decision
        outcome: str = d.outcome
        reason = d.reason
        items = a.items
        if duplicate_of is not None:
            outcome, reason = "duplicate", f"same event as {duplicate_of}: delivered once"
            # The claim is the deciding manager's: it never covers the copy for recipients
            # the manager did not take (a CI server may send one message to a list of
            # addresses, of which only one is ours).
            items = tuple(item for item in a.items if item.passthrough)
            if items:
                others = ", ".join(r for item in items for r in item.recipients)
                reason = f"{reason}; relayed unchanged to {others}"
        _insert(
            db,
            "INSERT INTO messages (id, received, mail_from, rcpt_tos, subject, manager, outcome,"
            " reason, facts, facts_data, trace, headers, raw)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,{blob})",
            (
                a.queue_id,
                a.received,
                storable(a.envelope.mail_from),
                json.dumps(a.envelope.rcpt_tos),
                storable(a.subject),
                d.manager,
                outcome,
                reason,
                a.facts,
                None if a.facts_data is None else _json_of(a.facts_data),
                json.dumps(a.trace, ensure_ascii=False),
                a.headers[:HEADERS_KEPT] or None,
                a.raw,
            ),
            ("messages", "raw"),
        )
        for item in items:
            self._insert_item(db, a.queue_id, a.received, item)
        manager = d.manager or ""
        tally.add("messages", manager=manager, outcome=outcome)
        if duplicate_of is not None:
            return
        for rule in d.trace:
            if rule.matched:
                tally.add("rule_matches", manager=manager, rule=str(rule.index))
        for note in a.notes:
            _keep(db, note, a.received)

    def held(self, after: int = 0) -> list[Held]:
        """Messages held until their manager has data, in the order they arrived; with
        ``after``, only those decided after the one whose :attr:`Held.row` it is."""
        rows = self.db.execute(
            "SELECT rowid, id, received, mail_from, rcpt_tos, raw FROM messages"
            " WHERE outcome='hold' AND rowid > ? ORDER BY received",
            (after,),
        ).fetchall()
        return [
            Held(row, qid, at, Envelope(loaded(sender), tuple(json.loads(rcpts))), bytes(raw))
            for row, qid, at, sender, rcpts, raw in rows
        ]

    def release(self, accepted: Accepted) -> Released | None:
        """Replace a held message's outcome with a new decision and queue its items; None
        when it is held no more (``queue delete`` took it meanwhile): nothing is queued.

        The unchanged copy for recipients no manager took was queued when the message was
        held: it is not queued again.
        """
        with self.transaction() as db:
            gone = db.execute(
                "DELETE FROM messages WHERE id=? AND outcome='hold'", (accepted.queue_id,)
            )
            if gone.rowcount == 0:
                return None
            queued = db.execute(
                "SELECT 1 FROM items WHERE message_id=? LIMIT 1", (accepted.queue_id,)
            ).fetchone()
            if queued is not None:
                items = tuple(item for item in accepted.items if not item.passthrough)
                accepted = dataclasses.replace(accepted, items=items)
            original = self._seen_before(db, accepted)
            tally = _Tally()
            self._insert_message(db, accepted, tally, duplicate_of=original)
            tally.write(db)
        return Released(original)

    def learn(self, notes: Sequence[Note], at: float) -> None:
        """Keep notes learnt from outside, only where nothing is known yet."""
        with self.transaction() as db:
            for note in notes:
                _keep(db, note, at, known_wins=True)

    def chat_thread(self, key: Sequence[str]) -> tuple[str, str] | None:
        """The Slack (channel, ts) of the thread a conversation's first post started, for
        ``key`` = (conversation key..., action)."""
        row = self.db.execute(
            "SELECT channel, ts FROM chat_threads WHERE key=?", (stored_key(key),)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def set_chat_thread(self, key: Sequence[str], channel: str, ts: str) -> None:
        """Remember the Slack thread a conversation's first post started."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO chat_threads VALUES (?,?,?)",
                (stored_key(key), channel, ts),
            )

    def drop_chat_thread(self, key: Sequence[str]) -> None:
        """Forget a Slack thread once the reply that ends its conversation is posted."""
        with self.transaction() as db:
            db.execute("DELETE FROM chat_threads WHERE key=?", (stored_key(key),))

    def purge(
        self,
        now: float,
        *,
        keep: float = 7 * 86400,
        max_messages: int = 100_000,
        batch: int = PURGE_BATCH,
    ) -> int:
        """Forget finished messages (nothing pending, dead or held) received more than
        ``keep`` seconds ago, and the oldest finished ones beyond the newest
        ``max_messages``, with their items, recipients and attempts; and claims past their
        window (a claim kept by an older version, a day after it was made). At most
        ``batch`` messages go in one call, which holds the writers' lock briefly: call it
        again while it returns ``batch``. Returns how many messages went."""
        with self.transaction("purge old messages from the outbox") as db:
            db.execute("DELETE FROM seen_events WHERE coalesce(until, at + 86400) < ?", (now,))
            # Rows are in the order messages were decided (the rowid): no index on the time
            # of arrival, which would cost every commit one more page written.
            row = db.execute(
                "SELECT rowid FROM messages ORDER BY rowid DESC LIMIT 1 OFFSET ?",
                (max_messages,),
            ).fetchone()
            beyond = 0 if row is None else int(row[0])
            ids = [
                qid
                for (qid,) in db.execute(
                    "SELECT id FROM messages m WHERE (received < ? OR rowid <= ?)"
                    " AND outcome != 'hold' AND NOT EXISTS (SELECT 1 FROM items i"
                    " WHERE i.message_id=m.id AND i.state IN ('pending','dead'))"
                    " ORDER BY rowid LIMIT ?",
                    (now - keep, beyond, batch),
                )
            ]
            if not ids:
                return 0
            marks = _marks(ids)
            items = f"SELECT id FROM items WHERE message_id IN ({marks})"  # noqa: S608 - only placeholders
            db.execute(f"DELETE FROM recipients WHERE item_id IN ({items})", ids)  # noqa: S608
            db.execute(f"DELETE FROM items WHERE message_id IN ({marks})", ids)  # noqa: S608
            db.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)  # noqa: S608
        return len(ids)

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
        pending: dict[int, list[str]] = {int(row[0]): [] for row in rows}
        for item_id, rcpt in self.db.execute(
            f"SELECT item_id, rcpt FROM recipients WHERE item_id IN ({_marks(rows)})"  # noqa: S608 - only placeholders
            " AND state='pending' ORDER BY rowid",
            list(pending),
        ):
            pending[int(item_id)].append(loaded(rcpt))
        for item_id, message_id, kind, mail_from, data, attempts, created, next_try in rows:
            rcpts = tuple(pending[int(item_id)])
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

    def still_pending(self, item: Item) -> bool:
        """Whether ``item`` is still to be sent (not deleted, nor finished, meanwhile)."""
        row = self.db.execute(
            "SELECT 1 FROM items WHERE id=? AND message_id=? AND state='pending'",
            (item.id, item.message_id),
        ).fetchone()
        return row is not None

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
        """Store delivery attempts: per recipient outcome, then the item's new state. The
        result of an item deleted meanwhile is dropped.

        An item is done when no recipient is left pending, dead when all that are left are
        dead, and else pending again at ``next_try``; an item left waiting for its
        destination keeps its count of attempts.
        """
        with self.transaction() as db:
            tally = _Tally()
            for result in results:
                self._record(db, result, tally)
            tally.write(db)

    @staticmethod
    def _record(db: sqlite3.Connection, result: Result, tally: _Tally) -> None:
        item, error = result.item, result.error
        # The item may have been deleted while it was tried (``queue delete``), and its id
        # taken since by a new message's item: its result is then nobody's.
        mine = db.execute(
            "SELECT 1 FROM items WHERE id=? AND message_id=?", (item.id, item.message_id)
        ).fetchone()
        if mine is None:
            return
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
        channel = channel_of(item.kind, item.data)
        outcome = "retry" if "pending" in states else "dead" if "dead" in states else "sent"
        attempt = {
            "at": result.at or time.time(),
            "result": "waiting" if result.waiting else outcome,
            "answer": _answer_of(result),
        }
        logged = json.dumps(attempt, ensure_ascii=False) + "\n"
        tally.add("deliveries", channel=channel, result=outcome)
        if outcome == "sent":
            _count_delivery_time(tally, time.time() - item.created)
        if "pending" in states:
            db.execute(
                "UPDATE items SET attempts=attempts+?, next_try=?, last_error=?, waiting=?,"
                " log=log||? WHERE id=?",
                (counted, result.next_try, error, result.waiting, logged, item.id),
            )
            return
        final = "dead" if "dead" in states else "done"
        # A delivered item's bytes are not needed any more; its row stays as a record.
        db.execute(
            "UPDATE items SET state=?, attempts=attempts+?, last_error=?, waiting='',"
            " log=log||?, data=CASE WHEN ?='done' THEN x'' ELSE data END WHERE id=?",
            (final, counted, error, logged, final, item.id),
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

    # -- reading and changing it from the outside (``queue``, tests) ---------------------

    @contextmanager
    def reading(self) -> Iterator[None]:
        """A read transaction: every read in it sees the same state of the outbox.

        In WAL mode it takes no lock the server waits for.
        """
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def known(self, queue_id: str) -> str:
        """The queue id as stored (ids are matched regardless of case); OutboxError if
        there is no such message."""
        row = self.db.execute(
            "SELECT id FROM messages WHERE id=? COLLATE NOCASE", (queue_id,)
        ).fetchone()
        if row is None:
            raise OutboxError(f"no message {queue_id} in the outbox {self.path}")
        return str(row[0])

    def messages(self) -> list[StoredMessage]:
        """Every message the outbox still has, oldest first."""
        rows = self.db.execute(f"{self._MESSAGE} ORDER BY received, id").fetchall()
        return [_message_of(row) for row in rows]

    def message(self, queue_id: str) -> StoredMessage | None:
        """The message with this queue id (exactly), or None."""
        row = self.db.execute(f"{self._MESSAGE} WHERE id=?", (queue_id,)).fetchone()
        return None if row is None else _message_of(row)

    def items_of(self, queue_id: str) -> list[StoredItem]:
        """The items of one message, in the order they were made."""
        rows = self.db.execute(
            "SELECT id, message_id, kind, mail_from, data, state, attempts, created, next_try,"
            " last_error, waiting FROM items WHERE message_id=? ORDER BY id",
            (queue_id,),
        ).fetchall()
        return [
            StoredItem(i, m, kind, loaded(sender), bytes(data), *rest)
            for i, m, kind, sender, data, *rest in rows
        ]

    def recipients_of(self, queue_id: str) -> list[StoredRecipient]:
        """The recipients of every item of one message, item by item, in order."""
        rows = self.db.execute(
            "SELECT r.item_id, r.rcpt, r.state, r.last_error FROM recipients r"
            " JOIN items i ON i.id=r.item_id WHERE i.message_id=? ORDER BY i.id, r.rowid",
            (queue_id,),
        ).fetchall()
        return [StoredRecipient(i, loaded(rcpt), state, error) for i, rcpt, state, error in rows]

    def unfinished(self, queue_ids: Sequence[str]) -> int:
        """How many items of these messages are not delivered yet."""
        where = f"state!='done' AND message_id IN ({_marks(queue_ids)})"
        row = self.db.execute(
            f"SELECT COUNT(*) FROM items WHERE {where}",  # noqa: S608 - only placeholders are interpolated
            tuple(queue_ids),
        ).fetchone()
        return int(row[0])

    def claims(self) -> int:
        """How many de-duplication claims are remembered (:meth:`purge` forgets old ones)."""
        return int(self.db.execute("SELECT COUNT(*) FROM seen_events").fetchone()[0])

    def add(self, counts: Sequence[Counted]) -> None:
        """Add to these counters (what intake refused, say), in one transaction."""
        with self.transaction("count in the outbox") as db:
            tally = _Tally()
            for name, labels, by in counts:
                tally.add(name, by, **dict(labels))
            tally.write(db)

    def counters(self) -> list[Counter]:
        """Every running total, in one read."""
        try:
            rows = self.db.execute(
                "SELECT name, labels, value FROM counters ORDER BY name, labels"
            ).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(exc, "read the counters") from exc
        return [
            Counter(name, tuple(sorted(json.loads(labels).items())), float(value))
            for name, labels, value in rows
        ]

    def gauges(self) -> Gauges:
        """Pending, dead and held counts and the oldest pending item, in one read."""
        try:
            return self._gauges()
        except sqlite3.Error as exc:
            raise storage_error(exc, "count the outbox's items") from exc

    def _gauges(self) -> Gauges:
        with self.reading():
            states = dict(
                self.db.execute(
                    "SELECT state, COUNT(*) FROM items WHERE state IN ('pending','dead')"
                    " GROUP BY state"
                ).fetchall()
            )
            held = self.db.execute("SELECT COUNT(*) FROM messages WHERE outcome='hold'").fetchone()[
                0
            ]
            oldest = self.db.execute(
                "SELECT MIN(created) FROM items WHERE state='pending'"
            ).fetchone()[0]
        return Gauges(
            int(states.get("pending", 0)),
            int(states.get("dead", 0)),
            int(held),
            None if oldest is None else float(oldest),
        )

    def check_writable(self) -> None:
        """Write and commit one row, as intake would, and look for room for more: raises
        OutboxError when it cannot (OutboxFull when the file system has less than
        :data:`READY_FREE` left)."""
        with self.transaction("write to the outbox (readiness check)") as db:
            db.execute("INSERT OR REPLACE INTO counters VALUES ('probe', '{}', ?)", (time.time(),))
        try:
            room = os.statvfs(self.path.parent)
        except OSError as exc:
            raise storage_error(exc, "look for room in data-dir") from exc
        free = room.f_bavail * room.f_frsize
        if free < READY_FREE:
            raise OutboxFull(f"data-dir is full: {free // 1024} KiB left")

    def integrity(self) -> str:
        """SQLite's own check of the file: ``ok``, or what is wrong."""
        return "; ".join(str(r[0]) for r in self.db.execute("PRAGMA integrity_check"))

    def entries(self) -> list[Entry]:
        """Pending and dead items and held messages, oldest first."""
        with self.reading():
            return self._entries()

    def _entries(self) -> list[Entry]:
        rcpts: dict[int, list[str]] = {}
        for item_id, rcpt in self.db.execute(
            "SELECT r.item_id, r.rcpt FROM recipients r JOIN items i ON i.id=r.item_id"
            " WHERE i.state IN ('pending','dead') AND r.state IN ('pending','dead')"
            " ORDER BY r.rowid"
        ):
            rcpts.setdefault(item_id, []).append(loaded(rcpt))
        found = [
            Entry(
                qid,
                item_id,
                kind,
                state,
                created,
                attempts,
                None if state == "dead" else next_try,
                _chat_action(chat) if chat is not None else tuple(rcpts.get(item_id, ())),
                loaded(sender),
                error,
            )
            for item_id, qid, kind, state, created, attempts, next_try, sender, error, chat in (
                self.db.execute(
                    "SELECT id, message_id, kind, state, created, attempts, next_try, mail_from,"
                    " last_error, CASE WHEN kind='chat' THEN data END"
                    " FROM items WHERE state IN ('pending','dead')"
                )
            )
        ]
        found += [
            Entry(
                m.id, None, "smtp", "held", m.received, 0, None, m.rcpt_tos, m.mail_from, m.reason
            )
            for m in map(
                _message_of, self.db.execute(f"{self._MESSAGE} WHERE outcome='hold'").fetchall()
            )
        ]
        return sorted(found, key=lambda e: (e.created, e.queue_id, e.item or 0))

    def retry(self, queue_ids: Sequence[str], now: float) -> list[Change]:
        """Make the pending and dead items of these messages (all if empty) due at ``now``.

        Dead items become pending again, and so do their dead recipients; recipients already
        served stay done and are not sent to again. Attempts are kept, so the back-off goes
        on where it was; an item older than ``give-up-after`` gets exactly one more try.
        """
        changes: list[Change] = []
        with self.transaction() as db:
            wanted = [self.known(q) for q in queue_ids] or [
                qid
                for (qid,) in db.execute(
                    "SELECT message_id FROM items WHERE state IN ('pending','dead')"
                    " GROUP BY message_id ORDER BY MIN(created), message_id"
                )
            ]
            for qid in dict.fromkeys(wanted):
                counts = self._item_counts(qid, QUEUED)
                revived = db.execute(
                    "UPDATE recipients SET state='pending' WHERE state='dead' AND item_id IN"
                    " (SELECT id FROM items WHERE message_id=? AND state IN ('pending','dead'))",
                    (qid,),
                ).rowcount
                db.execute(
                    "UPDATE items SET state='pending', waiting='', next_try=?"
                    " WHERE message_id=? AND state IN ('pending','dead')",
                    (now, qid),
                )
                changes.append(Change(qid, recipients=revived, held=self._is_held(qid), **counts))
        return changes

    def delete(self, queue_ids: Sequence[str]) -> list[Change]:
        """Remove these messages with all their items and recipients; nothing more is sent.

        An attempt the dispatcher has already started cannot be called back: it may still
        arrive.
        """
        changes: list[Change] = []
        with self.transaction() as db:
            for qid in dict.fromkeys(self.known(q) for q in queue_ids):
                counts = self._item_counts(qid, ("pending", "dead", "done"))
                held = self._is_held(qid)
                removed = db.execute(
                    "SELECT COUNT(*) FROM recipients WHERE state!='done'"
                    " AND item_id IN (SELECT id FROM items WHERE message_id=?)",
                    (qid,),
                ).fetchone()[0]
                db.execute(
                    "DELETE FROM recipients WHERE item_id IN"
                    " (SELECT id FROM items WHERE message_id=?)",
                    (qid,),
                )
                db.execute("DELETE FROM items WHERE message_id=?", (qid,))
                db.execute("DELETE FROM messages WHERE id=?", (qid,))
                changes.append(Change(qid, recipients=removed, held=held, **counts))
        return changes

    # -- the decision history (the web console) ------------------------------------------

    def history(
        self,
        *,
        manager: str | None = None,
        state: str | None = None,
        facts: Mapping[str, str] | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[HistoryRow]:
        """Messages, the last decided first, with their state now; only those of ``manager``, in
        ``state`` (one of :data:`STATES`) and whose facts have these plain values (a name
        of letters, digits, ``_`` and ``-`` each)."""
        where, params = [], []
        if manager is not None:
            where.append("manager IS ?" if manager else "manager IS NULL")
            if manager:
                params.append(manager)
        for name, value in (facts or {}).items():
            if not _FACT_NAME.fullmatch(name):
                raise OutboxError(f"no such fact {name!r}: a fact's name is letters and digits")
            where.append("json_extract(facts_data, ?) = ?")
            params += [f'$."{name}"', value]
        if state is not None:
            if state not in STATES:
                raise OutboxError(f"no such state {state!r}: one of {', '.join(STATES)}")
            where.append("state = ?")
            params.append(state)
            # Narrowed first by the index on items' state (or on held messages): without
            # it, every message's state is worked out to find the few pending or dead.
            if state in ("pending", "dead"):
                where.append("id IN (SELECT message_id FROM items WHERE state = ?)")
                params.append(state)
            elif state == "held":
                where.append("outcome = 'hold'")
        sql = (
            f"SELECT * FROM ({_HISTORY}) "  # noqa: S608 - fixed text and placeholders only
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + "ORDER BY seq DESC LIMIT ? OFFSET ?"
        )
        try:
            rows = self.db.execute(sql, (*params, limit, offset)).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(exc, "read the history") from exc
        return [_history_row(row) for row in rows]

    def decision(self, queue_id: str) -> Decided | None:
        """One message as the history keeps it, or None."""
        row = self.db.execute(
            f"{self._MESSAGE_FULL} WHERE id=?",
            (queue_id,),
        ).fetchone()
        if row is None:
            return None
        facts, facts_data, trace, headers = row[9:]
        return Decided(
            _message_of(row[:9]),
            str(facts),
            _facts_of(facts_data),
            tuple(str(line) for line in json.loads(trace or "[]")),
            b"" if headers is None else bytes(headers),
        )

    def attempts_of(self, queue_id: str) -> list[StoredAttempt]:
        """Every delivery attempt of the items of one message, in the order they were made."""
        rows = self.db.execute(
            "SELECT id, log FROM items WHERE message_id=? ORDER BY id", (queue_id,)
        ).fetchall()
        found = []
        for item_id, log in rows:
            for line in str(log).splitlines():
                attempt = json.loads(line)
                found.append(
                    StoredAttempt(
                        int(item_id),
                        float(attempt["at"]),
                        str(attempt["result"]),
                        str(attempt["answer"]),
                    )
                )
        return sorted(found, key=lambda a: a.at)

    def hourly(self, since: float) -> list[tuple[float, str, int]]:
        """Messages received since ``since`` per hour and kind: (the hour's start, the
        alert's ``event`` fact or else the outcome, how many), oldest hour first."""
        rows = self.db.execute(
            "SELECT CAST(received / 3600 AS INTEGER) * 3600 AS hour,"
            " COALESCE(json_extract(facts_data, '$.event'), outcome) AS kind, COUNT(*)"
            " FROM messages WHERE received >= ? GROUP BY hour, kind ORDER BY hour, kind",
            (since,),
        ).fetchall()
        return [(float(hour), str(kind), int(n)) for hour, kind, n in rows]

    _MESSAGE_FULL = (
        "SELECT id, received, mail_from, rcpt_tos, subject, manager, outcome, reason, raw,"
        " facts, facts_data, trace, headers FROM messages"
    )

    _MESSAGE = (
        "SELECT id, received, mail_from, rcpt_tos, subject, manager, outcome, reason, raw"
        " FROM messages"
    )

    def _item_counts(self, queue_id: str, states: Sequence[str]) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT state, COUNT(*) FROM items WHERE message_id=? GROUP BY state", (queue_id,)
        )
        return {state: count for state, count in rows if state in states}

    def _is_held(self, queue_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM messages WHERE id=? AND outcome='hold'", (queue_id,))
        return row.fetchone() is not None


#: The most messages :class:`GroupCommitter` commits in one transaction.
BATCH_MAX = 512
#: The file whose lock intake processes take turns on (in data-dir, beside the outbox).
TURN_LOCK = "outbox.intake.lock"


@contextmanager
def _flocked(fd: int) -> Iterator[None]:
    """Hold an exclusive lock on the open file ``fd``. Raises OSError."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class _Counts:
    """Queued to the writer thread when counters wait to be written."""


_COUNTS = _Counts()
_Job = tuple[Accepted, asyncio.Future[str | None]] | None | _Counts


class GroupCommitter:
    """Commits accepted messages from a writer thread, many per fsync.

    :meth:`put` returns once the message is durable; the event loop is never blocked by
    SQLite or fsync.
    """

    def __init__(
        self, data_dir: Path, *, on_death: Callable[[BaseException], None] | None = None
    ) -> None:
        """``on_death`` is called, from the writer thread, if that thread ends by an error."""
        # Commits without an fsync, then syncs outside the writers' lock (Outbox.sync).
        self._outbox = Outbox(data_dir, durable=False)
        try:
            self._turn = os.open(data_dir / TURN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._outbox.close()
            raise storage_error(exc, "open the intake lock") from exc
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._counts: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._counts_lock = threading.Lock()
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

        The result is the queue id of the original when this was a duplicate (its claim was
        seen within the claim's window).
        """
        if not self._thread.is_alive():
            # Only something like MemoryError ends it; never leave a sender waiting for it.
            raise OutboxError("the outbox writer thread has stopped; restart mail2alert")
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._queue.put((accepted, future))
        return await future

    def count(self, name: str, **labels: str) -> None:
        """Add one to a counter (never blocks): written with the next commit, or on its own
        as soon as the writer is free. Lost only if that write fails (a full disk)."""
        key = (name, tuple(sorted(labels.items())))
        with self._counts_lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        self._queue.put(_COUNTS)

    def _add_counts(self) -> None:
        """Write the counts waiting (refusals are rare: a transaction of their own, whose
        failure is no message's: logged, and those counts are lost)."""
        with self._counts_lock:
            counts, self._counts = self._counts, {}
        if not counts:
            return
        try:
            self._outbox.add([(name, labels, by) for (name, labels), by in counts.items()])
        except OutboxError as exc:
            log.warning("%d counts for /metrics not kept: %s", sum(counts.values()), exc)

    def close(self) -> None:
        """Finish what was queued, then stop the writer thread."""
        self._queue.put(None)
        self._thread.join()
        self._outbox.close()
        os.close(self._turn)

    def _drain(self, batch: list[tuple[Accepted, asyncio.Future[str | None]]]) -> bool:
        """Add what is queued to ``batch`` (up to :data:`BATCH_MAX`); False once the queue
        says stop (what came before the stop is in ``batch``)."""
        while len(batch) < BATCH_MAX:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                return True
            if more is None:
                return False
            if not isinstance(more, _Counts):
                batch.append(more)
        return True

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [] if isinstance(first, _Counts) else [first]
            error: OutboxError | None = None
            committed = Committed()
            try:
                # Intake processes take turns, from taking their queue to the end of their
                # fsync: whatever arrived while another synced joins this batch, so one fsync
                # serves all of it (draining before the wait made batches of one or two
                # messages, however long the wait). The writers' lock is held only while
                # the rows are written: delivery records its results during the fsync.
                with _flocked(self._turn):
                    stopping = not self._drain(batch)
                    if batch:
                        committed = self._outbox.put([a for a, _ in batch])
                    self._add_counts()
                    if batch:
                        self._outbox.sync()
            except OSError as exc:
                error = storage_error(exc, "lock the outbox")
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
            if settled:
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


def read_notes_of(data_dir: Path) -> dict[str, dict[tuple[str, ...], str]]:
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


def read_notes(db: sqlite3.Connection) -> dict[str, dict[tuple[str, ...], str]]:
    """Every note of the outbox ``db`` is a connection to, by space and key."""
    notes: dict[str, dict[tuple[str, ...], str]] = {}
    for space, key, value in db.execute("SELECT space, key, value FROM notes"):
        notes.setdefault(str(space), {})[_key_of(key)] = str(value)
    return notes


def unusable(data_dir: Path) -> str | None:
    """Why ``data_dir`` cannot hold an outbox (it is a file, or it or the directory it would
    be made in is not writable), or None when it can. Creates nothing that stays."""
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory" if existing != data_dir else "is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc)
        if existing == data_dir:
            return f"is not writable ({why})"
        return f"cannot be made: {existing} is not writable ({why})"
    return None
