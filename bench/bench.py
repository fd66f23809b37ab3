#!/usr/bin/env python3
"""Throughput / latency / memory benchmark: mail2alert versus a durable Postfix relay.

Everything runs on 127.0.0.1 and is bounded in message count and time. For every session
count (default 1, 10, 50) and every system under test:

* ``smtp-source`` (Postfix's C load generator) sends N messages over C concurrent sessions
  (a new connection per message, as smtp-source does by default; ``--reuse`` keeps them open);
* the system relays them to ``smtp-sink`` (Postfix's C sink), whose running counter (``-c``)
  tells when all N have arrived;
* intake rate  = N / (time until smtp-source got 250 for every message),
  end-to-end   = N / (time until the sink has all N);
* accept latency: afterwards a Python probe sends ``--probe`` messages over one persistent
  session while ``smtp-source`` keeps C-1 other sessions busy (none for C=1) and records, per
  message, DATA end ("." sent) -> 250, and the whole transaction (MAIL FROM -> 250 after DATA);
* peak RSS (mail2alert only): the sum of VmHWM over the serve process and its children, read
  from /proc just before it is stopped. With intake-workers the forked children share pages
  with the parent, so this sum over-counts;
* peak PSS (both): the peak of the summed proportional set size (smaps_rollup) of the process
  tree, sampled every 100 ms; shared pages are counted once. This is the fair figure for
  Postfix (~60 processes sharing most pages) and for mail2alert with intake-workers;
* CPU: CPU seconds used by the system's process tree per message, and machine-wide CPU use;
* what each message costs the disk, per 1,000 messages of the throughput phase (until the sink
  has all N): the bytes the process tree wrote (``write_bytes`` of /proc/<pid>/io, summed over
  the tree; a reaped child's counts go to its parent, so short-lived Postfix processes are
  counted too), and the block device's sectors written and flush requests (/sys/block/<dev>/
  stat: the whole device, so other work on the machine and the file system's journal count
  too). With ``--syncs M`` a further M messages are sent with ``strace -f -c`` attached to the
  tree, which counts its fsync and fdatasync calls (strace slows it, so no rate is taken then);
* peak WAL size (mail2alert): the largest outbox.sqlite3-wal seen, sampled every 100 ms.

Systems:
  m2a-routed   mail2alert, a ``mail`` manager whose mail.in_subject rule matches the subject
               (each message is rewritten to the rule's mailto: recipient)
  m2a-relay    mail2alert, no manager wants the message: relayed unchanged
  m2a-intake   mail2alert (routed config) whose remote-smtp accepts TCP but never greets:
               delivery is effectively disabled, items stay queued; intake rate only
  m2a-...-wN   any of the above with ``intake-workers: N`` (N intake processes sharing the
               listener, delivery in the parent), e.g. m2a-routed-w2
  postfix      a loopback-only Postfix instance (own config and queue in the work dir)
               with relayhost = [127.0.0.1]:SINK

Needs the Postfix tools (smtp-source, smtp-sink; Debian package ``postfix``), and root for the
Postfix instance. The script never installs anything; it says what is missing.

A system name may end in ``@LABEL`` to run the sources given as ``--src LABEL=PATH``, so two
versions of mail2alert are compared in one run, e.g.
  --src before=/tmp/m2a-before/src --src now=src --systems m2a-routed@before,m2a-routed@now

Example:
  .venv/bin/python bench/bench.py --messages 5000 --sessions 1,10,50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
FROM = "bench@example.com"
TO = "someone@example.com"
SUBJECT = "bench alert"
ALERT_TO = "alerts@example.com"
INSTALL_HINT = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postfix"
    "   (Debian/Ubuntu; provides smtp-source, smtp-sink and postfix)"
)

# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until something answers an SMTP greeting on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing greets on {HOST}:{port} after {timeout}s")


def children(pid: int) -> list[int]:
    """``pid`` and all its descendants (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_kb(pid: int, key: str) -> int:
    return sum(status_kb(p, key) for p in children(pid))


def tree_pss_kb(pid: int) -> int:
    """Summed proportional set size of a process tree (shared pages counted once overall)."""
    total = 0
    for p in children(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def proc_cpu(pid: int) -> float:
    """utime + stime (all threads) of one process and of its children that it has reaped
    (cutime + cstime), in seconds: summed over a tree, a child that ends between two readings
    still counts, in its parent (Postfix's smtpd and cleanup processes come and go)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per (process, thread name) over a process tree, e.g. 'main/outbox-writer'."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for i, p in enumerate(children(pid)):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            fields = raw.rsplit(")", 1)[1].split()
            # Python does not name OS threads: the main thread is tid == pid, others by tid.
            key = f"{'parent' if i == 0 else f'child{i}'}/{'main' if t == str(p) else 'tid' + t}"
            out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def tree_write_bytes(pid: int) -> int:
    """Bytes the process tree caused to be written to storage (``write_bytes`` in
    /proc/<pid>/io, which a reaped child's counts are added to), less what was dirtied and
    then thrown away before it reached the disk (``cancelled_write_bytes``: a file deleted
    before writeback)."""
    total = 0
    for p in children(pid):
        try:
            with open(f"/proc/{p}/io") as f:
                fields = dict(line.split(": ", 1) for line in f.read().splitlines())
        except (OSError, ValueError):
            continue
        total += int(fields.get("write_bytes", 0)) - int(fields.get("cancelled_write_bytes", 0))
    return total


class Device:
    """The block device that holds ``path``: its sectors written and flush requests
    (/sys/block/<dev>/stat). Device-wide: other processes and the file system's journal
    count too."""

    def __init__(self, path: Path) -> None:
        dev = os.stat(path).st_dev
        self.stat: Path | None = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
        if not self.stat.exists():
            self.stat = None
        elif (self.stat.parent / "partition").exists():  # a partition: the disk has the flushes
            self.stat = self.stat.parent.parent / "stat"
        self.name = self.stat.parent.resolve().name if self.stat else "?"

    def counters(self) -> tuple[int, int] | None:
        """(bytes written, flush requests) so far, or None when the kernel does not say."""
        if self.stat is None:
            return None
        try:
            f = [int(v) for v in self.stat.read_text().split()]
        except (OSError, ValueError):
            return None
        # Fields: 7 = sectors written (512 bytes each); 15 = flush requests completed
        # (kernels since 5.5).
        return f[6] * 512, f[14] if len(f) >= 15 else -1


def count_syncs(summary: str) -> int:
    """fsync + fdatasync calls in an ``strace -c`` summary."""
    calls = 0
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync") and parts[3].isdigit():
            calls += int(parts[3])
    return calls


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return float(sum(vals) - idle), float(sum(vals))


class RssSampler:
    """Samples the summed PSS of a process tree every 100 ms; keeps the peak."""

    def __init__(self, pid_fn, wal: Path | None = None) -> None:
        self.pid_fn = pid_fn
        self.wal = wal
        self.peak_kb = 0
        self.wal_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            pid = self.pid_fn()
            if pid:
                self.peak_kb = max(self.peak_kb, tree_pss_kb(pid))
            if self.wal is not None:
                with contextlib.suppress(OSError):
                    self.wal_peak = max(self.wal_peak, self.wal.stat().st_size)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


# ----------------------------------------------------------------------------- sink


class Sink:
    """``smtp-sink -c``: its running counter (``mesg=N``) says how many messages arrived."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        cmd = ["smtp-sink", "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += ["-m", "1024", f"{HOST}:{self.port}", "1024"]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=open(workdir / "smtp-sink.err", "wb")
        )
        self.count = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port, 10, self.proc)

    def _read(self) -> None:
        buf = b""
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            buf += chunk
            *records, buf = re.split(rb"[\r\n]", buf)
            for rec in reversed(records):
                m = re.search(rb"mesg=(\d+)", rec)
                if m:
                    with self._cond:
                        self.count = int(m.group(1))
                        self._cond.notify_all()
                    break

    def wait_for(self, target: int, timeout: float) -> float | None:
        """Monotonic time when the counter reached ``target``, None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
        return time.monotonic()

    def wait_quiet(self, quiet: float, timeout: float) -> None:
        """Wait until no message arrived for ``quiet`` seconds (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        last, since = self.count, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.count != last:
                last, since = self.count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()


class Blackhole:
    """Accepts TCP connections (kernel backlog) but never greets: delivery hangs, items stay."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])

    def stop(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------- systems


class Mail2Alert:
    def __init__(
        self,
        workdir: Path,
        name: str,
        remote_port: int,
        routed: bool,
        args,
        intake_workers: int = 1,
        src: str = "",
    ) -> None:
        self.name = name
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.dir / "data"
        self.wal = data / "outbox.sqlite3-wal"
        shutil.rmtree(data, ignore_errors=True)
        if routed:
            managers = f"""managers:
  - name: mail
    messages-we-want:
      from: {FROM}
    rules:
      - actions:
          - mailto:{ALERT_TO}
        filter:
          function: mail.in_subject
          args:
            - bench
            - alert
"""
        else:
            managers = """managers:
  - name: mail
    messages-we-want:
      from: nobody-sends-this@example.com
    rules:
      - actions:
          - mailto:never@example.com
        filter:
          function: mail.in_subject
          args:
            - never
"""
        self.config = self.dir / "configuration.yml"
        workers = f"intake-workers: {intake_workers}\n"
        self.config.write_text(
            f"local-smtp: {HOST}:{self.port}\nremote-smtp: {HOST}:{remote_port}\n"
            f"data-dir: {data}\nhttp: null\n{workers}{managers}"
        )
        cmd = [args.python, "-m", "mail2alert", "--log-level", args.log_level]
        cmd += ["serve", "--config", str(self.config)]
        prefix = args.m2a_prefix.split() if args.m2a_prefix else []
        self.prefixed = bool(prefix)
        self.log = open(self.dir / "mail2alert.log", "wb")
        env = dict(os.environ, PYTHONPATH=src, **args.slow_env)
        self.proc = subprocess.Popen(
            prefix + cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir, env=env
        )
        wait_port(self.port, 30, self.proc)
        self.pid = self._server_pid()

    def _server_pid(self) -> int:
        # With a --m2a-prefix wrapper (py-spy record ...), the server is a child of the wrapper.
        if not self.prefixed:
            return self.proc.pid
        for pid in children(self.proc.pid)[1:]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mail2alert" in cmdline and b"serve" in cmdline:
                return pid
        return self.proc.pid

    def cpu(self) -> float:
        return sum(proc_cpu(p) for p in children(self.pid))

    def peak_rss_kb(self) -> int:
        return tree_kb(self.pid, "VmHWM")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


POSTFIX_MASTER_CF = """\
{port} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A throw-away Postfix instance: config, queue and log under the work dir."""

    name = "postfix"

    def __init__(self, workdir: Path, sink_port: int, env: dict[str, str]) -> None:
        self.port = free_port()
        self.dir = workdir / "postfix"
        shutil.rmtree(self.dir, ignore_errors=True)
        conf, queue, data = self.dir / "conf", self.dir / "queue", self.dir / "data"
        for d in (conf, queue, data):
            d.mkdir(parents=True)
        for d in (workdir, self.dir):
            d.chmod(0o755)
        pw = pwd.getpwnam("postfix")
        os.chown(queue, 0, 0)
        os.chown(data, pw.pw_uid, pw.pw_gid)
        self.conf = conf
        (conf / "main.cf").write_text(
            f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.dir}/postfix.log
maillog_file_prefixes = {self.dir}
myhostname = bench-postfix.localdomain
mydomain = localdomain
myorigin = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:no local delivery in the benchmark
alias_maps =
alias_database =
relayhost = [{HOST}]:{sink_port}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtputf8_enable = no
biff = no
append_dot_mydomain = no
"""
            # The daemons get only the environment main.cf names (--fsync-delay-us).
            + (
                "import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C "
                + " ".join(f"{k}={v}" for k, v in env.items())
                + "\n"
                if env
                else ""
            )
        )
        (conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=f"{HOST}:{self.port}"))
        self._postfix("start")
        wait_port(self.port, 30)

    def _postfix(self, what: str) -> None:
        r = subprocess.run(
            ["postfix", "-c", str(self.conf), what], capture_output=True, text=True, timeout=60
        )
        if r.returncode != 0 and what == "start":
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}")

    @property
    def pid(self) -> int:
        try:
            return int((self.dir / "queue/pid/master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def cpu(self) -> float:
        # Finished children are accounted to master only when reaped; approximate with live ones.
        return sum(proc_cpu(p) for p in children(self.pid)) if self.pid else 0.0

    def stop(self) -> None:
        self._postfix("stop")
        time.sleep(0.5)
        if self.pid and Path(f"/proc/{self.pid}").exists():
            self._postfix("abort")


# ----------------------------------------------------------------------------- load


def smtp_source(
    port: int, sessions: int, count: int, args, quiet: bool = False
) -> subprocess.Popen:
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(args.size)]
    cmd += ["-f", FROM, "-t", TO, "-S", SUBJECT, "-M", "bench-client.localdomain"]
    if args.reuse:
        cmd.append("-d")
    cmd.append(f"{HOST}:{port}")
    err = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)


def probe(port: int, count: int, size: int, deadline: float) -> tuple[list[float], list[float]]:
    """One persistent session: per message (accept latency, transaction time), in seconds."""
    body = b"".join(b"La la la la la la la la la la la la %06d\r\n" % i for i in range(size // 40))
    msg = (
        f"From: <{FROM}>\r\nTo: <{TO}>\r\nSubject: {SUBJECT}\r\n"
        f"Message-ID: <probe-%d@bench>\r\n\r\n"
    ).encode()
    accept: list[float] = []
    txn: list[float] = []
    s = socket.create_connection((HOST, port), timeout=30)
    f = s.makefile("rb")

    def reply() -> bytes:
        while True:
            line = f.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return line

    try:
        reply()
        s.sendall(b"EHLO probe.localdomain\r\n")
        reply()
        for i in range(count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            s.sendall(f"MAIL FROM:<{FROM}>\r\n".encode())
            r1 = reply()
            s.sendall(f"RCPT TO:<{TO}>\r\n".encode())
            r2 = reply()
            s.sendall(b"DATA\r\n")
            r3 = reply()
            if not (r1.startswith(b"250") and r2.startswith(b"250") and r3.startswith(b"354")):
                raise RuntimeError(f"probe refused: {r1!r} {r2!r} {r3!r}")
            s.sendall(msg.replace(b"%d", str(i).encode()) + body + b".\r\n")
            t1 = time.perf_counter()
            r4 = reply()
            t2 = time.perf_counter()
            if not r4.startswith(b"250"):
                raise RuntimeError(f"probe DATA refused: {r4!r}")
            accept.append(t2 - t1)
            txn.append(t2 - t0)
        s.sendall(b"QUIT\r\n")
    finally:
        s.close()
    return accept, txn


# ----------------------------------------------------------------------------- one run


@dataclass
class Result:
    system: str
    sessions: int
    messages: int
    intake_s: float | None = None
    e2e_s: float | None = None
    cpu_per_msg_ms: float | None = None
    machine_cpu: float | None = None
    lat_accept: list[float] = field(default_factory=list)
    lat_txn: list[float] = field(default_factory=list)
    rss_kb: int = 0
    pss_kb: int = 0
    threads: dict[str, float] = field(default_factory=dict)
    written_mb_per_k: float | None = None
    """MB the process tree wrote per 1,000 messages (/proc/<pid>/io)."""
    dev_written_mb_per_k: float | None = None
    """MB the block device wrote per 1,000 messages (device-wide)."""
    dev_flushes_per_k: float | None = None
    """Flush requests the block device completed per 1,000 messages (device-wide)."""
    syncs_per_k: float | None = None
    """fsync + fdatasync calls per 1,000 messages, counted by strace (--syncs)."""
    wal_peak_mb: float | None = None
    error: str = ""

    @property
    def intake_rate(self) -> float | None:
        return self.messages / self.intake_s if self.intake_s else None

    @property
    def e2e_rate(self) -> float | None:
        return self.messages / self.e2e_s if self.e2e_s else None


def strace_syncs(target, sink: Sink | None, sessions: int, count: int, args) -> float:
    """Send ``count`` more messages with strace counting the tree's fsync/fdatasync calls;
    calls per 1,000 messages."""
    out = Path(tempfile.mkstemp(prefix="strace-", suffix=".txt")[1])
    cmd = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(out)]
    for pid in children(target.pid):
        cmd += ["-p", str(pid)]
    tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let strace attach to every thread
        before = sink.count if sink is not None else 0
        src = smtp_source(target.port, sessions, count, args)
        try:
            src.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            src.kill()
            raise RuntimeError("smtp-source (strace run) did not finish in time") from None
        if sink is not None:
            sink.wait_for(before + count, args.timeout)
        time.sleep(0.5)  # the last delivery results are recorded after the sink has them
    finally:
        tracer.send_signal(signal.SIGINT)  # detach and write the summary
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    try:
        return count_syncs(out.read_text()) * 1000 / count
    finally:
        out.unlink()


def run_one(system: str, sessions: int, args, workdir: Path) -> Result:
    res = Result(system, sessions, args.messages)
    sink: Sink | None = None
    hole: Blackhole | None = None
    target = None
    sampler = None
    device = Device(workdir)
    try:
        name, _, label = system.partition("@")
        if name.startswith("m2a") and label not in args.srcs:
            raise ValueError(f"no --src {label}=PATH for {system!r}")
        src = args.srcs.get(label, "")
        kind, _, w = name.partition("-w")
        workers = int(w) if w else 1
        if kind == "m2a-intake":
            hole = Blackhole()
            target = Mail2Alert(workdir, system, hole.port, True, args, workers, src)
            sampler = RssSampler(lambda: target.pid, target.wal)
        elif kind in ("m2a-routed", "m2a-relay"):
            sink = Sink(workdir)
            routed = kind == "m2a-routed"
            target = Mail2Alert(workdir, system, sink.port, routed, args, workers, src)
            sampler = RssSampler(lambda: target.pid, target.wal)
        elif kind == "postfix":
            sink = Sink(workdir)
            target = Postfix(workdir, sink.port, args.slow_env)
            sampler = RssSampler(lambda: target.pid)
        else:
            raise ValueError(f"unknown system {system!r}")
        deadline = time.monotonic() + args.timeout

        # Phase A: throughput.
        cpu0, mc0 = target.cpu(), machine_cpu()
        th0 = thread_cpu(target.pid) if isinstance(target, Mail2Alert) else {}
        wb0, dev0 = tree_write_bytes(target.pid), device.counters()
        t0 = time.monotonic()
        src = smtp_source(target.port, sessions, args.messages, args)
        try:
            _, err = src.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            src.kill()
            raise RuntimeError("smtp-source did not finish in time") from None
        t_intake = time.monotonic()
        if src.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {err.decode(errors='replace')[-500:]}")
        res.intake_s = t_intake - t0
        if sink is not None:
            done = sink.wait_for(args.messages, max(1.0, deadline - time.monotonic()))
            if done is None:
                res.error = f"only {sink.count}/{args.messages} delivered in time"
            else:
                res.e2e_s = done - t0
        cpu1, mc1 = target.cpu(), machine_cpu()
        wb1, dev1 = tree_write_bytes(target.pid), device.counters()
        per_k = 1000 / args.messages
        res.written_mb_per_k = (wb1 - wb0) / 1e6 * per_k
        if dev0 is not None and dev1 is not None:
            res.dev_written_mb_per_k = (dev1[0] - dev0[0]) / 1e6 * per_k
            if dev0[1] >= 0:
                res.dev_flushes_per_k = (dev1[1] - dev0[1]) * per_k
        res.cpu_per_msg_ms = (cpu1 - cpu0) * 1000 / args.messages
        if isinstance(target, Mail2Alert):
            th1 = thread_cpu(target.pid)
            res.threads = {
                k: (v - th0.get(k, 0.0)) * 1000 / args.messages
                for k, v in sorted(th1.items())
                if v - th0.get(k, 0.0) > 0
            }
        res.machine_cpu = (mc1[0] - mc0[0]) / max(1.0, mc1[1] - mc0[1])

        # Phase B: accept latency on one extra session while C-1 sessions keep it busy.
        bg = None
        if sessions > 1:
            bg = smtp_source(target.port, sessions - 1, 10_000_000, args, quiet=True)
            time.sleep(0.3)
        try:
            res.lat_accept, res.lat_txn = probe(
                target.port, args.probe, args.size, time.monotonic() + args.probe_seconds
            )
        finally:
            if bg is not None:
                bg.terminate()
                bg.wait()
        if sink is not None:
            sink.wait_quiet(1.0, 60)

        # Phase C (--syncs M): M more messages, strace counting fsync and fdatasync.
        if args.syncs:
            res.syncs_per_k = strace_syncs(target, sink, sessions, args.syncs, args)

        if isinstance(target, Mail2Alert):
            res.rss_kb = target.peak_rss_kb()
        if sampler is not None:
            res.pss_kb = sampler.stop()
            if isinstance(target, Mail2Alert):
                res.wal_peak_mb = sampler.wal_peak / 1e6
            sampler = None
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        if sampler is not None:
            sampler.stop()
        if target is not None:
            target.stop()
        if sink is not None:
            sink.stop()
        if hole is not None:
            hole.stop()
    return res


# ----------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def medians(results: list[Result]) -> list[Result]:
    """One result per (system, sessions): median rates and costs; latencies pooled."""
    groups: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        if not r.error:
            groups.setdefault((r.system, r.sessions), []).append(r)
    out = []
    for (system, sessions), rs in groups.items():
        m = Result(system, sessions, rs[0].messages)
        intakes = [r.intake_s for r in rs if r.intake_s]
        e2es = [r.e2e_s for r in rs if r.e2e_s]
        m.intake_s = statistics.median(intakes) if intakes else None
        m.e2e_s = statistics.median(e2es) if e2es else None
        m.lat_accept = [x for r in rs for x in r.lat_accept]
        m.cpu_per_msg_ms = _median([r.cpu_per_msg_ms for r in rs])
        m.written_mb_per_k = _median([r.written_mb_per_k for r in rs])
        m.dev_written_mb_per_k = _median([r.dev_written_mb_per_k for r in rs])
        m.dev_flushes_per_k = _median([r.dev_flushes_per_k for r in rs])
        m.syncs_per_k = _median([r.syncs_per_k for r in rs])
        m.wal_peak_mb = _median([r.wal_peak_mb for r in rs])
        m.pss_kb = int(_median([float(r.pss_kb) for r in rs if r.pss_kb]) or 0)
        out.append(m)
    return out


def report(results: list[Result], args) -> str:
    lines = [
        f"messages={args.messages} size={args.size}B reuse={args.reuse} "
        f"log-level={args.log_level} probe={args.probe} cores={os.cpu_count()}"
        f" fsync-delay-us={args.fsync_delay_us}",
        "",
        "| system | sessions | intake msg/s | end-to-end msg/s | accept p50 ms"
        " | accept p99 ms | txn p50 ms | txn p99 ms | CPU ms/msg | machine CPU"
        " | peak RSS MB | peak PSS MB | MB written /1k | device MB /1k | device flushes /1k"
        " | fsyncs /1k | peak WAL MB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        a = [x * 1000 for x in r.lat_accept]
        t = [x * 1000 for x in r.lat_txn]
        a50 = fmt(statistics.median(a) if a else None, ".2f")
        a99 = fmt(pct(a, 99) if a else None, ".2f")
        t50 = fmt(statistics.median(t) if t else None, ".2f")
        t99 = fmt(pct(t, 99) if t else None, ".2f")
        machine = fmt(r.machine_cpu * 100 if r.machine_cpu else None)
        lines.append(
            f"| {r.system} | {r.sessions} | {fmt(r.intake_rate)} | {fmt(r.e2e_rate)} | "
            f"{a50} | {a99} | {t50} | {t99} | "
            f"{fmt(r.cpu_per_msg_ms, '.2f')} | {machine}% | "
            f"{fmt(r.rss_kb / 1024 if r.rss_kb else None, '.1f')} | "
            f"{fmt(r.pss_kb / 1024 if r.pss_kb else None, '.1f')} | "
            f"{fmt(r.written_mb_per_k, '.1f')} | {fmt(r.dev_written_mb_per_k, '.1f')} | "
            f"{fmt(r.dev_flushes_per_k)} | {fmt(r.syncs_per_k)} | "
            f"{fmt(r.wal_peak_mb, '.1f')} | {r.error} |"
        )
    threads = [
        f"- {r.system} @{r.sessions}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in r.threads.items() if v >= 0.01)
        for r in results
        if r.threads
    ]
    if threads:
        lines += [
            "",
            "mail2alert CPU ms per message by process/thread (throughput phase):",
            *threads,
        ]
    if args.repeat > 1:
        results = medians(results)
        lines += ["", f"Medians over {args.repeat} interleaved repeats:", ""]
        lines += [
            "| system | sessions | intake msg/s | end-to-end msg/s | accept p50 ms"
            " | accept p99 ms | CPU ms/msg | MB written /1k | device flushes /1k | fsyncs /1k"
            " | peak PSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results:
            a = [x * 1000 for x in r.lat_accept]
            lines.append(
                f"| {r.system} | {r.sessions} | {fmt(r.intake_rate)} | {fmt(r.e2e_rate)} | "
                f"{fmt(statistics.median(a) if a else None, '.2f')} | "
                f"{fmt(pct(a, 99) if a else None, '.2f')} | "
                f"{fmt(r.cpu_per_msg_ms, '.2f')} | {fmt(r.written_mb_per_k, '.1f')} | "
                f"{fmt(r.dev_flushes_per_k)} | {fmt(r.syncs_per_k)} | "
                f"{fmt(r.pss_kb / 1024 if r.pss_kb else None, '.1f')} |"
            )
    post = {r.sessions: r for r in results if r.system == "postfix" and not r.error}
    ratios = []
    for r in results:
        p = post.get(r.sessions)
        if p is None or r.system == "postfix" or not r.system.startswith("m2a"):
            continue
        parts = []
        if r.e2e_rate and p.e2e_rate:
            parts.append(f"end-to-end {r.e2e_rate / p.e2e_rate:.2f}x")
        if r.intake_rate and p.intake_rate:
            parts.append(f"intake {r.intake_rate / p.intake_rate:.2f}x")
        if parts:
            ratios.append(f"- {r.system} / postfix at {r.sessions} sessions: {', '.join(parts)}")
    if ratios:
        lines += ["", "Ratios (mail2alert / Postfix, same run):", *ratios]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=5000, help="messages per run")
    ap.add_argument("--sessions", "-s", default="1,10,50", help="comma-separated session counts")
    ap.add_argument("--size", type=int, default=1024, help="message body bytes (smtp-source -l)")
    ap.add_argument(
        "--systems",
        default="m2a-routed,m2a-relay,m2a-intake,postfix",
        help="comma-separated: m2a-routed, m2a-relay, m2a-intake, postfix;\n"
        "append -wN to an m2a system for intake-workers: N (e.g. m2a-routed-w2)",
    )
    ap.add_argument("--no-postfix", action="store_true", help="skip the Postfix relay")
    ap.add_argument("--reuse", action="store_true", help="smtp-source -d: keep sessions open")
    ap.add_argument("--probe", type=int, default=500, help="latency probe messages per run")
    ap.add_argument("--probe-seconds", type=float, default=15, help="latency probe time bound")
    ap.add_argument("--timeout", type=float, default=180, help="bound per run, seconds")
    ap.add_argument("--log-level", default="INFO", help="mail2alert --log-level (default INFO)")
    venv = ROOT / ".venv/bin/python"
    ap.add_argument(
        "--python",
        default=str(venv if venv.exists() else sys.executable),
        help="mail2alert's python (default: .venv/bin/python, else this python)",
    )
    ap.add_argument(
        "--src",
        action="append",
        default=[],
        metavar="[LABEL=]PATH",
        help="mail2alert sources to run (PYTHONPATH); e.g. a snapshot made with\n"
        "git archive HEAD src | tar -x -C /tmp/m2a-snap  ->  --src /tmp/m2a-snap/src;\n"
        "repeat with LABEL=PATH and name systems SYSTEM@LABEL to compare versions\n"
        "in one run (default: src of this checkout)",
    )
    ap.add_argument(
        "--syncs",
        type=int,
        default=0,
        metavar="M",
        help="after each run send M more messages with strace -f -c counting the\n"
        "fsync/fdatasync calls of the tree (default 0: off)",
    )
    ap.add_argument(
        "--m2a-prefix",
        default="",
        help="command prefix for mail2alert, e.g. 'py-spy record -o prof.svg --'",
    )
    ap.add_argument(
        "--fsync-delay-us",
        type=int,
        default=0,
        help="a slower disk for both systems: every fsync and fdatasync waits this many "
        "microseconds more (bench/slowsync.c, built with gcc and loaded with LD_PRELOAD)",
    )
    ap.add_argument("--workdir", help="where data dirs and the Postfix queue go (default: /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, outboxes)")
    ap.add_argument("--repeat", type=int, default=1, help="run everything R times, interleaved")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    args.srcs = {}
    for spec in args.src or [str(ROOT / "src")]:
        label, sep, path = spec.rpartition("=")
        args.srcs[label if sep else ""] = str(Path(path).resolve())
    if args.syncs and shutil.which("strace") is None:
        print("bench: --syncs needs strace (apt-get install -y strace)", file=sys.stderr)
        return 2

    missing = [t for t in ("smtp-source", "smtp-sink") if shutil.which(t) is None]
    if missing:
        print(f"bench: {', '.join(missing)} not found. Install Postfix's tools:", file=sys.stderr)
        print(f"  {INSTALL_HINT}", file=sys.stderr)
        return 2
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if "postfix" in systems and args.no_postfix:
        systems.remove("postfix")
    if "postfix" in systems:
        why = None
        if shutil.which("postfix") is None:
            why = f"postfix not found; install it: {INSTALL_HINT}"
        elif os.geteuid() != 0:
            why = "running a Postfix instance needs root"
        else:
            try:
                pwd.getpwnam("postfix")
            except KeyError:
                why = "no 'postfix' user; is the postfix package installed?"
        if why:
            print(f"bench: skipping Postfix: {why}", file=sys.stderr)
            systems.remove("postfix")
    if not Path(args.python).exists():
        print(f"bench: {args.python} not found (--python)", file=sys.stderr)
        return 2
    sessions = [int(s) for s in args.sessions.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="m2a-bench-", dir=args.workdir))
    print(f"work dir: {workdir}", file=sys.stderr)
    args.slow_env = {}
    if args.fsync_delay_us > 0:
        shim = workdir / "slowsync.so"
        source = Path(__file__).with_name("slowsync.c")
        built = subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(source), "-ldl"],
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            print(f"bench: cannot build {source}: {built.stderr}", file=sys.stderr)
            return 2
        workdir.chmod(0o755)  # Postfix's daemons run as postfix and must read the shim
        args.slow_env = {"LD_PRELOAD": str(shim), "SLOW_FSYNC_US": str(args.fsync_delay_us)}
    results: list[Result] = []
    try:
        for c in [c for _ in range(args.repeat) for c in sessions]:
            for system in systems:
                print(f"running {system} with {c} sessions ...", file=sys.stderr, flush=True)
                r = run_one(system, c, args, workdir)
                results.append(r)
                print(
                    f"  intake {fmt(r.intake_rate)} msg/s, end-to-end {fmt(r.e2e_rate)} msg/s"
                    f"{', ' + r.error if r.error else ''}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "system": r.system,
                        "sessions": r.sessions,
                        "messages": r.messages,
                        "intake_rate": r.intake_rate,
                        "e2e_rate": r.e2e_rate,
                        "accept_p50_ms": statistics.median(r.lat_accept) * 1000
                        if r.lat_accept
                        else None,
                        "accept_p99_ms": pct(r.lat_accept, 99) * 1000 if r.lat_accept else None,
                        "txn_p50_ms": statistics.median(r.lat_txn) * 1000 if r.lat_txn else None,
                        "txn_p99_ms": pct(r.lat_txn, 99) * 1000 if r.lat_txn else None,
                        "cpu_ms_per_msg": r.cpu_per_msg_ms,
                        "machine_cpu": r.machine_cpu,
                        "peak_rss_mb": r.rss_kb / 1024,
                        "peak_pss_mb": r.pss_kb / 1024,
                        "written_mb_per_1000": r.written_mb_per_k,
                        "device_written_mb_per_1000": r.dev_written_mb_per_k,
                        "device_flushes_per_1000": r.dev_flushes_per_k,
                        "fsyncs_per_1000": r.syncs_per_k,
                        "peak_wal_mb": r.wal_peak_mb,
                        "thread_cpu_ms_per_msg": r.threads,
                        "error": r.error,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
