"""How long one ``/metrics`` scrape takes with a large outbox (issue: under 50 ms at 100,000
messages).

Fills a throw-away outbox with ``--messages`` messages, one item each (most delivered, some
pending, dead and held, as a busy week leaves it), and the counters those messages made;
then times what a scrape does: read the counters and the gauges from SQLite and render the
text format. Prints the median and the slowest of ``--scrapes`` scrapes, and the median time
of the history's queries behind the console's pages.
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

#: A header section about as big as a GoCD mail's, for the history.
HEADERS = b"".join(
    b"Received: from ci.example.com by relay " + b"x" * 60 + b"\r\n" for _ in range(6)
)


def fill(outbox: Outbox, messages: int) -> None:
    now = time.time()
    with outbox.transaction("fill") as db:
        for n in range(messages):
            state = "pending" if n % 100 == 0 else "dead" if n % 1000 == 1 else "done"
            outcome = "hold" if n % 2000 == 2 else "deliver"
            received = now - (messages - n)
            pipeline = f"p{n % 500}"
            db.execute(
                "INSERT INTO messages (id, received, mail_from, rcpt_tos, subject, manager,"
                " outcome, reason, raw, facts, facts_data, trace, headers)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    f"Q{n:012X}",
                    received,
                    "go@example.com",
                    '["ci@example.com"]',
                    f"Stage [{pipeline}/1/s/1] failed",
                    "gocd#0",
                    outcome,
                    "",
                    b"raw" if outcome == "hold" else None,
                    f"pipeline {pipeline} #1, stage s #1, event FAILS, group g",
                    json.dumps({"pipeline": pipeline, "stage": "s", "event": "FAILS"}),
                    json.dumps(["✓ rule 1 (line 14): pipelines.any(): matched -> mailto:a@b"]),
                    HEADERS,
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
        # What the console's pages ask of the history, at the same size.
        pages = {
            "messages page": lambda: outbox.history(limit=50),
            "messages of one pipeline": lambda: outbox.history(facts={"pipeline": "p7"}, limit=50),
            "dead messages": lambda: outbox.history(state="dead", limit=50),
            "chart (24 hours)": lambda: outbox.hourly(time.time() - 86400),
        }
        took = {}
        for name, page in pages.items():
            runs = []
            for _ in range(5):
                start = time.perf_counter()
                page()
                runs.append(time.perf_counter() - start)
            took[name] = statistics.median(runs)
        outbox.close()
    print(
        f"{args.messages} messages: scrape median {statistics.median(times) * 1000:.1f} ms,"
        f" slowest {max(times) * 1000:.1f} ms ({size} bytes)"
    )
    for name, seconds in took.items():
        print(f"  {name}: {seconds * 1000:.1f} ms")


if __name__ == "__main__":
    main()
