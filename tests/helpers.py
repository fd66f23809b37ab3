"""Helpers for the end-to-end tests: configs for given ports, an SMTP client that keeps the
server's reply, a read-only view of the outbox, and ``mail2alert serve`` as a real process.

Everything waits on events or polls state with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import email.utils
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trustme
import uvloop
import yaml
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mail2alert import config
from mail2alert.outbox import DB_NAME, Outbox
from mail2alert.testing import Captured, CaptureServer, ServiceThread

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "configuration.yml"

#: Retry quickly, give up late: delivery tests must not wait minutes for a retry.
FAST_DELIVERY: dict[str, Any] = {
    "retry-initial": "1s",
    "retry-max": "2s",
    "give-up-after": "1h",
    "timeout": "5s",
}


# -- configuration ------------------------------------------------------------------------


#: A mail manager: mail to admin@example.com whose subject says "backup" goes to
#: ops@example.com.
BACKUP_MANAGER: dict[str, Any] = {
    "name": "mail",
    "messages-we-want": {"to": "admin@example.com"},
    "rules": [
        {
            "actions": ["mailto:ops@example.com"],
            "filter": {"function": "mail.in_subject", "args": ["backup"]},
        }
    ],
}


def example_managers(*names: str) -> list[dict[str, Any]]:
    """The managers of examples/configuration.yml with these names, as plain data."""
    loaded = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    return [m for m in loaded["managers"] if m["name"] in names]


def write_config(
    path: Path,
    *,
    remote_port: int,
    data_dir: Path,
    managers: Sequence[dict[str, Any]],
    local: str | dict[str, Any] = "127.0.0.1:0",
    remote: dict[str, Any] | None = None,
    delivery: dict[str, Any] | None = None,
    http: str | dict[str, Any] | None = "127.0.0.1:0",
) -> Path:
    """Write a configuration file listening on ``local``, delivering to 127.0.0.1:remote_port
    (with the other keys of ``remote-smtp`` from ``remote``); ``/metrics`` and the health
    checks on ``http`` (any free port: tests run side by side, never on the default 9025)."""
    document = {
        "local-smtp": local,
        "remote-smtp": {"address": f"127.0.0.1:{remote_port}", **remote}
        if remote
        else f"127.0.0.1:{remote_port}",
        "data-dir": str(data_dir),
        "delivery": FAST_DELIVERY if delivery is None else delivery,
        "managers": list(managers),
        "http": http,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@contextlib.contextmanager
def running(
    config_path: Path, adjust: Callable[[config.Config], config.Config] = lambda c: c
) -> Iterator[ServiceThread]:
    """mail2alert started in a thread from ``config_path`` (the loaded config passed through
    ``adjust``); stopped gracefully afterwards."""
    with ServiceThread(adjust(config.load(config_path))) as service:
        yield service


# -- messages -----------------------------------------------------------------------------


def compose(
    *,
    subject: str | None = "Server Backup Completed Successfully",
    sender: str = "Go Server <go@example.com>",
    to: str = "admin@example.com",
    body: str = "The backup finished.\nSent by Go.\n",
    message_id: str | None = None,
    headers: Sequence[str] = (),
) -> bytes:
    """A plain text mail with CRLF line endings, as a client would send it."""
    lines = [
        f"From: {sender}",
        f"To: {to}",
        "Date: Fri, 15 Mar 2024 16:31:40 +0000",
        f"Message-ID: {message_id or email.utils.make_msgid(domain='test.example.com')}",
    ]
    if subject is not None:
        lines.append(f"Subject: {subject}")
    lines += [
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        *headers,
    ]
    text = "\r\n".join(lines) + "\r\n\r\n" + body.replace("\n", "\r\n")
    return text.encode("utf-8")


def header_fields(data: bytes) -> list[bytes]:
    """The header fields of ``data``, each with its continuation lines, without line ends."""
    head = data.split(b"\r\n\r\n", 1)[0]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def field_name(field: bytes) -> str:
    """The lower-case name of one header field."""
    return field.split(b":", 1)[0].decode("ascii").lower()


def field_value(data: bytes, name: str) -> str:
    """The first ``name`` field of ``data``, unfolded, as text ('' if absent)."""
    for field in header_fields(data):
        if field_name(field) == name.lower():
            raw = field.split(b":", 1)[1].replace(b"\r\n", b"")
            return raw.decode("utf-8").strip()
    return ""


def addresses(data: bytes, name: str) -> list[str]:
    """The bare addresses of the first ``name`` field (To:, From:), in order."""
    return [addr for _, addr in email.utils.getaddresses([field_value(data, name)])]


def body_of(data: bytes) -> bytes:
    """Everything after the blank line that ends the header section."""
    return data.split(b"\r\n\r\n", 1)[1]


def strip_received(data: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field, which must be a Received: trace field."""
    first = header_fields(data)[0]
    assert field_name(first) == "received", f"first field is not Received: {first[:80]!r}"
    return first, data[len(first) + 2 :]


# -- SMTP client --------------------------------------------------------------------------


class RecordingWriter:
    """An SMTP session's stream writer that keeps what each write was given."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


#: The event loops an SMTP session must work on: asyncio's own, and uvloop, which serve runs on.
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_on(loop_name: str, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end on a new event loop of :data:`LOOPS`, then close it."""
    loop = LOOPS[loop_name]()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


class RecordingHandler:
    """An SMTP session's handler that keeps each message's content and answers 250."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        self.contents.append(content)
        return "250 OK"


class RecordingTransport(RecordingWriter):
    """A connection's transport, as an SMTP session sees it, that keeps what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.aborted = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 25) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass(frozen=True)
class Reply:
    """mail2alert's final answer to DATA."""

    code: int
    text: str

    @property
    def queue_id(self) -> str:
        """The queue id in ``250 ... queued as <id>``."""
        assert self.code == 250, f"not queued: {self.code} {self.text}"
        return self.text.rsplit(" ", 1)[-1]


def send_session(
    port: int,
    messages: Sequence[bytes],
    *,
    mail_from: str = "someone@example.net",
    rcpt_to: str = "admin@example.com",
) -> list[Reply]:
    """Send ``messages`` one after the other in one SMTP session; mail2alert's DATA replies."""
    replies: list[Reply] = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        for data in messages:
            client.ehlo_or_helo_if_needed()
            code, text = client.mail(mail_from)
            assert code == 250, f"MAIL FROM refused: {code} {text!r}"
            code, text = client.rcpt(rcpt_to)
            assert code == 250, f"RCPT TO {rcpt_to} refused: {code} {text!r}"
            code, text = client.data(data)
            replies.append(Reply(code, text.decode("utf-8", "replace")))
    return replies


def send(
    port: int,
    data: bytes,
    *,
    mail_from: str = "go@example.com",
    rcpt_tos: Sequence[str] = ("admin@example.com",),
    mail_options: Sequence[str] = (),
) -> Reply:
    """Send one message to mail2alert on 127.0.0.1:port with smtplib; return the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        client.ehlo("client.test")
        code, text = client.mail(mail_from, list(mail_options))
        assert code == 250, f"MAIL FROM refused: {code} {text!r}"
        for rcpt in rcpt_tos:
            code, text = client.rcpt(rcpt)
            assert code == 250, f"RCPT TO {rcpt} refused: {code} {text!r}"
        code, text = client.data(data)
        return Reply(code, text.decode("utf-8", "replace"))


# -- certificates -------------------------------------------------------------------------


def server_tls(ca: trustme.CA, *, expired: bool = False) -> ssl.SSLContext:
    """A server's TLS context with a certificate from ``ca`` for 127.0.0.1 and localhost;
    with ``expired``, one whose validity ended yesterday."""
    now = datetime.datetime.now(datetime.UTC)
    validity = (
        {
            "not_before": now - datetime.timedelta(days=30),
            "not_after": now - datetime.timedelta(days=1),
        }
        if expired
        else {}
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", **validity).configure_cert(context)
    return context


def ca_file(ca: trustme.CA, path: Path) -> Path:
    """``ca``'s certificate written to ``path`` (for ``remote-smtp.ca-file``)."""
    ca.cert_pem.write_to_path(str(path))
    return path


# -- waiting and the outbox ---------------------------------------------------------------


def wait_until(check: Callable[[], T], *, timeout: float = 15.0, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy; return that. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(0.02)


class OutboxView:
    """Reads the outbox of a data dir from the outside, as an operator would."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / DB_NAME

    @contextlib.contextmanager
    def _opened(self) -> Iterator[Outbox]:
        outbox = Outbox(self.data_dir)
        try:
            yield outbox
        finally:
            outbox.close()

    def queue_ids(self) -> list[str]:
        """The queue id of every message the outbox has, oldest first."""
        with self._opened() as outbox:
            return [m.id for m in outbox.messages()]

    def integrity(self) -> str:
        """SQLite's check of the file: ``ok`` or what is wrong."""
        with self._opened() as outbox:
            return outbox.integrity()

    def notes(self, space: str) -> dict[tuple[str, ...], str]:
        """The notes kept in one space (``history``...), by key."""
        with self._opened() as outbox:
            return outbox.notes().get(space, {})

    def unfinished(self, queue_ids: Sequence[str]) -> int:
        """How many items of these messages are not delivered yet."""
        with self._opened() as outbox:
            return outbox.unfinished(queue_ids)

    def message(self, queue_id: str) -> dict[str, Any] | None:
        """The stored message ``queue_id``, as a dict of its fields."""
        with self._opened() as outbox:
            message = outbox.message(queue_id)
        return None if message is None else dataclasses.asdict(message)

    def items(self, queue_id: str) -> list[dict[str, Any]]:
        """The items of one message, in the order they were made."""
        with self._opened() as outbox:
            return [dataclasses.asdict(item) for item in outbox.items_of(queue_id)]

    def item(self, queue_id: str) -> dict[str, Any]:
        """The one item of a message."""
        rows = self.items(queue_id)
        assert len(rows) == 1, f"{queue_id} has {len(rows)} items"
        return rows[0]

    def recipients(self, queue_id: str) -> dict[str, dict[str, Any]]:
        """Recipient rows of every item of a message, by address."""
        with self._opened() as outbox:
            rows = [dataclasses.asdict(r) for r in outbox.recipients_of(queue_id)]
        return {row["rcpt"]: row for row in rows}

    def wait_state(self, queue_id: str, state: str, *, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the one item of ``queue_id`` is in ``state``; return its row."""

        def reached() -> dict[str, Any] | None:
            rows = self.items(queue_id)
            return rows[0] if len(rows) == 1 and rows[0]["state"] == state else None

        return wait_until(reached, timeout=timeout, what=f"{queue_id} to be {state}")

    def wait_attempted(self, queue_id: str, *, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until delivery of the one item of ``queue_id`` has been tried at least once.

        An attempt that did not reach the destination spends none of the item's attempts, but
        leaves its reason in ``last_error``.
        """

        def tried() -> dict[str, Any] | None:
            rows = self.items(queue_id)
            if len(rows) != 1:
                return None
            return rows[0] if rows[0]["attempts"] >= 1 or rows[0]["last_error"] else None

        return wait_until(tried, timeout=timeout, what=f"an attempt to deliver {queue_id}")


# -- mail2alert as a process --------------------------------------------------------------


def serve_command(config_path: Path) -> list[str]:
    """``python -m mail2alert serve --config <path>`` with this interpreter."""
    return [sys.executable, "-m", "mail2alert", "serve", "--config", str(config_path)]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class ServeProcess:
    """``mail2alert serve`` in a subprocess; stderr goes to a file for later assertions.

    With ``group`` it leads a process group of its own (its intake workers are in it), so
    that :meth:`kill_group` can kill all of them and nothing else.
    """

    def __init__(
        self, config_path: Path, port: int, log_path: Path, *, group: bool = False
    ) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.group = group
        self.proc: subprocess.Popen[bytes] | None = None
        #: Options given before ``serve`` (``--log-level DEBUG``).
        self.proc_args: list[str] = []

    def start(self, *, timeout: float = 20.0) -> ServeProcess:
        """Start the process and wait until it listens; raise if it exits first."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            command = serve_command(self.config_path)
            self.proc = subprocess.Popen(
                command[:3] + self.proc_args + command[3:],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.config_path.parent,
                start_new_session=self.group,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"mail2alert exited with {self.proc.returncode}: {self.log}")
            return listening(self.port)

        wait_until(up, timeout=timeout, what=f"mail2alert to listen on {self.port}")
        return self

    @property
    def log(self) -> str:
        """What the process wrote to stderr and stdout so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> int:
        """``kill -9``: no chance to flush or close anything."""
        return self._signal(signal.SIGKILL)

    def kill_group(self) -> int:
        """``kill -9`` of the process and its intake workers at once; its exit status."""
        assert self.group, "only a process started with group=True leads its own group"
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def terminate(self) -> int:
        """SIGTERM: what a service manager sends to stop it."""
        return self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def close(self) -> None:
        """Kill the process if it still runs (a test that failed half-way)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def processes_mentioning(text: str) -> list[int]:
    """Pids of processes whose command line contains ``text`` (Linux /proc)."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


# -- mail2alert in a thread with its upstream ---------------------------------------------


@dataclass
class Relay:
    """A running mail2alert, the capture server it delivers to, and its outbox."""

    service: ServiceThread
    upstream: CaptureServer
    outbox: OutboxView

    @property
    def port(self) -> int:
        """Where mail2alert listens."""
        return self.service.port

    def send(self, data: bytes, **envelope: Any) -> Reply:
        """Send one message to mail2alert (see :func:`send`)."""
        return send(self.port, data, **envelope)

    def sentinel(self) -> Captured:
        """Send a message no manager wants and wait until it is upstream.

        Whatever was delivered before it has arrived by then, so a test can show that
        something else did not arrive without sleeping.
        """
        marker = email.utils.make_msgid(domain="sentinel.test")
        before = len(self.upstream.messages)
        self.send(
            compose(subject="sentinel", message_id=marker, sender="s@sentinel.test"),
            mail_from="s@sentinel.test",
            rcpt_tos=["s@sentinel.test"],
        )
        wait_until(
            lambda: any(marker.encode() in m.data for m in self.upstream.messages[before:]),
            what="the sentinel upstream",
        )
        return next(m for m in self.upstream.messages if marker.encode() in m.data)


@contextlib.contextmanager
def relay(
    tmp_path: Path,
    upstream: CaptureServer,
    managers: Sequence[dict[str, Any]],
    *,
    data_dir: Path | None = None,
    delivery: dict[str, Any] | None = None,
    remote: dict[str, Any] | None = None,
    adjust: Callable[[config.Config], config.Config] = lambda c: c,
) -> Iterator[Relay]:
    """mail2alert in a thread with these managers, delivering to ``upstream`` (with the other
    keys of ``remote-smtp`` from ``remote``)."""
    data = data_dir or tmp_path / "data"
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=data,
        managers=managers,
        remote=remote,
        delivery=delivery,
    )
    with running(path, adjust) as service:
        yield Relay(service, upstream, OutboxView(data))


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``mount_point`` (made here) with ``options``, unmounted (lazily)
    afterwards. The tests run as root: only a real file system can be full or read-only for
    root, whom mode bits do not stop."""
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=30)
