"""DATA read in blocks gives exactly what aiosmtpd's line-by-line DATA gives, for any bytes.

aiosmtpd's own ``smtp_DATA`` is the oracle: both sessions get the same bytes, cut into the
same random pieces, and must answer the same, hand the handler the same content and leave
the same bytes unread.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mail2alert.session import DataDecoder, LeanSMTP
from tests.helpers import RecordingHandler, RecordingTransport, RecordingWriter

Outcome = tuple[list[bytes], list[bytes], bytes]


async def _data(
    session_class: type[SMTP], chunks: list[bytes], settings: dict[str, Any]
) -> Outcome:
    """Run one DATA command over ``chunks``: (replies, contents, bytes left unread)."""
    if session_class is LeanSMTP:
        return await _lean_data(chunks, settings)
    handler = RecordingHandler()
    session = session_class(handler, data_size_limit=settings.get("size_limit", 2**25))
    reader = asyncio.StreamReader(limit=session.line_length_limit)
    writer = RecordingWriter()
    session._reader = reader
    session._writer = writer  # type: ignore[assignment]
    session.transport = object()  # type: ignore[assignment]
    _ready_for_data(session)
    command = asyncio.ensure_future(session.smtp_DATA(""))
    for chunk in chunks:
        reader.feed_data(chunk)
        for _ in range(3):
            await asyncio.sleep(0)
    await asyncio.wait_for(command, 10)
    return writer.written, handler.contents, bytes(reader._buffer)  # type: ignore[attr-defined]


class _LeanAfterData(LeanSMTP):
    """LeanSMTP that reads no command after DATA: what is left is what DATA left unread."""

    def _feed_data(self, decoder: DataDecoder) -> bool:
        ended = super()._feed_data(decoder)
        if ended and self.transport is not None:
            self.transport.close()  # commands are read only while the connection is open
        return ended


async def _lean_data(chunks: list[bytes], settings: dict[str, Any]) -> Outcome:
    """DATA as LeanSMTP takes it: the bytes come to the session as a transport gives them."""
    handler = RecordingHandler()
    session = _LeanAfterData(handler, data_size_limit=settings.get("size_limit", 2**25))
    for name, value in settings.items():
        if name != "size_limit":
            setattr(session, name, value)
    transport = RecordingTransport()
    session.connection_made(transport)  # type: ignore[arg-type]
    transport.written.clear()  # the greeting
    _ready_for_data(session)
    session.data_received(b"DATA\r\n")
    for chunk in chunks:
        session.data_received(chunk)
        for _ in range(3):
            await asyncio.sleep(0)
    busy = session._busy
    if busy is not None:
        await asyncio.wait_for(busy, 10)
    return transport.written, handler.contents, bytes(session._buffer)


def _ready_for_data(session: SMTP) -> None:
    """After HELO and one RCPT."""
    session.session = Session(asyncio.get_running_loop())
    session.session.host_name = "client.test"
    session.envelope = SmtpEnvelope()
    session.envelope.rcpt_tos.append("someone@example.com")


def both(chunks: list[bytes], **settings: Any) -> tuple[Outcome, Outcome]:
    """What aiosmtpd's DATA and ours make of ``chunks``."""

    async def run() -> tuple[Outcome, Outcome]:
        return await _data(SMTP, chunks, settings), await _data(LeanSMTP, chunks, settings)

    return asyncio.run(run())


#: Lines that stress transparency and the limits: dots, lone CR and LF, lines at the limit.
PIECES = [
    b"",
    b".",
    b"..",
    b"...",
    b".x",
    b"x.",
    b"x.\r",
    b"\r",
    b"\n",
    b"a\rb",
    b"a\nb",
    b"\n.",
    b"\r.",
    b".\r",
    b"Subject: hello",
    b"x" * 998,
    b"x" * 999,
    b"x" * 1000,
    b"x" * 1001,
    b"." + b"x" * 999,
    b"x" * 3000,
]


def random_stream(rnd: random.Random) -> bytes:
    lines = [rnd.choice(PIECES) for _ in range(rnd.randint(0, 40))]
    tail = rnd.choice([b"", b"QUIT\r\n", b"RSET\r\nNOOP\r\n"])
    return b"\r\n".join(lines) + (b"\r\n" if lines else b"") + b".\r\n" + tail


def cut(data: bytes, rnd: random.Random) -> list[bytes]:
    """``data`` in random pieces, from single bytes to whole kilobytes."""
    chunks: list[bytes] = []
    pos = 0
    while pos < len(data):
        size = rnd.choice([1, 2, 3, 5, rnd.randint(1, 200), rnd.randint(1, 5000)])
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


def _cases(seed: int, count: int) -> Iterator[tuple[bytes, list[bytes]]]:
    rnd = random.Random(seed)
    for _ in range(count):
        stream = random_stream(rnd)
        yield stream, cut(stream, rnd)


def test_any_data_reads_exactly_as_aiosmtpd_reads_it() -> None:
    """Replies, content and unread bytes agree for random streams cut at random places."""
    for stream, chunks in _cases(seed=11, count=400):
        original, lean = both(chunks)
        assert lean == original, repr(stream[:200])


def breaks_both_limits(stream: bytes, size_limit: int) -> bool:
    """Whether DATA ``stream`` has a line too long and is too big as well."""
    body = b"" if stream.startswith(b".\r\n") else stream.split(b"\r\n.\r\n")[0] + b"\r\n"
    return len(body) > size_limit and any(len(line) >= 1000 for line in body.split(b"\r\n"))


def test_data_over_the_size_limit_is_refused_as_aiosmtpd_refuses_it() -> None:
    """The size limit counts the same bytes (dot-stuffed, CRLF included) and answers 552.

    A message with a line too long that is too big as well is refused either way, but which
    of the two refusals comes first depends, in aiosmtpd, on where its reads happened to end;
    for those only the refusal itself is compared.
    """
    for stream, chunks in _cases(seed=12, count=200):
        original, lean = both(chunks, size_limit=2000)
        if breaks_both_limits(stream, 2000):
            assert lean[0][-1][:1] == original[0][-1][:1] == b"5"
            assert (lean[1], lean[2]) == (original[1], original[2]) == ([], lean[2])
            continue
        assert lean == original, repr(stream[:200])


def test_data_spooled_to_a_file_reads_as_data_kept_in_memory() -> None:
    """A message over the spool threshold goes through a file and comes back byte for byte."""
    for stream, chunks in _cases(seed=13, count=100):
        original, lean = both(chunks, spool_threshold=64)
        assert lean == original, repr(stream[:200])


def test_a_message_larger_than_the_stream_limit_reads_as_aiosmtpd_reads_it() -> None:
    """A big message fed in big pieces: 3 MB, dot-stuffed lines in every block."""
    rnd = random.Random(14)
    lines = [rnd.choice([b"..leading dot", b"plain line.", b"x" * 900, b""]) for _ in range(9000)]
    stream = b"\r\n".join(lines) + b"\r\n.\r\n"
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]

    original, lean = both(chunks, spool_threshold=1 << 20)

    assert lean == original
    (content,) = lean[1]
    assert len(content) > 1 << 20


def test_the_empty_message_is_an_end_line_alone() -> None:
    """``.`` as the first line ends DATA with an empty message."""
    original, lean = both([b".\r\n"])

    assert lean == original
    assert lean[1] == [b""]


def test_a_spool_that_cannot_be_written_answers_452_and_keeps_nothing(tmp_path: Path) -> None:
    """When the spool directory cannot take the message, the sender is told to retry later."""

    async def run() -> Outcome:
        settings = {"spool_threshold": 10, "spool_dir": str(tmp_path / "missing")}
        return await _data(LeanSMTP, [b"x" * 100 + b"\r\n.\r\n"], settings)

    replies, contents, _ = asyncio.run(run())

    assert contents == []
    assert replies[-1] == b"452 4.3.1 Insufficient system storage, try again later\r\n"


@pytest.mark.parametrize("threshold", [1, 1 << 20])
def test_the_bytes_after_the_end_line_are_left_for_the_next_command(threshold: int) -> None:
    """DATA reads nothing past its end line, so a pipelined command is still there."""
    original, lean = both([b"a\r\n.\r\nQUIT\r\n"], spool_threshold=threshold)

    assert lean == original
    assert lean[2] == b"QUIT\r\n"
