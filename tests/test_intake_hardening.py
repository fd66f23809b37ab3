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
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mail2alert.errors import OutboxError, OutboxFull
from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.outbox import Outbox
from mail2alert.session import SPOOL_THRESHOLD, SessionGate
from mail2alert.testing import CaptureServer, free_port
from tests.helpers import (
    Relay,
    Reply,
    body_of,
    compose,
    example_managers,
    listening,
    relay,
    send,
    strip_received,
    wait_until,
    write_config,
)


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
        client.send(b"MAIL FROM:<caf\xe9@example.com> SMTPUTF8\r\n")
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
        client.send(b"MAIL FROM:<caf\xe9@example.com> SMTPUTF8\r\n")
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
    assert mail2alert.outbox.queue_ids() == []


# -- file descriptors -------------------------------------------------------------------------


def test_a_session_on_a_descriptor_below_the_ceiling_is_admitted() -> None:
    """The gate keeps 64 descriptors of 1024 (a quarter of a small limit) for the rest."""
    gate = SessionGate(1024)

    assert gate.ceiling == 960
    assert gate.admits(959)
    assert not gate.admits(960)
    assert SessionGate(128).ceiling == 96


def test_refusals_are_logged_once_until_a_session_is_admitted_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One ERROR for a run of refusals, one WARNING when sessions are served again."""
    gate = SessionGate(128)

    refused = [gate.admits(fd) for fd in (100, 101, 97, 99)]
    admitted = gate.admits(10)
    again = gate.admits(120)

    assert refused == [False] * 4
    assert admitted
    assert not again
    levels = [r.levelname for r in caplog.records if r.name == "mail2alert.server"]
    assert levels == ["ERROR", "WARNING", "ERROR"]
    assert "4 refused" in caplog.records[1].getMessage()


def test_without_a_limit_every_session_is_admitted() -> None:
    """RLIMIT_NOFILE unlimited: no ceiling."""
    assert SessionGate(None).admits(10**6)


#: ``mail2alert serve`` with RLIMIT_NOFILE lowered to 128 before anything is opened.
LOW_FD_SERVE = (
    "import resource, sys\n"
    "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))\n"
    "from mail2alert.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@contextlib.contextmanager
def serving_with_128_descriptors(tmp_path: Path, upstream: CaptureServer) -> Iterator[Any]:
    """``mail2alert serve`` (one intake process) allowed 128 open files; yields (port, log)."""
    port = free_port()
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=example_managers("mail"),
        local=f"127.0.0.1:{port}",
    )
    path.write_text(path.read_text(encoding="utf-8") + "intake-workers: 1\n", encoding="utf-8")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", LOW_FD_SERVE, "serve", "--config", str(path)],
            stdout=log,
            stderr=log,
            cwd=tmp_path,
        )
    try:
        wait_until(lambda: proc.poll() is not None or listening(port), what="mail2alert up")
        assert proc.poll() is None, log_path.read_text(encoding="utf-8")
        yield port, log_path
    finally:
        proc.terminate()
        proc.wait(30)


def logged(log_path: Path, text: str) -> str:
    """The whole log once ``text`` is in it, else ''."""
    log = log_path.read_text(encoding="utf-8")
    return log if text in log else ""


def sent_when_served(port: int) -> Reply | None:
    """The DATA reply, or None while the session is still told 421."""
    try:
        return send(port, compose(subject="after the storm"))
    except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected):
        return None


def greeting(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    return sock.recv(200)


def fill_until_refused(port: int, idle: list[socket.socket]) -> bytes:
    """Open idle sessions (kept in ``idle``) until one is not greeted with 220; its greeting."""
    for _ in range(128):  # bounded: the gate answers 421 before the limit of 128
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle.append(sock)
        answer = greeting(sock)
        if not answer.startswith(b"220"):
            return answer
    raise AssertionError("128 sessions were all greeted with 220")


def test_near_the_descriptor_limit_new_sessions_are_told_421_and_it_is_logged_once(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """Idle sessions fill the descriptors; the next ones get 421 4.3.2, and one ERROR line."""
    with serving_with_128_descriptors(tmp_path, upstream) as (port, log_path):
        idle: list[socket.socket] = []
        try:
            refused = [fill_until_refused(port, idle)]
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as more:
                    refused.append(greeting(more))
            log = wait_until(lambda: logged(log_path, "too many open files"), what="the error")
        finally:
            for sock in idle:
                sock.close()

    assert refused == [b"421 4.3.2 too many connections, try again later\r\n"] * 4
    assert log.count("too many open files") == 1
    assert " ERROR " in next(line for line in log.splitlines() if "too many open files" in line)


def test_once_idle_sessions_close_new_sessions_are_served_again(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """The 421 lasts only while descriptors are short: then mail is accepted as usual."""
    with serving_with_128_descriptors(tmp_path, upstream) as (port, _):
        idle: list[socket.socket] = []
        try:
            assert fill_until_refused(port, idle).startswith(b"421 ")
        finally:
            for sock in idle:
                sock.close()
        reply = wait_until(lambda: sent_when_served(port), what="a session served again")

    assert reply.code == 250
