#!/usr/bin/env python3
"""What else the outbox could write per message: its SQLite tables under other ways to commit.

A design experiment for issue 9, point 10 (fewer bytes written per message than a durable
Postfix), not code mail2alert runs. ``bench/outbox_io.py`` measures the outbox as it is, by
page size and commit size; this asks what each part of a message's cost is, and what two
larger changes would save, on the same workload (3,000 messages of 1.5 KB with what the
decision history keeps, 1 KiB pages, delivered as soon as they are due):

- ``as it is``: intake commits 3 messages at a time (what the group commit gathers at 10
  sessions), delivery records 4 results at a time (one per delivery connection);
- ``without ...``: the same, less the delivery results, the history's fields, or counters;
- ``spool``: each intake batch is first appended to a file with one ``fdatasync`` (the
  moment the 250 could be sent); SQLite takes the same rows later, ``index`` messages to a
  transaction; ``refs``: its items hold no bytes (they would be read from the spool);
  ``results R``: delivery records R results to a transaction.

It prints the bytes this process wrote per message (``write_bytes`` of /proc/self/io less
``cancelled_write_bytes``), on the disk of this checkout (a tmpfs counts nothing).

Usage:
  PYTHONPATH=src .venv/bin/python bench/store_io.py [--messages 3000]
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from outbox_io import HISTORY, ROOT, delivered, written

from mail2alert import outbox as ob
from mail2alert.model import Decision, Envelope, Outgoing

BODY = b"x" * 1500


def message(n: int, t0: float, *, history: bool) -> ob.Accepted:
    return ob.Accepted(
        f"Q{n:010d}",
        t0,
        Envelope("bench@example.com", ("someone@example.com",)),
        "bench alert",
        Decision("deliver", "mail", "bench"),
        (Outgoing("bench@example.com", ("alerts@example.com",), BODY),),
        **(HISTORY if history else {}),  # type: ignore[arg-type]
    )


def run(
    messages: int,
    *,
    index: int = 3,
    results: int = 4,
    spool: bool = False,
    refs: bool = False,
    history: bool = True,
    counters: bool = True,
    record: bool = True,
    split: list[float] | None = None,
) -> float:
    """KB written per message for one way of committing. With ``split`` (an empty list),
    nothing is checkpointed until the end, and the list gets the KB per message written to
    the WAL, the WAL frames per message, and the KB per message of the one checkpoint at the
    end."""
    tmp = Path(tempfile.mkdtemp(prefix="store-io-", dir=ROOT.parent))
    count = ob._Tally.add
    if not counters:
        ob._Tally.add = lambda *a, **k: None  # type: ignore[method-assign]
    try:
        intake = ob.Outbox(tmp, durable=not spool)
        delivery = ob.Outbox(tmp, durable=False)
        if split is not None:
            for outbox in (intake, delivery):
                outbox.db.execute("PRAGMA wal_autocheckpoint=0")
        log = os.open(tmp / "spool", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        t0, start, waiting = time.time(), written(), []
        for n in range(0, messages, 3):
            batch = [message(n + i, t0, history=history) for i in range(3)]
            if spool:
                os.write(log, b"".join(pickle.dumps(a) for a in batch))
                os.fdatasync(log)
                if refs:
                    batch = [
                        replace(a, items=tuple(replace(i, data=b"") for i in a.items))
                        for a in batch
                    ]
            waiting += batch
            if len(waiting) >= index or n + 3 >= messages:
                intake.put(waiting)
                waiting = []
            if record:
                due = delivery.due(t0 + 10, messages)
                while len(due) >= results:
                    delivery.record([delivered(item) for item in due[:results]])
                    due = due[results:]
        if record:
            for item in delivery.due(t0 + 10, messages):
                delivery.record([delivered(item)])
        per_message = (written() - start) / messages / 1000
        if split is not None:
            frames = (tmp / f"{ob.DB_NAME}-wal").stat().st_size / (ob.PAGE_SIZE + 24)
            before = written()
            intake.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            split += [per_message, frames / messages, (written() - before) / messages / 1000]
        os.close(log)
        intake.close()
        delivery.close()
        return per_message
    finally:
        ob._Tally.add = count  # type: ignore[method-assign]
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=3000)
    args = ap.parse_args()
    n = args.messages
    ob.PAGE_SIZE = 1024
    rows = [
        ("as it is", run(n)),
        ("without the delivery results", run(n, record=False)),
        ("without the history's fields", run(n, history=False)),
        ("without counters", run(n, counters=False)),
        ("spool, index 3", run(n, spool=True)),
        ("spool, index 3, refs", run(n, spool=True, refs=True)),
        ("spool, index 25, refs", run(n, spool=True, refs=True, index=25)),
        ("spool, index 25, refs, results 25", run(n, spool=True, refs=True, index=25, results=25)),
        (
            "spool, index 100, refs, results 25",
            run(n, spool=True, refs=True, index=100, results=25),
        ),
        (
            "spool, index 100, refs, results 25, no history",
            run(n, spool=True, refs=True, index=100, results=25, history=False),
        ),
    ]
    print(f"{n} messages of {len(BODY)} bytes, 1 KiB pages; KB written per message")
    print("| how | KB per message |")
    print("|---|---:|")
    for name, kb in rows:
        print(f"| {name} | {kb:.1f} |")
    print()
    print("As it is, with no checkpoint until the end: the WAL's part and the checkpoint's")
    print("| messages per commit | WAL KB/msg | WAL frames/msg | checkpoint KB/msg |")
    print("|---:|---:|---:|---:|")
    for batch in (3, 6, 30):
        parts: list[float] = []
        run(n, index=batch, split=parts)
        print(f"| {batch} | {parts[0]:.1f} | {parts[1]:.1f} | {parts[2]:.1f} |")


if __name__ == "__main__":
    main()
