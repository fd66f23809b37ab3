"""End to end: mail that is odd, broken or huge is never refused and never lost.

Whatever the bytes, the sender gets a 250 and the message goes on: routed when a manager
wants it (with its body intact), relayed byte for byte when none does. Only a failure to make
the message durable answers 451, so the sender retries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mail2alert.config import Config
from mail2alert.errors import OutboxError
from mail2alert.managers.base import Context
from mail2alert.model import Alert
from mail2alert.outbox import Outbox
from mail2alert.testing import CaptureServer
from tests.helpers import (
    Relay,
    body_of,
    compose,
    example_managers,
    field_name,
    header_fields,
    relay,
    strip_received,
)


def mail_manager() -> dict[str, Any]:
    """The example's mail manager, plus a fallback so that every message it wants goes on."""
    (manager,) = example_managers("mail")
    return {**manager, "fallback": ["mailto:ops@example.com"]}


def non_utf8_body() -> bytes:
    message = compose(subject="latin-1 in a utf-8 mail", body="BODY\n")
    return message.replace(b"BODY", b"caf\xe9 \xff\xfe\x80 na\xefve\r\n\x00 a NUL too")


def broken_mime() -> bytes:
    lines = [
        b"From: Go <go@example.com>",
        b"To: admin@example.com",
        b"Subject: broken mime",
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="never-closed',
        b"Content-Transfer-Encoding: base64",
        b"",
        b"--never-closed",
        b"Content-Type: text/plain; charset=no-such-charset",
        b"Content-Transfer-Encoding: quoted-printable",
        b"",
        b"caf=E9 =ZZ a broken soft break=",
        b"--never-closed",
        b"Content-Type: text/plain",
        b"Content-Transfer-Encoding: base64",
        b"",
        b"!!! not base64 !!!",
        b"",
    ]
    return b"\r\n".join(lines)


def odd_encoded_words() -> bytes:
    subject = (
        "=?x-no-such-charset?Q?caf=E9?= =?koi8-r?B?8NLJ18XU?= =?utf-8?B?!!!?=\r\n"
        " =?iso-2022-jp?B?GyRCJDMkcyRLJEEkTxsoQg==?= =?utf-7?Q?+AOk-?= =?utf-8?Q?unfinished"
    )
    return compose(subject=subject, sender="=?bogus?Q?Go_Server?= <go@example.com>")


def huge_header() -> bytes:
    references = "\r\n ".join(f"<{i}.reference@ci.example.com>" for i in range(7000))
    message = compose(subject="a 200 kB header", headers=[f"References: {references}"])
    assert len(message) > 200_000
    return message


BAD_INPUTS = {
    "missing-subject": lambda: compose(subject=None),
    "non-utf8-8bit-body": non_utf8_body,
    "broken-mime": broken_mime,
    "odd-charset-encoded-words": odd_encoded_words,
    "200kB-header": huge_header,
}


@pytest.fixture
def mail2alert(tmp_path: Path, upstream: CaptureServer) -> Iterator[Relay]:
    with relay(tmp_path, upstream, [mail_manager()]) as running:
        yield running


def without(data: bytes, *names: str) -> list[bytes]:
    return [f for f in header_fields(data) if field_name(f) not in names]


@pytest.mark.parametrize("make", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_a_malformed_message_a_manager_wants_is_accepted_and_routed_with_its_body_intact(
    mail2alert: Relay, make: Any
) -> None:
    original: bytes = make()

    reply = mail2alert.send(original, mail_from="go@example.com", mail_options=["BODY=8BITMIME"])

    assert reply.code == 250
    (got,) = mail2alert.upstream.wait_for(1)
    assert got.rcpt_tos == ("ops@example.com",)
    _, rest = strip_received(got.data)
    ours = ("x-mail2alert-id", "x-mail2alert-rule")  # the history's queue id and rules
    assert without(rest, "from", "to", *ours) == without(original, "from", "to")
    assert body_of(got.data) == body_of(original)
    mail2alert.outbox.wait_state(reply.queue_id, "done")


@pytest.mark.parametrize("make", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_a_malformed_message_no_manager_wants_is_relayed_byte_for_byte(
    mail2alert: Relay, make: Any
) -> None:
    original: bytes = make()

    reply = mail2alert.send(
        original, mail_from="someone@example.net", mail_options=["BODY=8BITMIME"]
    )

    assert reply.code == 250
    (got,) = mail2alert.upstream.wait_for(1)
    assert got.mail_from == "someone@example.net"
    assert got.rcpt_tos == ("admin@example.com",)
    assert strip_received(got.data)[1] == original


def raising_rules(config: Config) -> Config:
    """``config`` with every rule predicate replaced by one that raises (a bug in routing)."""

    def broken(alert: Alert, context: Context) -> Any:
        raise RuntimeError("a bug in a rule function")

    managers = tuple(
        replace(
            m,
            manager=replace(
                m.manager, rules=tuple(replace(r, predicate=broken) for r in m.manager.rules)
            ),
        )
        for m in config.managers
    )
    return replace(config, managers=managers)


def test_a_message_whose_routing_raises_is_relayed_unchanged_and_the_error_logged(
    tmp_path: Path, upstream: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    original = compose(subject="Server Backup Failed")

    with relay(tmp_path, upstream, [mail_manager()], adjust=raising_rules) as mail2alert:
        reply = mail2alert.send(original, mail_from="go@example.com")
        (got,) = upstream.wait_for(1)

    assert reply.code == 250
    assert got.mail_from == "go@example.com"
    assert got.rcpt_tos == ("admin@example.com",)
    assert strip_received(got.data)[1] == original
    (record,) = [r for r in caplog.records if "routing failed" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert reply.queue_id in record.getMessage()
    assert record.exc_info is not None
    assert "a bug in a rule function" in str(record.exc_info[1])


def test_a_message_that_cannot_be_committed_gets_451_and_is_not_delivered(
    mail2alert: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_put(self: Outbox, batch: Any) -> Any:
        raise OutboxError("cannot commit to the outbox: disk I/O error")

    with monkeypatch.context() as patched:
        patched.setattr(Outbox, "put", failing_put)
        reply = mail2alert.send(compose(subject="Server Backup Failed"))

    assert reply.code == 451
    assert reply.text.startswith("4.3.0")
    sentinel = mail2alert.sentinel()
    assert mail2alert.upstream.messages == [sentinel]
    assert len(mail2alert.outbox.queue_ids()) == 1
