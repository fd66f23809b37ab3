#!/usr/bin/env python3
"""What an append-only spool would write per message, beside the outbox as it is (no SMTP).

A design experiment for issue 9, point 10 (fewer bytes written per message than a durable
Postfix), not code mail2alert runs. The outbox commits each batch of messages to SQLite with
``synchronous=FULL``: every page the commit touches is written whole to the WAL, and again
to the database at the checkpoint (``bench/outbox_io.py``). The spool sketched here is the
durable log instead:

- intake appends each batch's records (queue id, envelope, the item's bytes) to a segment
  file and calls ``fdatasync`` once: that is when the 250 may be sent;
- delivery appends a small record per delivered item to the same log, without a sync (as
  the outbox records delivery with ``synchronous=NORMAL``: a crash may send again, never lose);
- an index in SQLite (``synchronous=OFF``: it can be rebuilt from the log's tail after a
  crash) takes small rows in big batches, off the path of the SMTP reply;
- a segment whose messages are all delivered is deleted whole (a file deletion, no rewrite).

It prints, like ``outbox_io.py``, the bytes this process wrote per message
(``write_bytes`` of /proc/self/io less ``cancelled_write_bytes``) by commit size, for the
spool and for the outbox, on the disk of this checkout (a tmpfs counts nothing).

Usage:
  PYTHONPATH=src .venv/bin/python bench/spool_io.py [--messages 2000] [--size 2100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import struct
import tempfile
from pathlib import Path

from outbox_io import ROOT, written
from outbox_io import run as outbox_run

BATCHES = (1, 2, 5, 10, 50)
#: How many messages the index takes in one transaction.
INDEX_BATCH = 500
#: Where a segment ends and the next begins.
SEGMENT_BYTES = 4 * 1024 * 1024


class Spool:
    """The sketch: segment files of length-prefixed records, and a lazy index."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.segment = 0
        self.file = self._open()
        self.index = sqlite3.connect(where / "index.sqlite3", isolation_level=None)
        self.index.execute("PRAGMA journal_mode=WAL")
        self.index.execute("PRAGMA synchronous=OFF")
        self.index.execute(
            "CREATE TABLE items (id TEXT PRIMARY KEY, segment INTEGER, offset INTEGER,"
            " length INTEGER, state TEXT)"
        )
        self.unindexed: list[tuple[str, int, int, int]] = []
        self.done: list[str] = []
        self.live: dict[int, int] = {}

    def _open(self) -> int:
        return os.open(
            self.where / f"segment-{self.segment:06d}", os.O_WRONLY | os.O_CREAT | os.O_APPEND
        )

    def put(self, batch: list[tuple[str, bytes, bytes]]) -> int:
        """Append a batch and make it durable (the moment intake may answer 250); the
        segment it went to."""
        written_to = self.segment
        offset = os.lseek(self.file, 0, os.SEEK_END)
        records = []
        for queue_id, envelope, data in batch:
            record = queue_id.encode() + b"\0" + envelope + b"\0" + data
            records.append(struct.pack(">I", len(record)) + record)
            self.unindexed.append((queue_id, self.segment, offset, len(record)))
            offset += 4 + len(record)
        os.write(self.file, b"".join(records))
        os.fdatasync(self.file)
        self.live[self.segment] = self.live.get(self.segment, 0) + len(batch)
        if offset >= SEGMENT_BYTES:
            os.close(self.file)
            self.segment += 1
            self.file = self._open()
        if len(self.unindexed) >= INDEX_BATCH:
            self.flush_index()
        return written_to

    def delivered(self, queue_ids: list[str], segments: list[int]) -> None:
        """Record delivery: a small record in the log, no sync; delete segments now empty."""
        log = b"".join(b"D" + q.encode() + b"\n" for q in queue_ids)
        os.write(self.file, struct.pack(">I", len(log)) + log)
        self.done += queue_ids
        for segment in segments:
            self.live[segment] -= 1
            if self.live[segment] == 0 and segment != self.segment:
                os.unlink(self.where / f"segment-{segment:06d}")
        if len(self.done) >= INDEX_BATCH:
            self.flush_index()

    def flush_index(self) -> None:
        self.index.execute("BEGIN")
        self.index.executemany("INSERT INTO items VALUES (?,?,?,?, 'pending')", self.unindexed)
        self.index.executemany(
            "UPDATE items SET state='done' WHERE id=?", [(q,) for q in self.done]
        )
        self.index.execute("COMMIT")
        self.unindexed, self.done = [], []

    def close(self) -> None:
        self.flush_index()
        os.close(self.file)
        self.index.close()


def spool_run(messages: int, size: int, batch: int) -> float:
    """Bytes written per message by the spool, committing ``batch`` messages at a time and
    recording their delivery as soon as they are durable."""
    tmp = Path(tempfile.mkdtemp(prefix="spool-io-", dir=ROOT.parent))
    try:
        spool = Spool(tmp)
        envelope = json.dumps(["bench@example.com", ["alerts@example.com"]]).encode()
        body = b"x" * size
        start = written()
        for n in range(0, messages, batch):
            ids = [f"Q{n + i:010d}" for i in range(batch)]
            segment = spool.put([(q, envelope, body) for q in ids])
            spool.delivered(ids, [segment] * len(ids))
        spool.close()
        return (written() - start) / messages
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=2100, help="bytes of each message")
    args = ap.parse_args()
    print(f"{args.messages} messages of {args.size} bytes; KB written per message")
    print("| store | " + " | ".join(f"commit {b}" for b in BATCHES) + " |")
    print("|---|" + "---:|" * len(BATCHES))
    spooled = [spool_run(args.messages, args.size, b) for b in BATCHES]
    print("| spool | " + " | ".join(f"{v / 1000:.1f}" for v in spooled) + " |")
    outbox = [outbox_run(args.messages, args.size, b, b)[0] for b in BATCHES]
    print("| outbox | " + " | ".join(f"{v / 1000:.1f}" for v in outbox) + " |")


if __name__ == "__main__":
    main()
