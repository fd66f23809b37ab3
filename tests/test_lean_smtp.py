"""The lean SMTP session behaves exactly as aiosmtpd's own, only faster, and an ended one is
freed at once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import smtplib
import socket
import ssl
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Session

from mail2alert.managers.base import Context
from mail2alert.outbox import GroupCommitter
from mail2alert.server import Handler
from mail2alert.session import Access, AfterHandshake, LeanSMTP, smtp_factory
from mail2alert.settings import HostPort, InboundAuth, InboundTls, Listener
from tests.helpers import LOOPS, RecordingWriter, run_on, server_tls


class _Handler:
    async def handle_DATA(self, *args: object) -> str:
        return "250 OK"


@pytest.fixture
def sessions() -> Iterator[tuple[SMTP, LeanSMTP]]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield SMTP(_Handler()), LeanSMTP(_Handler())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _addresses(seed: int, count: int) -> Iterator[str]:
    """Plain addresses with parameters, and random junk built from SMTP's special characters."""
    rnd = random.Random(seed)
    yield from [
        "<go@example.com>",
        "<go@example.com> SIZE=123 BODY=8BITMIME",
        "<>",
        "<> SIZE=1",
        "go@example.com",
        '<"quoted local"@example.com>',
        "<a@[127.0.0.1]>",
        "<bad",
        "<@route:a@b.c>",
        "",
        "<a@b>extra",
        "<a@b>\tSIZE=1",
        "<ü@example.com>",
        "<a..b@c>",
        "<.a@b>",
        "<a@b..c>",
        "<a@b> \r\n x",
        "<a@b> (comment) SIZE=1",
        "<a@b> \xa0",
        "<a@b> \u2003SIZE=1",
    ]
    specials = 'ab.@<>- \t+=_"()[]:;,\\ü\r\n'
    for _ in range(count):
        yield "".join(rnd.choice(specials) for _ in range(rnd.randint(0, 20)))
        local = "".join(rnd.choice("abc.-+_!#/{}'") for _ in range(rnd.randint(1, 8)))
        domain = "".join(rnd.choice("abc.-_") for _ in range(rnd.randint(1, 8)))
        tail = rnd.choice(["", " SIZE=1", "\tX", "  Y=2 ", "x", " \t", " (c) X", " A=(b)"])
        yield f"{rnd.choice(['', ' ', chr(9)])}<{local}@{domain}>{tail}"


def test_addresses_parse_exactly_as_aiosmtpd_parses_them(
    sessions: tuple[SMTP, LeanSMTP],
) -> None:
    original, lean = sessions
    for arg in _addresses(seed=7, count=3000):
        assert _outcome(lean, arg) == _outcome(original, arg), repr(arg)


def _outcome(session: SMTP, arg: str) -> object:
    """What parsing gives, or the exception it raises (aiosmtpd's parser trips on some junk)."""
    try:
        return session._getaddr(arg)
    except Exception as exc:  # noqa: BLE001 - the very thing compared
        return type(exc)


def test_the_same_commands_and_auth_mechanisms_are_found(
    sessions: tuple[SMTP, LeanSMTP],
) -> None:
    original, lean = sessions
    assert lean._smtp_methods.keys() == original._smtp_methods.keys()
    assert lean._auth_methods.keys() == original._auth_methods.keys()
    assert lean._handle_hooks.keys() == original._handle_hooks.keys()


def test_a_multi_line_reply_goes_out_in_one_write_with_the_same_bytes(
    sessions: tuple[SMTP, LeanSMTP],
) -> None:
    """EHLO's reply is one send() and one TCP segment, not one per line as aiosmtpd's."""
    loop = asyncio.get_event_loop()
    writes: dict[str, list[bytes]] = {}
    for name, session in zip(("aiosmtpd", "lean"), sessions, strict=True):
        writer = RecordingWriter()
        session._writer = cast(asyncio.StreamWriter, writer)  # what aiosmtpd writes to
        session.transport = cast(asyncio.Transport, writer)  # what LeanSMTP writes to
        session.session = Session(loop)
        loop.run_until_complete(session.smtp_EHLO("client.example"))
        loop.run_until_complete(session.smtp_NOOP(""))
        writes[name] = writer.written
    ehlo, noop = writes["lean"]
    assert ehlo.count(b"\r\n") > 3
    assert ehlo.endswith(b"250 HELP\r\n")
    assert noop == b"250 OK\r\n"
    assert b"".join(writes["aiosmtpd"]) == ehlo + noop


def test_a_reply_is_held_only_while_its_last_line_is_to_come(
    sessions: tuple[SMTP, LeanSMTP],
) -> None:
    """A hook's whole multi-line reply in one string goes at once; held lines go out before
    whatever comes next, bytes too, in order."""
    _, lean = sessions
    loop = asyncio.get_event_loop()
    writer = RecordingWriter()
    lean.transport = cast(asyncio.Transport, writer)
    lean.session = Session(loop)
    loop.run_until_complete(lean.push("250-first\r\n250 last"))
    assert writer.written == [b"250-first\r\n250 last\r\n"]
    loop.run_until_complete(lean.push("250-held"))
    loop.run_until_complete(lean.push(b"250 bytes"))
    assert writer.written[1:] == [b"250-held\r\n250 bytes\r\n"]


def test_the_handler_lists_aiosmtpd_every_hook_it_has() -> None:
    """Handler's short ``dir`` gives a session the same hooks and AUTH methods as a look
    through all of the handler's attributes would."""

    class Committer:
        def count(self, name: str, **labels: str) -> None:
            pass

    handler = Handler(cast(GroupCommitter, Committer()), list, lambda: cast(Context, None))
    everything = object.__dir__(handler)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        session = LeanSMTP(handler, hostname="test")
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert set(session._handle_hooks) == {
        n.removeprefix("handle_") for n in everything if n.startswith("handle_")
    }
    assert not [n for n in everything if n.startswith("auth_")]
    assert not [m for m, impl in session._auth_methods.items() if not impl.is_builtin]


# -- an ended session is freed at once --------------------------------------------------------
#
# An aiosmtpd session refers to itself, so without LeanSMTP breaking those cycles every ended
# session (with STARTTLS: asyncio's 256 KiB buffer and OpenSSL's state) waited for a full
# collection of the cyclic garbage collector, and the intake workers' RSS rose over hours.


def _quit(client: smtplib.SMTP) -> None:
    client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")
    client.quit()


def _hang_up(client: smtplib.SMTP) -> None:
    client.sendmail("a@example.com", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")
    client.close()


def _hang_up_in_data(client: smtplib.SMTP) -> None:
    client.ehlo_or_helo_if_needed()
    client.mail("a@example.com")
    client.rcpt("b@example.com")
    client.putcmd("data")
    assert client.getreply()[0] == 354
    client.send(b"Subject: x\r\n\r\nhalf a messa")
    client.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def without_cyclic_gc() -> Iterator[None]:
    """Only reference counting frees memory meanwhile, as between two full collections."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _sessions_left(
    ca: trustme.CA, loop_name: str, client: Callable[[int], None], *, tls: bool = True
) -> tuple[int, list[weakref.ref[SMTP]]]:
    """Run ``client`` against a listener on ``loop_name`` (offering STARTTLS with ``tls``);
    how many sessions it made, and those still alive once it is done (given 3 s in all to be
    freed)."""
    listener = Listener(HostPort("127.0.0.1", 0), tls=InboundTls("starttls", Path(), Path()))
    access = Access(listener, server_tls(ca) if tls else None)
    make = smtp_factory(cast(Handler, _Handler()), hostname="test", access=lambda: access)
    ended: list[weakref.ref[SMTP]] = []

    def factory() -> SMTP:
        session: SMTP = make()
        ended.append(weakref.ref(session))
        return session

    async def run() -> list[weakref.ref[SMTP]]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            await loop.run_in_executor(None, client, port)
            deadline = loop.time() + 3
            # Nothing signals that a session was freed: polling is the way.
            while any(ref() is not None for ref in ended) and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        finally:
            server.close()
            await server.wait_closed()
        return [ref for ref in ended if ref() is not None]

    alive = run_on(loop_name, run())
    return len(ended), alive


@pytest.mark.usefixtures("without_cyclic_gc")
@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize("starttls", [True, False], ids=["starttls", "plain"])
@pytest.mark.parametrize("ending", [_quit, _hang_up, _hang_up_in_data])
def test_an_ended_session_is_freed_without_the_cyclic_garbage_collector(
    ca: trustme.CA, loop_name: str, starttls: bool, ending: Callable[[smtplib.SMTP], None]
) -> None:
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    def client(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            if starttls:
                smtp.starttls(context=client_tls)
            ending(smtp)

    ended, alive = _sessions_left(ca, loop_name, client, tls=starttls)
    assert ended == 1
    assert alive == []


def _distrusting(smtp: smtplib.SMTP) -> None:
    """A client that does not trust the certificate: it ends the handshake with an alert."""
    with contextlib.suppress(ssl.SSLError):
        smtp.starttls(context=ssl.create_default_context())


def _not_speaking_tls(smtp: smtplib.SMTP) -> None:
    """A client that asks for TLS and then sends lines of text."""
    smtp.ehlo()
    smtp.putcmd("starttls")
    assert smtp.getreply()[0] == 220
    assert smtp.sock is not None
    smtp.sock.sendall(b"EHLO me\r\n" * 4)
    with contextlib.suppress(OSError):
        smtp.sock.recv(1024)  # until the server closes


@pytest.mark.usefixtures("without_cyclic_gc")
@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize("handshake", [_distrusting, _not_speaking_tls])
def test_a_session_whose_tls_handshake_failed_is_freed_without_the_cyclic_garbage_collector(
    ca: trustme.CA, loop_name: str, handshake: Callable[[smtplib.SMTP], None]
) -> None:
    def client(port: int) -> None:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:
            handshake(smtp)
        finally:
            smtp.close()

    ended, alive = _sessions_left(ca, loop_name, client)
    assert ended == 1
    assert alive == []


# -- implicit TLS: no session before the handshake is done ------------------------------------


def _distrusting_from_the_start(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw, contextlib.suppress(OSError):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def _plain_text_to_a_tls_port(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(b"EHLO me\r\n" * 4)
        with contextlib.suppress(OSError):
            raw.recv(1024)  # until the server closes


def _connect_and_go(port: int) -> None:
    """A port scan or a TCP health check."""
    socket.create_connection(("127.0.0.1", port)).close()


@pytest.mark.usefixtures("without_cyclic_gc")
@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize(
    "client", [_distrusting_from_the_start, _plain_text_to_a_tls_port, _connect_and_go]
)
def test_a_connection_to_implicit_tls_that_never_finishes_its_handshake_makes_no_session(
    ca: trustme.CA, loop_name: str, client: Callable[[int], None]
) -> None:
    """An aiosmtpd session made before the handshake would wait for a full collection of the
    cyclic garbage collector once the handshake failed. On uvloop, what serve runs on, the
    stand-in is freed at once too (asyncio's own SSL protocol keeps it in its error's
    traceback until a collection, with its buffers)."""
    make = smtp_factory(cast(Handler, _Handler()), hostname="test")
    sessions: list[weakref.ref[SMTP]] = []
    stand_ins: list[weakref.ref[AfterHandshake]] = []

    def session() -> SMTP:
        made: SMTP = make()
        sessions.append(weakref.ref(made))
        return made

    def factory() -> AfterHandshake:
        stand_in = AfterHandshake(session)
        stand_ins.append(weakref.ref(stand_in))
        return stand_in

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0, ssl=server_tls(ca))
        try:
            await loop.run_in_executor(None, client, server.sockets[0].getsockname()[1])
            deadline = loop.time() + 3
            # Nothing signals that the connection was taken, or let go: polling is the way.
            while not stand_ins and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            while stand_ins[0]() is not None and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        finally:
            server.close()
            await server.wait_closed()

    run_on(loop_name, run())
    assert len(stand_ins) == 1
    assert sessions == []
    if loop_name == "uvloop":
        assert stand_ins[0]() is None


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_session_on_implicit_tls_is_made_once_the_handshake_is_done_and_serves(
    ca: trustme.CA, loop_name: str
) -> None:
    make = smtp_factory(cast(Handler, _Handler()), hostname="test")
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    def client(port: int) -> tuple[int, dict[str, tuple[int, bytes]]]:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls, timeout=10) as smtp:
            refused = smtp.sendmail("a@example.com", ["b@example.com"], b"x\r\n")
            return smtp.noop()[0], refused

    async def run() -> tuple[int, dict[str, tuple[int, bytes]]]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: AfterHandshake(make), "127.0.0.1", 0, ssl=server_tls(ca)
        )
        try:
            return await loop.run_in_executor(None, client, server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    assert run_on(loop_name, run()) == (250, {})


def test_sessions_that_require_auth_on_implicit_tls_log_no_false_alarm(
    ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd warns that AUTH without STARTTLS is required; on implicit TLS it is TLS."""
    auth = InboundAuth(Path("users"), required=True)
    listener = Listener(
        HostPort("127.0.0.1", 0), tls=InboundTls("implicit", Path(), Path()), auth=auth
    )
    access = Access(listener, server_tls(ca))
    make = smtp_factory(cast(Handler, _Handler()), hostname="test", access=lambda: access)

    async def sessions() -> list[SMTP]:
        return [make() for _ in range(3)]

    caplog.set_level(logging.DEBUG, logger="mail.log")
    made = asyncio.run(sessions())
    assert all(session._auth_required for session in made)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
