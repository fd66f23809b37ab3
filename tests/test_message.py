"""mail2alert.message: header decoding, body text and rewriting, safe on any bytes."""

from __future__ import annotations

import encodings
import pkgutil
import random
import re

import pytest

from mail2alert.message import (
    LINE_LIMIT,
    RawMessage,
    _parsed_address,
    address_of,
    body_text,
    decode_header_value,
    fold_long_lines,
    rewrite,
)

#: Every codec module Python ships: encoded words may name any of them (idna, rot13, ...).
PYTHON_CODECS = sorted(m.name for m in pkgutil.iter_modules(encodings.__path__))

GOCD_MAIL = (
    b"Return-Path: <go@example.com>\r\n"
    b"Received: from ci.example.com by mx.example.com;\r\n"
    b"\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: GoCD <go@example.com>\r\n"
    b"To: mail2alert@example.com\r\n"
    b"Subject: Stage [my-app/12/build/1] failed\r\n"
    b"Message-ID: <1@ci.example.com>\r\n"
    b"Content-Type: text/plain; charset=UTF-8\r\n"
    b"\r\n"
    b"See details: http://ci.example.com/go/pipelines/my-app/12/build/1\r\n"
)


def parse(data: bytes) -> RawMessage:
    return RawMessage.parse(data)


def fields_except(message: RawMessage, *names: str) -> list[bytes]:
    """The raw fields of ``message`` other than ``names``, in order."""
    return [f.raw for f in message.fields if f.name not in names]


def rewritten(
    data: bytes,
    *,
    to: tuple[str, ...] = ("team@example.com",),
    from_value: str | None = None,
    prepend: bytes = b"",
) -> bytes:
    return rewrite(parse(data), from_value=from_value, to_addresses=to, prepend=prepend)


# -- reading headers --------------------------------------------------------------------------


def test_a_header_is_found_whatever_the_case_of_its_name() -> None:
    message = parse(GOCD_MAIL)

    assert message.get("SUBJECT") == "Stage [my-app/12/build/1] failed"
    assert message.get("message-id") == "<1@ci.example.com>"


def test_a_missing_subject_reads_as_empty_text() -> None:
    assert parse(b"From: go@example.com\r\n\r\nbody\r\n").get("subject") == ""


def test_the_first_of_repeated_fields_is_the_one_read() -> None:
    message = parse(b"Subject: first\r\nSubject: second\r\n\r\n")

    assert message.get("subject") == "first"


def test_the_body_starts_after_the_blank_line() -> None:
    message = parse(GOCD_MAIL)

    assert message.body == b"See details: http://ci.example.com/go/pipelines/my-app/12/build/1\r\n"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"=?utf-8?B?w6XDpMO2?=", "åäö", id="utf-8 B"),
        pytest.param(b"=?UTF-8?Q?caf=C3=A9_au_lait?=", "café au lait", id="utf-8 Q"),
        pytest.param(b"=?iso-8859-1?Q?caf=E9?=", "café", id="iso-8859-1"),
        pytest.param(b"=?koi8-r?B?8NLJ18XU?=", "Привет", id="koi8-r"),
        pytest.param(b"Build =?utf-8?Q?caf=C3=A9?= failed", "Build café failed", id="mixed"),
        pytest.param(
            b"=?utf-8?Q?caf=C3=A9?=\r\n =?iso-8859-1?Q?_cr=E8me?=",
            "café crème",
            id="adjacent words, folded",
        ),
    ],
)
def test_encoded_words_are_decoded_in_their_charset(raw: bytes, expected: str) -> None:
    assert decode_header_value(raw) == expected


def test_a_us_ascii_word_after_another_encoded_word_is_joined_without_a_space() -> None:
    """Found by tests/test_fuzz.py: it read "S tage [0/0/0/0] failed", no stage mail."""
    raw = b"=?utf-8?Q?S?= =?us-ascii?Q?tage_[0/0/0/0]_failed?="

    assert decode_header_value(raw) == "Stage [0/0/0/0] failed"


def test_a_backslash_escape_written_beside_an_encoded_word_in_8bit_text_is_kept() -> None:
    """decode_header's raw-unicode-escape bytes read it as the character it names: "A"."""
    raw = "café \\u0041 =?utf-8?Q?x?=".encode()

    assert decode_header_value(raw) == "café \\u0041 x"


def test_an_encoded_word_in_an_unknown_charset_reads_as_utf8_when_it_can() -> None:
    assert decode_header_value(b"=?x-unknown?B?w6XDpMO2?= tail") == "åäö tail"


def test_an_encoded_word_in_an_unknown_charset_falls_back_to_latin1() -> None:
    assert decode_header_value(b"=?x-unknown?Q?caf=E9?=") == "café"


def test_an_encoded_word_in_a_codec_that_cannot_replace_errors_reads_as_utf8() -> None:
    """idna, punycode and 'undefined' raise whatever ``errors`` says; they must not escape."""
    assert decode_header_value(b"=?idna?Q?caf=C3=A9?= x") == "café x"


@pytest.mark.parametrize("codec", PYTHON_CODECS)
def test_an_encoded_word_naming_any_python_codec_never_raises(codec: str) -> None:
    for word in (b"=?%s?Q?=FF=00abc=80?=", b"=?%s?B?/w==?=", b"caf\xc3\xa9 =?%s?Q?=FF?="):
        assert isinstance(decode_header_value(word % codec.encode()), str)


def test_a_broken_encoded_word_is_left_as_text() -> None:
    assert decode_header_value(b"=?utf-8?B?broken") == "=?utf-8?B?broken"


def test_undecodable_bytes_in_an_encoded_word_become_replacement_characters() -> None:
    assert decode_header_value(b"=?utf-8?Q?ok=FF?=") == "ok\ufffd"


def test_8bit_utf8_header_bytes_are_read_as_utf8() -> None:
    assert parse("Subject: Bygget är trasigt\r\n\r\n".encode()).get("subject") == (
        "Bygget är trasigt"
    )


def test_8bit_header_bytes_that_are_not_utf8_are_read_as_latin1() -> None:
    assert parse(b"Subject: caf\xe9 \xff\r\n\r\n").get("subject") == "café ÿ"


def test_8bit_text_beside_an_encoded_word_is_kept() -> None:
    """Raw UTF-8 next to an RFC 2047 word must not turn into escapes or '?'."""
    raw = "Привет café =?utf-8?Q?d=C3=A9j=C3=A0?=".encode()

    assert decode_header_value(raw) == "Привет café déjà"


@pytest.mark.parametrize(
    "fold", [b"\r\n ", b"\r\n\t", b"\n "], ids=["CRLF space", "CRLF tab", "LF space"]
)
def test_a_folded_subject_is_unfolded(fold: bytes) -> None:
    """Unfolding removes the line break only (RFC 5322 2.2.3), as JavaMail's folds expect."""
    data = b"Subject: Stage [my-app/12/build/1]" + fold + b"failed\r\n\r\n"

    assert parse(data).get("subject") == "Stage [my-app/12/build/1]" + fold[-1:].decode() + (
        "failed"
    )


def test_a_100kb_header_is_read_whole() -> None:
    data = b"X-Long: " + b"a" * 100_000 + b"\r\nSubject: short\r\n\r\nbody"
    message = parse(data)

    assert len(message.get("x-long")) == 100_000
    assert message.get("subject") == "short"
    assert message.body == b"body"


def test_a_100kb_folded_subject_of_encoded_words_is_decoded() -> None:
    data = b"Subject: " + b"=?utf-8?Q?caf=C3=A9?=\r\n " * 5000 + b"end\r\n\r\n"

    assert parse(data).get("subject") == "café" * 5000 + " end"


def test_lf_only_messages_are_split_into_fields_and_body() -> None:
    message = parse(b"From: go@example.com\nSubject: hi\n\nbody\n")

    assert [f.name for f in message.fields] == ["from", "subject"]
    assert message.get("subject") == "hi"
    assert message.body == b"body\n"
    assert message.newline == b"\n"


def test_a_line_that_is_not_a_field_ends_the_header_section() -> None:
    message = parse(b"Subject: x\r\nthis is not a field\r\nTo: y@example.com\r\n\r\nbody")

    assert [f.name for f in message.fields] == ["subject"]
    assert message.get("to") == ""
    assert message.body == b"this is not a field\r\nTo: y@example.com\r\n\r\nbody"


def test_empty_input_is_a_message_without_fields_or_body() -> None:
    message = parse(b"")

    assert message.fields == ()
    assert message.get("subject") == ""
    assert message.body == b""
    assert message.body_text == ""


# -- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("GoCD <go@example.com>", "go@example.com"),
        ("go@example.com", "go@example.com"),
        ('"ops@example.com" <go@example.com>', "go@example.com"),
        ("Gö <go@example.com>", "go@example.com"),
        ("a@example.com, b@example.com", "a@example.com"),
        ("garbage", ""),
        ("", ""),
    ],
)
def test_address_of_finds_the_bare_address(header: str, expected: str) -> None:
    assert address_of(header) == expected


def test_a_plain_address_is_read_as_the_full_parser_reads_it() -> None:
    """The shortcut for plain From: fields gives what parseaddr gives, for any text."""
    rnd = random.Random(5)
    pieces = [
        "a",
        "b.c",
        "x",
        "@",
        "<",
        ">",
        " ",
        "\t",
        ".",
        '"',
        "(",
        ")",
        ",",
        ";",
        ":",
        "[",
        "]",
        "\\",
        "!",
        "#",
        "%",
        "+",
        "-",
        "_",
        "ü",
        "\r",
        "\n",
        "Go CD",
        "<>",
    ]
    texts = [
        "go@example.com",
        "<go@example.com>",
        " GoCD  Server <go@example.com> ",
        "GoCD<go@example.com>",
        "a.b@c.d",
        "a..b@c",
        ".a@b",
        "a@b.",
        "<a@b> x",
    ]
    texts += ["".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 12))) for _ in range(20000)]
    for text in texts:
        assert address_of(text) == _parsed_address(text), repr(text)


# -- body text --------------------------------------------------------------------------------


def test_body_text_of_a_plain_message_is_its_body() -> None:
    assert parse(GOCD_MAIL).body_text.startswith("See details: http://ci.example.com/go/")


def test_body_text_decodes_transfer_encoding_and_charset() -> None:
    data = (
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n"
        b"caf=E9"
    )

    assert body_text(data) == "café"


def test_body_text_is_the_first_text_plain_part_of_a_multipart_message() -> None:
    data = (
        b'Content-Type: multipart/alternative; boundary="b1"\r\n'
        b"\r\n"
        b"--b1\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nw6XDpMO2\r\n"
        b"--b1--\r\n"
    )

    assert body_text(data) == "åäö"


def test_body_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    assert body_text(b"Subject: x\r\n\r\nbody \xff\xfe") == "body \ufffd\ufffd"


def test_a_body_in_an_unknown_charset_is_read_as_latin1() -> None:
    data = b"Content-Type: text/plain; charset=x-unknown\r\n\r\ncaf\xe9"

    assert body_text(data) == "café"


def test_a_multipart_message_without_a_text_part_has_no_body_text() -> None:
    data = (
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n--b1--\r\n"
    )

    assert body_text(data) == ""


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            b'Content-Type: multipart/mixed; boundary="xx"\r\n\r\n--yy\r\n\r\nhello\r\n',
            id="boundary never used",
        ),
        pytest.param(b"Content-Type: multipart/mixed\r\n\r\nno boundary", id="no boundary"),
        pytest.param(b'Content-Type: multipart/mixed; boundary="xx"\r\n\r\n', id="no parts"),
        pytest.param(
            b'Content-Type: multipart/mixed; boundary="xx"\r\n\r\n--xx\r\nContent-Type: text/pl',
            id="cut off in a part",
        ),
        pytest.param(b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64", id="bad base64"),
    ],
)
def test_broken_mime_gives_text_without_raising(data: bytes) -> None:
    assert isinstance(body_text(data), str)


# -- rewriting --------------------------------------------------------------------------------


def test_rewrite_replaces_to_with_the_given_recipients() -> None:
    out = parse(rewritten(GOCD_MAIL, to=("a@example.com", "b@example.com")))

    assert out.get("to") == "a@example.com, b@example.com"


def test_rewrite_folds_a_long_recipient_list_below_78_characters() -> None:
    recipients = tuple(f"team-{i}@example.com" for i in range(20))
    out = rewritten(GOCD_MAIL, to=recipients)
    to_field = next(f.raw for f in parse(out).fields if f.name == "to")

    assert all(len(line) <= 78 for line in to_field.split(b"\r\n"))
    assert to_field.count(b"\r\n") > 1
    assert parse(out).get("to").split(", ") == list(recipients)


def test_rewrite_keeps_from_when_from_value_is_none() -> None:
    out = parse(rewritten(GOCD_MAIL, from_value=None))

    assert out.get("from") == "GoCD <go@example.com>"


def test_rewrite_replaces_from_when_given() -> None:
    out = parse(rewritten(GOCD_MAIL, from_value="relay@example.com"))

    assert out.get("from") == "relay@example.com"


def test_rewrite_leaves_every_other_header_and_the_body_byte_identical() -> None:
    original = parse(GOCD_MAIL)
    out = parse(rewritten(GOCD_MAIL, from_value="relay@example.com"))

    assert fields_except(out, "to", "from") == fields_except(original, "to", "from")
    assert out.body == original.body


def test_rewrite_puts_the_new_fields_where_the_old_ones_were() -> None:
    out = parse(rewritten(GOCD_MAIL, from_value="relay@example.com"))

    assert [f.name for f in out.fields] == [f.name for f in parse(GOCD_MAIL).fields]


def test_rewrite_puts_prepend_in_front() -> None:
    trace = b"Received: from ci by relay; Mon, 1 Jan 2024 00:00:00 +0000\r\n"

    out = rewritten(GOCD_MAIL, prepend=trace)

    assert out.startswith(trace + b"Return-Path: <go@example.com>\r\n")


def test_rewrite_removes_further_to_and_from_fields() -> None:
    data = b"To: a@example.com\r\nFrom: x@example.com\r\nTo: b@example.com\r\n\r\nbody"

    out = parse(rewritten(data, to=("team@example.com",), from_value="relay@example.com"))

    assert [f.raw for f in out.fields] == [
        b"To: team@example.com\r\n",
        b"From: relay@example.com\r\n",
    ]


def test_rewrite_adds_to_and_from_when_the_message_has_none() -> None:
    out = rewritten(b"Subject: hi\r\n\r\nbody", from_value="relay@example.com")

    assert out == b"Subject: hi\r\nFrom: relay@example.com\r\nTo: team@example.com\r\n\r\nbody"


def test_rewrite_keeps_lf_only_line_endings() -> None:
    out = rewritten(b"To: a@example.com\nSubject: hi\n\nbody\n")

    assert out == b"To: team@example.com\nSubject: hi\n\nbody\n"


def test_rewrite_keeps_a_line_that_is_not_a_field_in_the_body() -> None:
    out = rewritten(b"Subject: x\r\nnot a field\r\nmore\r\n")

    assert out == b"Subject: x\r\nTo: team@example.com\r\n\r\nnot a field\r\nmore\r\n"


def test_rewrite_ends_a_last_field_that_has_no_line_ending() -> None:
    """A message cut short after its last header must not get To: glued onto that value."""
    out = rewritten(b"X-A: 1\r\nSubject: hi")

    assert out == b"X-A: 1\r\nSubject: hi\r\nTo: team@example.com\r\n"


# -- any bytes at all -------------------------------------------------------------------------

NASTY = [
    b"",
    b"\r\n",
    b"\n\n\n",
    b":",
    b": no name\r\n\r\n",
    b"Subject",
    b"Subject:",
    b"Subject:\r\n\r\n",
    b" leading continuation\r\nSubject: x\r\n\r\n",
    b"Subject: x\r",
    b"Subject: x\r\r\r\n\r\n",
    b"\x00\x01\x02: \x00\r\n\r\n\x00",
    b"Subject: " + bytes(range(256)) + b"\r\n\r\n" + bytes(range(256)),
    bytes(range(256)),
    bytes(range(255, -1, -1)),
    b"Subject: =?\r\n\r\n",
    b"Subject: =?=?=?==?utf-8?Q??=?=\r\n\r\n",
    b"Subject: =?utf-8?B?====?=\r\n\r\n",
    b"Subject: =?utf-8?X?abc?=\r\n\r\n",
    b"Subject: =?\xff\xfe?Q?abc?=\r\n\r\n",
    b"Subject: =?utf-8*en?Q?abc?=\r\n\r\n",
    b"From: <<<@@@>>>\r\nTo: ,,,\r\n\r\n",
    b"From: =?utf-8?Q?=00?= <\x00@\x00>\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n--\r\n",
    b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n--a\r\n--a\r\n--a--\r\n--a\r\n',
    b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n--a\r\nContent-Type: multipart/mixed; '
    b'boundary="a"\r\n\r\n--a\r\n',
    b'Content-Type: text/plain; charset="\xff"\r\n\r\nbody',
    b"Content-Type: text/plain; charset=utf-7\r\n\r\n+AGEAYgBj-+\xff",
    b"Content-Type: \r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n!!!\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=\r\n=Z=\xff",
    b"X: " + b"=?utf-8?Q?a?=" * 20_000 + b"\r\n\r\n",
    b"X: y\r\n" + b" \r\n" * 10_000 + b"\r\n",
]


def exercise(data: bytes) -> None:
    """Everything routing and delivery do with a message; none of it may raise."""
    message = RawMessage.parse(data)
    for name in ("subject", "from", "to", "message-id", "content-type"):
        assert isinstance(message.get(name), str)
    assert isinstance(address_of(message.get("from")), str)
    assert isinstance(message.body_text, str)
    out = rewrite(
        message,
        from_value="relay@example.com",
        to_addresses=("team@example.com",),
        prepend=b"Received: x\r\n",
    )
    assert out.startswith(b"Received: x\r\n")
    kept = rewrite(message, from_value=None, to_addresses=(), prepend=b"")
    assert message.body in kept


@pytest.mark.parametrize("data", NASTY)
def test_nasty_input_never_raises(data: bytes) -> None:
    exercise(data)


def random_encoded_words(rng: random.Random) -> bytes:
    """A Subject: of encoded words with random charsets, encodings and payloads."""
    words = []
    for _ in range(rng.randrange(1, 6)):
        charset = rng.choice([*PYTHON_CODECS, "utf-8", "x-unknown", ""]).encode()
        encoding = rng.choice([b"Q", b"B", b"q", b"b", b"X"])
        payload = bytes(rng.choice(b"=ABCDEFabcdef0123456789_/+?\xff") for _ in range(12))
        words.append(b"=?" + charset + b"?" + encoding + b"?" + payload + b"?=")
    return b"Subject: " + rng.choice([b" ", b"\r\n ", b""]).join(words) + b"\r\n\r\nbody"


def random_messages(seed: int, count: int) -> list[bytes]:
    """Random bytes, random encoded words, and the sample mail with random bytes spliced in."""
    rng = random.Random(seed)
    pieces = [b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b"=?", b"?=", b"?Q?", b"?B?", b"--"]
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.35:
            out.append(rng.randbytes(rng.randrange(0, 4096)))
            continue
        if kind < 0.6:
            out.append(random_encoded_words(rng))
            continue
        data = bytearray(GOCD_MAIL)
        for _ in range(rng.randrange(1, 20)):
            at = rng.randrange(0, len(data) + 1)
            insert = rng.choice(pieces) if rng.random() < 0.5 else rng.randbytes(rng.randrange(8))
            data[at:at] = insert
        out.append(bytes(data))
    return out


def test_500_random_byte_strings_never_raise() -> None:
    for data in random_messages(seed=20240101, count=500):
        exercise(data)


# -- lines longer than SMTP allows --------------------------------------------------------------


def _wire_lengths(data: bytes) -> list[int]:
    """The length of each line as it goes on the wire: a leading dot is doubled."""
    return [len(line) + line.startswith(b".") for line in data.splitlines()]


def test_a_message_with_no_line_over_the_limit_is_sent_as_it_is() -> None:
    data = b"Subject: hi\r\n\r\n" + b"x" * LINE_LIMIT + b"\r\n." + b"y" * 500 + b"\n"
    assert fold_long_lines(data) is data


def test_every_long_line_is_broken_into_lines_smtp_takes_that_unfold_to_the_original() -> None:
    rnd = random.Random(3)
    for _ in range(200):
        pieces = [
            rnd.choice([b"", b".", b"x", "é".encode()]) * rnd.randint(0, 1500)
            + rnd.choice([b"\r\n", b"\n", b"\r"])
            for _ in range(rnd.randint(1, 6))
        ]
        data = b"Subject: x\r\n\r\n" + b"".join(pieces)
        folded = fold_long_lines(data)
        assert max(_wire_lengths(folded)) <= LINE_LIMIT
        assert folded.replace(b"\r\n ", b"") == data
        folded.decode("utf-8")  # no character was cut in two


@pytest.mark.parametrize("character", ["é", "€", "𝄞"], ids=["2 bytes", "3 bytes", "4 bytes"])
def test_no_character_is_cut_in_two_wherever_the_limit_falls(character: str) -> None:
    wide = character.encode()
    for shift in range(len(wide)):
        data = b"x" * shift + wide * (3000 // len(wide)) + b"\r\n"
        folded = fold_long_lines(data)
        assert max(_wire_lengths(folded)) <= LINE_LIMIT
        assert folded.replace(b"\r\n ", b"").decode() == data.decode()


def test_a_line_whose_only_space_is_early_is_cut_at_the_limit() -> None:
    """A break before a space in the first half of a line would leave pieces ever shorter."""
    line = b"x" * 100 + b" " + b"y" * 2000
    (first, *_) = fold_long_lines(line).split(b"\r\n")
    assert len(first) == LINE_LIMIT


def test_a_long_line_is_broken_before_a_run_of_white_space_not_inside_it() -> None:
    data = b"Subject: " + b"a" * 700 + b" \t" * 100 + b"b" * 700 + b"\r\n"
    folded = fold_long_lines(data)
    assert folded == data.replace(b"a \t", b"a\r\n \t", 1)


def test_a_run_of_white_space_longer_than_a_line_is_broken_inside_it_with_nothing_added() -> None:
    data = b"Subject: " + b"a" * 700 + b" " * 1500 + b"b" * 700 + b"\r\n"
    folded = fold_long_lines(data)
    assert max(_wire_lengths(folded)) <= LINE_LIMIT
    assert re.sub(rb"\r\n(?=[ \t])", b"", folded) == data


def test_a_long_line_of_words_is_broken_before_its_own_spaces() -> None:
    """Unfolded as RFC 5322 unfolds (a line break before white space taken out), the line
    is what it was: nothing was added."""
    line = b" ".join(b"w%d" % i for i in range(1000))
    folded = fold_long_lines(b"Subject: x\r\n\r\n" + line + b"\r\n")
    assert max(_wire_lengths(folded)) <= LINE_LIMIT
    assert re.sub(rb"\r\n(?=[ \t])", b"", folded) == b"Subject: x\r\n\r\n" + line + b"\r\n"


def test_a_long_header_field_goes_on_as_a_folded_continuation() -> None:
    data = b"Subject: " + b"word " * 400 + b"\r\nTo: a@example.com\r\n\r\nbody\r\n"
    folded = fold_long_lines(data)
    message = RawMessage.parse(folded)
    assert [f.name for f in message.fields] == ["subject", "to"]
    assert message.get("Subject") == " ".join(["word"] * 400)
    assert folded[message.body_offset :] == b"body\r\n"
