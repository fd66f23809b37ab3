"""How long one ``/metrics`` scrape takes with a large outbox (issue: under 50 ms at 100,000
messages).

Fills a throw-away outbox with ``--messages`` messages, one item each (most delivered, some
pending, dead and held, as a busy week leaves it), and the counters those messages made;
then times what a scrape does: read the counters and the gauges from SQLite and render the
text format. Prints the median and the slowest of ``--scrapes`` scrapes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mail2alert.metrics import Status, render
from mail2alert.outbox import DELIVERY_BUCKETS, Outbox


def fill(outbox: Outbox, messages: int) -> None:
    now = time.time()
    with outbox.transaction("fill") as db:
        for n in range(messages):
            state = "pending" if n % 100 == 0 else "dead" if n % 1000 == 1 else "done"
            outcome = "hold" if n % 2000 == 2 else "deliver"
            received = now - (messages - n)
            db.execute(
                "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    f"Q{n:012X}",
                    received,
                    "go@example.com",
                    '["ci@example.com"]',
                    f"Stage [p{n % 500}/1/s/1] failed",
                    "gocd#0",
                    outcome,
                    "",
                    b"raw" if outcome == "hold" else None,
                ),
            )
            if outcome == "hold":
                continue
            db.execute(
                "INSERT INTO items (message_id, kind, mail_from, data, state, created, next_try)"
                " VALUES (?,?,?,?,?,?,?)",
                (f"Q{n:012X}", "smtp", "go@example.com", b"", state, received, received),
            )
        for manager in ("gocd#0", "mail#1", ""):
            for outcome in ("deliver", "relay", "drop", "hold", "duplicate"):
                labels = json.dumps({"manager": manager, "outcome": outcome}, sort_keys=True)
                db.execute("INSERT INTO counters VALUES ('messages', ?, 1000)", (labels,))
            for rule in range(20):
                labels = json.dumps({"manager": manager, "rule": str(rule)}, sort_keys=True)
                db.execute("INSERT INTO counters VALUES ('rule_matches', ?, 1000)", (labels,))
        for bound in (*(repr(b) for b in DELIVERY_BUCKETS), "+Inf"):
            db.execute(
                "INSERT INTO counters VALUES ('delivery_seconds_bucket', ?, 10)",
                (json.dumps({"le": bound}),),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mail2alert-scrape-") as tmp:
        outbox = Outbox(Path(tmp))
        fill(outbox, args.messages)
        times = []
        size = 0
        for _ in range(args.scrapes):
            start = time.perf_counter()
            text = render(outbox.counters(), outbox.gauges(), Status("0"), now=time.time())
            times.append(time.perf_counter() - start)
            size = len(text)
        outbox.close()
    print(
        f"{args.messages} messages: scrape median {statistics.median(times) * 1000:.1f} ms,"
        f" slowest {max(times) * 1000:.1f} ms ({size} bytes)"
    )


if __name__ == "__main__":
    main()
