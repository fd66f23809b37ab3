"""End to end: smtplib -> mail2alert (in a thread) -> capture server, over real sockets.

The managers are those of examples/configuration.yml: its ``mail`` manager as written, and a
``gocd`` manager with rules that need no GoCD data (``pipelines.any`` and ``mail.in_subject``
with events), since pipeline groups are not fetched by these tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mail2alert.testing import CaptureServer
from tests.helpers import (
    Relay,
    addresses,
    body_of,
    compose,
    example_managers,
    field_name,
    header_fields,
    relay,
    strip_received,
)

#: A gocd manager written for these tests; the example's gocd rules need pipeline groups.
GOCD: dict[str, Any] = {
    "name": "gocd",
    "messages-we-want": {"to": "mail2alert@example.com"},
    "rules": [
        {
            "actions": ["mailto:cat@example.com", "mailto:dog@example.com"],
            "filter": {"events": ["BREAKS"], "function": "pipelines.any"},
        },
        {
            "actions": ["mailto:dog@example.com", "mailto:eel@example.com"],
            "filter": {
                "events": ["BREAKS", "FIXED"],
                "function": "mail.in_subject",
                "args": ["release"],
            },
        },
    ],
}


@pytest.fixture
def mail2alert(tmp_path: Path, upstream: CaptureServer) -> Iterator[Relay]:
    """mail2alert with the test's gocd manager first, then the example's mail manager."""
    with relay(tmp_path, upstream, [GOCD, *example_managers("mail")]) as running:
        yield running


def stage_mail(subject: str, *, sender: str = "Go <go@example.com>") -> bytes:
    return compose(subject=subject, sender=sender, to="mail2alert@example.com")


def without(data: bytes, *names: str) -> list[bytes]:
    return [f for f in header_fields(data) if field_name(f) not in names]


# -- the mail manager of the example ---------------------------------------------------------


@pytest.mark.parametrize(
    "subject", ["Server Backup Completed Successfully", "Server Backup Failed"]
)
def test_a_mail_from_the_wanted_sender_matching_the_rule_goes_to_its_recipients_in_order(
    mail2alert: Relay, subject: str
) -> None:
    mail2alert.send(compose(subject=subject), mail_from="go@example.com")

    (got,) = mail2alert.upstream.wait_for(1)
    assert got.rcpt_tos == ("sys@example.com", "op@example.com")
    assert addresses(got.data, "to") == ["sys@example.com", "op@example.com"]


@pytest.mark.parametrize(
    ("subject", "sender", "recipient"),
    [
        ("Low artifacts disk space warning message from Go Server at 10.0.0.5", "go", "admin"),
        ("[Lost Contact] Go agent host: agent-7.example.com", "go", "admin"),
        ("Go Email Notification", "go", "admin"),
        ("Stage [app/6/build/1] is fixed", "go", "mail2alert"),
        ("Stage [app/6/build/1] failed", "go", "mail2alert"),
        ("Deployment finished", "go", "mail2alert"),
    ],
)
def test_a_wanted_message_matching_no_rule_is_dropped_after_a_250(
    mail2alert: Relay, subject: str, sender: str, recipient: str
) -> None:
    reply = mail2alert.send(
        compose(subject=subject),
        mail_from=f"{sender}@example.com",
        rcpt_tos=[f"{recipient}@example.com"],
    )

    assert reply.code == 250
    message = mail2alert.outbox.message(reply.queue_id)
    assert message is not None
    assert message["outcome"] == "drop"
    assert mail2alert.outbox.items(reply.queue_id) == []
    sentinel = mail2alert.sentinel()
    assert mail2alert.upstream.messages == [sentinel]


def test_the_original_from_field_is_kept_with_its_display_name_when_it_names_the_sender(
    mail2alert: Relay,
) -> None:
    original = compose(sender='"Go Server (ci)" <Go@Example.com>')

    mail2alert.send(original, mail_from="go@example.com")

    (got,) = mail2alert.upstream.wait_for(1)
    assert got.mail_from == "go@example.com"
    from_fields = [f for f in header_fields(got.data) if field_name(f) == "from"]
    assert from_fields == [b'From: "Go Server (ci)" <Go@Example.com>']


def test_from_becomes_the_envelope_sender_when_the_original_names_another_address(
    mail2alert: Relay,
) -> None:
    mail2alert.send(compose(sender="CI Robot <robot@ci.example.com>"), mail_from="go@example.com")

    (got,) = mail2alert.upstream.wait_for(1)
    assert got.mail_from == "go@example.com"
    assert addresses(got.data, "from") == ["go@example.com"]
    assert b"robot@ci.example.com" not in got.data


def test_a_routed_mail_keeps_every_other_header_and_the_body_byte_for_byte(
    mail2alert: Relay,
) -> None:
    original = compose(
        subject="Server Backup\r\n  Completed Successfully",
        headers=[
            "X-Folded: first part\r\n\tsecond part",
            "x-lower-case-name:   odd   spacing  ",
            "Reply-To: go@example.com",
        ],
        body="line one\n.a line with a leading dot\n\ntrailing spaces   \n\n\n",
    )

    mail2alert.send(original, mail_from="go@example.com")

    (got,) = mail2alert.upstream.wait_for(1)
    _, rest = strip_received(got.data)
    # Beside From: and To:, only the two fields that name its queue id and rules are new.
    assert without(rest, "from", "to", "x-mail2alert-id", "x-mail2alert-rule") == without(
        original, "from", "to"
    )
    assert body_of(got.data) == body_of(original)


def test_a_routed_mail_gets_exactly_one_received_field_prepended(mail2alert: Relay) -> None:
    original = compose(headers=["Received: from earlier.example.com by ci.example.com"])

    reply = mail2alert.send(original, mail_from="go@example.com")

    (got,) = mail2alert.upstream.wait_for(1)
    received, rest = strip_received(got.data)
    assert reply.queue_id.encode() in received
    names = [field_name(f) for f in header_fields(got.data)]
    assert names.count("received") == 2
    assert [f for f in header_fields(rest) if field_name(f) == "received"] == [
        b"Received: from earlier.example.com by ci.example.com"
    ]


# -- the gocd manager -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "recipients"),
    [
        ("Stage [app/6/build/1] is broken", ["cat@example.com", "dog@example.com"]),
        ("Stage [app-release-1.2/12/deploy/2] is fixed", ["dog@example.com", "eel@example.com"]),
    ],
)
def test_a_stage_mail_goes_to_the_recipients_of_the_rules_its_event_and_filter_match(
    mail2alert: Relay, subject: str, recipients: list[str]
) -> None:
    mail2alert.send(stage_mail(subject), rcpt_tos=["mail2alert@example.com"])

    (got,) = mail2alert.upstream.wait_for(1)
    assert list(got.rcpt_tos) == recipients
    assert addresses(got.data, "to") == recipients


def test_recipients_of_several_matching_rules_are_deduplicated_in_first_seen_order(
    mail2alert: Relay,
) -> None:
    subject = "Stage [app-release-1.2/12/deploy/2] is broken"

    mail2alert.send(stage_mail(subject), rcpt_tos=["mail2alert@example.com"])

    (got,) = mail2alert.upstream.wait_for(1)
    expected = ["cat@example.com", "dog@example.com", "eel@example.com"]
    assert list(got.rcpt_tos) == expected
    assert addresses(got.data, "to") == expected


@pytest.mark.parametrize(
    ("first", "recipients"),
    [
        ("gocd", ["cat@example.com", "dog@example.com", "eel@example.com"]),
        ("mail", ["sys@example.com", "op@example.com"]),
    ],
)
def test_the_first_manager_in_configuration_order_that_wants_a_message_decides(
    tmp_path: Path, upstream: CaptureServer, first: str, recipients: list[str]
) -> None:
    managers = [GOCD, *example_managers("mail")]
    if first == "mail":
        managers.reverse()
    # Both managers want this message and both have a rule that matches it.
    message = stage_mail("Stage [server-backup-release/1/run/1] is broken")

    with relay(tmp_path, upstream, managers) as running:
        running.send(message, mail_from="go@example.com", rcpt_tos=["mail2alert@example.com"])
        (got,) = upstream.wait_for(1)

    assert list(got.rcpt_tos) == recipients
    assert len(upstream.messages) == 1


def test_messages_we_want_to_is_matched_case_insensitively(mail2alert: Relay) -> None:
    message = stage_mail("Stage [app/6/build/1] is broken")

    mail2alert.send(message, mail_from="someone@example.net", rcpt_tos=["MAIL2ALERT@Example.COM"])

    (got,) = mail2alert.upstream.wait_for(1)
    assert got.rcpt_tos == ("cat@example.com", "dog@example.com")


def test_messages_we_want_from_is_matched_case_insensitively(mail2alert: Relay) -> None:
    mail2alert.send(compose(), mail_from="GO@EXAMPLE.COM")

    (got,) = mail2alert.upstream.wait_for(1)
    assert got.rcpt_tos == ("sys@example.com", "op@example.com")


# -- what no manager takes ----------------------------------------------------------------


def test_a_message_no_manager_wants_is_relayed_with_its_envelope_and_bytes_unchanged(
    mail2alert: Relay,
) -> None:
    original = compose(
        sender="Someone <someone@example.net>",
        to="friend@example.org",
        subject="Server Backup (not from GoCD)",
        headers=["X-Folded: a\r\n b"],
        body="hello\n.dot line\n..two dots\nend   \n",
    )

    mail2alert.send(
        original,
        mail_from="someone@example.net",
        rcpt_tos=["friend@example.org", "other@example.org"],
    )

    (got,) = mail2alert.upstream.wait_for(1)
    assert got.mail_from == "someone@example.net"
    assert got.rcpt_tos == ("friend@example.org", "other@example.org")
    received, rest = strip_received(got.data)
    assert rest == original
    assert got.data == received + b"\r\n" + original


def test_recipients_the_deciding_manager_does_not_take_get_the_message_unchanged(
    mail2alert: Relay,
) -> None:
    original = stage_mail("Stage [app/6/build/1] is broken")

    mail2alert.send(
        original,
        mail_from="go@example.com",
        rcpt_tos=["mail2alert@example.com", "boss@example.com"],
    )

    got = mail2alert.upstream.wait_for(2)
    by_rcpts = {m.rcpt_tos: m for m in got}
    assert set(by_rcpts) == {("cat@example.com", "dog@example.com"), ("boss@example.com",)}
    copy = by_rcpts[("boss@example.com",)]
    assert copy.mail_from == "go@example.com"
    assert strip_received(copy.data)[1] == original


# -- SMTP extensions and the reply --------------------------------------------------------


def test_smtputf8_and_8bitmime_are_accepted_and_a_non_ascii_message_is_relayed_as_is(
    mail2alert: Relay,
) -> None:
    original = compose(
        sender="Jörg Müller <jörg@exämple.net>",
        to="Zoë <zoë@example.org>",
        subject="Größe: 3 GB – fertig ✓",
        body="Grüße aus Köln\nΕλληνικά, 日本語\n",
    )

    reply = mail2alert.send(
        original,
        mail_from="jörg@exämple.net",
        rcpt_tos=["zoë@example.org"],
        mail_options=["SMTPUTF8", "BODY=8BITMIME"],
    )

    assert reply.code == 250
    (got,) = mail2alert.upstream.wait_for(1)
    assert got.mail_from == "jörg@exämple.net"
    assert got.rcpt_tos == ("zoë@example.org",)
    assert strip_received(got.data)[1] == original


def test_a_non_ascii_mail_sent_with_8bitmime_is_routed_with_its_body_intact(
    mail2alert: Relay,
) -> None:
    original = compose(subject="Server Backup fertig – Größe 3 GB", body="Grüße, 日本語\n")

    mail2alert.send(original, mail_from="go@example.com", mail_options=["BODY=8BITMIME"])

    (got,) = mail2alert.upstream.wait_for(1)
    assert got.rcpt_tos == ("sys@example.com", "op@example.com")
    assert body_of(got.data) == body_of(original)
    assert "Subject: Server Backup fertig – Größe 3 GB".encode() in got.data


def test_the_250_reply_names_a_queue_id_that_is_in_the_outbox(mail2alert: Relay) -> None:
    reply = mail2alert.send(compose(subject="Server Backup Failed"), mail_from="go@example.com")

    assert reply.code == 250
    assert re.fullmatch(r"2\.0\.0 Ok: queued as [0-9A-F]{14}", reply.text)
    message = mail2alert.outbox.message(reply.queue_id)
    assert message is not None
    assert message["mail_from"] == "go@example.com"
    assert message["outcome"] == "deliver"
    assert message["subject"] == "Server Backup Failed"
