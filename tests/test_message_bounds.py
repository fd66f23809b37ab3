"""mail2alert.message on hostile input: its text is always valid Unicode, its work bounded."""

from __future__ import annotations

import time

import pytest

from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.message import (
    BODY_TEXT_LIMIT,
    RawMessage,
    address_of,
    body_text,
    decode_header_value,
    rewrite,
)


def is_valid_unicode(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (and so bound as an SQLite TEXT)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- no lone surrogates ---------------------------------------------------------------------

#: Encoded words whose charset decodes to lone surrogates (UTF-7 and UTF-16 can encode them).
SURROGATE_WORDS = {
    "utf-7-q": b"=?utf-7?q?+3Xe0?=",
    "utf-7-b": b"=?utf-7?b?KzNYZTAt?=",
    "utf-16-le": b"=?utf-16-le?b?ANg=?=",
    "utf-16-be": b"=?utf-16-be?b?2AA=?=",
    "beside-8-bit-text": b"caf\xc3\xa9 =?utf-7?q?+3Xe0?=",
}


@pytest.mark.parametrize("raw", SURROGATE_WORDS.values(), ids=SURROGATE_WORDS.keys())
def test_an_encoded_word_that_decodes_to_lone_surrogates_reads_as_replacement_characters(
    raw: bytes,
) -> None:
    """What a decoder makes of a lone surrogate becomes U+FFFD."""
    text = decode_header_value(raw)

    assert is_valid_unicode(text)
    assert "\ufffd" in text


def test_text_around_an_undecodable_encoded_word_is_kept() -> None:
    """Only the undecodable characters are replaced, not the words around them."""
    subject = RawMessage.parse(b"Subject: Stage =?utf-7?q?+3Xe0?= broke\r\n\r\n").get("subject")

    assert subject.startswith("Stage ")
    assert subject.endswith(" broke")


def test_a_body_in_a_charset_that_decodes_to_lone_surrogates_reads_as_valid_text() -> None:
    """body_text replaces lone surrogates too."""
    data = b"Content-Type: text/plain; charset=utf-7\r\n\r\nSee +3Xe0- details\r\n"

    text = body_text(data)

    assert is_valid_unicode(text)
    assert text.startswith("See ")


def test_an_address_read_from_surrogate_escaped_text_is_valid_text() -> None:
    """address_of never hands a lone surrogate on, whatever text it is given."""
    assert is_valid_unicode(address_of("Caf\udce9 <caf\udce9@example.com>"))


def test_a_surrogate_escaped_sender_is_written_into_from_as_its_original_bytes() -> None:
    """The envelope sender of non-UTF-8 bytes (surrogate-escaped by aiosmtpd) is written back
    byte for byte when it replaces From:."""
    message = RawMessage.parse(b"From: a@example.com\r\nTo: b@example.com\r\n\r\nbody\r\n")
    sender = b"caf\xe9@example.com".decode("utf-8", "surrogateescape")

    data = rewrite(message, from_value=sender, to_addresses=("t@example.com",), prepend=b"")

    assert data.startswith(b"From: caf\xe9@example.com\r\n")


# -- bounded work on big messages -----------------------------------------------------------


def big_stage_mail(size: int) -> bytes:
    """A GoCD stage mail whose CHANGES list makes it ``size`` bytes or more."""
    change = "revision: 1f5557f8a1c3, modified by Jane Doe\nFix flaky test\n"
    body = (
        "See details: https://ci.example.com/go/pipelines/p/6/s/1\n\n-- CHANGES --\n"
        + change * (size // len(change) + 1)
    )
    return gocd_stage_mail(body=body)


def test_body_text_reads_no_further_than_its_limit() -> None:
    """Of a 30 MB mail, only the first BODY_TEXT_LIMIT bytes become text."""
    text = RawMessage.parse(big_stage_mail(30_000_000)).body_text

    assert len(text) <= BODY_TEXT_LIMIT


def test_the_top_of_a_body_bigger_than_the_limit_is_read_as_usual() -> None:
    """What routing reads near the top (GoCD's "See details" link) is still there."""
    text = body_text(big_stage_mail(3 * BODY_TEXT_LIMIT))

    assert text.startswith("See details: https://ci.example.com/go/pipelines/p/6/s/1\r\n")


def test_a_base64_part_cut_by_the_limit_is_decoded_as_far_as_it_goes() -> None:
    """A part cut short by the limit is no error: its first bytes are text."""
    data = (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b"aGVsbG8gd29ybGQK\r\n" * 1000
    )

    assert body_text(data, limit=200).startswith("hello world\n")


def test_a_rewritten_big_mail_keeps_its_body_byte_for_byte() -> None:
    """rewrite copies the body once, into its result, unchanged."""
    data = big_stage_mail(3_000_000)
    message = RawMessage.parse(data)

    out = rewrite(message, from_value=None, to_addresses=("t@example.com",), prepend=b"R: x\r\n")

    assert out.endswith(data[message.header_end :])
    assert out.startswith(b"R: x\r\n")


# -- bounded work -------------------------------------------------------------------------------


def test_a_from_field_of_a_thousand_nested_comments_has_no_address_and_raises_nothing() -> None:
    """Found by tests/test_fuzz.py: parseaddr recursed once per "(" and raised RecursionError."""
    assert address_of("(" * 5000) == ""


def test_a_from_field_of_200_kb_without_an_at_sign_is_read_in_linear_time() -> None:
    """Found by tests/test_fuzz.py: the fallback search was quadratic (200 kB took minutes)."""
    started = time.monotonic()

    assert address_of("x" * 200_000) == ""
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a@@b@c", "b@c"),
        ("<<<@@@>>> x@y", "x@y"),
        ("((( go@example.com", "go@example.com"),
    ],
)
def test_the_fallback_search_finds_the_first_bare_address(text: str, expected: str) -> None:
    assert address_of(text) == expected


@pytest.mark.parametrize(
    ("word", "text"),
    [
        (b"=?utf-8?Q?caf=C3=A9?=", "café"),
        (b"=?utf-8?Q?caf=C3=A9?= ", "café"),
        (b"x =?utf-8?Q?caf=C3=A9?= ", "x café "),
        (b"\xc3\xa9 =?utf-8?Q?caf=C3=A9?= ", "é café "),
    ],
    ids=["adjacent", "spaced", "text-between", "8-bit-between"],
)
def test_a_subject_of_80000_encoded_words_is_decoded_whole_in_linear_time(
    word: bytes, text: str
) -> None:
    """Found by probing what tests/test_fuzz.py feeds: decode_header took 16 s for 1 MB."""
    started = time.monotonic()

    subject = decode_header_value(word * 80_000)

    assert time.monotonic() - started < 5
    assert subject == (text * 80_000).strip()


@pytest.mark.parametrize("codec", ["unicode-escape", "raw_unicode_escape"])
def test_an_encoded_word_in_a_python_escape_codec_reads_as_of_an_unknown_charset(
    codec: str,
) -> None:
    """Found by tests/test_fuzz.py: decoding "\\ " warned (an error where warnings are)."""
    assert decode_header_value(f"=?{codec}?Q?a=5C_b?= c".encode()) == "a\\ b c"


def test_a_body_in_a_python_escape_codec_reads_as_latin1() -> None:
    data = b"Content-Type: text/plain; charset=unicode-escape\r\n\r\ncaf\xe9 \\ \\q"

    assert body_text(data) == "caf\xe9 \\ \\q"
