"""End to end: no loop, no smuggled message, no smuggled header field.

A message that has looped through 30 servers is refused; a rule never sends mail back to
mail2alert; only ``<CRLF>.<CRLF>`` ends DATA, on the way in and on the way out; what mail2alert
writes into a header stays in its field; and a relayed message reaches the upstream with its
own bytes, line ends made CRLF only where the wire needs them and never so as to start a field.
Text from the outside (a commit author's address, a relayed recipient) reaches no log line
with a control character that a terminal would obey.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import logging
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.testing import Captured, CaptureServer
from mail2alert.transports.smtp import DATA_BLOCK
from tests.helpers import Relay, compose, example_managers, relay, strip_received, wait_until

#: A gocd manager whose rules send mail to its own address: with others for BREAKS, alone
#: for FIXED. ``pipelines.any`` needs no pipeline groups, so nothing is held.
GOCD: dict[str, Any] = {
    "name": "gocd",
    "messages-we-want": {"to": "mail2alert@example.com"},
    "rules": [
        {
            "actions": ["mailto:cat@example.com", "mailto:Mail2Alert@Example.com"],
            "filter": {"events": ["BREAKS"], "function": "pipelines.any"},
        },
        {
            "actions": ["mailto:mail2alert@example.com"],
            "filter": {"events": ["FIXED"], "function": "pipelines.any"},
        },
    ],
}

#: Neither sender nor recipient is wanted by a manager: relayed unchanged.
STRANGER = {"mail_from": "someone@example.net", "rcpt_tos": ["someone@example.org"]}

BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@pytest.fixture
def mail2alert(tmp_path: Path, upstream: CaptureServer) -> Iterator[Relay]:
    with relay(tmp_path, upstream, [GOCD, *example_managers("mail")]) as running:
        yield running


def parsed(data: bytes) -> email.message.EmailMessage:
    """``data`` as a mail reader sees it: Python's parser, which, like most, takes a bare CR
    for a line end."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def field_names(data: bytes) -> list[str]:
    return [name.lower() for name in parsed(data)]


def with_hops(count: int) -> bytes:
    hops = [
        f"Received: from hop{i}.example.net by hop{i + 1}.example.net; "
        "Fri, 15 Mar 2024 16:31:40 +0000"
        for i in range(count)
    ]
    return compose(subject=f"{count} hops", headers=hops)


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


# -- loops ----------------------------------------------------------------------------------


def test_a_message_with_more_than_30_received_fields_is_refused_as_a_loop(
    mail2alert: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    reply = mail2alert.send(with_hops(31), **STRANGER)

    assert (reply.code, reply.text.split()[0]) == (554, "5.4.6")
    assert mail2alert.outbox.queue_ids() == []
    sentinel = mail2alert.sentinel()
    assert mail2alert.upstream.messages == [sentinel]
    (logged,) = warnings_with(caplog, "looping")
    assert "31 Received: fields" in logged
    assert "from=<someone@example.net>" in logged


def test_a_message_with_30_received_fields_is_taken(mail2alert: Relay) -> None:
    original = with_hops(30)

    reply = mail2alert.send(original, **STRANGER)

    assert reply.code == 250
    (got,) = mail2alert.upstream.wait_for(1)
    assert strip_received(got.data)[1] == original


def test_a_rule_naming_mail2alerts_own_address_sends_only_to_the_others(
    mail2alert: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Sent upstream, mail to mail2alert@ would come back to mail2alert and round again."""
    stage = compose(subject="Stage [app/6/build/1] is broken", to="mail2alert@example.com")

    reply = mail2alert.send(stage, rcpt_tos=["mail2alert@example.com"])

    (got,) = mail2alert.upstream.wait_for(1)
    assert got.rcpt_tos == ("cat@example.com",)
    assert parsed(got.data)["to"] == "cat@example.com"
    message = mail2alert.outbox.message(reply.queue_id)
    assert message is not None
    assert message["outcome"] == "deliver"
    assert "Mail2Alert@Example.com left out (mail2alert's own address)" in message["reason"]
    (logged,) = warnings_with(caplog, "would come back")
    assert logged.startswith(f"{reply.queue_id}: not sent to Mail2Alert@Example.com")


def test_a_rule_naming_only_mail2alerts_own_address_drops_the_mail_and_says_why(
    mail2alert: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    stage = compose(subject="Stage [app/6/build/1] is fixed", to="mail2alert@example.com")

    reply = mail2alert.send(stage, rcpt_tos=["mail2alert@example.com"])

    assert reply.code == 250
    message = mail2alert.outbox.message(reply.queue_id)
    assert message is not None
    assert message["outcome"] == "drop"
    assert message["reason"] == (
        "1 of 2 rules matched; mail2alert@example.com left out (mail2alert's own address):"
        " no one left to send to"
    )
    sentinel = mail2alert.sentinel()
    assert mail2alert.upstream.messages == [sentinel]
    assert len(warnings_with(caplog, "would come back")) == 1


# -- the end of DATA ------------------------------------------------------------------------

#: Ends of DATA that some servers take and SMTP does not (SMTP smuggling).
FALSE_ENDS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
}

SMUGGLED = (
    b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"From: ceo@example.org\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)


def send_raw_data(port: int, data: bytes) -> tuple[tuple[int, bytes], int]:
    """One transaction whose DATA is ``data`` as it is, then the real end line: mail2alert's
    reply to DATA, and the code of its reply to QUIT (which a second transaction, split off
    the first, would answer with a reply of its own first)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(str(STRANGER["mail_from"]))[0] == 250
        assert client.rcpt("someone@example.org")[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(data + b"\r\n.\r\n")
        reply = client.getreply()
        return reply, client.docmd("QUIT")[0]


@pytest.mark.parametrize("false_end", FALSE_ENDS.values(), ids=FALSE_ENDS.keys())
def test_only_crlf_dot_crlf_ends_data_on_the_way_in_and_on_the_way_out(
    mail2alert: Relay, false_end: bytes
) -> None:
    data = compose(subject="one message", body="first part") + false_end + SMUGGLED

    (code, text), quit_code = send_raw_data(mail2alert.port, data)

    assert (code, quit_code) == (250, 221)
    queue_id = text.decode().rsplit(" ", 1)[-1]
    assert mail2alert.outbox.queue_ids() == [queue_id]
    (got,) = mail2alert.upstream.wait_for(1)
    assert got.rcpt_tos == ("someone@example.org",)
    assert b"RCPT TO:<victim@example.org>" in got.data
    assert b"smuggled body" in got.data
    assert BARE_LINE_END.search(got.data) is None
    sentinel = mail2alert.sentinel()
    assert mail2alert.upstream.messages == [got, sentinel]


# -- header fields ----------------------------------------------------------------------------


def upstream_copy(mail2alert: Relay, original: bytes, **envelope: Any) -> Captured:
    reply = mail2alert.send(original, **envelope)
    assert reply.code == 250
    (got,) = mail2alert.upstream.wait_for(1)
    return got


@pytest.mark.parametrize(
    "envelope",
    [STRANGER, {"mail_from": "go@example.com"}],
    ids=["relayed", "routed"],
)
def test_a_quoted_sender_with_a_cr_arrives_upstream_as_its_own_address(
    mail2alert: Relay, envelope: dict[str, Any]
) -> None:
    """The reported bug: the CR became a line end upstream, cut the From: field after the
    quote, and the mail arrived from victim@example.org."""
    sender = str(envelope["mail_from"])
    original = compose(sender=f'"victim@example.org\r" <{sender}>', subject="Server Backup")

    got = upstream_copy(mail2alert, original, **envelope)

    (address,) = parsed(got.data)["from"].addresses
    assert address.addr_spec == sender


def test_a_bare_cr_in_a_relayed_header_starts_no_field(mail2alert: Relay) -> None:
    """The reported bug: ``Subject: hello<CR>Bcc: ...`` arrived upstream with a Bcc field."""
    original = compose(subject="hello\rBcc: victim@example.org")

    got = upstream_copy(mail2alert, original, **STRANGER)

    assert "bcc" not in field_names(got.data)
    assert b"victim@example.org" in got.data


@pytest.mark.parametrize("lines", [0, DATA_BLOCK // 100 + 1], ids=["small", "sent-in-blocks"])
def test_a_relayed_message_keeps_its_bytes_but_for_the_line_ends_the_wire_needs(
    mail2alert: Relay, lines: int
) -> None:
    """A bare CR in the header is folded (a continuation line: no field starts there); in the
    body bare CRs and LFs become CRLF, as the wire requires; nothing else changes."""
    head = b"From: Someone <someone@example.net>\r\nTo: someone@example.org\r\nSubject: hello"
    filler = b"x" * 98 + b"\r\n"
    original = (
        head
        + b"\rBcc: victim@example.org\r\nMessage-ID: <kept@example.net>\r\n\r\n"
        + b"a bare LF\nand a bare CR\r.a dot line\r\n"
        + filler * lines
    )

    got = upstream_copy(mail2alert, original, **STRANGER)

    assert strip_received(got.data)[1] == (
        head
        + b"\r\n Bcc: victim@example.org\r\nMessage-ID: <kept@example.net>\r\n\r\n"
        + b"a bare LF\r\nand a bare CR\r\n.a dot line\r\n"
        + filler * lines
    )


def test_a_helo_name_with_a_cr_stays_inside_the_received_field(mail2alert: Relay) -> None:
    """The one field mail2alert writes from what a client says: its EHLO name."""
    with smtplib.SMTP("127.0.0.1", mail2alert.port, timeout=30) as client:
        # Commands by hand: smtplib's mail() would say EHLO again, with its own name.
        client.send(b"EHLO client.test\rBcc: victim@example.org\r\n")
        assert client.getreply()[0] == 250
        assert client.docmd("MAIL", "FROM:<someone@example.net>")[0] == 250
        assert client.docmd("RCPT", "TO:<someone@example.org>")[0] == 250
        assert client.data(compose(subject="helo"))[0] == 250

    (got,) = mail2alert.upstream.wait_for(1)
    assert field_names(got.data)[:2] == ["received", "from"]
    assert "bcc" not in field_names(got.data)


def test_a_committer_address_with_control_characters_is_not_mailed_nor_logged_raw(
    tmp_path: Path, upstream: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Git author address is whatever the commit's author wrote: ``ESC c`` resets the
    operator's terminal. Such an address is no mail address."""
    evil = "\x1bc\x08\x08eve@example.com"
    body = (
        "See details: https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1\n\n"
        "-- CHANGES --\n\nGit: https://git.example.com/app.git\n"
        f"revision: 1f5557f8a1c3, modified by Eve <{evil}> on 2024-03-15\n"
        "harmless commit\n\nSent by Go on behalf of ci-robot\n"
    )
    manager = {
        "name": "gocd",
        "messages-we-want": {"to": "mail2alert@example.com"},
        "rules": [
            {
                "actions": ["committers:", "mailto:team@example.com"],
                "filter": {"function": "pipelines.any"},
            }
        ],
    }
    caplog.set_level(logging.INFO)
    with relay(tmp_path, upstream, [manager]) as mail2alert:
        mail2alert.send(gocd_stage_mail(body=body), rcpt_tos=["mail2alert@example.com"])
        (got,) = upstream.wait_for(1)
    assert got.rcpt_tos == ("team@example.com",)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("mail2alert")]
    assert [line for line in ours if "\x1b" in line or "\x08" in line] == []


def test_a_relayed_recipient_reaches_the_delivery_log_line_escaped(
    tmp_path: Path, upstream: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """C1 controls (U+009B is CSI) and line separators may be in an SMTPUTF8 address; the
    delivery line shows them escaped."""
    rcpt = "ops\u009b2J\u2028x@example.net"
    caplog.set_level(logging.INFO)
    nobody = {
        "name": "mail",
        "messages-we-want": {"to": "nobody@example.com"},
        "rules": [
            {
                "actions": ["mailto:a@example.com"],
                "filter": {"function": "mail.in_subject", "args": ["x"]},
            }
        ],
    }
    with relay(tmp_path, upstream, [nobody]) as mail2alert:  # relayed unchanged
        mail2alert.send(compose(), rcpt_tos=[rcpt], mail_options=["SMTPUTF8"])
        (got,) = upstream.wait_for(1)
        wait_until(
            lambda: any("delivered to" in r.getMessage() for r in caplog.records),
            what="the delivery line",
        )
    assert got.rcpt_tos == (rcpt,)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("mail2alert")]
    assert [line for line in ours if "\u009b" in line or "\u2028" in line] == []
    assert any("ops\\x9b2J\\u2028x@example.net" in line for line in ours)
