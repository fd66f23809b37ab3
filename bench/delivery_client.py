#!/usr/bin/env python3
"""What delivery's SMTP client alone costs per message: ``SmtpConnection.send`` of N items
over C connections to Postfix's ``smtp-sink``, in a process of its own on uvloop, with no
outbox, dispatcher or intake. ``LABEL`` runs the sources given as ``--src LABEL=PATH``;
``LABEL/nopipe`` the same against a sink that does not offer PIPELINING (``smtp-sink -p``),
so that the client goes one command at a time. ``LABEL/dispatcher`` is the whole of
delivery without intake: a ``Dispatcher`` sends N items, committed to an outbox beforehand,
over C connections, claiming them and recording their results as ``serve`` does.

The table gives messages per second and the client process's CPU per message (user and
system, from /proc, the sending only), medians over ``--repeat`` interleaved runs. Each item
is a 2 KB mail with one recipient. Everything is on 127.0.0.1 and bounded by N.

  .venv/bin/python bench/delivery_client.py -n 5000 -c 4 --repeat 3 \\
      --src before=/tmp/m2a-before/src --src now=src --clients before,now,now/nopipe
  .venv/bin/python bench/delivery_client.py -n 5000 -c 8 --repeat 5 \\
      --src before=/tmp/m2a-before/src --src now=src --clients before/dispatcher,now/dispatcher
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

from mail2alert.testing import free_port

HOST = "127.0.0.1"
BODY = (
    b"From: go@example.com\r\nTo: cat@example.com\r\nSubject: Stage [p/1/s/1] failed\r\n\r\n"
    + (b"y" * 76 + b"\r\n") * 26
)


def cpu_seconds() -> float:
    """User and system CPU of this process so far, from /proc."""
    with open(f"/proc/{os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(port: int, messages: int, connections: int) -> None:
    """Send and print ``msg/s cpu_ms_per_msg`` (runs with the sources under test)."""
    import uvloop

    from mail2alert.outbox import Item
    from mail2alert.transports.smtp import SmtpConnection

    async def main() -> None:
        pool = [
            SmtpConnection(HOST, port, timeout=30, local_hostname="bench.test")
            for _ in range(connections)
        ]

        async def send(connection: SmtpConnection, count: int) -> None:
            for n in range(count):
                item = Item(n, "Q", "mail", "go@example.com", BODY, 0, 0.0, ("cat@example.com",))
                attempt = await connection.send(item)
                if not attempt.recipients or attempt.recipients[0].state != "done":
                    raise SystemExit(f"not delivered: {attempt}")

        await asyncio.gather(*(send(c, 50) for c in pool))  # connect and warm up
        cpu, wall = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(send(c, messages // connections) for c in pool))
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        for connection in pool:
            await connection.close()
        sent = messages // connections * connections
        print(f"{sent / wall:.0f} {cpu / sent * 1000:.3f}")

    uvloop.run(main())


def dispatcher_worker(port: int, messages: int, connections: int) -> None:
    """Deliver ``messages`` items from an outbox and print ``msg/s cpu_ms_per_msg``."""
    import tempfile
    from pathlib import Path

    import uvloop

    from mail2alert.dispatcher import Dispatcher
    from mail2alert.model import Decision, Envelope, Outgoing
    from mail2alert.outbox import Accepted, Outbox
    from mail2alert.settings import Delivery, HostPort

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        outbox = Outbox(data_dir)
        envelope = Envelope("go@example.com", ("cat@example.com",))
        item = Outgoing("go@example.com", ("cat@example.com",), BODY)
        decision = Decision("deliver", None, "bench")
        batch = [
            Accepted(f"Q{n:07d}", time.time(), envelope, "s", decision, (item,))
            for n in range(messages)
        ]
        for start in range(0, messages, 5):  # as intake commits them: a few a transaction
            outbox.put(batch[start : start + 5])

        async def main() -> None:
            dispatcher = Dispatcher(
                data_dir, HostPort(HOST, port), Delivery(connections=connections)
            )
            stop = asyncio.Event()
            cpu, wall = cpu_seconds(), time.perf_counter()
            running = asyncio.create_task(dispatcher.run(stop))
            # Nothing in the outbox says when it is empty: a look every 20 ms (a cheap query).
            while outbox.gauges().pending:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
            stop.set()
            await running
            print(f"{messages / wall:.0f} {cpu / messages * 1000:.3f}")

        uvloop.run(main())
        outbox.close()


def run(client: str, sources: dict[str, str], args: argparse.Namespace) -> tuple[float, float]:
    label, _, mode = client.partition("/")
    port = free_port()
    sink_args = ["smtp-sink", "-u", "nobody"] + (["-p"] if mode == "nopipe" else [])
    sink = subprocess.Popen([*sink_args, f"{HOST}:{port}", "256"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        env = dict(os.environ, PYTHONPATH=sources[label])
        role = "--dispatcher" if mode == "dispatcher" else "--worker"
        done = subprocess.run(
            [sys.executable, __file__, role, str(port), str(args.messages), str(args.c)],
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=True,
        )
        rate, cpu = done.stdout.split()
        return float(rate), float(cpu)
    finally:
        sink.terminate()
        sink.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=5000)
    ap.add_argument("-c", type=int, default=4, help="connections (delivery.connections)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=PATH")
    ap.add_argument(
        "--clients", default="now", help="LABEL, LABEL/nopipe or LABEL/dispatcher, comma-separated"
    )
    ap.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dispatcher", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    if args.dispatcher:
        dispatcher_worker(*args.dispatcher)
        return 0
    sources = dict(s.split("=", 1) for s in args.src)
    sources.setdefault("now", "src")
    clients = args.clients.split(",")
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in clients}
    for _ in range(args.repeat):
        for client in clients:
            results[client].append(run(client, sources, args))
    print(f"{args.messages} messages over {args.c} connections, medians of {args.repeat}")
    print("| client | msg/s | CPU ms/msg | runs (msg/s) |")
    print("|---|---:|---:|---|")
    for client, runs in results.items():
        rates = [r for r, _ in runs]
        cpus = [c for _, c in runs]
        shown = ", ".join(f"{r:.0f}" for r in rates)
        print(
            f"| `{client}` | {statistics.median(rates):.0f} | {statistics.median(cpus):.3f}"
            f" | {shown} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
