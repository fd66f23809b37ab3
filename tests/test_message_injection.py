"""What mail2alert writes into a header stays in its field, every address stays itself, and a
message's hops are counted as its Received: fields.

Pure functions only: the same behaviours over real sockets are in ``test_e2e_smuggling.py``.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mail2alert.actions import outgoing_for
from mail2alert.message import RawMessage, address_of, fold_bare_cr, received_header, rewrite
from mail2alert.model import Decision, Envelope

MESSAGE = b"From: Go <go@example.com>\r\nTo: mail2alert@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def names(data: bytes) -> list[str]:
    """The field names of ``data`` as Python's mail parser (which, like most mail readers,
    takes a bare CR for a line end) reads them."""
    return [name.lower() for name in email.message_from_bytes(data, policy=email.policy.default)]


def from_address(data: bytes) -> str:
    """The address of the From: field as Python's mail parser reads it."""
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    (address,) = parsed["from"].addresses
    return str(address.addr_spec)


# -- fields mail2alert writes ---------------------------------------------------------------


@pytest.mark.parametrize("line_break", ["\r\n", "\r", "\n"])
def test_a_line_break_in_the_written_from_value_starts_no_field(line_break: str) -> None:
    sender = f"go@example.com{line_break}Bcc: victim@example.org"

    out = rewrite(
        RawMessage.parse(MESSAGE), from_value=sender, to_addresses=("t@example.com",), prepend=b""
    )

    assert names(out) == ["from", "to", "subject"]


@pytest.mark.parametrize("line_break", ["\r\n", "\r", "\n"])
def test_a_line_break_in_an_added_field_starts_no_field(line_break: str) -> None:
    """In-Reply-To carries the Message-ID an earlier mail had, decoded: it may hold anything."""
    added = f"In-Reply-To: <a@x>{line_break}Bcc: victim@example.org".encode()

    out = rewrite(
        RawMessage.parse(MESSAGE),
        from_value=None,
        to_addresses=("t@example.com",),
        prepend=b"",
        add_fields=(added,),
    )

    assert names(out) == ["from", "to", "subject", "in-reply-to"]


def test_a_message_id_decoded_into_line_breaks_threads_a_mail_without_adding_a_field() -> None:
    """``=?utf-8?Q?<a@x>=0D=0ABcc:_victim@example.org?=`` decodes to a CRLF and a Bcc."""
    decision = Decision("deliver", "m#0", "1 of 1 rules matched", ("mailto:t@example.com",))

    (item,) = outgoing_for(
        decision,
        Envelope("go@example.com", ("m@example.com",)),
        RawMessage.parse(MESSAGE),
        b"",
        in_reply_to="<a@x>\r\nBcc: victim@example.org",
    )

    assert names(item.data) == ["from", "to", "subject", "in-reply-to", "references"]


@pytest.mark.parametrize(
    ("helo", "peer", "recipient"),
    [
        ("client\r\nBcc: victim@example.org", "127.0.0.1", "a@example.com"),
        ("client", "127.0.0.1\rBcc: victim@example.org", "a@example.com"),
        ("client", "127.0.0.1", "a@example.com>\nBcc: victim@example.org"),
    ],
)
def test_the_received_field_is_one_field_whatever_the_client_said(
    helo: str, peer: str, recipient: str
) -> None:
    trace = received_header(
        helo=helo, peer=peer, hostname="mx", queue_id="Q1", recipient=recipient, newline=b"\r\n"
    )

    assert names(trace + MESSAGE) == ["received", "from", "to", "subject"]


# -- addresses stay themselves ----------------------------------------------------------------


def test_a_cr_in_a_quoted_display_name_does_not_end_the_quote() -> None:
    """The reported bug: Python's parseaddr ends a quoted string at a CR, and so read this
    sender as victim@example.org."""
    assert address_of('"victim@example.org\r" <go@example.com>') == "go@example.com"


@pytest.mark.parametrize(
    "sender",
    [
        "go@example.com",
        '"victim@example.org"@evil.example',
        '"a <victim@example.org>, b"@evil.example',
        '"quoted \\" quote"@example.com',
        "caf\u00e9@example.com",
    ],
)
def test_an_envelope_sender_written_as_from_reads_back_as_the_same_address(sender: str) -> None:
    out = rewrite(
        RawMessage.parse(MESSAGE), from_value=sender, to_addresses=("t@example.com",), prepend=b""
    )

    assert address_of(RawMessage.parse(out).get("from")) == sender
    assert email.utils.parseaddr(RawMessage.parse(out).get("from"))[1] == sender


# -- a bare CR on the wire ------------------------------------------------------------------


def test_a_bare_cr_in_a_header_is_folded_so_that_it_starts_no_field() -> None:
    data = b"Subject: hi\rBcc: victim@example.org\r\nTo: a@example.com\r\n\r\nbody\r\n"

    out = fold_bare_cr(data)

    assert out == b"Subject: hi\r\n Bcc: victim@example.org\r\nTo: a@example.com\r\n\r\nbody\r\n"
    assert names(out) == ["subject", "to"]


def test_a_bare_cr_before_white_space_becomes_a_plain_fold() -> None:
    assert fold_bare_cr(b"Subject: a\r b\r\n\r\n") == b"Subject: a\r\n b\r\n\r\n"


def test_a_quoted_sender_with_a_cr_keeps_its_address_once_folded() -> None:
    """The reported bug, on the wire: made a CRLF, the CR cut the From: field after the
    quote, and a mail reader took victim@example.org for the sender."""
    data = b'From: "victim@example.org\r" <go@example.com>\r\nSubject: hi\r\n\r\nbody\r\n'

    assert from_address(fold_bare_cr(data)) == "go@example.com"


def test_a_bare_cr_in_the_body_is_left_to_the_wire() -> None:
    """In the body a CR may become a line end: it cannot start a field there."""
    data = b"Subject: hi\r\n\r\nbody\rBcc: victim@example.org\r\n"

    assert fold_bare_cr(data) is data


def test_a_message_without_a_bare_cr_in_its_header_is_returned_as_it_is() -> None:
    assert fold_bare_cr(MESSAGE) is MESSAGE


def test_a_bare_cr_that_ends_the_header_section_stays_where_mail2alert_saw_the_body() -> None:
    """``\\r\\r\\n`` is no field to mail2alert, so the body starts there; as a CRLF on the wire
    it is the blank line that ends the header section, the same place."""
    data = b"Subject: hi\r\n\rBcc: victim@example.org\r\n\r\nbody\r\n"

    assert fold_bare_cr(data) is data
    assert RawMessage.parse(data).header_end == len(b"Subject: hi\r\n")


_VALUES = st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r", b"\n"]), max_size=6)
_FIELDS = st.lists(_VALUES.map(lambda parts: b"S: " + b"".join(parts) + b"\r\n"), max_size=6)


@settings(max_examples=400)
@given(
    _FIELDS.map(b"".join),
    st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b"", b"x\r\n"]),
    _VALUES.map(b"".join),
)
def test_folding_agrees_with_folding_the_parsed_header_section(
    fields: bytes, blank: bytes, body: bytes
) -> None:
    """The quick look for a bare CR (up to the first empty line) never lets through one that
    the parsed header section holds, nor changes anything beyond it."""
    data = fields + blank + body
    end = RawMessage.parse(data).header_end
    folded = re.sub(
        rb"\r(?!\n)",
        lambda m: b"\r\n" if m.string[m.end() : m.end() + 1] in (b" ", b"\t") else b"\r\n ",
        data[:end],
    )

    assert fold_bare_cr(data) == folded + data[end:]


# -- hops -------------------------------------------------------------------------------------


def test_received_fields_are_counted_whatever_the_case_and_however_folded() -> None:
    data = (
        b"Received: from a by b;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"RECEIVED: from b by c\r\n"
        b"received: from c by d\r\n"
        b"X-Received: not a hop\r\n"
        b"\r\n"
        b"Received: in the body, not a hop\r\n"
    )

    assert RawMessage.parse(data).count("received") == 3
