#!/usr/bin/env python3
"""Bytes the outbox alone writes per message, by page size and commit size (no SMTP).

Two connections to a fresh outbox in a temporary directory, as the server has them: a durable
one commits messages in batches of B (the group commit), a non-durable one takes the due
items and records them delivered in batches of R (the dispatcher). The bytes are this
process's ``write_bytes`` from /proc/self/io (WAL, checkpoints, the database file), less
``cancelled_write_bytes``; the directory is made next to this checkout, so on its disk, not
on a tmpfs /tmp (where nothing is counted).

Usage:
  .venv/bin/python bench/outbox_io.py [--messages 2000] [--size 2100] [--page-sizes 1024,2048,4096]

It runs the sources it is started with: PYTHONPATH=src for this checkout.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from mail2alert import outbox as ob
from mail2alert.model import Decision, Envelope, Outgoing

ROOT = Path(__file__).resolve().parent.parent
BATCHES = ((1, 1), (2, 2), (5, 5), (10, 10), (50, 50))


def written() -> int:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ", 1) for line in f.read().splitlines())
    return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])


def delivered(item: ob.Item) -> ob.Result:
    """The result of an attempt that served every recipient."""
    return ob.Result(item, tuple(ob.RecipientResult(r, "done") for r in item.recipients), 0, "")


#: What the decision history keeps of a GoCD stage mail beside its item (``--history``): its
#: header section, facts line and data, and one rule's verdict, about as big as the real ones.
HISTORY = {
    "headers": b"X-Header: " + b"h" * 60 + b"\r\n" * 1 + (b"Received: " + b"r" * 90 + b"\r\n") * 6,
    "facts": "pipeline my-pipeline #6, stage my-stage #1, event BREAKS, group my-group",
    "facts_data": {
        "pipeline": "my-pipeline",
        "pipeline_counter": 6,
        "stage": "my-stage",
        "stage_counter": 1,
        "event": "BREAKS",
        "group": "my-group",
        "details_url": "https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1",
    },
    "trace": (
        "✓ rule 1 (line 14): pipelines.in_group('my-group') events BREAKS: matched"
        " -> mailto:cat@example.com",
    ),
}


def run(
    messages: int, size: int, put_batch: int, record_batch: int, *, history: bool = False
) -> tuple[float, int]:
    """(bytes written per message, peak WAL bytes) for one configuration."""
    tmp = Path(tempfile.mkdtemp(prefix="outbox-io-", dir=ROOT.parent))
    try:
        intake, delivery = ob.Outbox(tmp), ob.Outbox(tmp, durable=False)
        body = b"x" * size
        start, wal = written(), 0
        t0 = time.time()
        for n in range(0, messages, put_batch):
            intake.put(
                [
                    ob.Accepted(
                        f"Q{n + i:010d}",
                        t0 + n + i,
                        Envelope("bench@example.com", ("someone@example.com",)),
                        "bench alert",
                        Decision("deliver", "mail", "bench"),
                        (Outgoing("bench@example.com", ("alerts@example.com",), body),),
                        **(HISTORY if history else {}),  # type: ignore[arg-type]
                    )
                    for i in range(put_batch)
                ]
            )
            due = delivery.due(t0 + 10 * messages, record_batch)
            if len(due) == record_batch or n + put_batch >= messages:
                delivery.record([delivered(item) for item in due])
            wal_file = tmp / f"{ob.DB_NAME}-wal"
            wal = max(wal, wal_file.stat().st_size if wal_file.exists() else 0)
        for item in delivery.due(t0 + 10 * messages, messages):
            delivery.record([delivered(item)])
        per_message = (written() - start) / messages
        intake.close()
        delivery.close()
        return per_message, wal
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=2100, help="bytes of each message")
    ap.add_argument("--page-sizes", default="1024,2048,4096")
    ap.add_argument(
        "--history",
        action="store_true",
        help="messages carry what the decision history keeps (headers, facts, trace)",
    )
    args = ap.parse_args()
    print(f"{args.messages} messages of {args.size} bytes; KB written per message")
    print("| page size | " + " | ".join(f"commit {b}, record {r}" for b, r in BATCHES) + " |")
    print("|---:|" + "---:|" * len(BATCHES))
    for page in (int(p) for p in args.page_sizes.split(",")):
        ob.PAGE_SIZE = page  # a new outbox takes it; the WAL stays 4 MiB whatever the page
        cells = [run(args.messages, args.size, b, r, history=args.history) for b, r in BATCHES]
        print(f"| {page} | " + " | ".join(f"{kb / 1000:.1f}" for kb, _ in cells) + " |")


if __name__ == "__main__":
    main()
