"""End to end: what a client sends cannot corrupt the envelope, the outbox or the log.

Control characters in an address are refused at MAIL or RCPT; what a full disk, a lack of file
descriptors or a hostile client does is answered with a 4xx the sender understands, and logged
once, escaped.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mail2alert.errors import OutboxError, OutboxFull
from mail2alert.outbox import Outbox
from mail2alert.server import SPOOL_THRESHOLD
from mail2alert.testing import CaptureServer, gocd_stage_mail
from tests.helpers import Relay, body_of, compose, example_managers, relay, strip_received


@pytest.fixture
def mail2alert(tmp_path: Path, upstream: CaptureServer) -> Iterator[Relay]:
    with relay(tmp_path, upstream, example_managers("mail")) as running:
        yield running


@contextlib.contextmanager
def session(port: int) -> Iterator[smtplib.SMTP]:
    """An smtplib session to mail2alert after EHLO."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        client.ehlo("client.test")
        yield client


CONTROLS = {"nul": "\x00", "escape": "\x1b", "delete": "\x7f", "tab": "\t", "bell": "\x07"}


# -- control characters in addresses ---------------------------------------------------------


@pytest.mark.parametrize("control", CONTROLS.values(), ids=CONTROLS.keys())
def test_a_control_character_in_the_sender_address_is_refused_with_501_5_1_7(
    mail2alert: Relay, control: str
) -> None:
    """MAIL FROM with a control character anywhere in the address is a syntax error."""
    with session(mail2alert.port) as client:
        code, text = client.docmd("MAIL", f"FROM:<go{control}x@example.com>")

    assert (code, text) == (501, b"5.1.7 Bad sender address syntax")


@pytest.mark.parametrize("control", CONTROLS.values(), ids=CONTROLS.keys())
def test_a_control_character_in_a_recipient_address_is_refused_with_501_5_1_3(
    mail2alert: Relay, control: str
) -> None:
    """RCPT TO with a control character anywhere in the address is a syntax error."""
    with session(mail2alert.port) as client:
        assert client.mail("go@example.com")[0] == 250
        code, text = client.docmd("RCPT", f"TO:<admin@exa{control}mple.com>")

    assert (code, text) == (501, b"5.1.3 Bad recipient address syntax")


def test_a_bare_carriage_return_in_an_address_is_refused(mail2alert: Relay) -> None:
    """A CR that does not end the line is a control character like any other."""
    with session(mail2alert.port) as client:
        client.send(b"MAIL FROM:<go\r@example.com>\r\n")
        code, text = client.getreply()

    assert (code, text) == (501, b"5.1.7 Bad sender address syntax")


def test_a_nul_byte_after_the_address_is_refused_too(mail2alert: Relay) -> None:
    """A control character in the parameters of MAIL is refused like one in the address."""
    with session(mail2alert.port) as client:
        code, _ = client.docmd("MAIL", "FROM:<go@example.com> BODY=8BITMIME\x00")

    assert code == 501


def test_a_refused_recipient_is_not_delivered_and_the_others_are(mail2alert: Relay) -> None:
    """The session goes on after a refused RCPT; only the accepted recipients get the mail."""
    message = compose(subject="nobody wants this", sender="someone@example.net")
    with session(mail2alert.port) as client:
        client.mail("someone@example.net")
        assert client.docmd("RCPT", "TO:<bad\x00@example.net>")[0] == 501
        assert client.rcpt("good@example.net")[0] == 250
        code, _ = client.data(message)

    assert code == 250
    (got,) = mail2alert.upstream.wait_for(1)
    assert got.rcpt_tos == ("good@example.net",)


def test_the_null_sender_is_accepted(mail2alert: Relay) -> None:
    """``MAIL FROM:<>`` (a bounce, a delivery report) is legitimate and queued."""
    with session(mail2alert.port) as client:
        assert client.docmd("MAIL", "FROM:<>")[0] == 250
        assert client.rcpt("someone@example.net")[0] == 250
        code, text = client.data(compose(subject="a bounce", sender="MAILER-DAEMON@example.net"))

    assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[-1]
    assert mail2alert.outbox.message(queue_id) is not None


def test_a_tab_between_the_address_and_its_parameters_is_accepted(mail2alert: Relay) -> None:
    """White space between the parts of MAIL is not part of the address."""
    with session(mail2alert.port) as client:
        code, _ = client.docmd("MAIL", "FROM:<go@example.com>\tBODY=8BITMIME")

    assert code == 250


# -- text that is not valid Unicode ---------------------------------------------------------


def wanting_every_sender() -> dict[str, Any]:
    """The example's mail manager, but wanting every mail to admin@example.com."""
    (manager,) = example_managers("mail")
    return {**manager, "messages-we-want": {"to": "admin@example.com"}}


def test_a_subject_that_decodes_to_lone_surrogates_is_queued_with_replacement_characters(
    mail2alert: Relay,
) -> None:
    """An encoded word that does not decode cleanly is stored as text with U+FFFD."""
    original = compose(subject="=?utf-7?q?+3Xe0?= Server Backup Failed")

    reply = mail2alert.send(original)

    assert reply.code == 250
    row = mail2alert.outbox.message(reply.queue_id)
    assert row is not None
    assert row["subject"] == "\ufffd\ufffd Server Backup Failed"
    got = mail2alert.upstream.wait_for(1)
    assert b"Subject: =?utf-7?q?+3Xe0?= Server Backup Failed\r\n" in got[0].data


def test_a_sender_address_of_non_utf8_bytes_is_accepted_and_routed(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """A routed mail whose envelope sender is not UTF-8 gets that sender in From:, byte for
    byte."""
    message = compose(subject="Server Backup Failed", to="admin@example.com")
    with (
        relay(tmp_path, upstream, [wanting_every_sender()]) as mail2alert,
        session(mail2alert.port) as client,
    ):
        client.send(b"MAIL FROM:<caf\xe9@example.com>\r\n")
        assert client.getreply()[0] == 250
        assert client.rcpt("admin@example.com")[0] == 250
        code, text = client.data(message)
        assert code == 250, text
        got = upstream.wait_for(1)

    assert got[0].rcpt_tos == ("sys@example.com", "op@example.com")
    assert b"\r\nFrom: caf\xe9@example.com\r\n" in got[0].data


# -- a full disk ------------------------------------------------------------------------------


def failing_put(error: OutboxError) -> Callable[[Outbox, Any], Any]:
    def put(self: Outbox, batch: Any) -> Any:
        raise error

    return put


def test_a_message_the_full_disk_cannot_take_gets_452_4_3_1(
    mail2alert: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the outbox is full, the sender is told our storage is short, and retries."""
    full = OutboxFull("cannot commit to the outbox: database or disk is full")
    with monkeypatch.context() as patched:
        patched.setattr(Outbox, "put", failing_put(full))
        reply = mail2alert.send(compose(subject="Server Backup Failed"))

    assert (reply.code, reply.text) == (452, "4.3.1 Insufficient system storage, try again later")


def test_a_message_the_full_disk_cannot_take_is_logged_once_as_an_error(
    mail2alert: Relay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One ERROR line names the queue id and the reason."""
    full = OutboxFull("cannot commit to the outbox: database or disk is full")
    with monkeypatch.context() as patched:
        patched.setattr(Outbox, "put", failing_put(full))
        mail2alert.send(compose(subject="Server Backup Failed"))

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "not queued" in errors[0].getMessage()
    assert "disk is full" in errors[0].getMessage()


def test_any_other_outbox_failure_still_gets_451_4_3_0(
    mail2alert: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a full disk answers 452; every other failure to commit is a 451."""
    with monkeypatch.context() as patched:
        patched.setattr(Outbox, "put", failing_put(OutboxError("disk I/O error")))
        reply = mail2alert.send(compose(subject="Server Backup Failed"))

    assert reply.code == 451
    assert reply.text.startswith("4.3.0 ")


# -- what a client sent, in the log -----------------------------------------------------------


#: The loggers of the SMTP intake: aiosmtpd's and the server's.
INTAKE_LOGGERS = ("mail.log", "mail2alert.server")


def control_characters_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The intake's log messages that hold a C0/C1 control or an undecodable byte."""
    bad = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
    return [
        r.getMessage()
        for r in caplog.records
        if r.name in INTAKE_LOGGERS and bad.search(r.getMessage())
    ]


def test_an_unknown_command_with_an_escape_sequence_is_logged_escaped(
    mail2alert: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """ESC reaches the log as the four characters ``\\x1b``, never as the terminal's command."""
    with session(mail2alert.port) as client:
        client.send(b"\x1b[2JOOPS\r\n")
        assert client.getreply()[0] == 500

    assert control_characters_in(caplog) == []
    assert any("\\x1b[2JOOPS" in r.getMessage() for r in caplog.records)


def test_an_unknown_command_with_a_bare_carriage_return_is_logged_escaped(
    mail2alert: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A CR in the middle of a line cannot overwrite the log line it is in."""
    with session(mail2alert.port) as client:
        client.send(b"NO\rOP\r\n")
        assert client.getreply()[0] == 500

    assert control_characters_in(caplog) == []
    assert any("NO\\x0dOP" in r.getMessage() for r in caplog.records)


def test_helo_names_and_addresses_are_logged_escaped(
    tmp_path: Path, upstream: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A session of control characters and non-UTF-8 bytes leaves none of them in the log."""
    caplog.set_level(logging.DEBUG)
    with (
        relay(tmp_path, upstream, [wanting_every_sender()]) as mail2alert,
        smtplib.SMTP("127.0.0.1", mail2alert.port, timeout=30) as client,
    ):
        client.send(b"EHLO client\x1b[31m\x9b.test\r\n")
        assert client.getreply()[0] == 250
        client.send(b"MAIL FROM:<caf\xe9@example.com>\r\n")
        assert client.getreply()[0] == 250
        client.send(b"RCPT TO:<admin\xff@example.com>\r\n")
        assert client.getreply()[0] == 250
        code, text = client.data(compose(subject="=?utf-8?q?=1B[31m_Server_Backup?="))
        assert code == 250, text
        upstream.wait_for(1)

    assert control_characters_in(caplog) == []
    assert any("from=<caf\\xe9@example.com>" in r.getMessage() for r in caplog.records)


def test_help_lists_only_the_commands_offered(mail2alert: Relay) -> None:
    """AUTH is not offered without TLS, so HELP does not list it."""
    with session(mail2alert.port) as client:
        code, text = client.docmd("HELP")

    assert code == 250
    assert text == b"Supported commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"


def test_help_for_auth_answers_as_for_a_command_not_offered(mail2alert: Relay) -> None:
    """``HELP AUTH`` gets the 501 of an unknown command, not AUTH's syntax."""
    with session(mail2alert.port) as client:
        code, text = client.docmd("HELP", "AUTH")

    assert code == 501
    assert b"AUTH" not in text


# -- big messages ---------------------------------------------------------------------------


def big_mail(size: int) -> bytes:
    """A plain mail of ``size`` bytes or more, with dot-started lines for transparency."""
    block = b".a line that starts with a dot\r\n" + b"an ordinary line.\r\n" * 6
    head = compose(subject="a big report", sender="someone@example.net", body="")
    return head + block * ((size - len(head)) // len(block) + 1)


def test_a_message_bigger_than_the_spool_threshold_is_relayed_byte_for_byte(
    mail2alert: Relay,
) -> None:
    """DATA spooled to disk as it arrives comes out unchanged, dots and all."""
    original = big_mail(3 * SPOOL_THRESHOLD)

    reply = mail2alert.send(original, mail_from="someone@example.net")

    assert reply.code == 250
    (got,) = mail2alert.upstream.wait_for(1)
    assert strip_received(got.data)[1] == original


def test_a_big_stage_mail_is_routed_and_rewritten_with_its_body_intact(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """A GoCD mail bigger than what routing reads of it is routed by its subject as usual."""
    manager = {
        "name": "gocd",
        "messages-we-want": {"to": "mail2alert@example.com"},
        "rules": [
            {
                "actions": ["mailto:cat@example.com"],
                "filter": {"events": ["BREAKS"], "function": "pipelines.any"},
            }
        ],
    }
    changes = "revision: 1f5557f8a1c3, modified by Jane Doe\nFix a test.\n" * 40_000
    original = gocd_stage_mail(body=f"See details: https://ci.example.com/x\n\n{changes}")
    with relay(tmp_path, upstream, [manager]) as mail2alert:
        reply = mail2alert.send(original, rcpt_tos=["mail2alert@example.com"])
        (got,) = upstream.wait_for(1)

    assert reply.code == 250
    assert got.rcpt_tos == ("cat@example.com",)
    assert body_of(got.data) == body_of(original)


def test_a_message_over_the_size_limit_is_refused_with_552(mail2alert: Relay) -> None:
    """aiosmtpd's 32 MiB limit still holds, and what was read is not kept."""
    line = b"x" * 998 + b"\r\n"
    too_big = line * (2**25 // len(line) + 1)

    with session(mail2alert.port) as client:
        client.mail("someone@example.net")
        client.rcpt("admin@example.com")
        assert client.docmd("DATA")[0] == 354
        client.send(too_big + b".\r\n")
        code, _ = client.getreply()

    assert code == 552
    assert mail2alert.outbox.query("SELECT id FROM messages") == []
