"""``mail2alert queue``: look at and act on the outbox, like Postfix's postqueue and postsuper.

It works while ``mail2alert serve`` runs: the outbox is SQLite in WAL mode, so reading never
blocks the server, and the few writes here are short transactions that wait (busy timeout) for
the server's own. The running dispatcher looks at the outbox at least every
:data:`mail2alert.dispatcher.POLL` seconds, so a retried item goes out within that.

Actions::

    list            pending and dead items and held messages, oldest first (the default)
    show ID         everything about one message: envelope, routing, items, recipients, headers
    retry ID|--all  pending and dead items due now; dead ones (and their dead recipients) pending
    delete ID       the message, its items and its recipients are removed: nothing more is sent

The queue id is the one mail2alert answered with (``250 ... queued as <ID>``) and logs.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from mail2alert import config
from mail2alert.errors import OutboxError, UsageError
from mail2alert.outbox import DB_NAME, Outbox

#: How many header lines ``show`` prints of an item's data.
HEADER_LINES = 20
#: ``list`` shortens the last error to this many characters (``--json`` and ``show`` do not).
ERROR_WIDTH = 60
#: Printed where there is no next try: dead items, held messages.
NONE = "—"

States = tuple[str, ...]
QUEUED: States = ("pending", "dead")


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One line of ``queue list``: a pending or dead item, or a message held for GoCD data."""

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
class RecipientRow:
    """One recipient of an item and the upstream server's last answer about it."""

    rcpt: str
    state: str
    last_answer: str


@dataclass(frozen=True)
class ItemDetail:
    """An item of a message, as ``show`` prints it."""

    id: int
    kind: str
    state: str
    attempts: int
    created: float
    next_try: float | None
    sender: str
    last_error: str
    recipients: tuple[RecipientRow, ...]
    headers: tuple[str, ...]


@dataclass(frozen=True)
class MessageDetail:
    """A message and its items, as ``show`` prints it."""

    queue_id: str
    received: float
    mail_from: str
    rcpt_tos: tuple[str, ...]
    subject: str
    manager: str | None
    outcome: str
    reason: str
    headers: tuple[str, ...]
    """The held message's own header lines (held messages have no items yet)."""
    items: tuple[ItemDetail, ...]


@dataclass(frozen=True)
class Change:
    """What ``retry`` or ``delete`` did to one message."""

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


# -- reading and changing the outbox -------------------------------------------------------


@contextmanager
def opened(cfg: config.Config) -> Iterator[Outbox]:
    """The outbox of ``cfg``'s data dir; never creates one where there is none."""
    if not (cfg.data_dir / DB_NAME).is_file():
        raise OutboxError(
            f"no outbox in {cfg.data_dir} (data-dir of {cfg.path});"
            " has mail2alert served with this configuration?"
        )
    outbox = Outbox(cfg.data_dir)
    try:
        yield outbox
    except sqlite3.Error as exc:
        raise OutboxError(f"cannot use the outbox in {cfg.data_dir}: {exc}") from exc
    finally:
        outbox.close()


@contextmanager
def snapshot(outbox: Outbox) -> Iterator[sqlite3.Connection]:
    """A read transaction: every query in it sees the same state of the outbox.

    In WAL mode it takes no lock the server waits for.
    """
    outbox.db.execute("BEGIN")
    try:
        yield outbox.db
    finally:
        outbox.db.execute("COMMIT")


def entries(outbox: Outbox) -> list[Entry]:
    """Pending and dead items and held messages, oldest first."""
    with snapshot(outbox) as db:
        return _entries(db)


def _entries(db: sqlite3.Connection) -> list[Entry]:
    rcpts: dict[int, list[str]] = {}
    for item_id, rcpt in db.execute(
        "SELECT r.item_id, r.rcpt FROM recipients r JOIN items i ON i.id=r.item_id"
        " WHERE i.state IN ('pending','dead') AND r.state IN ('pending','dead')"
        " ORDER BY r.rowid"
    ):
        rcpts.setdefault(item_id, []).append(rcpt)
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
            sender,
            error,
        )
        for item_id, qid, kind, state, created, attempts, next_try, sender, error, chat in (
            db.execute(
                "SELECT id, message_id, kind, state, created, attempts, next_try, mail_from,"
                " last_error, CASE WHEN kind='chat' THEN data END"
                " FROM items WHERE state IN ('pending','dead')"
            )
        )
    ]
    found += [
        Entry(
            qid,
            None,
            "smtp",
            "held",
            received,
            0,
            None,
            tuple(json.loads(rcpt_tos)),
            sender,
            reason,
        )
        for qid, received, sender, rcpt_tos, reason in db.execute(
            "SELECT id, received, mail_from, rcpt_tos, reason FROM messages WHERE outcome='hold'"
        )
    ]
    return sorted(found, key=lambda e: (e.created, e.queue_id, e.item or 0))


def detail(outbox: Outbox, queue_id: str) -> MessageDetail:
    """Everything about one message; OutboxError if there is no such message."""
    with snapshot(outbox) as db:
        return _detail(db, _known(outbox, queue_id))


def _detail(db: sqlite3.Connection, queue_id: str) -> MessageDetail:
    row = db.execute(
        "SELECT id, received, mail_from, rcpt_tos, subject, manager, outcome, reason, raw"
        " FROM messages WHERE id=?",
        (queue_id,),
    ).fetchone()
    qid, received, mail_from, rcpt_tos, subject, manager, outcome, reason, raw = row
    items = tuple(
        ItemDetail(
            item_id,
            kind,
            state,
            attempts,
            created,
            None if state != "pending" else next_try,
            sender,
            error,
            _recipients(db, item_id),
            data_lines(kind, bytes(data)),
        )
        for item_id, kind, state, attempts, created, next_try, sender, error, data in db.execute(
            "SELECT id, kind, state, attempts, created, next_try, mail_from, last_error, data"
            " FROM items WHERE message_id=? ORDER BY id",
            (qid,),
        ).fetchall()
    )
    return MessageDetail(
        qid,
        received,
        mail_from,
        tuple(json.loads(rcpt_tos)),
        subject,
        manager,
        outcome,
        reason,
        header_lines(bytes(raw or b"")),
        items,
    )


def _chat_action(data: bytes) -> tuple[str, ...]:
    """A chat item's destination as operators see it: the masked action, never its id."""
    try:
        return (str(json.loads(data)["action"]),)
    except (ValueError, KeyError, TypeError):
        return ("(chat)",)


def _recipients(db: sqlite3.Connection, item_id: int) -> tuple[RecipientRow, ...]:
    return tuple(
        RecipientRow(rcpt, state, answer)
        for rcpt, state, answer in db.execute(
            "SELECT rcpt, state, last_error FROM recipients WHERE item_id=? ORDER BY rowid",
            (item_id,),
        )
    )


def retry(outbox: Outbox, queue_ids: Sequence[str], now: float) -> list[Change]:
    """Make the pending and dead items of these messages (all if empty) due at ``now``.

    Dead items become pending again, and so do their dead recipients; recipients already
    served stay done and are not sent to again. Attempts are kept, so the back-off goes on
    where it was; an item older than ``give-up-after`` gets exactly one more try.
    """
    changes: list[Change] = []
    with outbox.transaction() as db:
        wanted = [_known(outbox, q) for q in queue_ids] or [
            qid
            for (qid,) in db.execute(
                "SELECT message_id FROM items WHERE state IN ('pending','dead')"
                " GROUP BY message_id ORDER BY MIN(created), message_id"
            )
        ]
        for qid in dict.fromkeys(wanted):
            counts = _item_counts(db, qid, QUEUED)
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
            changes.append(Change(qid, recipients=revived, held=_is_held(db, qid), **counts))
    return changes


def delete(outbox: Outbox, queue_ids: Sequence[str]) -> list[Change]:
    """Remove these messages with all their items and recipients; nothing more is sent.

    An attempt the dispatcher has already started cannot be called back: it may still arrive.
    """
    changes: list[Change] = []
    with outbox.transaction() as db:
        for qid in dict.fromkeys(_known(outbox, q) for q in queue_ids):
            counts = _item_counts(db, qid, ("pending", "dead", "done"))
            held = _is_held(db, qid)
            removed = db.execute(
                "SELECT COUNT(*) FROM recipients WHERE state!='done'"
                " AND item_id IN (SELECT id FROM items WHERE message_id=?)",
                (qid,),
            ).fetchone()[0]
            db.execute(
                "DELETE FROM recipients WHERE item_id IN (SELECT id FROM items WHERE message_id=?)",
                (qid,),
            )
            db.execute("DELETE FROM items WHERE message_id=?", (qid,))
            db.execute("DELETE FROM messages WHERE id=?", (qid,))
            changes.append(Change(qid, recipients=removed, held=held, **counts))
    return changes


def _known(outbox: Outbox, queue_id: str) -> str:
    """The queue id as stored (ids are matched regardless of case); OutboxError if unknown."""
    row = outbox.db.execute(
        "SELECT id FROM messages WHERE id=? COLLATE NOCASE", (queue_id,)
    ).fetchone()
    if row is None:
        raise OutboxError(f"no message {queue_id} in the outbox {outbox.path}")
    return str(row[0])


def _item_counts(db: sqlite3.Connection, queue_id: str, states: States) -> dict[str, int]:
    rows = db.execute(
        "SELECT state, COUNT(*) FROM items WHERE message_id=? GROUP BY state", (queue_id,)
    )
    return {state: count for state, count in rows if state in states}


def _is_held(db: sqlite3.Connection, queue_id: str) -> bool:
    row = db.execute("SELECT 1 FROM messages WHERE id=? AND outcome='hold'", (queue_id,))
    return row.fetchone() is not None


# -- formatting ----------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``45s``, ``3m``, ``2h``, ``1d``: the largest whole unit, rounded down."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def next_try(when: float | None, now: float) -> str:
    """``in 45s``, ``now``, or a dash when there is none (dead, held)."""
    if when is None:
        return NONE
    return "now" if when <= now else f"in {duration(when - now + 0.999)}"


def printable(text: str) -> str:
    """``text`` without control characters: mail headers must not drive the terminal.

    A tab (as in folded header lines) becomes a space; any other one a ``?``.
    """
    return "".join(c if c.isprintable() else " " if c == "\t" else "?" for c in text)


def shorten(text: str, width: int = ERROR_WIDTH) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def header_lines(data: bytes, limit: int = HEADER_LINES) -> tuple[str, ...]:
    """The first ``limit`` lines of the header section of ``data``, made printable."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    lines = head.decode("utf-8", "replace").splitlines() if head else []
    return tuple(printable(line.rstrip("\r")) for line in lines[:limit])


def data_lines(kind: str, data: bytes, limit: int = HEADER_LINES) -> tuple[str, ...]:
    """What ``show`` prints of an item's data: a mail's header lines, a chat post's JSON."""
    if kind == "smtp" or not data:
        return header_lines(data, limit)
    try:
        text = json.dumps(json.loads(data), indent=2, ensure_ascii=False)
    except ValueError:
        text = data.decode("utf-8", "replace")
    return tuple(printable(line) for line in text.splitlines()[:limit])


def _stamp(when: float) -> str:
    return datetime.fromtimestamp(when).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


def _sender(address: str, kind: str = "smtp") -> str:
    # Only a mail has an envelope sender; "<>" is the null sender of a bounce.
    return (printable(address) or "<>") if kind == "smtp" else NONE


def list_lines(found: Sequence[Entry], now: float) -> list[str]:
    """The table of ``queue list`` and its summary line."""
    rows = [
        (
            e.queue_id,
            e.state,
            duration(now - e.created),
            str(e.attempts),
            next_try(e.next_try, now),
            printable(",".join(e.recipients)),
            _sender(e.sender, e.kind),
            printable(shorten(e.last_error)),
        )
        for e in found
    ]
    lines: list[str] = []
    if rows:
        head = ("QUEUE ID", "STATE", "AGE", "TRIES", "NEXT TRY", "RECIPIENTS", "SENDER", "ERROR")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        for row in [head, *rows]:
            cells = [
                cell.rjust(w) if i in (2, 3) else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=False))
            ]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
    count = {s: sum(e.state == s for e in found) for s in ("pending", "dead", "held")}
    lines.append(", ".join(f"{n} {s}" for s, n in count.items()))
    return lines


def entry_json(e: Entry, now: float) -> dict[str, Any]:
    """One entry of ``queue list --json``: times as ISO 8601 UTC, the whole last error."""
    return {
        "queue_id": e.queue_id,
        "item": e.item,
        "kind": e.kind,
        "state": e.state,
        "created": _iso(e.created),
        "age_seconds": round(max(0.0, now - e.created), 3),
        "attempts": e.attempts,
        "next_try": _iso(e.next_try),
        "recipients": list(e.recipients),
        "sender": e.sender,
        "last_error": e.last_error,
    }


def message_json(m: MessageDetail) -> dict[str, Any]:
    """``queue show --json``: the records as they are, times as ISO 8601 UTC."""
    document = asdict(m)
    document["received"] = _iso(m.received)
    for item in document["items"]:
        item["created"] = _iso(item["created"])
        item["next_try"] = _iso(item["next_try"])
    return document


def show_lines(m: MessageDetail, now: float) -> list[str]:
    """What ``queue show`` prints about one message."""
    lines = [
        f"queue id:  {m.queue_id}",
        f"received:  {_stamp(m.received)} ({duration(now - m.received)} ago)",
        f"from:      {_sender(m.mail_from)}",
        f"to:        {printable(', '.join(m.rcpt_tos))}",
        f"subject:   {printable(m.subject)}",
        f"manager:   {m.manager or NONE}",
        f"outcome:   {m.outcome}",
        f"reason:    {printable(m.reason)}",
    ]
    if m.outcome == "hold":
        lines += ["held for GoCD data: routed again when it comes, or after hold-max"]
        lines += ["headers:", *(f"  {h}" for h in m.headers)]
    if not m.items and m.outcome != "hold":
        lines.append("items:     none (nothing to deliver)")
    for item in m.items:
        lines += [
            "",
            f"item {item.id} ({item.kind}): {item.state}, {item.attempts} attempt"
            f"{'s' * (item.attempts != 1)}, next try {next_try(item.next_try, now)}",
            f"  sender:      {_sender(item.sender, item.kind)}",
            f"  last error:  {printable(item.last_error) or NONE}",
            "  recipients:",
        ]
        width = max((len(r.rcpt) for r in item.recipients), default=0)
        for r in item.recipients:
            answer = printable(r.last_answer)
            lines.append(f"    {printable(r.rcpt).ljust(width)}  {r.state:7}  {answer}".rstrip())
        label = "headers" if item.kind == "smtp" else "data"
        if item.headers:
            lines += [f"  {label}:", *(f"    {h}" for h in item.headers)]
        else:
            lines.append(f"  {label}:{' ' * (11 - len(label))}not kept after delivery")
    return lines


def change_line(c: Change, verb: str) -> str:
    """One line per message of ``retry`` / ``delete``."""
    if c.items == 0:
        if c.held and verb == "requeued":
            return f"{c.queue_id}: held for GoCD data, nothing to retry"
        what = "held message" if c.held else "record"
        return f"{c.queue_id}: {'nothing to retry' if verb == 'requeued' else f'{what} deleted'}"
    parts = [f"{n} {s}" for s, n in (("pending", c.pending), ("dead", c.dead), ("done", c.done))]
    states = ", ".join(p for p in parts if not p.startswith("0 "))
    rcpts = f"{c.recipients} recipient{'s' * (c.recipients != 1)}"
    items = f"{c.items} item{'s' * (c.items != 1)}"
    if verb == "requeued":
        revived = f"; {rcpts} back to pending" if c.recipients else ""
        return f"{c.queue_id}: requeued {items} ({states}), due now{revived}"
    return f"{c.queue_id}: deleted {items} ({states}); {rcpts} will not get it"


# -- the command ---------------------------------------------------------------------------


def _add_options(parser: argparse.ArgumentParser, *, top: bool, json_output: bool) -> None:
    # The options are accepted before and after the action (``queue --json list`` and
    # ``queue list --json``); SUPPRESS keeps an action's parser from resetting them.
    parser.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=None if top else argparse.SUPPRESS,
        help=f"configuration file (default: ${config.ENV_CONFIG}, else ./{config.DEFAULT_CONFIG})",
    )
    if json_output:
        parser.add_argument(
            "--json",
            action="store_true",
            default=False if top else argparse.SUPPRESS,
            help="print JSON (list and show)" if top else "print JSON",
        )


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``queue`` and its actions to the commands of :func:`mail2alert.cli.build_parser`."""
    queue = commands.add_parser(
        "queue",
        help="list, show, retry or delete queued mail (like postqueue/postsuper)",
        description="Look at and act on the outbox; works while mail2alert serve runs.",
    )
    _add_options(queue, top=True, json_output=True)
    actions = queue.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="pending, dead and held mail, oldest first (default)")
    _add_options(listing, top=False, json_output=True)
    show = actions.add_parser("show", help="everything about one message")
    show.add_argument("queue_ids", nargs=1, metavar="ID", help="a queue id (see list)")
    _add_options(show, top=False, json_output=True)
    again = actions.add_parser("retry", help="make pending and dead items due now")
    again.add_argument("queue_ids", nargs="*", metavar="ID", help="queue ids (see list)")
    again.add_argument("--all", action="store_true", help="every pending and dead item")
    _add_options(again, top=False, json_output=False)
    remove = actions.add_parser("delete", help="remove messages: nothing more is sent")
    remove.add_argument("queue_ids", nargs="+", metavar="ID", help="queue ids (see list)")
    _add_options(remove, top=False, json_output=False)


def run(args: argparse.Namespace) -> int:
    """``mail2alert queue``: 0 when done; raises OutboxError (1) or UsageError (2)."""
    action = args.action or "list"
    if action == "retry" and bool(args.queue_ids) == args.all:
        raise UsageError("queue retry: give queue ids or --all, not both or neither")
    cfg = config.load(config.config_path(args.config))
    with opened(cfg) as outbox:
        lines = _ACTIONS[action](outbox, args, time.time())
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def _list(outbox: Outbox, args: argparse.Namespace, now: float) -> list[str]:
    found = entries(outbox)
    if args.json:
        return [json.dumps([entry_json(e, now) for e in found], indent=2)]
    return list_lines(found, now)


def _show(outbox: Outbox, args: argparse.Namespace, now: float) -> list[str]:
    message = detail(outbox, args.queue_ids[0])
    if args.json:
        return [json.dumps(message_json(message), indent=2)]
    return show_lines(message, now)


def _retry(outbox: Outbox, args: argparse.Namespace, now: float) -> list[str]:
    changes = retry(outbox, args.queue_ids, now)
    return [change_line(c, "requeued") for c in changes] or ["nothing to retry"]


def _delete(outbox: Outbox, args: argparse.Namespace, now: float) -> list[str]:
    return [change_line(c, "deleted") for c in delete(outbox, args.queue_ids)]


_ACTIONS: dict[str, Callable[[Outbox, argparse.Namespace, float], list[str]]] = {
    "list": _list,
    "show": _show,
    "retry": _retry,
    "delete": _delete,
}
