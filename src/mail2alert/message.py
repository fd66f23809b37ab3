"""Bytes in, facts out: header splitting, decoding and byte-exact rewriting, safe on any input.

Routing reads a handful of headers on every message, so headers are split here at the byte
level instead of building a full :mod:`email` object tree; the body is decoded only when a
manager asks for it, and only its first :data:`BODY_TEXT_LIMIT` bytes: a 30 MB mail cost
seconds of CPU and hundreds of MB in :mod:`email` objects for a "See details" link near its
top. Nothing in this module raises on malformed input: a header that cannot be
decoded is returned as the best text we can make of it.

Every text this module returns is valid Unicode: a decoder that yields lone surrogates (UTF-7
and UTF-16 can encode them) has them replaced by U+FFFD, since such a string can be neither
encoded as UTF-8 nor stored in SQLite.
"""

from __future__ import annotations

import codecs
import email.header
import email.parser
import email.policy
import email.utils
import functools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# Tried only where a run of address characters starts, and never given back: searched
# from every position, a 16 kB From: without an @ took 0.6 s, and 200 kB minutes.
_ADDRESS = re.compile(r"(?<![^@\s<>])[^@\s<>]++@[^@\s<>]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: How many encoded words are decoded at once. email.header.decode_header joins a run of
#: words of one charset byte string by byte string, so its time grows with the square of
#: their number (80,000 words, a 1 MB Subject: 16 s); a longer run is decoded in pieces.
WORDS_AT_ONCE = 200
#: Where decoding may be cut: just after an encoded word, and after the whitespace that
#: follows it (whitespace that decoding drops before another encoded word, and keeps before
#: text, so it stays in the piece before the cut).
_AFTER_WORD = re.compile(r"(?<=\?=)(?:(?P<dropped>\s*)(?==\?)|\s*(?=[^\s=]))")
#: Python's codecs of its own backslash escapes: no mail's charset, and they warn about an
#: escape they do not know ("\\ "), an exception where warnings are errors.
_ESCAPE_CODECS = frozenset({"unicode-escape", "raw-unicode-escape"})
#: An encoded word as email.header.decode_header finds one (its ``ecre``).
_ENCODED_WORD = re.compile(r"=\?([^?]*?)\?([qQbB])\?(.*?)\?=", re.MULTILINE)
#: The names :mod:`email` gives ASCII (as an encoded word's charset, lower-cased).
_ASCII_CHARSETS = frozenset({"us-ascii", "ascii"})
_LINE_BREAK_TEXT = re.compile("[\r\n]")
_LINE_BREAKS = re.compile(rb"[\r\n]+")
#: A CR that does not begin a CRLF: no line end to mail2alert, but one to most mail readers.
_BARE_CR = re.compile(rb"\r(?!\n)")
#: The longest line SMTP lets through, without its line end (RFC 5321 4.5.3.1.6).
LINE_LIMIT = 998
_NEWLINE = re.compile(rb"[\r\n]")

#: How much of a message :func:`body_text` reads: the text routing needs is near the top.
BODY_TEXT_LIMIT = 1 << 20


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


@dataclass(frozen=True)
class HeaderField:
    """One header field exactly as it stands in the message, continuation lines included."""

    name: str
    raw: bytes

    @property
    def value(self) -> bytes:
        """The raw value, still folded, without the name, colon and line ending."""
        return self.raw.split(b":", 1)[1].rstrip(b"\r\n")


@dataclass(frozen=True)
class RawMessage:
    """A message split into its header fields and body, byte for byte."""

    data: bytes
    fields: tuple[HeaderField, ...]
    body_offset: int
    newline: bytes

    @classmethod
    def parse(cls, data: bytes) -> RawMessage:
        """Split ``data`` into header fields; never raises.

        A line that is neither a field nor a continuation ends the header section, as it
        would for a mail client, and is left in the body.
        """
        fields: list[HeaderField] = []
        newline = b"\r\n" if b"\r\n" in data[:2000] or b"\n" not in data[:2000] else b"\n"
        pos = 0
        size = len(data)
        current_start = -1
        current_name = ""
        while pos < size:
            end = data.find(b"\n", pos)
            end = size if end < 0 else end + 1
            line = data[pos:end]
            if line in (b"\r\n", b"\n"):
                if current_start >= 0:
                    fields.append(HeaderField(current_name, data[current_start:pos]))
                return cls(data, tuple(fields), end, newline)
            if line[:1] in (b" ", b"\t") and current_start >= 0:
                pos = end
                continue
            colon = line.find(b":")
            name = line[:colon] if colon > 0 else b""
            if not name or any(c <= 32 or c >= 127 for c in name):
                break
            if current_start >= 0:
                fields.append(HeaderField(current_name, data[current_start:pos]))
            current_start = pos
            current_name = name.decode("ascii").lower()
            pos = end
        if current_start >= 0:
            fields.append(HeaderField(current_name, data[current_start:pos]))
        return cls(data, tuple(fields), pos, newline)

    def get_raw(self, name: str) -> bytes | None:
        """The raw value of the first field called ``name`` (case-insensitive)."""
        wanted = name.lower()
        for f in self.fields:
            if f.name == wanted:
                return f.value
        return None

    def count(self, name: str) -> int:
        """How many fields called ``name`` (case-insensitive) the header section holds."""
        wanted = name.lower()
        return sum(f.name == wanted for f in self.fields)

    def get(self, name: str) -> str:
        """The first ``name`` field, unfolded and decoded (RFC 2047, any charset); '' if absent."""
        raw = self.get_raw(name)
        return "" if raw is None else decode_header_value(raw)

    @property
    def header_end(self) -> int:
        """Offset just past the last header field (fields always start at offset 0)."""
        return sum(len(f.raw) for f in self.fields)

    @property
    def body(self) -> bytes:
        """The body bytes, after the blank line that ends the header section."""
        return self.data[self.body_offset :]

    @cached_property
    def body_text(self) -> str:
        """The first text/plain part as text (transfer encoding and charset decoded), as far
        as it lies within the message's first :data:`BODY_TEXT_LIMIT` bytes."""
        return body_text(self.data)


def decode_header_value(raw: bytes) -> str:
    """Unfold and decode a raw header value; 8-bit bytes are read as UTF-8, else Latin-1."""
    return valid_text(_decode_header_value(raw))


def _decode_header_value(raw: bytes) -> str:
    unfolded = _FOLD.sub(b"", raw).strip()
    try:
        text = unfolded.decode("utf-8")
    except UnicodeDecodeError:
        text = unfolded.decode("latin-1")
    if "=?" not in text:
        return text
    return "".join(_decode_text(piece) for piece in _runs_of_words(text))


def _runs_of_words(text: str) -> list[str]:
    """``text`` cut after encoded words into pieces of at most :data:`WORDS_AT_ONCE` words,
    each of which decodes as it would in the whole (but for the space make_header puts
    between an encoded word and text glued to it, "=?utf-8?Q?a?=x", which a cut leaves out)."""
    cuts = [
        m.span() if m["dropped"] is not None else (m.end(), m.end())
        for m in _AFTER_WORD.finditer(text)
    ][WORDS_AT_ONCE - 1 :: WORDS_AT_ONCE]
    starts = [0, *(end for _, end in cuts)]
    ends = [*(start for start, _ in cuts), len(text)]
    return [text[a:b] for a, b in zip(starts, ends, strict=True)]


def _decode_text(text: str) -> str:
    if not text.isascii():
        # make_header reads unencoded parts as ASCII, which would mangle 8-bit text beside
        # an encoded word ("café =?utf-8?Q?x?=" became "caf\ufffd x").
        return _decode_words_leniently(text)
    try:
        return str(email.header.make_header(_ascii_words_as_utf8(email.header.decode_header(text))))
    except (LookupError, ValueError, UnicodeError, email.errors.MessageError):
        return _decode_words_leniently(text)


def _ascii_words_as_utf8(parts: list[tuple[bytes, str | None]]) -> list[tuple[bytes, str | None]]:
    """Encoded words in us-ascii read as UTF-8 (which ASCII is), joined to UTF-8 words beside.

    make_header takes a us-ascii word for unencoded text and puts a space between it and the
    encoded word before: "=?utf-8?Q?S?= =?us-ascii?Q?tage?=" read "S tage".
    """
    out: list[tuple[bytes, str | None]] = []
    for chunk, charset in parts:
        if charset is not None:
            charset = "utf-8" if charset in _ASCII_CHARSETS else _mail_charset(charset)
        if out and charset is not None and out[-1][1] == charset:
            out[-1] = (out[-1][0] + chunk, charset)
        else:
            out.append((chunk, charset))
    return out


def _decode_words_leniently(text: str) -> str:
    """Decode what encoded words we can, one by one, replacing what we cannot."""
    out: list[str] = []
    try:
        parts = email.header.decode_header(_backslashes_escaped(text))
    except (ValueError, email.errors.MessageError):
        return text
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(chunk)
        elif charset is None:
            # decode_header hands back unencoded text as raw-unicode-escape bytes.
            out.append(chunk.decode("raw-unicode-escape", errors="replace"))
        else:
            out.append(_decode_chunk(chunk, charset))
    return "".join(out)


def _backslashes_escaped(text: str) -> str:
    """``text`` with each backslash outside encoded words written as ``\\u005c``.

    decode_header hands back unencoded text as raw-unicode-escape bytes, which read a
    backslash escape written in the text as the character it names ("\\u0041" became "A").
    """
    pieces = _ENCODED_WORD.split(text)
    # split() gives: text, then charset, encoding and encoded text of a word, then text...
    for i in range(0, len(pieces), 4):
        pieces[i] = pieces[i].replace("\\", "\\u005c")
    for i in range(1, len(pieces), 4):
        pieces[i] = f"=?{pieces[i]}?{pieces[i + 1]}?{pieces[i + 2]}?="
        pieces[i + 1] = pieces[i + 2] = ""
    return "".join(pieces)


def _decode_chunk(chunk: bytes, charset: str) -> str:
    """An encoded word's bytes as text; an unknown charset is read as UTF-8, else Latin-1."""
    try:
        return chunk.decode(_mail_charset(charset), errors="replace")
    except (LookupError, UnicodeError):
        # Unknown, or a codec such as idna or punycode that fails whatever ``errors`` says.
        pass
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError:
        return chunk.decode("latin-1")


def _mail_charset(charset: str) -> str:
    """``charset``, or an unknown one for Python's escape codecs (:data:`_ESCAPE_CODECS`)."""
    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError):
        return charset
    return "x-python-escapes" if name in _ESCAPE_CODECS else charset


# Possessive: an atom ends where a character not of an atom comes, so nothing is retried.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]++"
#: An RFC 5322 dot-atom (the plain form of each part of an address), for regular expressions.
DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*+"
#: A plain address, alone or in angle brackets after a display name of plain words (most
#: From: fields): what the full parser reads in it is that address.
_PLAIN_ADDRESS = re.compile(
    rf"[ \t]*+(?:(?:{_ATOM}(?:[ \t]++{_ATOM})*+[ \t]*+)?<({DOT_ATOM}@{DOT_ATOM})>"
    rf"|({DOT_ATOM}@{DOT_ATOM}))[ \t]*+\Z"
)


def address_of(header_text: str) -> str:
    """The bare address in a From:/To:-style value, or '' when there is none."""
    plain = _PLAIN_ADDRESS.match(header_text)
    if plain is not None:  # a tenth of the time parseaddr takes
        return plain.group(1) or plain.group(2)
    return _parsed_address(header_text)


def _parsed_address(header_text: str) -> str:
    """:func:`address_of` by the full parser."""
    # parseaddr ends a quoted string at a CR: '"victim@example.org\r" <go@example.com>' read
    # as victim@example.org. No line break belongs in a value, so none may end a quote.
    try:
        _, addr = email.utils.parseaddr(_LINE_BREAK_TEXT.sub(" ", header_text))
    except RecursionError:  # parseaddr recurses once per nested comment: "((((..." raised
        addr = ""
    if addr and "@" in addr:
        return valid_text(addr)
    found = _ADDRESS.search(header_text)
    return valid_text(found.group(0).strip("<>")) if found else ""


def body_text(data: bytes, limit: int = BODY_TEXT_LIMIT) -> str:
    """Text of the first text/plain part (or the whole body), decoded; never raises.

    Only the first ``limit`` bytes of ``data`` are read: a part cut there is decoded as far
    as it goes.
    """
    try:
        head = data[:limit] if len(data) > limit else data
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head)
        part = next(
            (p for p in msg.walk() if p.get_content_type() == "text/plain"),
            msg if not msg.is_multipart() else None,
        )
        if part is None:
            return ""
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return ""
        charset = _mail_charset(part.get_content_charset() or "utf-8")
        try:
            return valid_text(payload.decode(charset, errors="replace"))
        except LookupError:
            return payload.decode("latin-1")
    except Exception:  # noqa: BLE001 - a body we cannot read must never stop routing
        return ""


def received_header(
    *, helo: str, peer: str, hostname: str, queue_id: str, recipient: str | None, newline: bytes
) -> bytes:
    """A ``Received:`` trace field (RFC 5321 section 4.4) for a message we accepted."""
    stamp = _date(int(time.time()))
    helo = _printable(helo) or "unknown"
    lines = [
        f"Received: from {helo} ({_printable(peer)})",
        f"\tby {hostname} (mail2alert) with ESMTP id {queue_id}",
    ]
    if recipient:
        lines.append(f"\tfor <{_printable(recipient)}>; {stamp}")
    else:
        lines[-1] += f"; {stamp}"
    return newline.join(line.encode("utf-8", "replace") for line in lines) + newline


@functools.lru_cache(maxsize=2)
def _date(second: int) -> str:
    """An RFC 5322 date in local time: the same for every message of one second, and made
    once (``formatdate`` takes about 9 µs, at every message)."""
    return email.utils.formatdate(second, localtime=True)


def _printable(text: str) -> str:
    # CR and LF are not printable: a text that is all printable is kept as it is.
    return text if text.isprintable() else "".join(c for c in text if c.isprintable())


def rewrite(
    message: RawMessage,
    *,
    from_value: str | None,
    to_addresses: tuple[str, ...],
    prepend: bytes,
    add_fields: tuple[bytes, ...] = (),
) -> bytes:
    """The message with new ``From:``/``To:`` fields and ``prepend`` in front; all else as is.

    The new fields take the place of the first old ones; further From:/To: fields are removed.
    ``from_value`` None keeps the original From: field. ``add_fields`` (without line endings)
    go at the end of the header section, replacing any fields of the same names. A line
    break in a value written here is left out: it could only end the field and start another.
    """
    add_fields = tuple(one_line(f) for f in add_fields)
    replaced = {f.split(b":", 1)[0].strip().lower().decode("ascii") for f in add_fields}
    nl = message.newline
    new_to = _fold_addresses(to_addresses, nl)
    # An envelope sender of non-UTF-8 bytes arrives surrogate-escaped: write its own bytes.
    new_from = (
        b"From: " + one_line(from_value.encode("utf-8", "surrogateescape")) + nl
        if from_value is not None
        else None
    )
    out: list[bytes | memoryview] = [prepend]
    seen_from = seen_to = False
    for f in message.fields:
        if f.name == "to":
            if not seen_to:
                out.append(new_to)
                seen_to = True
            continue
        if f.name == "from" and new_from is not None:
            if not seen_from:
                out.append(new_from)
                seen_from = True
            continue
        if f.name in replaced:
            continue
        # The last field of a message cut short has no line ending; give it one, or the
        # next field would be glued onto its value.
        out.append(f.raw if f.raw.endswith(b"\n") else f.raw + nl)
    if not seen_from and new_from is not None:
        out.append(new_from)
    if not seen_to:
        out.append(new_to)
    out.extend(field + nl for field in add_fields)
    data, end = message.data, message.header_end
    if end < len(data) and not data.startswith((b"\r\n", b"\n"), end):
        # A line that is not a header field ended the section: keep it as the body's start.
        out.append(nl)
    # A view, not a slice: the body is copied once, into the result, however big it is.
    out.append(memoryview(data)[end:])
    return b"".join(out)


def _fold_addresses(addresses: tuple[str, ...], nl: bytes) -> bytes:
    """``To: a, b, ...`` folded so that no line grows past 78 characters where avoidable."""
    lines: list[str] = []
    line = "To:"
    for i, addr in enumerate(addresses):
        piece = f" {addr}" + ("," if i < len(addresses) - 1 else "")
        if len(line) + len(piece) > 78 and line != "To:":
            lines.append(line)
            line = " " + piece.lstrip(" ")
        else:
            line += piece
    lines.append(line)
    return nl.join(s.encode("utf-8", "surrogateescape") for s in lines) + nl


def one_line(value: bytes) -> bytes:
    """``value`` with its line breaks left out, as unfolding does: fit to write in one field."""
    return _LINE_BREAKS.sub(b"", value)


def fold_bare_cr(data: bytes) -> bytes:
    """``data`` with each bare CR of its header section made the start of a folded line.

    SMTP lets no bare CR through, and the usual cure, a CRLF in its place, would start a new
    header field where mail2alert (and the SMTP servers on the way) saw none:
    ``Subject: hi<CR>Bcc: x`` would gain a Bcc. Folded, the field stays the one field it was.
    Returns ``data`` itself when there is nothing to fold (the body is never touched).
    """
    # Every item is folded on its way out: most have no bare CR up to their first empty line
    # (where the header section ends at the latest), which one search tells without parsing.
    blank = [i for i in (data.find(b"\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if _BARE_CR.search(data, 0, min(blank) + 3 if blank else len(data)) is None:
        return data
    end = RawMessage.parse(data).header_end
    if _BARE_CR.search(data, 0, end) is None:
        return data
    return _BARE_CR.sub(_fold, data[:end]) + data[end:]


def fold_long_lines(data: bytes) -> bytes:
    """``data`` with every line longer than :data:`LINE_LIMIT` broken into lines that are not,
    each after the first starting with white space; ``data`` itself when no line is too long.

    A smarthost may refuse such a line for good ("500 Line too long"), and the alert would be
    lost. A line is broken before a space or tab of its own where it has one, which in a
    header field is folding (RFC 5322 2.2.3: unfolded, the field is what it was); else it is
    cut and the rest starts with an added space, as Postfix's ``smtp_line_length_limit``
    does. A line that starts with a dot gets one byte less, which dot stuffing adds back on
    the wire; no UTF-8 character is cut in two.
    """
    out: list[bytes] = []
    done = 0
    for start, end in _long_lines(data):
        out += (data[done:start], _broken(data[start:end]))
        done = end
    if not out:
        return data
    out.append(data[done:])
    return b"".join(out)


def _long_lines(data: bytes) -> Iterator[tuple[int, int]]:
    """Where the lines too long for SMTP are in ``data``, as (start, end).

    Every item is looked at on its way out, so this copies nothing and reads each byte at
    most a few times, in C: a line of ``step`` bytes or more holds one of every ``step``-th
    positions, so only the lines around those are looked at.
    """
    step = LINE_LIMIT - 1
    size = len(data)
    known = 0  # no line that is still to be looked at starts before this
    position = step - 1
    while position < size:
        if data[position] in b"\r\n":
            known = position + 1
        else:
            lf = data.rfind(b"\n", known, position)
            start = max(known - 1, lf, data.rfind(b"\r", max(lf, known), position)) + 1
            newline = _NEWLINE.search(data, position)
            end = size if newline is None else newline.start()
            if end - start + (data[start : start + 1] == b".") > LINE_LIMIT:
                yield start, end
            known = end
        position += step
        while position < known:
            position += step


def _broken(line: bytes) -> bytes:
    """``line`` in pieces SMTP takes: folded before white space where there is some in the
    second half of a piece (unfolding gives the line back), else cut with a space added."""
    out: list[bytes] = []
    start, room = 0, LINE_LIMIT - line.startswith(b".")
    while len(line) - start > room:
        end = start + room
        space = max(line.rfind(b" ", start + 1, end + 1), line.rfind(b"\t", start + 1, end + 1))
        # Before the first of a run of white space where it can: no line then ends in some.
        first = space
        while first > start + room // 2 and line[first - 1] in b" \t":
            first -= 1
        if first > start + room // 2:
            space = first
        if space > start + room // 2:
            out += (line[start:space], b"\r\n")
            start, room = space, LINE_LIMIT
            continue
        # A UTF-8 continuation byte (10xxxxxx) is not where a character starts.
        while end > start + room - 3 and 0x80 <= line[end] < 0xC0:
            end -= 1
        out += (line[start:end], b"\r\n ")
        start, room = end, LINE_LIMIT - 1  # the space that starts the next line
    out.append(line[start:])
    return b"".join(out)


def _fold(bare_cr: re.Match[bytes]) -> bytes:
    after = bare_cr.string[bare_cr.end() : bare_cr.end() + 1]
    return b"\r\n" if after in (b" ", b"\t") else b"\r\n "
