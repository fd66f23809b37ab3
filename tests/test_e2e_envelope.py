"""End to end: envelopes as real senders write them (a bounce's null sender, addresses that are
not UTF-8) reach the upstream as they came, and one odd message never fails its neighbours in
a group commit."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mail2alert.testing import CaptureServer, ServiceThread
from tests.helpers import (
    OutboxView,
    compose,
    example_managers,
    running,
    send,
    write_config,
)


@pytest.fixture
def relay(tmp_path: Path, upstream: CaptureServer) -> Iterator[ServiceThread]:
    """mail2alert with the example's mail manager (admin@ routed), the rest relayed."""
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=example_managers("mail"),
    )
    with running(path) as service:
        yield service


def raw_transaction(port: int, mail_from: bytes, rcpt: bytes, data: bytes) -> tuple[int, bytes]:
    """One SMTP transaction with the envelope's bytes sent exactly as given; the DATA reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        for command in (b"MAIL FROM:<" + mail_from + b"> SMTPUTF8", b"RCPT TO:<" + rcpt + b">"):
            client.send(command + b"\r\n")
            code, text = client.getreply()
            assert code == 250, f"{command!r}: {code} {text!r}"
        code, text = client.data(data)
        return code, text


def test_a_bounce_with_the_null_sender_is_relayed_with_the_null_reverse_path(
    tmp_path: Path, relay: ServiceThread, upstream: CaptureServer
) -> None:
    """``MAIL FROM:<>`` is a legitimate sender (RFC 5321 4.5.5): it is delivered, once."""
    message = compose(subject="Undelivered Mail Returned to Sender", sender="MAILER-DAEMON")
    reply = send(relay.port, message, mail_from="", rcpt_tos=["someone@example.net"])
    assert reply.code == 250

    (got,) = upstream.wait_for(1)
    assert got.mail_from == "<>"  # aiosmtpd spells the null reverse-path so
    assert got.rcpt_tos == ("someone@example.net",)
    assert OutboxView(tmp_path / "data").wait_state(reply.queue_id, "done")["attempts"] == 1


def test_a_sender_address_that_is_not_utf8_is_relayed_byte_for_byte(
    tmp_path: Path, relay: ServiceThread, upstream: CaptureServer
) -> None:
    """Undecodable text is text: stored, answered 250, relayed with the same bytes."""
    code, _ = raw_transaction(
        relay.port,
        b"caf\xe9@example.net",
        b"someone@example.net",
        compose(subject="Latin-1 sender"),
    )
    assert code == 250

    (got,) = upstream.wait_for(1)
    assert got.mail_from.encode("utf-8", "surrogateescape") == b"caf\xe9@example.net"


def test_odd_messages_in_one_group_commit_never_fail_the_innocent_ones(
    relay: ServiceThread, upstream: CaptureServer
) -> None:
    """120 senders at once, some with an undecodable subject or a non-UTF-8 address: all 250,
    all relayed."""

    def one(i: int) -> int:
        to, sender = ["someone@example.net"], "someone@example.org"
        if i % 10 == 3:
            message = compose(subject="=?utf-7?q?+3Xe0?=")
            return send(relay.port, message, mail_from=sender, rcpt_tos=to).code
        if i % 10 == 7:
            body = compose(subject=f"innocent {i}")
            return raw_transaction(relay.port, b"x\xff@example.net", to[0].encode(), body)[0]
        message = compose(subject=f"innocent {i}")
        return send(relay.port, message, mail_from=sender, rcpt_tos=to).code

    with ThreadPoolExecutor(max_workers=24) as pool:
        codes = list(pool.map(one, range(120)))

    assert codes == [250] * 120
    assert len(upstream.wait_for(120, timeout=30)) == 120
