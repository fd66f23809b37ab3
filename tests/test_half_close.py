"""A client that half-closes its connection (``shutdown(SHUT_WR)``) after its last command
still gets every answer, and a message it sent whole is committed and answered once: never
stored unanswered, which the client would send again and the smarthost get twice. A message
cut off in the middle is not kept. Over real sockets, with the service in a thread.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mail2alert.testing import CaptureServer, ServiceThread
from tests.helpers import OutboxView, compose, running, write_config

MANAGER = {
    "name": "mail",
    "messages-we-want": {"to": "admin@example.com"},
    "rules": [
        {
            "actions": ["mailto:ops@example.com"],
            "filter": {"function": "mail.in_subject", "args": ["backup"]},
        }
    ],
}
ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<go@example.com>\r\nRCPT TO:<admin@example.com>\r\n"


@pytest.fixture
def service(tmp_path: Path, upstream: CaptureServer) -> Iterator[ServiceThread]:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[MANAGER],
        local={"address": "127.0.0.1:0"},
    )
    with running(path, lambda c: dataclasses.replace(c, intake_workers=1)) as running_service:
        yield running_service


def half_closed_session(port: int, stream: bytes) -> list[bytes]:
    """Send ``stream`` once the 354 came, half-close, and read every reply to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220")
        sock.sendall(ENVELOPE + b"DATA\r\n")
        lines = []
        while not (line := replies.readline()).startswith(b"354"):
            assert line, "the connection closed before DATA was answered"
            lines.append(line)
        sock.sendall(stream)
        sock.shutdown(socket.SHUT_WR)
        return [*lines, line, *replies.readlines()]


def test_a_message_sent_whole_before_a_half_close_is_answered_and_delivered_once(
    tmp_path: Path, service: ServiceThread, upstream: CaptureServer
) -> None:
    message = compose(subject="Server Backup Completed").replace(b"\n", b"\r\n")
    replies = half_closed_session(service.port, message + b".\r\n")
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")  # then the connection closed
    queue_id = replies[-1].split()[-1].decode()
    (got,) = upstream.wait_for(1)
    assert got.rcpt_tos == ("ops@example.com",)
    assert OutboxView(tmp_path / "data").queue_ids() == [queue_id]


def test_commands_after_the_message_are_answered_too(
    service: ServiceThread, upstream: CaptureServer
) -> None:
    message = compose(subject="Server Backup Completed").replace(b"\n", b"\r\n")
    replies = half_closed_session(service.port, message + b".\r\nNOOP\r\nQUIT\r\n")
    assert [r[:3] for r in replies[-3:]] == [b"250", b"250", b"221"]
    upstream.wait_for(1)


def test_a_message_cut_off_by_the_half_close_is_not_kept(
    tmp_path: Path, service: ServiceThread
) -> None:
    replies = half_closed_session(service.port, b"Subject: Server Backup\r\n\r\nhalf a mess")
    assert replies[-1].startswith(b"354")  # nothing more: the connection closed
    assert OutboxView(tmp_path / "data").queue_ids() == []
