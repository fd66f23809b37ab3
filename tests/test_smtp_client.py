"""The client side of SMTP toward ``remote-smtp``: replies read whole however they are cut,
commands pipelined where the server offers PIPELINING and one at a time where it does not,
and every way a server can go wrong ends in an error, never a hang.

The reply parser is fed bytes directly (no socket); delivery is run against scripted servers
on 127.0.0.1 that check how the commands arrive, and against aiosmtpd
(:class:`~mail2alert.testing.CaptureServer`) for what each refusal means.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mail2alert.outbox import Item, RecipientResult
from mail2alert.settings import HostPort, Upstream
from mail2alert.testing import CaptureServer
from mail2alert.transports import Attempt
from mail2alert.transports import smtp as smtp_transport
from mail2alert.transports.smtp import SmtpConnection
from mail2alert.transports.smtpclient import (
    MAX_LINE,
    MAX_REPLIES,
    Client,
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
    """Run ``scenario(port)`` against a server that runs ``script`` for each connection;
    return once every connection's script has ended."""
    sessions: list[asyncio.Task[None]] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await scenario(port)
    finally:
        server.close()
        await server.wait_closed()
        async with asyncio.timeout(5):
            await asyncio.gather(*sessions)


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
    server = Scripted(
        {
            b"MAIL": b"553 5.7.1 sender not allowed\r\n",
            b"RCPT": b"503 5.5.1 Error: need MAIL command\r\n",
            b"DATA": b"503 5.5.1 Error: need MAIL command\r\n",
        },
        ehlo=EHLO if pipelining else b"250 scripted\r\n",
    )
    (attempt,) = deliver(server, item("a@example.org"))
    assert attempt.error == "553 5.7.1 sender not allowed"
    assert attempt.permanent
    assert not attempt.unreachable
    assert attempt.recipients == ()
    verbs = [line.split()[0] for line in server.lines]
    assert verbs == (
        [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"QUIT"]
        if pipelining
        else [b"EHLO", b"MAIL", b"RSET", b"QUIT"]
    )


def test_a_password_that_is_not_utf_8_is_never_shown() -> None:
    server = Scripted({}, ehlo=b"250-scripted\r\n250 AUTH PLAIN\r\n")

    async def scenario(port: int) -> None:
        with pytest.raises(ValueError, match="not valid UTF-8") as refused:
            await logged_in(port, "alerts", "s3cr\udcffet")
        assert "s3cr" not in str(refused.value)
        assert "\\udcff" not in str(refused.value)

    run_on("uvloop", serving(server, scenario))
    assert not [line for line in server.lines if line.startswith(b"AUTH")]


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


class Scripted:
    """An SMTP server on 127.0.0.1 that answers each line with the first of ``answers``
    whose key starts it, in any case (else 354 to DATA, 250 to the rest). It records every
    line it was sent (the message after 354 as one), and hangs up right after the
    ``hang_up_at``-th command ``hang_up_after`` (``.``: message) without answering it; with
    ``close_after_message``, it closes each connection once a message is answered."""

    def __init__(
        self,
        answers: dict[bytes, bytes],
        *,
        ehlo: bytes = EHLO,
        hang_up_after: bytes = b"",
        hang_up_at: int = 1,
        close_after_message: bool = False,
    ) -> None:
        self.answers = answers
        self.close_after_message = close_after_message
        self.ehlo = ehlo
        self.hang_up_after = hang_up_after
        self.hang_up_at = hang_up_at
        self.lines: list[bytes] = []
        self.sessions = 0

    def _last_straw(self) -> bool:
        self.hang_up_at -= 1
        return self.hang_up_at == 0

    def answer(self, line: bytes) -> bytes:
        for start, reply in self.answers.items():
            if line.upper().startswith(start.upper()):
                return reply
        return b"354 go ahead\r\n" if line.upper() == b"DATA\r\n" else b"250 2.0.0 Ok\r\n"

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        writer.write(b"220 scripted ESMTP\r\n")
        while line := await reader.readline():
            self.lines.append(line)
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == self.hang_up_after and self._last_straw():
                break
            if verb == b"EHLO":
                writer.write(self.ehlo)
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            elif verb == b"DATA" and self.answer(line).startswith(b"354"):
                writer.write(self.answer(line))
                first = await reader.readline()
                data = first if first == b".\r\n" else first + await read_data(reader)
                self.lines.append(data)
                if self.hang_up_after == b"." and self._last_straw():
                    break
                writer.write(self.answer(data))
                if self.close_after_message:
                    break
            else:
                writer.write(self.answer(line))
        writer.close()


def deliver(server: Scripted, *items: Item, upstream: Any = None) -> list[Attempt]:
    """Send ``items`` one after another over one SmtpConnection to ``server``."""

    async def scenario(port: int) -> None:
        connection = SmtpConnection("127.0.0.1", port, timeout=5, local_hostname="m2a.test")
        for one in items:
            attempts.append(await connection.send(one))
        await connection.close()

    attempts: list[Attempt] = []
    run_on("uvloop", serving(server, scenario))
    return attempts


def test_when_data_is_taken_with_no_recipient_an_empty_message_ends_it() -> None:
    """RFC 2920, 3.1: a server that says 354 although it took no RCPT is sent a lone dot."""
    server = Scripted(
        {
            b"RCPT": b"550 5.1.1 no such user\r\n",
            b"DATA": b"354 go ahead\r\n",
            b".\r\n": b"554 5.5.1 no valid recipients\r\n",
        }
    )
    (attempt,) = deliver(server, item("gone@example.org"))
    assert attempt.recipients == (
        RecipientResult("gone@example.org", "dead", "550 5.1.1 no such user"),
    )
    assert server.lines[-2:] == [b".\r\n", b"QUIT\r\n"]
    assert b"Subject: hi\r\n" not in b"".join(server.lines)


@pytest.mark.parametrize("hang_up_after", [b"MAIL", b"RCPT"])
def test_a_server_that_refuses_the_sender_and_hangs_up_has_refused_it(
    hang_up_after: bytes,
) -> None:
    """As Exim's ``drop`` does: the refusal is the answer about the item, not an outage."""
    server = Scripted({b"MAIL": b"550 5.7.1 go away\r\n"}, hang_up_after=hang_up_after)
    if hang_up_after == b"MAIL":  # it answers, then hangs up
        server.answers[b"RCPT"] = b"503 5.5.1 need MAIL\r\n"
        server.hang_up_after = b"RCPT"
    (attempt,) = deliver(server, item("a@example.org"))
    assert attempt.error == "550 5.7.1 go away"
    assert attempt.permanent
    assert not attempt.unreachable


def test_a_connection_lost_after_the_message_is_not_sent_again_at_once() -> None:
    """The server may have taken it: the item waits for the destination, which is tried
    again later, rather than go out twice in the same breath."""
    server = Scripted({}, hang_up_after=b".", hang_up_at=2)
    first, second = deliver(server, item("a@example.org"), item("b@example.org"))
    assert first.reply.startswith("250 ")
    assert second.unreachable
    assert "lost" in second.error
    assert server.sessions == 1
    assert sum(line.startswith(b"Subject: hi") for line in server.lines) == 2


def test_a_connection_the_server_closed_after_a_message_is_opened_again_for_the_next() -> None:
    """As a server's idle timeout or its limit of messages per connection would: whether the
    close is seen before the next item or while it is sent, the item goes out, once."""
    server = Scripted({}, close_after_message=True)
    first, second = deliver(server, item("a@example.org"), item("b@example.org"))
    assert first.reply.startswith("250 ")
    assert second.reply.startswith("250 ")
    assert server.sessions == 2
    assert sum(line.startswith(b"Subject: hi") for line in server.lines) == 2


def test_text_after_the_220_to_starttls_is_refused_before_the_handshake() -> None:
    """Anything after the 220 came in clear text, where anyone on the path could have put
    it (extensions, a reply to come): the connection is dropped and nothing is sent."""
    server = Scripted(
        {b"STARTTLS": b"220 2.0.0 Ready\r\n250-INJECTED\r\n"},
        ehlo=b"250-scripted\r\n250 STARTTLS\r\n",
    )

    async def scenario(port: int) -> None:
        connection = SmtpConnection(
            "127.0.0.1",
            port,
            timeout=5,
            local_hostname="m2a.test",
            upstream=Upstream(address=HostPort("127.0.0.1", port), tls="may"),
        )
        attempt = await connection.send(item("a@example.org"))
        assert attempt.unreachable
        assert "said more after its 220 to STARTTLS" in attempt.error

    run_on("uvloop", serving(server, scenario))
    assert [line.split(b" ")[0].strip() for line in server.lines] == [b"EHLO", b"STARTTLS"]


def test_a_line_of_a_reply_after_the_220_is_unread_input_too() -> None:
    async def scenario() -> None:
        wire, _ = wire_on(asyncio.get_running_loop())
        wire.data_received(b"220 go ahead\r\n250-SMTPUTF8\r\n")
        assert await wire.reply() == Reply(220, "go ahead")
        assert wire.pending()

    run_on("uvloop", scenario())


async def logged_in(port: int, user: str, password: str) -> Reply:
    client = await Client.connect("127.0.0.1", port, within=5)
    await client.ehlo("m2a.test")
    try:
        return await client.login(user, password)
    finally:
        await client.quit()


def test_cram_md5_answers_the_challenge_as_rfc_2195_shows() -> None:
    """RFC 2195's own example: user tim, password tanstaaftanstaaf."""
    challenge = base64.b64encode(b"<1896.697170952@postoffice.reston.mci.net>")
    server = Scripted(
        {
            b"AUTH CRAM-MD5": b"334 " + challenge + b"\r\n",
            base64.b64encode(b"tim b913a602c7eda7a495b4e6e7334d3890"): b"235 2.7.0 Ok\r\n",
        },
        ehlo=b"250-scripted\r\n250 AUTH LOGIN CRAM-MD5 PLAIN\r\n",
    )

    async def scenario(port: int) -> None:
        assert await logged_in(port, "tim", "tanstaaftanstaaf") == Reply(235, "2.7.0 Ok")

    run_on("uvloop", serving(server, scenario))


def test_login_sends_the_user_then_the_password_each_in_base64() -> None:
    server = Scripted(
        {
            b"AUTH LOGIN " + base64.b64encode(b"alerts"): b"334 UGFzc3dvcmQ6\r\n",
            base64.b64encode("pä55".encode()): b"235 2.7.0 Ok\r\n",
        },
        ehlo=b"250-scripted\r\n250 AUTH LOGIN\r\n",
    )

    async def scenario(port: int) -> None:
        assert (await logged_in(port, "alerts", "pä55")).code == 235

    run_on("uvloop", serving(server, scenario))


@pytest.mark.parametrize(
    ("first", "tried"),
    [
        (b"535 5.7.8 no\r\n", [b"AUTH CRAM-MD5", b"AUTH PLAIN"]),
        (b"454 4.7.0 try later\r\n", [b"AUTH CRAM-MD5"]),
    ],
    ids=["refused-then-the-next", "trouble-ends-the-tries"],
)
def test_a_refused_mechanism_is_followed_by_the_next_and_other_trouble_is_not(
    first: bytes, tried: list[bytes]
) -> None:
    server = Scripted(
        {b"AUTH CRAM-MD5": first, b"AUTH PLAIN": b"235 2.7.0 Ok\r\n"},
        ehlo=b"250-scripted\r\n250 AUTH PLAIN CRAM-MD5\r\n",
    )

    async def scenario(port: int) -> None:
        await logged_in(port, "alerts", "secret")

    run_on("uvloop", serving(server, scenario))
    assert [line.split()[:2] for line in server.lines if line.startswith(b"AUTH")] == [
        t.split(b" ") for t in tried
    ]


def test_an_item_with_more_recipients_than_one_write_takes_goes_one_command_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """So that the replies left unread at any moment stay few, however many recipients."""
    monkeypatch.setattr(smtp_transport, "PIPELINED_RCPTS", 2)
    pipelined: list[int] = []
    original = SmtpConnection._pipelined  # the path an item takes, counted

    async def counting(self: SmtpConnection, smtp: Client, one: Item, *rest: Any) -> Attempt:
        pipelined.append(len(one.recipients))
        return await original(self, smtp, one, *rest)

    monkeypatch.setattr(SmtpConnection, "_pipelined", counting)
    three, two = deliver(
        Scripted({}),
        item("a@example.org", "b@example.org", "c@example.org"),
        item("a@example.org", "b@example.org"),
    )
    assert [r.state for r in three.recipients] == ["done"] * 3
    assert [r.state for r in two.recipients] == ["done"] * 2
    assert pipelined == [2]


def test_a_refused_sender_stays_refused_when_the_server_closes_on_what_follows() -> None:
    """421 to the pipelined RCPT and DATA after a refused MAIL: the refusal is the answer
    about the item; the server is not taken for down."""
    server = Scripted(
        {
            b"MAIL": b"550 5.7.1 go away\r\n",
            b"RCPT": b"421 4.7.0 closing\r\n",
            b"DATA": b"421 4.7.0 closing\r\n",
        }
    )
    (attempt,) = deliver(server, item("a@example.org"))
    assert attempt.error == "550 5.7.1 go away"
    assert attempt.permanent
    assert not attempt.unreachable


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_refused_connection_reads_the_same_on_every_event_loop(loop_name: str) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]

    async def scenario() -> Attempt:
        connection = SmtpConnection("127.0.0.1", port, timeout=5, local_hostname="m2a.test")
        return await connection.send(item("a@example.org"))

    attempt = run_on(loop_name, scenario())
    assert attempt.error == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert attempt.unreachable
