"""LeanSMTP's engine: commands answered in ``data_received`` as they come, a task only for a
command that has to wait, and the very answers aiosmtpd's own session gives.

aiosmtpd's ``SMTP`` is the oracle: both serve the same random streams of commands over real
sockets, sent in random pieces, and must answer them byte for byte alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme
import uvloop
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mail2alert.session import LeanSMTP, SessionCount
from tests.helpers import LOOPS, RecordingHandler, RecordingTransport, run_on, server_tls

#: Command lines, good and bad: what a client may send, and what it should not.
COMMANDS = [
    "HELO client.example",
    "EHLO client.example",
    "HELO",
    "ehlo",
    "MAIL FROM:<a@example.com>",
    "MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME",
    "MAIL FROM:<a@example.com> SIZE=999999999",
    "MAIL FROM:<a@example.com> SMTPUTF8",
    "MAIL FROM:<a@example.com> X=1",
    "mail from:<lower@example.com>",
    "MAIL FROM: a@example.com",
    "MAIL FROM:<>",
    "MAIL TO:<a@example.com>",
    "MAIL FROM:<ü@example.com>",
    "RCPT TO:<b@example.com>",
    "RCPT TO:<c@example.com> NOTIFY=NEVER",
    "RCPT TO:<@route:d@example.com>",
    "RCPT FROM:<b@example.com>",
    "RCPT",
    "DATA",
    "DATA now",
    "RSET",
    "RSET x",
    "NOOP",
    "NOOP anything",
    "VRFY someone",
    "VRFY",
    "EXPN list",
    "HELP MAIL",
    "AUTH PLAIN",
    "STARTTLS",
    "QUIT now",
    "NOSUCH",
    "",
    " ",
    "\u00e9t\u00e9",
    "MAIL FROM:<" + "x" * 490 + "@example.com>",
    "NOOP " + "x" * 505,
    "NOOP " + "x" * 506,
    "NOOP " + "x" * 1000,
    "NOOP " + "x" * 3000,
]

#: What may follow DATA: message lines, the end line among them or not.
BODY = [b"Subject: hi", b"", b"text", b".dotted", b"..", b"x" * 1200, b"QUIT"]


def _script(rnd: random.Random) -> bytes:
    """Random commands, and whole transactions among them (most streams greet first)."""
    lines: list[bytes] = []
    if rnd.random() < 0.8:
        lines.append(rnd.choice([b"HELO client.example", b"EHLO client.example"]))
    for _ in range(rnd.randint(1, 20)):
        if rnd.random() < 0.3:
            lines += [b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>", b"DATA"]
            lines += [rnd.choice(BODY) for _ in range(rnd.randint(0, 4))] + [b"."]
            continue
        command = rnd.choice(COMMANDS)
        lines.append(command.encode("utf-8"))
        if command == "DATA":
            lines += [rnd.choice(BODY) for _ in range(rnd.randint(0, 4))]
            if rnd.random() < 0.9:
                lines.append(b".")
    ending = rnd.choice([b"\r\n", b"\n"])
    # The end line ends a DATA still open; else it is one more unknown command.
    return ending.join(lines) + b"\r\n.\r\nQUIT\r\n"


def _pieces(data: bytes, rnd: random.Random) -> list[bytes]:
    pieces: list[bytes] = []
    while data:
        size = rnd.choice([1, 3, rnd.randint(1, 100), len(data)])
        pieces.append(data[:size])
        data = data[size:]
    return pieces


async def _served(make: Callable[[], SMTP], pieces: list[bytes]) -> bytes:
    """Everything a session answers to ``pieces``, sent one after the other, until it closes."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(make, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        answers = await asyncio.wait_for(reader.read(), 10)  # the session closes after QUIT
        writer.close()
        return answers
    finally:
        server.close()
        await server.wait_closed()


def test_any_stream_of_commands_is_answered_as_aiosmtpd_answers_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replies byte for byte, and the messages handed over, for random command streams cut
    at random places (one session at a time: aiosmtpd's command size limits are shared by
    every session of the process). Unknown commands do not end these sessions: a session
    that closes while the client still sends makes the kernel reset the connection, and
    replies not yet read would be lost (the next test covers that limit)."""
    monkeypatch.setattr("aiosmtpd.smtp.BOGUS_LIMIT", 10_000)
    monkeypatch.setattr("mail2alert.session.BOGUS_LIMIT", 10_000)

    async def run() -> None:
        rnd = random.Random(21)
        delivered = 0
        for _ in range(150):
            pieces = _pieces(_script(rnd), rnd)
            original, lean = RecordingHandler(), RecordingHandler()
            theirs = await _served(lambda h=original: SMTP(h, hostname="test"), pieces)  # type: ignore[misc]
            ours = await _served(lambda h=lean: LeanSMTP(h, hostname="test"), pieces)  # type: ignore[misc]
            assert ours == theirs, b"".join(pieces)[:300]
            assert lean.contents == original.contents
            delivered += len(lean.contents)
        assert delivered > 20  # the streams do carry messages, not only refusals

    asyncio.run(run())


def test_too_many_unknown_commands_end_the_session_as_in_aiosmtpd() -> None:
    async def run() -> tuple[bytes, bytes]:
        pieces = [b"EHLO me\r\n", b"NOSUCH\r\n" * 3, b"NOOP\r\n", b"OTHER\r\n" * 2]
        theirs = await _served(lambda: SMTP(RecordingHandler(), hostname="test"), pieces)
        ours = await _served(lambda: LeanSMTP(RecordingHandler(), hostname="test"), pieces)
        return theirs, ours

    theirs, ours = asyncio.run(run())
    assert ours == theirs
    assert ours.endswith(b"502 5.5.1 Too many unrecognized commands, goodbye.\r\n")


# -- a command that has to wait ---------------------------------------------------------------


class _SlowHandler:
    """Answers DATA only when told to."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.called = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        self.called += 1
        await self.release.wait()
        return "250 stored"


async def _session(handler: Any) -> tuple[LeanSMTP, RecordingTransport]:
    session = LeanSMTP(handler, hostname="test", loop=asyncio.get_running_loop())
    transport = RecordingTransport()
    session.connection_made(transport)  # type: ignore[arg-type]
    return session, transport


async def _turns(condition: Callable[[], bool], limit: int = 50) -> None:
    """Let the loop run until ``condition`` holds (a few turns at most)."""
    for _ in range(limit):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("did not happen")


async def _eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until ``condition`` holds: what the server does when a client goes is not
    signalled to the test, so it is polled."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():  # nothing to wait on but the state itself
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("did not happen")
        await asyncio.sleep(0.005)


def test_commands_that_need_not_wait_are_answered_at_once_without_a_task() -> None:
    async def run() -> None:
        session, transport = await _session(RecordingHandler())
        session.data_received(b"HELO me\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\n")
        assert transport.written[1:] == [b"250 test\r\n", b"250 OK\r\n", b"250 OK\r\n"]
        assert session._busy is None

    asyncio.run(run())


def test_commands_after_one_that_waits_are_answered_after_it_in_order() -> None:
    async def run() -> None:
        handler = _SlowHandler()
        session, transport = await _session(handler)
        session.data_received(b"HELO me\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
        session.data_received(b"hi\r\n.\r\nNOOP\r\n")
        await _turns(lambda: handler.called == 1)
        assert transport.written[-1] == b"354 End data with <CR><LF>.<CR><LF>\r\n"
        session.data_received(b"RSET\r\n")
        assert session._busy is not None
        handler.release.set()
        await _turns(lambda: session._busy is None)
        assert transport.written[-3:] == [b"250 stored\r\n", b"250 OK\r\n", b"250 OK\r\n"]

    asyncio.run(run())


def test_a_command_waiting_when_the_connection_is_lost_is_cancelled_and_the_session_let_go() -> (
    None
):
    async def run() -> None:
        handler = _SlowHandler()
        session, transport = await _session(handler)
        session.data_received(b"HELO me\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.\r\n")
        await _turns(lambda: handler.called == 1)
        busy = session._busy
        assert busy is not None
        session.connection_lost(None)
        await _turns(lambda: session._busy is None)
        assert busy.cancelled()
        assert session._smtp_methods == {}  # the cycles are broken
        assert transport.written[-1].startswith(b"354")

    asyncio.run(run())


def test_much_sent_while_a_command_waits_pauses_reading_until_it_is_done() -> None:
    async def run() -> None:
        handler = _SlowHandler()
        session, transport = await _session(handler)
        paused: list[bool] = []
        transport.pause_reading = lambda: paused.append(True)  # type: ignore[method-assign]
        transport.resume_reading = lambda: paused.append(False)  # type: ignore[method-assign]
        session.data_received(b"HELO me\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.\r\n")
        await _turns(lambda: handler.called == 1)
        session.data_received(b"NOOP\r\n" * 100)
        session.data_received(b"NOOP\r\n" * 200)
        assert paused == [True]
        handler.release.set()
        await _turns(lambda: session._busy is None)
        assert paused == [True, False]
        assert transport.written[-300:] == [b"250 OK\r\n"] * 300

    asyncio.run(run())


def test_replies_the_client_does_not_read_stop_the_reading_of_commands() -> None:
    async def run() -> None:
        session, transport = await _session(RecordingHandler())
        paused: list[bool] = []
        transport.pause_reading = lambda: paused.append(True)  # type: ignore[method-assign]
        transport.resume_reading = lambda: paused.append(False)  # type: ignore[method-assign]
        session.pause_writing()
        session.pause_writing()
        session.resume_writing()
        assert paused == [True, False]

    asyncio.run(run())


@pytest.mark.parametrize(
    ("answer", "reply"),
    [
        (b"*\r\n", b"501 5.7.0 Auth aborted\r\n"),
        (b"not base64!\r\n", b"501 5.5.2 Can't decode base64\r\n"),
        (b"x" * 3000 + b"\r\n", b"500 5.5.2 Command line too long\r\n"),
    ],
)
def test_an_auth_answer_that_cannot_be_used_is_told_so(answer: bytes, reply: bytes) -> None:
    """The challenge's answer is read from the same stream as the commands."""

    async def run() -> list[bytes]:
        session, transport = await _session(RecordingHandler())
        challenge = asyncio.ensure_future(session.challenge_auth("User Name"))
        await _turns(lambda: len(transport.written) == 2)
        assert transport.written[1] == b"334 VXNlciBOYW1l\r\n"
        session._busy = challenge  # as AUTH, which waits for the answer
        for piece in (answer[:5], answer[5:1500], answer[1500:]):
            session.data_received(piece)
        await _turns(challenge.done)
        return transport.written[2:]

    assert asyncio.run(run()) == [reply]


def test_an_idle_session_is_told_why_and_closed_at_its_timeout() -> None:
    """Commands move the deadline; the one timer fires once it has passed."""

    async def run() -> tuple[list[bytes], bool, float]:
        loop = asyncio.get_running_loop()
        session = LeanSMTP(RecordingHandler(), hostname="test", timeout=0.2, loop=loop)
        transport = RecordingTransport()
        started = loop.time()
        session.connection_made(transport)  # type: ignore[arg-type]
        closed = loop.create_future()
        transport.close = lambda: closed.done() or closed.set_result(loop.time())  # type: ignore[method-assign]
        await asyncio.sleep(0.1)
        session.data_received(b"NOOP\r\n")
        at = await asyncio.wait_for(closed, 5)
        return transport.written, session._timeout_handle is None, at - started

    written, no_timer, after = asyncio.run(run())
    assert written[-1] == b"421 4.4.2 Timeout exceeded, closing the connection\r\n"
    assert no_timer
    assert after >= 0.3


async def _watched(seen: list[str], gate: asyncio.Future[None], *, then_yield: bool) -> None:
    """A command that waits for ``gate`` (then, with ``then_yield``, yields for ever) and
    notes how it ended."""
    try:
        await gate
        while then_yield:  # noqa: ASYNC110 - a bare yield is what is cancelled here
            await asyncio.sleep(0)
        seen.append("resumed")
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise
    except GeneratorExit:
        seen.append("closed")
        raise


async def _as_its_future_is_done(session: LeanSMTP, gate: asyncio.Future[None]) -> None:
    await asyncio.sleep(0)  # the task waits for the gate
    gate.set_result(None)
    assert session._busy is not None
    session._busy.cancel()


async def _before_its_task_ran(session: LeanSMTP, gate: asyncio.Future[None]) -> None:
    # Over TLS, the end of DATA and the client's close can come in one read.
    assert session._busy is not None
    session._busy.cancel()


async def _while_it_yields(session: LeanSMTP, gate: asyncio.Future[None]) -> None:
    gate.set_result(None)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    session.connection_lost(None)


@pytest.mark.parametrize(
    ("cancel", "then_yield"),
    [(_as_its_future_is_done, False), (_before_its_task_ran, False), (_while_it_yields, True)],
    ids=["as-its-future-is-done", "before-its-task-ran", "while-it-yields"],
)
def test_a_command_that_waits_sees_its_cancellation_as_under_a_task_of_its_own(
    cancel: Callable[[LeanSMTP, asyncio.Future[None]], Awaitable[None]], then_yield: bool
) -> None:
    """However the cancellation comes, the command gets CancelledError (its ``finally`` runs
    then), never a resumption, nor a GeneratorExit whenever it is collected."""

    async def run() -> list[str]:
        seen: list[str] = []
        session, _ = await _session(RecordingHandler())
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        session._start(_watched(seen, gate, then_yield=then_yield))
        await cancel(session, gate)
        await _turns(lambda: session._busy is None)
        return seen

    assert asyncio.run(run()) == ["cancelled"]


def test_the_idle_timer_fires_once_at_its_deadline_on_uvloop() -> None:
    """uvloop keeps timers to the millisecond: a deadline moved to within a millisecond of
    when the timer fires must not make it fire again and again until that moment."""
    calls: list[int] = []

    class Counting(LeanSMTP):
        def _timed_out(self) -> None:
            calls[-1] += 1
            super()._timed_out()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            calls.append(0)
            session = Counting(RecordingHandler(), hostname="test", timeout=0.05, loop=loop)
            transport = RecordingTransport()
            session.connection_made(transport)  # type: ignore[arg-type]
            await asyncio.sleep(0.0213)  # the deadline moves by a fraction of a millisecond
            session.data_received(b"NOOP\r\n")
            await _eventually(lambda t=transport: t.closed)  # type: ignore[misc]

    uvloop.run(run())
    assert max(calls) <= 3, calls


# -- STARTTLS at the edges ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@contextlib.asynccontextmanager
async def _tls_listener(
    ca: trustme.CA, count: SessionCount, *, idle: float = 300
) -> AsyncIterator[tuple[tuple[str, int], list[dict[str, Any]]]]:
    """A listener offering STARTTLS whose sessions count themselves in ``count``: its
    address, and the errors the loop reports. Closed on the way out."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    context = server_tls(ca)

    def make() -> LeanSMTP:
        session = LeanSMTP(RecordingHandler(), hostname="test", tls_context=context, timeout=idle)
        session.sessions = count
        return session

    server = await loop.create_server(make, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2], errors
    finally:
        server.close()
        await server.wait_closed()


async def _reply(reader: asyncio.StreamReader) -> bytes:
    lines = [await asyncio.wait_for(reader.readline(), 10)]
    while lines[-1][3:4] == b"-":
        lines.append(await asyncio.wait_for(reader.readline(), 10))
    return b"".join(lines)


async def _ask_for_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """EHLO and STARTTLS; the answer to STARTTLS."""
    writer.write(b"EHLO me\r\nSTARTTLS\r\n")
    await _reply(reader)
    return await _reply(reader)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_starttls_after_replies_the_client_did_not_read_yet_hands_over_to_tls(
    ca: trustme.CA, client_tls: ssl.SSLContext, loop_name: str
) -> None:
    """A client that sends many commands and STARTTLS before it reads any reply: TLS begins
    only once the replies before 220 are sent, and the session goes on over TLS."""
    count = SessionCount(limit=10)

    async def run() -> tuple[bytes, list[dict[str, Any]]]:
        async with _tls_listener(ca, count) as (address, errors):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(address)
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            await _reply(reader)
            writer.write(b"EHLO me\r\n" + b"NOOP\r\n" * 40_000 + b"STARTTLS\r\n")
            await asyncio.sleep(0.2)  # replies back up meanwhile
            while not (await _reply(reader)).startswith(b"220 "):
                pass
            await asyncio.wait_for(writer.start_tls(client_tls, server_hostname="localhost"), 10)
            writer.write(b"EHLO me\r\n")
            answer = await _reply(reader)
            writer.write(b"QUIT\r\n")
            await _reply(reader)
            writer.close()
            await _eventually(lambda: count.active == 0)
            return answer, errors

    answer, errors = run_on(loop_name, run())
    assert answer.startswith(b"250-test\r\n")
    assert errors == []


def test_starttls_on_a_tls_session_is_refused_and_the_session_goes_on(
    ca: trustme.CA, client_tls: ssl.SSLContext
) -> None:
    """aiosmtpd would start TLS inside TLS; a client silent in that second handshake then
    kept its place among the sessions for good."""
    count = SessionCount(limit=10)

    async def run() -> tuple[bytes, bytes]:
        async with _tls_listener(ca, count) as (address, _):
            reader, writer = await asyncio.open_connection(*address)
            await _reply(reader)
            await _ask_for_tls(reader, writer)
            await asyncio.wait_for(writer.start_tls(client_tls, server_hostname="localhost"), 10)
            again = await _ask_for_tls(reader, writer)
            writer.write(b"NOOP\r\n")
            after = await _reply(reader)
            writer.close()
            await _eventually(lambda: count.active == 0)
            return again, after

    assert asyncio.run(run()) == (b"554 5.5.1 Error: TLS already active\r\n", b"250 OK\r\n")


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_client_silent_in_the_starttls_handshake_is_cut_at_the_timeout_and_its_slot_freed(
    ca: trustme.CA, loop_name: str
) -> None:
    count = SessionCount(limit=10)

    async def run() -> tuple[bytes, int, list[dict[str, Any]]]:
        async with _tls_listener(ca, count, idle=0.3) as (address, errors):
            reader, writer = await asyncio.open_connection(*address)
            await _reply(reader)
            await _ask_for_tls(reader, writer)
            left = await asyncio.wait_for(reader.read(), 10)  # until the server hangs up
            writer.close()
            await _eventually(lambda: count.active == 0)
            return left, count.active, errors

    left, active, errors = run_on(loop_name, run())
    assert left == b""
    assert active == 0
    assert errors == []


@pytest.mark.parametrize("waits", [False, True], ids=["at-once", "after-waiting"])
def test_a_command_that_raises_is_answered_as_aiosmtpd_answers_it_and_the_session_goes_on(
    waits: bool, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing:
        async def handle_DATA(self, *args: object) -> str:
            if waits:
                await asyncio.sleep(0)
            raise ValueError("boom")

    async def run() -> list[bytes]:
        session, transport = await _session(Failing())
        session.data_received(b"HELO me\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.\r\n")
        session.data_received(b"NOOP\r\n")
        await _turns(lambda: session._busy is None and transport.written[-1] == b"250 OK\r\n")
        return transport.written[-2:]

    assert asyncio.run(run()) == [b"500 Error: (ValueError) boom\r\n", b"250 OK\r\n"]
    assert "SMTP session exception" in caplog.text
    assert 'raise ValueError("boom")' in caplog.text  # with its traceback


def test_an_error_of_a_command_that_ends_after_its_session_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Failing:
        async def handle_DATA(self, *args: object) -> str:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise RuntimeError("cleanup failed") from None
            return "250 never"

    async def run() -> None:
        session, _ = await _session(Failing())
        session.data_received(b"HELO me\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.\r\n")
        await _turns(lambda: session._busy is not None)
        session.connection_lost(None)
        await _turns(lambda: session._busy is None)

    asyncio.run(run())
    assert "SMTP session exception" in caplog.text
    assert 'raise RuntimeError("cleanup failed")' in caplog.text
