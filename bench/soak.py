#!/usr/bin/env python3
"""Soak: ``mail2alert serve`` at a steady rate for a long while, with the smarthost and GoCD
failing on a schedule; one line a minute, and whether memory stayed flat.

Everything runs on 127.0.0.1, and everything is bounded: the run lasts ``--minutes`` plus at
most ``--drain`` seconds to deliver what is left. The script starts, in its own work dir:

* a smarthost: :class:`mail2alert.testing.CaptureServer` with STARTTLS required and a login
  (a certificate made by trustme for the run), which counts what arrives and keeps nothing;
* a GoCD: :class:`mail2alert.gocd.testing.FakeGoCD` with the pipeline group ``my-group``;
* ``mail2alert serve`` as a process of its own (intake workers as configured by default),
  STARTTLS offered on its listener, delivering with ``tls: starttls`` and a login;
* ``--sessions`` clients that send ``--rate`` messages a second between them over STARTTLS,
  each session sending ``--per-session`` messages before it starts anew. Half are GoCD stage
  mails routed by group (``Stage [my-pipeline/N/build/1] is broken`` -> cat@example.com),
  half are mails no manager wants, relayed unchanged. ``N`` is the message's number, so
  each message is known when it arrives, however it was rewritten. A client that gets no
  250 sends the message again a second later (as a real sender would), so a message the
  server took before it failed to answer arrives twice: those count as duplicates too.

Faults, one every ``--fault-every`` minutes from the second minute on, each for
``--fault-length`` seconds, in this order and round again: the smarthost down (its port
closed), stalled (it completes the TLS handshake, then answers nothing), flapping (down and
up every 5 s), with a certificate from a CA mail2alert does not trust; GoCD answering 503;
GoCD answering after 15 s (mail2alert gives up after 10 s).

Each minute one line: messages answered 250 so far, delivered (distinct messages arrived),
pending (answered, not yet arrived), dead (outbox items given up), duplicates (arrivals of a
message already arrived), the current RSS of the serve process tree (the sum of ``VmRSS``
over it, sampled each second), its peak so far, and the serve process's own (the rest is its
intake workers), in MB. At the end: the totals, and whether RSS stayed flat: its median over
the last five minutes against the second to sixth minute (and the second half's growth).

Example (the run recorded in bench/README.md)::

    nohup .venv/bin/python bench/soak.py --minutes 30 --rate 20 > /tmp/soak.out 2>&1 &
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from bench import children, status_kb, wait_port

from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.outbox import Outbox
from mail2alert.testing import CaptureServer, free_port

HOST = "127.0.0.1"
PASSWORD = "soak-smtp-password"
#: The number of each message, in its subject, as it arrives upstream (routed or relayed).
NUMBER = re.compile(rb"\r\nSubject: (?:Stage \[my-pipeline/(\d+)/build/1\]|report soak-(\d+))")

CONFIG = """\
local-smtp:
  address: {host}:{port}
  tls: {{mode: starttls, cert: {cert}, key: {key}}}
remote-smtp:
  address: {host}:{upstream}
  tls: starttls
  ca-file: {ca}
  user: alerts
  passwd: $SOAK_SMTP_PASSWD
data-dir: {data}
http: {host}:0
delivery:
  retry-initial: 5s
  retry-max: 30s
  give-up-after: 1h
  timeout: 10s
managers:
  - name: gocd
    url: {gocd}
    poll-interval: 5s
    messages-we-want:
      to: mail2alert@example.com
    rules:
      - actions: [mailto:cat@example.com]
        filter:
          function: pipelines.in_group
          args: [my-group]
          events: [BREAKS]
"""


# -- the message stream ---------------------------------------------------------------------


def message(number: int) -> tuple[str, bytes]:
    """Message ``number`` (even: a GoCD stage mail, odd: relayed); (recipient, bytes)."""
    if number % 2 == 0:
        subject = f"Stage [my-pipeline/{number}/build/1] is broken"
        return "mail2alert@example.com", gocd_stage_mail(subject)
    text = (
        "From: Someone <someone@example.net>\r\nTo: admin@example.com\r\n"
        f"Message-ID: <soak-{number}@soak.example.com>\r\nSubject: report soak-{number}\r\n"
        "\r\nA steady report.\r\n"
    )
    return "admin@example.com", text.encode("ascii")


@dataclass
class Stream:
    """Hands out message numbers at ``rate`` a second and counts the 250s."""

    rate: float
    until: float
    started: float = field(default_factory=time.monotonic)
    next_number: int = 0
    accepted: set[int] = field(default_factory=set)
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> int | None:
        """The next number, once it is due; None when the run is over."""
        with self.lock:
            number = self.next_number
            self.next_number += 1
        due = self.started + number / self.rate
        if due >= self.until:
            return None
        time.sleep(max(0.0, due - time.monotonic()))
        return number


def client(port: int, stream: Stream, context: ssl.SSLContext, per_session: int) -> None:
    """Send what ``stream`` hands out, ``per_session`` messages a session, over STARTTLS;
    a message that gets no 250 is sent again a second later, until the run is over."""
    number = stream.take()
    while number is not None:
        try:
            with smtplib.SMTP(HOST, port, local_hostname="soak.test", timeout=30) as smtp:
                smtp.starttls(context=context)
                for _ in range(per_session):
                    rcpt, data = message(number)
                    smtp.sendmail("go@example.com", [rcpt], data)
                    with stream.lock:
                        stream.accepted.add(number)
                    number = stream.take()
                    if number is None:
                        return
        except (smtplib.SMTPException, OSError):
            with stream.lock:
                stream.retries += 1
            time.sleep(1)
            if time.monotonic() >= stream.until:
                return


# -- what arrives, what the serve process holds -------------------------------------------


class Tally:
    """Counts each message's arrivals at the smarthost and keeps no message."""

    def __init__(self, upstream: CaptureServer) -> None:
        self.upstream = upstream
        self.arrivals: Counter[int] = Counter()
        self.unknown = 0

    def collect(self) -> None:
        with self.upstream.changed:
            arrived, self.upstream.messages[:] = list(self.upstream.messages), []
        for captured in arrived:
            found = NUMBER.search(captured.data)
            if found is None:
                self.unknown += 1
            else:
                self.arrivals[int(found.group(1) or found.group(2))] += 1

    @property
    def delivered(self) -> int:
        return len(self.arrivals)

    def missing(self, accepted: set[int]) -> int:
        """How many of the messages answered 250 have not arrived."""
        return len(accepted - self.arrivals.keys())

    @property
    def duplicates(self) -> int:
        return sum(self.arrivals.values()) - len(self.arrivals)


class Memory:
    """Samples the RSS of a process tree each second, in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.current_kb = 0
        self.main_kb = 0
        """The serve process alone; the rest of the tree is its intake workers."""
        self.peak_kb = 0
        self.by_minute: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self) -> Memory:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.main_kb = status_kb(self.pid, "VmRSS")
            self.current_kb = sum(status_kb(p, "VmRSS") for p in children(self.pid))
            self.peak_kb = max(self.peak_kb, self.current_kb)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def dead_items(data_dir: Path) -> int:
    """Items the outbox gave up on (``queue list``'s dead ones)."""
    outbox = Outbox(data_dir)
    try:
        return sum(entry.state == "dead" for entry in outbox.entries())
    finally:
        outbox.close()


# -- faults ---------------------------------------------------------------------------------


@dataclass
class Faults:
    """The faults the run injects, each a start and an end, in the order they come."""

    upstream: CaptureServer
    gocd: FakeGoCD
    good_tls: ssl.SSLContext
    other_tls: ssl.SSLContext
    steady: threading.Event = field(default_factory=threading.Event)
    flapper: threading.Thread | None = None

    def schedule(self) -> list[tuple[str, Callable[[], None], Callable[[], None]]]:
        return [
            ("smtp down", self.upstream.stop, self.upstream.start),
            ("smtp stall", self.upstream.stall, self.upstream.resume),
            ("smtp flap", self._flap, self._steady),
            ("smtp cert", self._other_certificate, self._own_certificate),
            ("gocd 503", self._gocd_503, self._gocd_ok),
            ("gocd slow", self._gocd_slow, self._gocd_ok),
        ]

    def _flap(self) -> None:
        self.steady.clear()
        self.flapper = threading.Thread(target=self._flapping, name="flapper", daemon=True)
        self.flapper.start()

    def _flapping(self) -> None:
        up = True
        while not self.steady.wait(5.0):
            if up:
                self.upstream.stop()
            else:
                self.upstream.start()
            up = not up
        if not up:
            self.upstream.start()

    def _steady(self) -> None:
        self.steady.set()
        if self.flapper is not None:
            self.flapper.join(30)

    def _other_certificate(self) -> None:
        self.upstream.replace_certificate(self.other_tls)

    def _own_certificate(self) -> None:
        self.upstream.replace_certificate(self.good_tls)

    def _gocd_503(self) -> None:
        self.gocd.failing = 503

    def _gocd_slow(self) -> None:
        self.gocd.delay = 15.0

    def _gocd_ok(self) -> None:
        self.gocd.failing, self.gocd.delay = None, 0.0


@dataclass
class Timetable:
    """When each fault starts and ends: the first after a quiet minute, then one every
    ``every`` seconds, each lasting ``length`` seconds, the schedule's faults in turn."""

    faults: list[tuple[str, Callable[[], None], Callable[[], None]]]
    every: float
    length: float
    count: int = 0
    active: tuple[str, float, Callable[[], None]] | None = None

    def tick(self, elapsed: float) -> None:
        """Start or end a fault as the time ``elapsed`` since the start says."""
        if self.active is not None and elapsed >= self.active[1]:
            self.end()
        start = 60 + self.count * self.every
        if self.active is None and elapsed >= start:
            name, begin, end = self.faults[self.count % len(self.faults)]
            begin()
            self.active = (name, start + self.length, end)
            self.count += 1

    def end(self) -> None:
        """End the fault under way, if any."""
        if self.active is not None:
            self.active[2]()
            self.active = None

    @property
    def now(self) -> str:
        return self.active[0] if self.active is not None else "-"


# -- the run --------------------------------------------------------------------------------


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST, "localhost").configure_cert(context)
    return context


@contextlib.contextmanager
def serving(config: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``mail2alert serve`` in its own process group; SIGTERM (then SIGKILL) at the end."""
    env = {**os.environ, "SOAK_SMTP_PASSWD": PASSWORD}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mail2alert", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
    try:
        wait_port(port, 30, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def run(args: argparse.Namespace, work: Path) -> int:
    ca, stranger = trustme.CA(), trustme.CA()
    good_tls = server_context(ca)
    upstream = CaptureServer(
        HOST, tls=good_tls, require_starttls=True, users={"alerts": PASSWORD}
    ).start()
    gocd = FakeGoCD({"my-group": ["my-pipeline"]}).start()
    faults = Faults(upstream, gocd, good_tls, server_context(stranger))
    cert = ca.issue_cert(HOST, "localhost")
    cert.cert_chain_pems[0].write_to_path(str(work / "tls.crt"))
    cert.private_key_pem.write_to_path(str(work / "tls.key"))
    ca.cert_pem.write_to_path(str(work / "ca.pem"))
    port = free_port()
    config = work / "configuration.yml"
    config.write_text(
        CONFIG.format(
            host=HOST,
            port=port,
            cert=work / "tls.crt",
            key=work / "tls.key",
            upstream=upstream.port,
            ca=work / "ca.pem",
            data=work / "data",
            gocd=gocd.url,
        ),
        encoding="utf-8",
    )
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    tally = Tally(upstream)
    print(
        f"soak: {args.minutes} min at {args.rate}/s over {args.sessions} sessions; a fault every"
        f" {args.fault_every} min for {args.fault_length:g}s; work dir {work}",
        flush=True,
    )
    print(
        f"{'min':>4} {'fault':<11} {'accepted':>8} {'delivered':>9} {'pending':>7} {'dead':>4}"
        f" {'dup':>4} {'rss MB':>7} {'peak MB':>7} {'main MB':>7}",
        flush=True,
    )
    try:
        with serving(config, port, work / "serve.log") as proc:
            memory = Memory(proc.pid).start()
            started = time.monotonic()
            stream = Stream(args.rate, started + args.minutes * 60, started)
            senders = [
                threading.Thread(
                    target=client,
                    args=(port, stream, client_tls, args.per_session),
                    name=f"client-{i}",
                    daemon=True,
                )
                for i in range(args.sessions)
            ]
            for sender in senders:
                sender.start()
            timetable = Timetable(faults.schedule(), args.fault_every * 60, args.fault_length)
            try:
                for minute in range(1, args.minutes + 1):
                    while time.monotonic() < started + minute * 60:
                        timetable.tick(time.monotonic() - started)
                        tally.collect()
                        time.sleep(0.5)
                    if proc.poll() is not None:
                        print(f"mail2alert serve exited with {proc.returncode}", flush=True)
                        return 1
                    memory.by_minute.append(memory.current_kb)
                    with stream.lock:
                        accepted = set(stream.accepted)
                    print(
                        f"{minute:>4} {timetable.now:<11} {len(accepted):>8}"
                        f" {tally.delivered:>9} {tally.missing(accepted):>7}"
                        f" {dead_items(work / 'data'):>4} {tally.duplicates:>4}"
                        f" {mb(memory.current_kb):>7} {mb(memory.peak_kb):>7}"
                        f" {mb(memory.main_kb):>7}",
                        flush=True,
                    )
            finally:
                timetable.end()
            for sender in senders:
                sender.join(40)
            drain_ends = time.monotonic() + args.drain
            while tally.missing(stream.accepted) and time.monotonic() < drain_ends:
                tally.collect()
                time.sleep(0.5)
            tally.collect()
            memory.stop()
            dead = dead_items(work / "data")
    finally:
        upstream.stop()
        gocd.stop()
    missing = tally.missing(stream.accepted)
    print(
        f"end: {len(stream.accepted)} accepted, {tally.delivered} delivered, {missing} missing,"
        f" {dead} dead, {tally.duplicates} duplicates, {stream.retries} client retries,"
        f" {tally.unknown} unknown arrivals; peak RSS {mb(memory.peak_kb)} MB",
        flush=True,
    )
    minutes = memory.by_minute
    if len(minutes) >= 10:
        early, late = statistics.median(minutes[1:6]), statistics.median(minutes[-5:])
        flat = late - early <= args.flat_mb * 1024
        half = len(minutes) // 2
        print(
            f"RSS {'flat' if flat else 'GREW'}: median {mb(int(early))} MB in minutes 2-6,"
            f" {mb(int(late))} MB in the last five ({(late - early) / 1024:+.1f} MB; flat means"
            f" within {args.flat_mb:g} MB); second half: {mb(minutes[half - 1])} MB at minute"
            f" {half}, {mb(minutes[-1])} MB at the end",
            flush=True,
        )
    else:
        flat = True
        print("RSS: too short a run to say whether it stays flat (10 minutes at least)")
    return 0 if missing == 0 and dead == 0 and flat else 1


def main() -> int:
    # The fake smarthost's own complaints (handshakes that mail2alert breaks off on a
    # strange certificate, aiosmtpd's deprecation notes) are the faults working, not news.
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=30, help="how long to send (default 30)")
    parser.add_argument("--rate", type=float, default=20.0, help="messages a second (default 20)")
    parser.add_argument("--sessions", type=int, default=4, help="client sessions (default 4)")
    parser.add_argument(
        "--per-session", type=int, default=100, help="messages before a new session (100)"
    )
    parser.add_argument(
        "--fault-every", type=float, default=3.0, help="minutes between faults (default 3)"
    )
    parser.add_argument(
        "--fault-length", type=float, default=60.0, help="seconds each fault lasts (default 60)"
    )
    parser.add_argument(
        "--drain", type=float, default=180.0, help="seconds to deliver the rest (default 180)"
    )
    parser.add_argument(
        "--flat-mb", type=float, default=10.0, help="RSS growth still called flat (10 MB)"
    )
    parser.add_argument("--workdir", type=Path, help="keep the run's files here (default: temp)")
    args = parser.parse_args()
    if args.minutes < 1 or args.rate <= 0 or args.sessions < 1:
        parser.error("--minutes, --rate and --sessions must be positive")
    if args.fault_length >= args.fault_every * 60:
        parser.error("--fault-length must be shorter than --fault-every")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir)
    work = Path(tempfile.mkdtemp(prefix="m2a-soak-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
