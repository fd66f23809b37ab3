"""A client that half-closes its connection (``shutdown(SHUT_WR)``) after its last command
still gets every answer, and a message it sent whole is committed and answered once: never
stored unanswered, which the client would send again and the smarthost get twice. A message
cut off in the middle is not kept. Over real sockets, with the service in a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import trustme

from mail2alert.server import Handler
from mail2alert.session import AfterHandshake, LeanSMTP, smtp_factory
from mail2alert.testing import CaptureServer, ServiceThread
from tests.helpers import (
    LOOPS,
    OutboxView,
    compose,
    example_managers,
    run_on,
    running,
    server_tls,
    write_config,
)

ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<go@example.com>\r\nRCPT TO:<admin@example.com>\r\n"


@pytest.fixture
def service(tmp_path: Path, upstream: CaptureServer) -> Iterator[ServiceThread]:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=example_managers("mail"),
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
    assert got.rcpt_tos == ("sys@example.com", "op@example.com")
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


class _SlowHandler:
    """Answers DATA once ``release`` is set: a commit that takes its time."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handle_DATA(self, *args: object) -> str:
        await self.release.wait()
        return "250 2.0.0 Ok: queued as X"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_over_tls_the_end_of_the_clients_sending_ends_the_session_at_once(
    ca: trustme.CA, loop_name: str
) -> None:
    """TLS has no half-close: the client's close_notify ends the session, a commit that
    waits included, long before the session's timeout."""
    handler = _SlowHandler()
    make = smtp_factory(cast(Handler, handler), hostname="test")
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    def client(port: int) -> tuple[bytes, float]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with client_tls.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            replies = tls.makefile("rb")
            assert replies.readline().startswith(b"220")
            tls.sendall(ENVELOPE + b"DATA\r\n")
            while not replies.readline().startswith(b"354"):
                pass
            tls.sendall(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
            started = time.monotonic()
            plain = tls.unwrap()  # close_notify, and the server's in answer
            rest = plain.recv(100)
            plain.close()
            return rest, time.monotonic() - started

    async def run() -> tuple[bytes, float]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: AfterHandshake(make), "127.0.0.1", 0, ssl=server_tls(ca)
        )
        try:
            port = server.sockets[0].getsockname()[1]
            return await loop.run_in_executor(None, client, port)
        finally:
            handler.release.set()
            server.close()
            await server.wait_closed()

    rest, took = run_on(loop_name, run())
    assert rest == b""  # no answer, and the connection closed
    assert took < 5.0  # the session's timeout is 300 s


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_an_auth_read_after_the_half_close_ends_the_session_instead_of_waiting(
    loop_name: str,
) -> None:
    """AUTH after a message whose commit was still waiting when the client half-closed: its
    334 goes out, and since no answer can come, the session ends at once, not at its
    timeout. (``serve`` never gets here: on a plain listener it takes AUTH only after
    STARTTLS, and TLS has no half-close; a session built with ``auth_require_tls=False``
    can.)"""
    handler = _SlowHandler()
    sessions: list[LeanSMTP] = []

    def make() -> LeanSMTP:
        session = LeanSMTP(handler, hostname="test", auth_require_tls=False, timeout=300)
        sessions.append(session)
        return session

    def client(port: int) -> tuple[list[bytes], float]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            replies = sock.makefile("rb")
            assert replies.readline().startswith(b"220")
            sock.sendall(ENVELOPE + b"DATA\r\n")
            while not replies.readline().startswith(b"354"):
                pass
            sock.sendall(b"Subject: hi\r\n\r\nbody\r\n.\r\nAUTH LOGIN\r\n")
            sock.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            rest = replies.readlines()  # to the end: the session closed the connection
            return rest, time.monotonic() - started

    async def run() -> tuple[list[bytes], float]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(make, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            answered = loop.run_in_executor(None, client, port)
            # The commit is let go only once the session has seen the end of the client's
            # sending, so that AUTH is read after it.
            while not (sessions and sessions[0]._eof):  # noqa: ASYNC110 - nothing signals it
                await asyncio.sleep(0.01)
            handler.release.set()
            return await answered
        finally:
            handler.release.set()
            server.close()
            await server.wait_closed()

    rest, took = run_on(loop_name, run())
    assert [r[:3] for r in rest] == [b"250", b"334"]
    assert took < 5.0  # the session's timeout is 300 s; the client's socket gives up at 10
