#!/usr/bin/env python3
"""Memory and CPU of mail2alert for big messages: peak and retained RSS, CPU seconds.

For each scenario a fresh ``mail2alert serve`` (one intake process unless ``--workers``)
listens on 127.0.0.1 on a free port and delivers to a capture server in this process. The
bench sends ``count`` messages of ``size`` bytes at once, one smtplib session each, waits for
every 250 and for every delivery, and reads from /proc:

* at 250: the serve process's ``VmHWM`` when the last 250 came (intake; delivery has begun);
* peak RSS: its ``VmHWM`` at the end (its own pages; the capture server is not in it);
* retained RSS: its ``VmRSS`` once everything is delivered (what the process keeps);
* CPU: utime+stime of the process until the last 250 (intake) and until the last delivery.

Scenarios: ``relay`` (a plain text mail no manager wants: relayed unchanged) and ``gocd`` (a
GoCD stage mail whose CHANGES list makes it big, routed by a gocd manager and rewritten).
Everything is on loopback, and every wait has a deadline.

Example::

    .venv/bin/python bench/memory.py --scenario relay:1 --scenario relay:16 --scenario gocd:1
    # against another tree, e.g. a snapshot of an older commit:
    mkdir -p /tmp/before && git archive HEAD~3 src | tar -x -C /tmp/before
    .venv/bin/python bench/memory.py --src /tmp/before/src
    # intake alone: remote-smtp is a closed port
    .venv/bin/python bench/memory.py --no-delivery
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.testing import CaptureServer, free_port

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")

CONFIG = """\
local-smtp: {host}:{port}
remote-smtp: {host}:{upstream}
data-dir: {data}
http: null
intake-workers: {workers}
managers:
  - name: gocd
    messages-we-want:
      to: mail2alert@example.com
    rules:
      - actions:
          - mailto:cat@example.com
        filter:
          events: [BREAKS]
          function: pipelines.any
"""


def relay_mail(size: int) -> bytes:
    """A plain text mail of about ``size`` bytes that no manager wants (relayed unchanged)."""
    head = (
        b"From: someone@example.net\r\nTo: else@example.net\r\nSubject: a big report\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?-+*/\r\n"
    return head + line * ((size - len(head)) // len(line))


def gocd_mail(size: int) -> bytes:
    """A GoCD "is broken" stage mail of about ``size`` bytes: a very long CHANGES list."""
    change = (
        "revision: 1f5557f8a1c3, modified by Jane Doe <jane@example.com> on 2024-03-15\n"
        "Fix flaky test in payment module\n"
    )
    head = "See details: https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1\n\n"
    head += "-- CHANGES --\n\nGit: https://git.example.com/app.git\n"
    tail = "\nSent by Go on behalf of ci-robot\n"
    body = head + change * ((size - 600) // (len(change) + 2)) + tail
    return gocd_stage_mail(body=body)


@dataclass
class Figures:
    scenario: str
    count: int
    size: int
    baseline_mb: float
    intake_peak_mb: float
    peak_mb: float
    retained_mb: float
    intake_s: float
    cpu_intake_s: float
    cpu_total_s: float


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and its threads."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_greeting(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mail2alert exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"mail2alert does not greet on {HOST}:{port} after {timeout}s")


def send_all(port: int, message: bytes, count: int, envelope: tuple[str, str]) -> list[int]:
    """Send ``message`` ``count`` times at once, one session each; the DATA reply codes."""
    codes: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(count)

    def one() -> None:
        code = 0
        try:
            with smtplib.SMTP(HOST, port, timeout=300) as client:
                start.wait(60)
                client.ehlo("bench.test")
                client.mail(envelope[0])
                client.rcpt(envelope[1])
                code = client.data(message)[0]
        except (OSError, smtplib.SMTPException, threading.BrokenBarrierError) as exc:
            print(f"  send failed: {exc!r}", file=sys.stderr)
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return codes


def run(scenario: str, count: int, size: int, args: argparse.Namespace) -> Figures:
    work = Path(tempfile.mkdtemp(prefix="m2a-memory-"))
    upstream = CaptureServer().start()
    port = free_port()
    config = work / "configuration.yml"
    config.write_text(
        CONFIG.format(
            host=HOST,
            port=port,
            upstream=free_port() if args.no_delivery else upstream.port,
            data=work / "data",
            workers=args.workers,
        ),
        encoding="utf-8",
    )
    env = dict(os.environ, PYTHONPATH=str(args.src))
    log = (work / "mail2alert.log").open("wb")
    cmd = [sys.executable, "-m", "mail2alert", "serve", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=work, env=env)
    try:
        wait_greeting(port, proc, 30)
        if scenario == "gocd":
            message = gocd_mail(size)
            envelope = ("go@example.com", "mail2alert@example.com")
        else:
            message = relay_mail(size)
            envelope = ("someone@example.net", "else@example.net")
        baseline = status_kb(proc.pid, "VmRSS")
        cpu0 = cpu_seconds(proc.pid)
        began = time.monotonic()
        codes = send_all(port, message, count, envelope)
        intake = time.monotonic() - began
        cpu_intake = cpu_seconds(proc.pid) - cpu0
        intake_peak = status_kb(proc.pid, "VmHWM")
        if codes.count(250) != count:
            raise RuntimeError(f"not every message was queued: {codes}; see {work}")
        if not args.no_delivery:
            upstream.wait_for(count, timeout=600)
        # Delivery is recorded right after the upstream's 250: wait for the process to settle.
        deadline = time.monotonic() + 30
        last = cpu_seconds(proc.pid)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = cpu_seconds(proc.pid)
            if now - last < 0.02:
                break
            last = now
        figures = Figures(
            scenario,
            count,
            len(message),
            baseline / 1024,
            intake_peak / 1024,
            status_kb(proc.pid, "VmHWM") / 1024,
            status_kb(proc.pid, "VmRSS") / 1024,
            intake,
            cpu_intake,
            cpu_seconds(proc.pid) - cpu0,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        upstream.stop()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        help="KIND:COUNT with KIND relay or gocd (default: relay:1 relay:16 gocd:1)",
    )
    parser.add_argument("--size", type=int, default=31_000_000, help="bytes per relay mail")
    parser.add_argument("--gocd-size", type=int, default=30_000_000, help="bytes per gocd mail")
    parser.add_argument("--workers", type=int, default=1, help="intake-workers of the service")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="mail2alert sources")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    parser.add_argument(
        "--no-delivery",
        action="store_true",
        help="remote-smtp is a closed port: intake only (delivery fails and retries later)",
    )
    args = parser.parse_args()
    print(
        f"{'scenario':10} {'n':>3} {'MB each':>8} {'base MB':>8} {'at 250 MB':>10} {'peak MB':>8} "
        f"{'kept MB':>8} {'intake s':>9} {'CPU intake s':>13} {'CPU total s':>12}"
    )
    for spec in args.scenario or ["relay:1", "relay:16", "gocd:1"]:
        kind, _, count = spec.partition(":")
        if kind not in ("relay", "gocd"):
            parser.error(f"unknown scenario {spec!r}")
        size = args.gocd_size if kind == "gocd" else args.size
        f = run(kind, int(count or 1), size, args)
        print(
            f"{f.scenario:10} {f.count:3} {f.size / 1e6:8.1f} {f.baseline_mb:8.1f} "
            f"{f.intake_peak_mb:10.1f} {f.peak_mb:8.1f} {f.retained_mb:8.1f} {f.intake_s:9.2f} "
            f"{f.cpu_intake_s:13.2f} {f.cpu_total_s:12.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
