"""End to end: the nasty mails of ``tests/data/nasty/`` sent over real SMTP.

Each file is a mail shaped like something seen in the wild (GoCD's own mixed line endings,
8-bit headers, NULs, broken encoded words, a 1 MiB line, a mail loop's Received: fields...).
Sent as GoCD sends, each has the outcome stated in :data:`CORPUS`: routed to its rule's
recipients with its body bytes intact, dropped by the manager that wanted it, or refused with
a 5xx reply and its enhanced code; sent by a sender no manager wants, each that is not refused
is relayed byte for byte, but for its lines over SMTP's 998 bytes, which are broken; over the
size limit, one is refused with ``552 5.3.4``.

Each file goes out as an SMTP client must send it (:func:`as_sent`: CRLF line ends; smtplib
dot-stuffs it): bare CR and LF as they stand in the files are for the in-process properties
(``tests/test_fuzz.py`` routes every file of the corpus raw) and for the DATA tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from mail2alert.config import Config
from mail2alert.message import LINE_LIMIT, RawMessage, fold_long_lines
from mail2alert.testing import Captured, CaptureServer
from tests.helpers import Relay, example_managers, relay, strip_received

CORPUS_DIR = Path(__file__).resolve().parent / "data" / "nasty"

#: A gocd manager that needs no GoCD data (the example's rules need pipeline groups), then
#: the example's mail manager as written.
GOCD: dict[str, Any] = {
    "name": "gocd",
    "messages-we-want": {"to": "mail2alert@example.com"},
    "rules": [
        {
            "actions": ["mailto:cat@example.com"],
            "filter": {"events": ["BREAKS", "FAILS"], "function": "pipelines.any"},
        }
    ],
}
TEAM = ("cat@example.com",)
OPS = ("sys@example.com", "op@example.com")
#: GoCD's envelope: the gocd manager takes mail to its address, the mail manager the rest.
TO_GOCD = "mail2alert@example.com"
TO_ADMIN = "admin@example.com"


@dataclass(frozen=True)
class Expected:
    """What mail2alert does with one corpus file sent from go@example.com to ``rcpt``."""

    rcpt: str
    routed_to: tuple[str, ...] = ()
    """The rule's recipients; empty: the manager that wants it drops it."""
    refused: str = ""
    """The reply's code and enhanced code when it is refused, whoever sends it."""
    long_lines: bool = False
    """It has lines over SMTP's 998 bytes: mail2alert takes it (as Postfix does) and breaks
    them on the way out, so the test's smarthost, which refuses a line over 1,000 bytes for
    good (as RFC 5321 lets it, and aiosmtpd does), takes it too."""


CORPUS: dict[str, Expected] = {
    # CRLF headers, LF body, a bare CR and no final newline: GoCD's own shape, and worse.
    "mixed-line-endings.eml": Expected(TO_GOCD, TEAM),
    # Sent as CRLF, the bare CR ends the Subject and the line after it ends the header.
    "bare-cr-in-header.eml": Expected(TO_ADMIN, OPS),
    "nul-bytes.eml": Expected(TO_ADMIN, OPS),
    "8bit-headers.eml": Expected(TO_ADMIN, OPS),
    "broken-encoded-words.eml": Expected(TO_ADMIN, OPS),
    "rfc2231-parameters.eml": Expected(TO_ADMIN, OPS),
    "nested-multipart-missing-boundary.eml": Expected(TO_ADMIN, OPS),
    "long-header-line.eml": Expected(TO_ADMIN, OPS, long_lines=True),
    # The line without a colon ends the header section; the subject before it still counts.
    "header-without-colon.eml": Expected(TO_ADMIN, OPS),
    "headers-only.eml": Expected(TO_ADMIN, OPS),
    "body-starts-with-from.eml": Expected(TO_ADMIN, OPS),
    "dot-lines.eml": Expected(TO_ADMIN, OPS),
    "utf7-utf16-encoded-words.eml": Expected(TO_ADMIN, OPS),
    "one-mib-line.eml": Expected(TO_ADMIN, OPS, long_lines=True),
    # Thirty Received: fields, the most a mail may have: a stage that failed, FAILS.
    "received-x30.eml": Expected(TO_GOCD, TEAM),
    # One more is a mail loop.
    "received-x31.eml": Expected(TO_GOCD, refused="554 5.4.6"),
    # No closing bracket: not a stage mail, so no event; the gocd manager drops it.
    "gocd-subject-mangled.eml": Expected(TO_GOCD),
    # Encoded words folded mid-verb decode to "... is broken": BREAKS.
    "gocd-subject-encoded-folded.eml": Expected(TO_GOCD, TEAM),
    # A 25-digit counter is no Java long: not a stage mail, dropped.
    "gocd-counter-overflow.eml": Expected(TO_GOCD),
    # An mbox "From " line first: no header field at all, so no subject; dropped.
    "mbox-from-line-first.eml": Expected(TO_ADMIN),
    # The first Subject: counts; the second From: and To: are removed.
    "repeated-fields.eml": Expected(TO_ADMIN, OPS),
}

ROUTED = [name for name, e in CORPUS.items() if e.routed_to]
DROPPED = [name for name, e in CORPUS.items() if not e.routed_to and not e.refused]
REFUSED = [name for name, e in CORPUS.items() if e.refused]
ACCEPTED = sorted(set(CORPUS) - set(REFUSED))

_LINE_END = re.compile(rb"\r\n|\r|\n")


def as_sent(data: bytes) -> bytes:
    """``data`` as smtplib sends it, transparency undone: CRLF line ends, ending in CRLF."""
    wire = _LINE_END.sub(b"\r\n", data)
    return wire if wire.endswith(b"\r\n") else wire + b"\r\n"


def corpus(name: str) -> bytes:
    """The file ``name`` as a client sends it."""
    return as_sent((CORPUS_DIR / name).read_bytes())


def delivered(name: str) -> bytes:
    """The file ``name`` as mail2alert sends it on: its long lines broken."""
    return fold_long_lines(corpus(name))


def other_fields(data: bytes) -> list[bytes]:
    """The raw header fields other than From: and To: (and the two that name the queue id
    and rules of a routed mail), in order."""
    ours = ("from", "to", "x-mail2alert-id", "x-mail2alert-rule")
    return [f.raw for f in RawMessage.parse(data).fields if f.name not in ours]


@pytest.fixture(scope="module")
def mail2alert(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One mail2alert for the whole corpus: each file names a stage of its own, so no file's
    notes or de-duplication touch another's."""
    with (
        CaptureServer() as upstream,
        relay(tmp_path_factory.mktemp("nasty"), upstream, [GOCD, *example_managers("mail")]) as r,
    ):
        yield r


def send_and_receive(mail2alert: Relay, name: str, **envelope: Any) -> tuple[str, Captured]:
    """Send the file ``name``; return its queue id and the one message that came out of it."""
    before = len(mail2alert.upstream.messages)
    reply = mail2alert.send(corpus(name), mail_options=["BODY=8BITMIME"], **envelope)
    assert reply.code == 250, f"{reply.code} {reply.text}"
    got = mail2alert.upstream.wait_for(before + 1)[before]
    mail2alert.outbox.wait_state(reply.queue_id, "done")
    assert (delivered(name) != corpus(name)) is CORPUS[name].long_lines
    assert max(map(len, got.data.split(b"\r\n"))) <= LINE_LIMIT
    return reply.queue_id, got


def test_the_corpus_has_a_stated_outcome_for_every_file_and_a_file_for_every_outcome() -> None:
    assert sorted(p.name for p in CORPUS_DIR.glob("*.eml")) == sorted(CORPUS)
    assert len(CORPUS) >= 12


@pytest.mark.parametrize("name", ROUTED)
def test_a_nasty_mail_a_rule_matches_is_routed_with_its_body_and_other_fields_intact(
    mail2alert: Relay, name: str
) -> None:
    sent = delivered(name)
    expected = CORPUS[name]

    queue_id, got = send_and_receive(
        mail2alert, name, mail_from="go@example.com", rcpt_tos=[expected.rcpt]
    )

    assert got.rcpt_tos == expected.routed_to
    received, rest = strip_received(got.data)
    assert queue_id.encode() in received
    assert RawMessage.parse(got.data).body == RawMessage.parse(sent).body
    assert got.data.endswith(RawMessage.parse(sent).body)
    assert other_fields(rest) == other_fields(sent)


@pytest.mark.parametrize("name", DROPPED)
def test_a_nasty_mail_its_manager_wants_but_no_rule_matches_is_dropped_after_a_250(
    mail2alert: Relay, name: str
) -> None:
    before = len(mail2alert.upstream.messages)

    reply = mail2alert.send(corpus(name), mail_from="go@example.com", rcpt_tos=[CORPUS[name].rcpt])

    assert reply.code == 250
    stored = mail2alert.outbox.message(reply.queue_id)
    assert stored is not None
    assert stored["outcome"] == "drop"
    assert mail2alert.outbox.items(reply.queue_id) == []
    sentinel = mail2alert.sentinel()
    assert mail2alert.upstream.messages[before:] == [sentinel]


@pytest.mark.parametrize("name", REFUSED)
@pytest.mark.parametrize("sender", ["go@example.com", "someone@example.net"])
def test_a_nasty_mail_that_is_refused_gets_its_5xx_and_enhanced_code_and_nothing_is_kept(
    mail2alert: Relay, name: str, sender: str
) -> None:
    before = len(mail2alert.upstream.messages)
    queued = mail2alert.outbox.queue_ids()

    reply = mail2alert.send(corpus(name), mail_from=sender, rcpt_tos=[CORPUS[name].rcpt])

    assert f"{reply.code} {reply.text}".startswith(CORPUS[name].refused)
    assert mail2alert.outbox.queue_ids() == queued
    sentinel = mail2alert.sentinel()
    assert mail2alert.upstream.messages[before:] == [sentinel]


@pytest.mark.parametrize("name", ACCEPTED)
def test_a_nasty_mail_no_manager_wants_is_relayed_byte_for_byte_but_its_long_lines_broken(
    mail2alert: Relay, name: str
) -> None:
    _, got = send_and_receive(
        mail2alert, name, mail_from="someone@example.net", rcpt_tos=["ops@example.net"]
    )

    assert got.mail_from == "someone@example.net"
    assert got.rcpt_tos == ("ops@example.net",)
    assert strip_received(got.data)[1] == delivered(name)


def smaller_than_a_mib(config: Config) -> Config:
    return replace(config, listener=replace(config.listener, max_message_size=512 * 1024))


def test_a_nasty_mail_over_the_size_limit_is_refused_with_552_5_3_4_and_nothing_is_kept(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    managers = [GOCD, *example_managers("mail")]
    with relay(tmp_path, upstream, managers, adjust=smaller_than_a_mib) as mail2alert:
        reply = mail2alert.send(corpus("one-mib-line.eml"), rcpt_tos=[TO_ADMIN])

        assert (reply.code, reply.text[:5]) == (552, "5.3.4")
        assert mail2alert.outbox.queue_ids() == []
        assert mail2alert.upstream.messages == [mail2alert.sentinel()]
