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
from mail2alert.outbox import DB_NAME, Change, Entry, Outbox

#: How many header lines ``show`` prints of an item's data.
HEADER_LINES = 20
#: ``list`` shortens the last error to this many characters (``--json`` and ``show`` do not).
ERROR_WIDTH = 60
#: Printed where there is no next try: dead items, held messages.
NONE = "—"

# -- records -------------------------------------------------------------------------------


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


# -- reading the outbox --------------------------------------------------------------------


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


def detail(outbox: Outbox, queue_id: str) -> MessageDetail:
    """Everything about one message; OutboxError if there is no such message."""
    with outbox.reading():
        message = outbox.message(outbox.known(queue_id))
        assert message is not None
        items = outbox.items_of(message.id)
        recipients = outbox.recipients_of(message.id)
    return MessageDetail(
        message.id,
        message.received,
        message.mail_from,
        message.rcpt_tos,
        message.subject,
        message.manager,
        message.outcome,
        message.reason,
        header_lines(message.raw or b""),
        tuple(
            ItemDetail(
                item.id,
                item.kind,
                item.state,
                item.attempts,
                item.created,
                None if item.state != "pending" else item.next_try,
                item.mail_from,
                item.last_error,
                tuple(
                    RecipientRow(r.rcpt, r.state, r.last_error)
                    for r in recipients
                    if r.item_id == item.id
                ),
                data_lines(item.kind, item.data),
            )
            for item in items
        ),
    )


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
        lines += [
            "held until its manager has the data its rules need: routed again when it comes,"
            " or after hold-max"
        ]
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
            return f"{c.queue_id}: held, nothing to retry"
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
    cfg = config.load(config.config_path(args.config), unset_ok=True)
    for note in cfg.unset_notes():
        print(f"note: {note}", file=sys.stderr)
    with opened(cfg) as outbox:
        lines = _ACTIONS[action](outbox, args, time.time())
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def _list(outbox: Outbox, args: argparse.Namespace, now: float) -> list[str]:
    found = outbox.entries()
    if args.json:
        return [json.dumps([entry_json(e, now) for e in found], indent=2)]
    return list_lines(found, now)


def _show(outbox: Outbox, args: argparse.Namespace, now: float) -> list[str]:
    message = detail(outbox, args.queue_ids[0])
    if args.json:
        return [json.dumps(message_json(message), indent=2)]
    return show_lines(message, now)


def _retry(outbox: Outbox, args: argparse.Namespace, now: float) -> list[str]:
    changes = outbox.retry(args.queue_ids, now)
    return [change_line(c, "requeued") for c in changes] or ["nothing to retry"]


def _delete(outbox: Outbox, args: argparse.Namespace, now: float) -> list[str]:
    return [change_line(c, "deleted") for c in outbox.delete(args.queue_ids)]


_ACTIONS: dict[str, Callable[[Outbox, argparse.Namespace, float], list[str]]] = {
    "list": _list,
    "show": _show,
    "retry": _retry,
    "delete": _delete,
}
