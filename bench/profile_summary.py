#!/usr/bin/env python3
"""Summarise a ``py-spy record --threads -f raw`` profile of mail2alert into cost buckets.

Usage:
  python bench/profile_summary.py PROFILE.txt [--thread MainThread]

Every sample of the chosen thread is put in the first bucket (in the order below) whose frame
occurs anywhere in its stack; the table says what share of that thread's samples each bucket
got. Record with ``--native`` (and without ``--nonblocking``) to split uvloop's C time into
socket writes, accepts and polling; without it that time shows as "event loop (C, unsplit)".
"""

from __future__ import annotations

import argparse
import collections
import sys

# (bucket, frames that put a sample into it); first match wins.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("aiosmtpd SMTP.__init__ per connection (inspect.getmembers)", ("SMTP.__init__",)),
    ("logging (our INFO lines)", ("Logger.info", "Logger._log", "Logger.error", "Logger.warning")),
    ("mail2alert accept(): parse, route, Received, rewrite", ("accept",)),
    ("aiosmtpd MAIL/RCPT address parsing (_getaddr, email parser)", ("SMTP._getaddr",)),
    ("aiosmtpd replies: push() -> socket write", ("SMTP.push",)),
    ("handle_DATA rest: queue id, commit future, wake", ("Handler.handle_DATA",)),
    ("aiosmtpd session rest: line reads, DATA assembly, dispatch", ("SMTP._handle_client",)),
    (
        "delivery: dispatcher + SMTP client",
        ("Dispatcher.", "SmtpConnection", "Client.", "_Wire.", "Dispatcher._worker"),
    ),
    ("uvloop accept of new connections", ("UVStreamServer__on_listen", "__uv_streamserver")),
    ("uvloop reads / closes / epoll", ("uv__io_poll",)),
    ("garbage collector", ("gc_collect_main",)),
    ("event loop (C, unsplit)", ("Runner.run",)),
]


def bucket_of(frames: list[str]) -> str:
    names = [f.split(" (")[0] for f in frames]
    for label, keys in BUCKETS:
        for key in keys:
            if any(
                n == key or (key.endswith(".") and n.startswith(key)) or key in n for n in names
            ):
                return label
    return "other (start-up, imports, ...)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profile")
    ap.add_argument("--thread", default="MainThread")
    args = ap.parse_args()
    threads: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            thread = frames[0].split(": ", 1)[-1]
            threads[thread] += int(count)
            if thread == args.thread:
                buckets[bucket_of(frames[1:])] += int(count)
    total = sum(threads.values())
    print("samples per thread:")
    for name, n in threads.most_common():
        print(f"  {n:6d} {100 * n / total:5.1f}%  {name}")
    mine = threads[args.thread]
    if not mine:
        print(f"no samples for thread {args.thread!r}", file=sys.stderr)
        return 1
    print(f"\n{args.thread}: {mine} samples")
    for label, n in buckets.most_common():
        print(f"  {100 * n / mine:5.1f}%  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
