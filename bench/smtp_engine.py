#!/usr/bin/env python3
"""What the SMTP engine alone costs per message: mail2alert's session
(:class:`~mail2alert.session.LeanSMTP`, which answers aiosmtpd's commands as they arrive)
against a bare ``asyncio.Protocol`` state machine, each on uvloop in a process of its own,
answering ``250`` at once with nothing stored and no routing. ``lean@LABEL`` runs the
session of the sources given as ``--src LABEL=PATH``, to compare two versions.

Postfix's ``smtp-source`` sends N messages over C sessions, a new connection per message, as
in ``bench/bench.py`` (it says HELO, never EHLO). The table gives messages per
second and the server process's CPU per message (user and system, from /proc), medians over
``--repeat`` interleaved runs. Everything is on 127.0.0.1 and bounded by N and a timeout.

The bare engine is a measuring stick, not a server: it answers every command with the reply
a plain session would get and checks nothing: it is the floor. A real session must still do
what LeanSMTP does (parse addresses, limits, access, STARTTLS, AUTH, the handler).

  PYTHONPATH=src .venv/bin/python bench/smtp_engine.py -n 5000 -s 10 --repeat 3
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

HOST = "127.0.0.1"


class BareSession(asyncio.Protocol):
    """An SMTP session as a state machine over ``data_received``: lines in, replies out."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.in_data = False
        self.transport.write(b"220 bare ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies: list[bytes] = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end == -1:
                    break
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                replies.append(b"250 OK")
                continue
            cut = self.buffer.find(b"\r\n")
            if cut == -1:
                break
            line, self.buffer = self.buffer[:cut], self.buffer[cut + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(b"250-bare\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250 HELP")
            elif verb == b"DATA":
                replies.append(b"354 End data with <CR><LF>.<CR><LF>")
                # smtp-source sends the message only after 354, so the end line is
                # searched from the start of what follows.
                self.in_data = True
                self.buffer = b"\r\n" + self.buffer
            elif verb == b"QUIT":
                self.transport.write(b"\r\n".join([*replies, b"221 Bye"]) + b"\r\n")
                self.transport.close()
                return
            else:
                replies.append(b"250 OK")
        if replies:
            self.transport.write(b"\r\n".join(replies) + b"\r\n")


def serve(engine: str, port: int) -> None:
    """Run one engine until stdin closes."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if engine == "bare":
            factory = BareSession
        else:
            try:
                from mail2alert.session import smtp_factory
            except ImportError:  # sources from before the session had a module of its own
                from mail2alert.server import smtp_factory  # type: ignore[attr-defined,no-redef]

            class Handler:
                hostname = "lean"

                def __dir__(self) -> list[str]:
                    # As mail2alert's Handler: aiosmtpd looks for hooks through dir().
                    return ["handle_DATA"]

                async def handle_DATA(self, *args: object) -> str:
                    return "250 OK"

            factory = smtp_factory(Handler())  # type: ignore[arg-type]

        server = await loop.create_server(factory, HOST, port, backlog=1024)
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()

    uvloop.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_of(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run(engine: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """Messages per second and the server's user and system CPU ms per message.

    ``lean@LABEL`` runs mail2alert's sources given as ``--src LABEL=PATH``."""
    port = free_port()
    env = dict(os.environ)
    kind, _, label = engine.partition("@")
    if label:
        env["PYTHONPATH"] = dict(s.split("=", 1) for s in args.src)[label]
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"{engine} did not start")
        user0, sys0 = cpu_of(server.pid)
        started = time.monotonic()
        cmd = ["smtp-source", "-s", str(args.sessions), "-m", str(args.messages), "-l", "1024"]
        subprocess.run(
            [*cmd, f"{HOST}:{port}"],
            check=True,
            timeout=args.timeout,
            stdout=subprocess.DEVNULL,
        )
        elapsed = time.monotonic() - started
        user1, sys1 = cpu_of(server.pid)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=10)
    n = args.messages
    return n / elapsed, (user1 - user0) * 1000 / n, (sys1 - sys0) * 1000 / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=5000)
    ap.add_argument("-s", "--sessions", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--engines", default="lean,bare", help="which to run (default: lean,bare)")
    ap.add_argument("--src", action="append", default=[], metavar="LABEL=PATH")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--serve", choices=("lean", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    results: dict[str, list[tuple[float, float, float]]] = {
        engine: [] for engine in args.engines.split(",")
    }
    for _ in range(args.repeat):
        for engine in results:
            results[engine].append(run(engine, args))
    print(f"messages={args.messages} sessions={args.sessions} repeat={args.repeat}")
    print("| engine | msg/s | user CPU ms/msg | system CPU ms/msg | CPU ms/msg |")
    print("|---|---:|---:|---:|---:|")
    for engine, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        user = statistics.median(r[1] for r in runs)
        system = statistics.median(r[2] for r in runs)
        print(f"| {engine} | {rate:.0f} | {user:.3f} | {system:.3f} | {user + system:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
