"""The listener's limits, over real sockets, with the codes Postfix gives: SIZE, recipients,
sessions, an idle or stalled client, long lines and addresses that need SMTPUTF8."""

from __future__ import annotations

import contextlib
import dataclasses
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mail2alert.testing import CaptureServer, ServiceThread
from tests.helpers import BACKUP_MANAGER, OutboxView, compose, running, write_config


@contextlib.contextmanager
def listening(tmp_path: Path, upstream: CaptureServer, **limits: Any) -> Iterator[ServiceThread]:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[BACKUP_MANAGER],
        local={"address": "127.0.0.1:0", **limits},
    )
    # One intake process holds the whole of max-sessions.
    with running(path, lambda c: dataclasses.replace(c, intake_workers=1)) as service:
        yield service


def client(service: ServiceThread) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", service.port, timeout=10)
    smtp.ehlo("client.test")
    return smtp


def test_size_is_advertised_and_a_bigger_message_is_refused_with_552_5_3_4(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with listening(tmp_path, upstream, **{"max-message-size": "2KiB"}) as service:
        smtp = client(service)
        assert smtp.esmtp_features["size"] == "2048"
        code, text = smtp.mail("go@example.com", ["SIZE=4096"])
        assert (code, text[:5]) == (552, b"5.3.4")
        smtp.rset()
        smtp.mail("go@example.com")
        smtp.rcpt("admin@example.com")
        code, text = smtp.data(compose(body="x" * 3000))
        assert (code, text[:5]) == (552, b"5.3.4")
        smtp.quit()
        assert OutboxView(tmp_path / "data").queue_ids() == []


def test_recipients_beyond_max_recipients_get_452_4_5_3_and_the_rest_is_delivered(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with listening(tmp_path, upstream, **{"max-recipients": 2}) as service:
        smtp = client(service)
        smtp.mail("go@example.com")
        assert smtp.rcpt("admin@example.com")[0] == 250
        assert smtp.rcpt("other@example.com")[0] == 250
        code, text = smtp.rcpt("third@example.com")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert smtp.data(compose(subject="Server Backup Failed"))[0] == 250
        smtp.quit()
        got = upstream.wait_for(2)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["ops@example.com", "other@example.com"]


def test_a_session_beyond_max_sessions_gets_421_4_7_0_until_one_ends(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with listening(tmp_path, upstream, **{"max-sessions": 2}) as service:
        first, second = client(service), client(service)
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as third:
            greeting = third.makefile("rb").readline()
        assert greeting.startswith(b"421 4.7.0")
        first.quit()
        deadline = time.monotonic() + 10
        while True:  # the first session's end reaches the server a moment after QUIT
            with socket.create_connection(("127.0.0.1", service.port), timeout=10) as again:
                if again.makefile("rb").readline().startswith(b"220"):
                    break
            assert time.monotonic() < deadline
        second.quit()


def read_reply(sock: socket.socket) -> bytes:
    return sock.makefile("rb").readline()


def test_an_idle_client_is_cut_off_with_421_4_4_2(tmp_path: Path, upstream: CaptureServer) -> None:
    with (
        listening(tmp_path, upstream, timeout="0.5s") as service,
        socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock,
    ):
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220")
        assert replies.readline().startswith(b"421 4.4.2")  # said nothing for 0.5 s
        assert replies.readline() == b""  # and the connection is closed


def test_a_client_that_stalls_in_the_middle_of_data_is_cut_off_and_nothing_is_kept(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with (
        listening(tmp_path, upstream, timeout="0.5s") as service,
        socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock,
    ):
        replies = sock.makefile("rb")
        replies.readline()
        for command in (
            b"EHLO c.test",
            b"MAIL FROM:<go@example.com>",
            b"RCPT TO:<admin@example.com>",
        ):
            sock.sendall(command + b"\r\n")
            while replies.readline()[3:4] == b"-":
                pass
        sock.sendall(b"DATA\r\n")
        assert replies.readline().startswith(b"354")
        sock.sendall(b"Subject: Server Backup Failed\r\n\r\nhalf a mess")
        assert replies.readline().startswith(b"421 4.4.2")
    assert OutboxView(tmp_path / "data").queue_ids() == []


def test_a_slow_but_steady_upload_is_not_cut_off(tmp_path: Path, upstream: CaptureServer) -> None:
    with listening(tmp_path, upstream, timeout="1s") as service:
        smtp = client(service)
        smtp.mail("go@example.com")
        smtp.rcpt("admin@example.com")
        assert smtp.docmd("DATA")[0] == 354
        for line in (b"Subject: Server Backup Failed", b"", b"one", b"two", b"three"):
            smtp.send(line + b"\r\n")
            time.sleep(0.4)  # a slow client: 2 s in all, never 1 s without a byte
        smtp.send(b".\r\n")
        assert smtp.getreply()[0] == 250
        smtp.quit()


def test_lines_longer_than_998_bytes_are_accepted_and_delivered_whole(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """Taken as they came; on the way out broken into lines SMTP takes, which unfold to it."""
    long_line = b"x" * 5000
    with listening(tmp_path, upstream) as service:
        smtp = client(service)
        message = compose(subject="Server Backup Failed", body=long_line.decode())
        smtp.sendmail("go@example.com", ["admin@example.com"], message)
        smtp.quit()
        (got,) = upstream.wait_for(1)
    assert long_line in got.data.replace(b"\r\n ", b"")


def test_a_non_ascii_address_needs_smtputf8(tmp_path: Path, upstream: CaptureServer) -> None:
    with listening(tmp_path, upstream) as service:
        smtp = client(service)

        def said(command: str) -> tuple[int, bytes]:
            smtp.send(command.encode("utf-8") + b"\r\n")
            return smtp.getreply()

        code, text = said("MAIL FROM:<josé@example.com>")
        assert (code, text[:5]) == (553, b"5.6.7")
        assert said("MAIL FROM:<go@example.com>")[0] == 250
        code, text = said("RCPT TO:<jörg@example.com>")
        assert (code, text[:5]) == (553, b"5.6.7")
        assert said("RSET")[0] == 250
        assert said("MAIL FROM:<josé@example.com> SMTPUTF8")[0] == 250
        assert said("RCPT TO:<jörg@example.com>")[0] == 250
        smtp.quit()


def test_commands_up_to_2048_bytes_are_taken_and_longer_ones_refused_with_500_5_5_2(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    with listening(tmp_path, upstream) as service:
        smtp = client(service)
        assert smtp.mail("go@example.com")[0] == 250
        padding = "RCPT TO:<@example.com>"
        taken = "RCPT TO:<" + "a" * (2048 - len(padding)) + "@example.com>"
        assert len(taken) == 2048
        smtp.send(taken.encode("ascii") + b"\r\n")
        assert smtp.getreply()[0] == 250
        refused = "RCPT TO:<" + "b" * 3000 + "@example.com>"
        smtp.send(refused.encode("ascii") + b"\r\n")
        code, text = smtp.getreply()
        assert (code, text[:5]) == (500, b"5.5.2")
        # The session goes on after the refusal.
        assert smtp.rcpt("admin@example.com")[0] == 250
        smtp.quit()


def test_a_client_that_never_reads_its_replies_is_cut_off_and_frees_its_session(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """Its replies fill the socket's buffers until the server stops reading; at the timeout
    the connection is dropped (its replies could never go out), and its place among
    max-sessions is free again."""
    with (
        listening(tmp_path, upstream, timeout="0.5s", **{"max-sessions": 1}) as service,
        socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(0.2)
        sent = 0
        with contextlib.suppress(TimeoutError):  # the server stopped reading
            while sent < 64 * 1024 * 1024:
                sent += sock.send(b"NOOP\r\n" * 10_000)
        assert sent < 64 * 1024 * 1024, "the server never stopped reading"
        deadline = time.monotonic() + 10
        while True:  # the dropped session's place comes back a moment after the timeout
            with socket.create_connection(("127.0.0.1", service.port), timeout=10) as again:
                if again.makefile("rb").readline().startswith(b"220"):
                    break
            assert time.monotonic() < deadline, "the session that read nothing kept its place"
