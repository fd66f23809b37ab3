"""End to end: how many messages a ``kill -9`` can send twice.

The dispatcher records each result before its worker takes the next item, so at any moment at
most ``delivery.connections`` items have been delivered but not yet recorded: after a crash,
those are sent again, and nothing else is. ``mail2alert serve`` runs as a real process and
is killed with SIGKILL while the capture server is still receiving the backlog.
"""

from __future__ import annotations

import email.utils
import smtplib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mail2alert.testing import CaptureServer, free_port
from tests.helpers import (
    FAST_DELIVERY,
    OutboxView,
    Reply,
    ServeProcess,
    compose,
    field_value,
    send,
    wait_until,
    write_config,
)

CONNECTIONS = 4
MESSAGES = 300
SESSIONS = 6


@pytest.fixture
def serve(tmp_path: Path, upstream: CaptureServer) -> Iterator[ServeProcess]:
    """``mail2alert serve`` relaying everything to ``upstream`` over 4 connections (not
    started); killed if a test leaves it running."""
    port = free_port()
    config_path = write_config(
        tmp_path / "configuration.yml",
        local=f"127.0.0.1:{port}",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[],
        delivery={**FAST_DELIVERY, "connections": CONNECTIONS},
    )
    process = ServeProcess(config_path, port, tmp_path / "serve.log")
    yield process
    process.close()


def relayed(message_id: str) -> bytes:
    """A small message no manager wants: relayed unchanged, one item."""
    return compose(sender="Someone <someone@example.net>", subject="report", message_id=message_id)


def send_session(port: int, message_ids: Sequence[str]) -> dict[str, str]:
    """Send one message per Message-ID in one SMTP session; queue id -> Message-ID."""
    queued: dict[str, str] = {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        for message_id in message_ids:
            client.ehlo_or_helo_if_needed()
            code, text = client.mail("someone@example.net")
            assert code == 250, text
            code, text = client.rcpt("admin@example.com")
            assert code == 250, text
            code, text = client.data(relayed(message_id))
            queued[Reply(code, text.decode("utf-8", "replace")).queue_id] = message_id
    return queued


def pending(outbox: OutboxView, queue_ids: Sequence[str]) -> int:
    """How many items of these messages are not delivered yet."""
    return outbox.unfinished(queue_ids)


KILLS = 3


def test_each_kill_9_during_delivery_sends_at_most_one_message_per_connection_twice(
    tmp_path: Path, upstream: CaptureServer, serve: ServeProcess
) -> None:
    """Killed with SIGKILL three times while 300 messages are being delivered over 4
    connections, and restarted each time, mail2alert delivers every accepted message at least
    once and at most 4 of them twice per kill (those delivered but not yet recorded when it
    died)."""
    upstream.stop()
    serve.start()
    ids = [email.utils.make_msgid(domain=f"dup{i}.test.example.com") for i in range(MESSAGES)]
    with ThreadPoolExecutor(SESSIONS) as pool:
        sessions = pool.map(
            send_session, [serve.port] * SESSIONS, [ids[i::SESSIONS] for i in range(SESSIONS)]
        )
        accepted = {q: m for queued in sessions for q, m in queued.items()}
    assert len(accepted) == MESSAGES
    upstream.start()
    # New mail is tried at once: its delivery finds the upstream back and releases the rest.
    last_id = email.utils.make_msgid(domain="last.test.example.com")
    accepted[send(serve.port, relayed(last_id), mail_from="someone@example.net").queue_id] = last_id

    upstream_at_kills = []
    for kill in range(1, KILLS + 1):
        wait_until(
            lambda kill=kill: len(upstream.messages) >= 50 * kill,
            timeout=15,
            what=f"{50 * kill} messages upstream",
        )
        assert serve.kill() == -9
        upstream_at_kills.append(len(upstream.messages))
        serve.start()
    outbox = OutboxView(tmp_path / "data")
    wait_until(
        lambda: pending(outbox, list(accepted)) == 0, timeout=30, what="every message delivered"
    )
    assert serve.terminate() == 0

    arrived = Counter(field_value(m.data, "message-id") for m in upstream.messages)
    duplicates = sum(count - 1 for count in arrived.values())
    figures = (
        f"{duplicates} duplicates after {KILLS} kill -9 with {CONNECTIONS} connections "
        f"(upstream at the kills: {upstream_at_kills} of {len(accepted)})"
    )
    print(figures)
    assert upstream_at_kills[-1] < len(accepted), f"all delivered before the last kill: {figures}"
    assert set(arrived) == set(accepted.values()), figures
    assert duplicates <= KILLS * CONNECTIONS, figures
