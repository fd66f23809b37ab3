"""End to end: ``kill -9`` of ``mail2alert serve`` and of its intake workers while 20 clients
send 5,000 messages over STARTTLS and delivery goes out over STARTTLS with a login; a restart
on the same data-dir delivers every message that got a 250.

The clients behave as senders must: a message that got no answer because the server died is
sent again once the server is back, so such a message may arrive twice by the client's
doing. Any other message may arrive twice only if it was delivered but not yet recorded when
the server died: at most one per delivery connection (README, "At least once, with few
duplicates"). Certificates are made here by trustme; everything runs on 127.0.0.1.
"""

from __future__ import annotations

import smtplib
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme

from mail2alert.testing import CaptureServer, free_port
from tests.helpers import (
    FAST_DELIVERY,
    OutboxView,
    Reply,
    ServeProcess,
    ca_file,
    compose,
    field_value,
    listening,
    processes_mentioning,
    server_tls,
    wait_until,
    write_config,
)

PASSWORD = "s3cret-smtp-pass"
MESSAGES = 5000
SESSIONS = 20
CONNECTIONS = 4
#: The kill comes once this many messages were answered 250.
KILL_AT = 2000
#: No client may take longer than this, the outage included.
CLIENT_DEADLINE = 120.0


class Clients:
    """What the clients got, shared between their threads: a queue id for each Message-ID
    answered 250, and the Message-IDs sent again after the server died in their
    transaction."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: dict[str, str] = {}
        self.resent: list[str] = []

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def send(self, port: int, message_ids: Sequence[str], context: ssl.SSLContext) -> None:
        """Send each message in one session over STARTTLS; when the server dies, wait until
        it listens again and carry on, sending again the message it did not answer."""
        deadline = time.monotonic() + CLIENT_DEADLINE
        todo = deque(message_ids)
        client: smtplib.SMTP | None = None
        while todo:
            assert time.monotonic() < deadline, f"{len(todo)} messages not sent in time"
            in_transaction = False
            try:
                if client is None:
                    client = smtplib.SMTP(
                        "127.0.0.1", port, local_hostname="client.test", timeout=30
                    )
                    client.starttls(context=context)
                    client.ehlo()
                code, text = client.mail("someone@example.net")
                assert code == 250, f"MAIL FROM refused: {code} {text!r}"
                in_transaction = True
                code, text = client.rcpt("admin@example.com")
                assert code == 250, f"RCPT TO refused: {code} {text!r}"
                code, text = client.data(relayed(todo[0]))
                reply = Reply(code, text.decode("utf-8", "replace"))
                with self.lock:
                    self.accepted[todo.popleft()] = reply.queue_id
            except (smtplib.SMTPServerDisconnected, OSError):
                if client is not None:
                    client.close()
                client = None
                if in_transaction:
                    with self.lock:
                        self.resent.append(todo[0])
                wait_until(lambda: listening(port), timeout=60, what="the server back")
        if client is not None:
            client.quit()


def relayed(message_id: str) -> bytes:
    """A message no manager wants: relayed unchanged, one item."""
    return compose(sender="Someone <someone@example.net>", subject="report", message_id=message_id)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def test_kill_9_of_serve_and_its_workers_during_5000_messages_over_tls_loses_none(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 clients send 5,000 messages over STARTTLS (required); delivery goes out over
    STARTTLS with a login, on 4 connections. Once 2,000 were answered 250, the serve
    process and its intake workers are killed with SIGKILL, together, and started again on
    the same data-dir. Every message that got a 250 is delivered; the messages that arrive
    twice are at most the 4 that delivery had sent but not recorded, plus those the clients
    had to send again."""
    monkeypatch.setenv("SMTP_PASSWD", PASSWORD)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    upstream = CaptureServer(tls=server_tls(ca), require_starttls=True, users={"alerts": PASSWORD})
    port = free_port()
    config_path = write_config(
        tmp_path / "configuration.yml",
        local={
            "address": f"127.0.0.1:{port}",
            "tls": {"mode": "starttls-required", "cert": str(cert_path), "key": str(key_path)},
        },
        remote_port=upstream.port,
        remote={
            "tls": "starttls",
            "ca-file": str(ca_file(ca, tmp_path / "ca.pem")),
            "user": "alerts",
            "passwd": "$SMTP_PASSWD",
        },
        data_dir=tmp_path / "data",
        managers=[],
        delivery={**FAST_DELIVERY, "connections": CONNECTIONS},
    )
    serve = ServeProcess(config_path, port, tmp_path / "serve.log", group=True)
    ids = [f"<kill-{n}@tls.test.example.com>" for n in range(MESSAGES)]
    clients = Clients()
    started = time.monotonic()
    try:
        with upstream:
            serve.start()
            with ThreadPoolExecutor(SESSIONS) as pool:
                sessions = [
                    pool.submit(clients.send, port, ids[i::SESSIONS], client_context)
                    for i in range(SESSIONS)
                ]
                wait_until(
                    lambda: clients.count >= KILL_AT or any(s.done() for s in sessions),
                    timeout=60,
                    what="the kill point",
                )
                failed = [s.result() for s in sessions if s.done()]  # raises what a client met
                assert not failed, "a client ended before the kill"
                assert serve.kill_group() == -9
                upstream_at_kill, accepted_at_kill = len(upstream.messages), clients.count
                wait_until(
                    lambda: processes_mentioning(str(config_path)) == [],
                    what="the serve process and its workers gone",
                )
                serve.start()
                for session in sessions:
                    session.result(timeout=CLIENT_DEADLINE)
            upstream.wait_for(MESSAGES, timeout=90)
            outbox = OutboxView(tmp_path / "data")
            queue_ids = list(clients.accepted.values())
            wait_until(
                lambda: outbox.unfinished(queue_ids) == 0, timeout=60, what="every 250 delivered"
            )
            assert serve.terminate() == 0
    finally:
        serve.close()
    elapsed = time.monotonic() - started
    got = Counter(field_value(m.data, "message-id") for m in upstream.messages)
    resent = set(clients.resent)
    duplicates = sum(count - 1 for count in got.values())
    by_delivery = sum(count - 1 for message_id, count in got.items() if message_id not in resent)
    figures = (
        f"{MESSAGES} messages in {elapsed:.1f}s; kill at {accepted_at_kill} accepted,"
        f" {upstream_at_kill} upstream; {len(resent)} sent again by the clients;"
        f" {duplicates} duplicates, {by_delivery} of them by delivery"
    )
    print(figures)
    assert accepted_at_kill < MESSAGES, f"killed after the last 250: {figures}"
    assert upstream_at_kill > 0, f"killed before delivery began: {figures}"
    assert set(clients.accepted) == set(ids), figures
    assert set(got) == set(ids), figures
    assert by_delivery <= CONNECTIONS, figures
    assert duplicates <= CONNECTIONS + len(resent), figures
