"""The client side of SMTP toward ``remote-smtp``: replies read whole however they are cut,
commands pipelined where the server offers PIPELINING and one at a time where it does not,
and every way a server can go wrong ends in an error, never a hang.

The reply parser is fed bytes directly (no socket); delivery is run against scripted servers
on 127.0.0.1 that check how the commands arrive, and against aiosmtpd
(:class:`~mail2alert.testing.CaptureServer`) for what each refusal means.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

import pytest

from mail2alert.outbox import Item
from mail2alert.testing import CaptureServer
from mail2alert.transports.smtp import SmtpConnection
from mail2alert.transports.smtpclient import (
    MAX_LINE,
    MAX_REPLIES,
    Garbled,
    Lost,
    Reply,
    _extension,
    _Wire,
)
from tests.helpers import LOOPS, RecordingTransport, run_on

EHLO = (
    b"250-smarthost.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
    b"250-AUTH=LOGIN PLAIN\r\n250 8BITMIME\r\n"
)


def wire_on(
    loop: asyncio.AbstractEventLoop, timeout: float = 5.0
) -> tuple[_Wire, RecordingTransport]:
    wire = _Wire(loop, timeout)
    transport = RecordingTransport()
    wire.connection_made(transport)  # type: ignore[arg-type]
    return wire, transport


def item(*recipients: str, data: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> Item:
    return Item(1, "Q1", "mail", "go@example.com", data, 0, 0.0, recipients)


# The reply parser, fed bytes: no sockets.


@pytest.mark.parametrize("seed", range(20))
def test_replies_cut_anywhere_are_read_whole_and_in_order(seed: int) -> None:
    stream = b"220 hello\r\n" + EHLO + b"250 2.1.0 Ok\r\n554 5.5.1 Error: no valid recipients\r\n"
    cuts = sorted(random.Random(seed).sample(range(1, len(stream)), 8))

    async def scenario() -> list[Reply]:
        wire, _ = wire_on(asyncio.get_running_loop())
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            wire.data_received(stream[start:end])
        return [await wire.reply() for _ in range(4)]

    greeting, ehlo, mail, data = run_on("uvloop", scenario())
    assert greeting == Reply(220, "hello")
    assert ehlo.code == 250
    assert ehlo.text.split("\n") == [
        "smarthost.example.org",
        "PIPELINING",
        "SIZE 10240000",
        "AUTH=LOGIN PLAIN",
        "8BITMIME",
    ]
    assert mail == Reply(250, "2.1.0 Ok")
    assert str(data) == "554 5.5.1 Error: no valid recipients"


def test_a_reply_on_several_lines_is_shown_on_one() -> None:
    assert str(Reply(550, "5.1.1 no such user\nsee the manual")) == (
        "550 5.1.1 no such user see the manual"
    )


@pytest.mark.parametrize(
    ("line", "extension"),
    [
        ("PIPELINING", ("PIPELINING", "")),
        ("auth LOGIN PLAIN", ("AUTH", "LOGIN PLAIN")),
        ("AUTH=LOGIN PLAIN", ("AUTH", "LOGIN PLAIN")),
        ("SIZE 10240000", ("SIZE", "10240000")),
    ],
)
def test_an_ehlo_line_is_read_as_keyword_and_parameters(
    line: str, extension: tuple[str, str]
) -> None:
    assert _extension(line) == extension


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 400 Bad Request\r\n", b"+OK POP3 ready\r\n", b"25\r\n", b"2500 what\r\n"],
)
def test_what_is_no_smtp_reply_is_garbled_and_the_connection_dropped(answer: bytes) -> None:
    async def scenario() -> tuple[BaseException, bool]:
        wire, transport = wire_on(asyncio.get_running_loop())
        wire.data_received(answer)
        with pytest.raises(Garbled) as raised:
            await wire.reply()
        return raised.value, transport.aborted

    error, aborted = run_on("uvloop", scenario())
    assert "no SMTP reply" in str(error)
    assert aborted


@pytest.mark.parametrize("end", [b"", b"\r\n"], ids=["before-it-ends", "ended"])
def test_a_reply_line_longer_than_the_limit_is_garbled(end: bytes) -> None:
    async def scenario() -> None:
        wire, _ = wire_on(asyncio.get_running_loop())
        wire.data_received(b"250 " + b"x" * MAX_LINE + end)
        with pytest.raises(Garbled, match="over 8192 bytes"):
            await wire.reply()

    run_on("uvloop", scenario())


def test_a_flood_of_replies_nobody_asked_for_ends_the_connection_at_the_limit() -> None:
    async def scenario() -> None:
        wire, transport = wire_on(asyncio.get_running_loop())
        wire.data_received(b"250 Ok\r\n" * (MAX_REPLIES + 5))
        assert transport.aborted
        for _ in range(MAX_REPLIES + 1):  # what came before the limit is still read
            await wire.reply()
        with pytest.raises(Garbled, match="replies to no command"):
            await wire.reply()

    run_on("uvloop", scenario())


def test_replies_that_came_before_the_server_hung_up_are_read_then_the_loss() -> None:
    async def scenario() -> None:
        wire, _ = wire_on(asyncio.get_running_loop())
        wire.data_received(b"421 4.3.2 shutting down\r\n")
        wire.eof_received()
        wire.connection_lost(None)
        assert await wire.reply() == Reply(421, "4.3.2 shutting down")
        with pytest.raises(Lost, match="closed the connection"):
            await wire.reply()
        with pytest.raises(Lost):
            wire.write(b"QUIT\r\n")
        assert wire.closed.done()

    run_on("uvloop", scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_no_reply_within_the_timeout_is_a_timeout(loop_name: str) -> None:
    async def scenario() -> None:
        wire, _ = wire_on(asyncio.get_running_loop(), timeout=0.01)
        with pytest.raises(TimeoutError, match=r"no answer within 0\.01 s"):
            await wire.reply()
        wire.data_received(b"250 late\r\n")
        assert await wire.reply() == Reply(250, "late")

    run_on(loop_name, scenario())


# Delivery against servers on 127.0.0.1.

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serving(script: Script, scenario: Callable[[int], Awaitable[None]]) -> None:
    """Run ``scenario(port)`` against a server that runs ``script`` for each connection."""
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await scenario(port)
    finally:
        server.close()
        await server.wait_closed()


async def greet(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, ehlo: bytes) -> None:
    writer.write(b"220 scripted ESMTP\r\n")
    assert (await reader.readline()).startswith(b"EHLO ")
    writer.write(ehlo)


async def read_data(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n.\r\n")


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_with_pipelining_mail_every_rcpt_and_data_go_before_any_reply(loop_name: str) -> None:
    """The server answers nothing until it has MAIL, both RCPTs and DATA: a client that
    waited for MAIL's reply would wait for ever."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(writer, reader, EHLO)
        commands = [await reader.readline() for _ in range(4)]
        seen.extend(commands)
        writer.write(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
        seen.append(await read_data(reader))
        writer.write(b"250 2.0.0 Ok: queued as ABC\r\n")
        seen.append(await reader.readline())
        writer.write(b"221 bye\r\n")
        writer.close()

    async def scenario(port: int) -> None:
        connection = SmtpConnection("127.0.0.1", port, timeout=5, local_hostname="m2a.test")
        attempt = await connection.send(item("a@example.org", "b@example.org"))
        await connection.close()
        assert attempt.reply == "250 2.0.0 Ok: queued as ABC"
        assert [r.state for r in attempt.recipients] == ["done", "done"]

    run_on(loop_name, serving(script, scenario))
    assert seen == [
        b"MAIL FROM:<go@example.com>\r\n",
        b"RCPT TO:<a@example.org>\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"DATA\r\n",
        b"Subject: hi\r\n\r\nbody\r\n.\r\n",
        b"QUIT\r\n",
    ]


def test_without_pipelining_each_command_waits_for_the_reply_before() -> None:
    """The server checks that nothing more has arrived before it answers each command."""
    early: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(writer, reader, b"250-scripted\r\n250 8BITMIME\r\n")
        for answer in (b"250 Ok\r\n", b"250 Ok\r\n", b"354 go\r\n"):
            await reader.readline()
            # A pipelining client's next command would arrive within this window.
            with contextlib.suppress(TimeoutError):
                early.append(await asyncio.wait_for(reader.readexactly(1), 0.05))
            writer.write(answer)
        await read_data(reader)
        writer.write(b"250 queued\r\n")
        await reader.readline()
        writer.close()

    async def scenario(port: int) -> None:
        connection = SmtpConnection("127.0.0.1", port, timeout=5, local_hostname="m2a.test")
        attempt = await connection.send(item("a@example.org"))
        await connection.close()
        assert attempt.reply == "250 queued"

    run_on("uvloop", serving(script, scenario))
    assert early == []


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
def test_when_every_recipient_is_refused_no_data_goes_out_and_the_connection_serves_on(
    pipelining: bool,
) -> None:
    with CaptureServer(pipelining=pipelining) as upstream:
        upstream.refuse_rcpt("gone@example.org", "550 5.1.1 no such user")
        upstream.refuse_rcpt("full@example.org", "452 4.2.2 mailbox full")

        async def scenario() -> tuple[list[tuple[str, str, str]], str, int]:
            connection = SmtpConnection(
                "127.0.0.1", upstream.port, timeout=5, local_hostname="m2a.test"
            )
            refused = await connection.send(item("gone@example.org", "full@example.org"))
            then = await connection.send(item("here@example.org"))
            await connection.close()
            shown = [(r.rcpt, r.state, r.reason) for r in refused.recipients]
            return shown, then.reply, len(then.recipients)

        refused, reply, count = run_on("uvloop", scenario())
        assert refused == [
            ("gone@example.org", "dead", "550 5.1.1 no such user"),
            ("full@example.org", "pending", "452 4.2.2 mailbox full"),
        ]
        assert reply.startswith("250 ")
        assert count == 1
        assert [m.rcpt_tos for m in upstream.messages] == [("here@example.org",)]
        assert upstream.connections == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
def test_a_refused_sender_refuses_the_whole_item_and_nothing_goes_out(pipelining: bool) -> None:
    refusal = b"553 5.7.1 sender not allowed\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ehlo = EHLO if pipelining else b"250 scripted\r\n"
        await greet(writer, reader, ehlo)
        while line := await reader.readline():
            verb = line.split(b" ")[0].strip().upper()
            if verb == b"MAIL":
                writer.write(refusal)
            elif verb in (b"RCPT", b"DATA"):
                writer.write(b"503 5.5.1 Error: need MAIL command\r\n")
            elif verb == b"RSET":
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"502 what\r\n")  # data would land here
        writer.close()

    async def scenario(port: int) -> None:
        connection = SmtpConnection("127.0.0.1", port, timeout=5, local_hostname="m2a.test")
        attempt = await connection.send(item("a@example.org"))
        await connection.close()
        assert attempt.error == "553 5.7.1 sender not allowed"
        assert attempt.permanent
        assert not attempt.unreachable
        assert attempt.recipients == ()

    run_on("uvloop", serving(script, scenario))


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\n", "answered no SMTP reply: 'HTTP/1.1 200 OK'"),
        (b"421 4.3.2 going down\r\n", "answered 421 4.3.2 going down"),
        (b"", "connection to 127.0.0.1:{port} lost: the server closed the connection"),
    ],
)
def test_a_server_that_goes_wrong_after_ehlo_leaves_the_item_waiting_for_it(
    answer: bytes, error: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await greet(writer, reader, EHLO)
        await reader.readline()
        writer.write(answer)
        writer.close()

    async def scenario(port: int) -> None:
        connection = SmtpConnection("127.0.0.1", port, timeout=5, local_hostname="m2a.test")
        attempt = await connection.send(item("a@example.org"))
        await connection.close()
        assert attempt.unreachable
        assert attempt.recipients == ()
        assert error.format(port=port) in attempt.error

    run_on("uvloop", serving(script, scenario))
