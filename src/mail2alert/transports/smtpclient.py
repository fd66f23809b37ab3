"""The client side of SMTP over one connection: replies queued as they arrive, commands
written in one go where the server allows it.

Delivery (:mod:`mail2alert.transports.smtp`) decides what to say and what each answer means;
this module only speaks the wire. Replies are parsed as they come in and queued, so a caller
may write several commands before it reads their replies: with PIPELINING (RFC 2920) a
message costs two round trips to the smarthost, MAIL, every RCPT and DATA in one write and
then the data, where one command at a time costs three plus one per recipient. Over a
network that is what bounds a connection's rate; on loopback it is half the writes.

Every read of a reply is bounded by the connection's timeout. What goes wrong is one of:
:class:`Lost` (the server closed the connection or it broke), :class:`Garbled` (what came
back is no SMTP reply), :class:`ConnectFailed` (no connection, or no TLS handshake, at all)
or ``TimeoutError`` (no reply in time). No command line is ever logged or put in an error:
AUTH lines carry the password.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

#: The longest reply line taken (RFC 5321 says 512; servers send longer texts).
MAX_LINE = 8192
#: The most lines one reply may have (an EHLO reply has a dozen).
MAX_LINES = 100
#: The most replies kept unread: a pipelined message asks for one per recipient and two more,
#: and ``delivery.max-recipients`` may be set high.
MAX_REPLIES = 100_000


@dataclass(frozen=True)
class Reply:
    """One reply of the server: its code and its text, the lines of a multi-line reply
    joined by line feeds."""

    code: int
    text: str

    def __str__(self) -> str:
        """The reply on one line, as errors and the history show it: ``550 5.1.1 no such
        user``."""
        return f"{self.code} {' '.join(self.text.split())}"


class Lost(Exception):
    """The connection was closed by the server, or broke."""


class Garbled(Exception):
    """The server sent what is no SMTP reply."""


class ConnectFailed(Exception):
    """No connection could be made (refused, unreachable, timed out, a TLS handshake that
    failed); the text says why."""


class _Wire(asyncio.Protocol):
    """Parses replies into a queue and wakes whoever waits for one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended: Exception | None = None
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._ended is not None:
            return
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            if end - start >= MAX_LINE:
                break  # refused below, as a line that has not ended yet would be
            line = bytes(buffer[start : end + 1])
            start = end + 1
            code, mark = line[:3], line[3:4]
            if not (code.isdigit() and mark in (b" ", b"-", b"\r", b"\n")):
                self._end(Garbled(f"no SMTP reply: {_shown(line)}"))
                return
            self._lines.append(line[4:].rstrip(b"\r\n"))
            if mark == b"-":
                if len(self._lines) > MAX_LINES:
                    self._end(Garbled(f"a reply of over {MAX_LINES} lines"))
                    return
                continue
            text = b"\n".join(part.strip(b" \t") for part in self._lines)
            self._lines = []
            self._replies.append(Reply(int(code), text.decode("utf-8", "surrogateescape")))
            if len(self._replies) > MAX_REPLIES:
                self._end(Garbled(f"over {MAX_REPLIES} replies to no command"))
                return
        del buffer[:start]
        if len(buffer) >= MAX_LINE:
            self._end(Garbled(f"a reply line of over {MAX_LINE} bytes"))
            return
        if self._replies:
            self._wake()

    def eof_received(self) -> bool:
        self._end(Lost("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(Lost(f"the connection broke: {exc}" if exc else "the connection was closed"))
        self.transport = None
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def _end(self, why: Exception) -> None:
        if self._ended is None:
            self._ended = why
            if isinstance(why, Garbled) and self.transport is not None:
                self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def usable(self) -> bool:
        """Whether commands may still be written."""
        return (
            self._ended is None and self.transport is not None and not self.transport.is_closing()
        )

    def write(self, data: bytes) -> None:
        """Write ``data``; on a connection that is gone, raises what ended it (Lost or
        Garbled)."""
        if self._ended is not None:
            raise self._ended
        if self.transport is None or self.transport.is_closing():
            raise Lost("the connection was closed")
        self.transport.write(data)

    async def drained(self) -> None:
        """Return once the transport takes more (at once unless its buffer is full)."""
        while self._paused and self.transport is not None:
            self._resumed = self._loop.create_future()
            await _within(self._resumed, self.timeout, self._loop)

    async def reply(self) -> Reply:
        """The next reply; what arrived before the connection ended is still read."""
        while not self._replies:
            if self._ended is not None:
                raise self._ended
            self._waiter = self._loop.create_future()
            try:
                await _within(self._waiter, self.timeout, self._loop)
            finally:
                self._waiter = None
        return self._replies.popleft()

    def pending(self) -> bool:
        """Whether anything arrived that was not read yet: a reply, a line of one, a part of
        a line (after STARTTLS's 220 nothing may have: it came in clear text)."""
        return bool(self._buffer or self._lines or self._replies)


async def _within(
    future: asyncio.Future[None], seconds: float, loop: asyncio.AbstractEventLoop
) -> None:
    """Await ``future``; TimeoutError after ``seconds``. A timer is cheaper than
    ``asyncio.wait_for``'s task and futures, for every reply of every message."""

    def expire() -> None:
        if not future.done():
            future.set_exception(TimeoutError(f"no answer within {seconds:g} s"))

    timer = loop.call_later(seconds, expire)
    try:
        await future
    finally:
        timer.cancel()


def _shown(line: bytes) -> str:
    return repr(line[:80].rstrip(b"\r\n").decode("utf-8", "replace"))


class Client:
    """One SMTP connection: made by :meth:`connect`, which reads the greeting."""

    def __init__(self, wire: _Wire, *, host: str, greeting: Reply) -> None:
        self._wire = wire
        self.host = host
        self.greeting = greeting
        self.extensions: dict[str, str] = {}
        """What the last EHLO offered: upper-case keyword -> its parameters."""

    @classmethod
    async def connect(
        cls, host: str, port: int, *, within: float, tls: ssl.SSLContext | None = None
    ) -> Client:
        """Connect (with ``tls``: implicit TLS) and read the greeting, whatever its code;
        ``within`` bounds the connection and the wait for each reply, in seconds.

        Raises ConnectFailed, or Lost, Garbled or TimeoutError for the greeting.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(within):
                _, wire = await loop.create_connection(
                    lambda: _Wire(loop, within),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls is not None else None,
                    ssl_handshake_timeout=within if tls is not None else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"no connection within {within:g} s") from None
        except OSError as exc:  # ssl.SSLError too: a certificate that does not verify
            raise ConnectFailed(_why(exc)) from None
        try:
            greeting = await wire.reply()
        except BaseException:
            if wire.transport is not None:
                wire.transport.abort()
            raise
        return cls(wire, host=host, greeting=greeting)

    @property
    def usable(self) -> bool:
        """Whether the connection is still open for commands."""
        return self._wire.usable

    @property
    def secure(self) -> bool:
        """Whether the connection is over TLS."""
        transport = self._wire.transport
        return transport is not None and transport.get_extra_info("ssl_object") is not None

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done once the connection is closed."""
        return self._wire.closed

    def supports(self, extension: str) -> bool:
        """Whether the last EHLO offered ``extension`` (any case)."""
        return extension.upper() in self.extensions

    def write(self, lines: Iterable[bytes]) -> None:
        """Write command lines in one go (their replies are read with :meth:`reply`)."""
        self._wire.write(b"".join(line + b"\r\n" for line in lines))

    def write_data(self, data: bytes) -> None:
        """Write bytes as they are (the data of DATA)."""
        self._wire.write(data)

    async def drained(self) -> None:
        """Wait while the transport's buffer is full."""
        await self._wire.drained()

    async def reply(self) -> Reply:
        """The next reply. Raises Lost, Garbled or TimeoutError."""
        return await self._wire.reply()

    async def command(self, line: bytes) -> Reply:
        """Send one command line and read its reply."""
        self.write((line,))
        return await self.reply()

    async def ehlo(self, name: str) -> Reply:
        """EHLO; on 250 its extensions are kept in :attr:`extensions`."""
        answer = await self.command(b"EHLO " + name.encode("ascii", "replace"))
        if answer.code == 250:
            self.extensions = dict(_extension(line) for line in answer.text.split("\n")[1:])
        return answer

    async def helo(self, name: str) -> Reply:
        """HELO: a server that knows no EHLO offers no extensions."""
        self.extensions = {}
        return await self.command(b"HELO " + name.encode("ascii", "replace"))

    async def starttls(self, context: ssl.SSLContext) -> Reply:
        """STARTTLS; on 220 the TLS handshake follows (raises ConnectFailed if it fails).
        The extensions are forgotten: they must be asked for again (RFC 3207)."""
        answer = await self.command(b"STARTTLS")
        if answer.code != 220:
            return answer
        wire = self._wire
        if wire.pending():
            # Anything after the 220 came in clear text and could be an attacker's.
            raise Garbled("the server said more after its 220 to STARTTLS")
        transport = wire.transport
        if transport is None:
            raise Lost("the connection was closed")
        loop = asyncio.get_running_loop()
        try:
            secured = await loop.start_tls(
                transport,
                wire,
                context,
                server_hostname=self.host,
                ssl_handshake_timeout=wire.timeout,
            )
        except (OSError, TimeoutError) as exc:
            transport.abort()
            raise ConnectFailed(_why(exc)) from None
        if secured is None:
            raise Lost("the connection was closed during the TLS handshake")
        wire.transport = secured
        self.extensions = {}
        return answer

    async def login(self, user: str, password: str) -> Reply:
        """AUTH with the first mechanism both sides know (CRAM-MD5, PLAIN, LOGIN), trying
        the next when one is refused (5xx); its 235, or the answer that ended the tries.

        Raises ValueError when the server offers none of them.
        """
        offered = self.extensions.get("AUTH", "").upper().split()
        known = [m for m in _MECHANISMS if m in offered]
        if not known:
            raise ValueError(
                f"it offers no AUTH mechanism known here ({' '.join(offered) or 'none'})"
            )
        try:
            name, secret = user.encode(), password.encode()
        except UnicodeError:
            # The error's own text would show a character of the password.
            raise ValueError("the user name or password is not valid UTF-8") from None
        answer = Reply(0, "")
        for mechanism in known:
            answer = await _MECHANISMS[mechanism](self, name, secret)
            if not 500 <= answer.code < 600:
                break  # taken (235), or trouble that another mechanism would meet too
        return answer

    async def quit(self) -> None:
        """Say QUIT and close; never raises."""
        try:
            if self._wire.usable:
                await self.command(b"QUIT")
        except (Lost, Garbled, TimeoutError, OSError):
            pass
        self.close()

    def close(self) -> None:
        """Close the connection (with TLS: after a close_notify)."""
        transport = self._wire.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        transport = self._wire.transport
        if transport is not None:
            transport.abort()


def _extension(line: str) -> tuple[str, str]:
    """An EHLO line as keyword and parameters: ``AUTH PLAIN LOGIN``, or the old
    ``AUTH=PLAIN LOGIN``."""
    keyword, _, params = line.strip().replace("=", " ", 1).partition(" ")
    return keyword.upper(), params.strip()


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


async def _plain(client: Client, user: bytes, password: bytes) -> Reply:
    return await client.command(b"AUTH PLAIN " + _b64(b"\0" + user + b"\0" + password))


async def _login(client: Client, user: bytes, password: bytes) -> Reply:
    answer = await client.command(b"AUTH LOGIN " + _b64(user))
    if answer.code != 334:
        return answer
    return await client.command(_b64(password))


async def _cram_md5(client: Client, user: bytes, password: bytes) -> Reply:
    answer = await client.command(b"AUTH CRAM-MD5")
    if answer.code != 334:
        return answer
    try:
        challenge = base64.b64decode(answer.text.strip(), validate=True)
    except ValueError:
        client.write((b"*",))  # cancels the exchange (RFC 4954)
        return await client.reply()
    digest = hmac.new(password, challenge, "md5").hexdigest().encode()
    return await client.command(_b64(user + b" " + digest))


_MECHANISMS = {"CRAM-MD5": _cram_md5, "PLAIN": _plain, "LOGIN": _login}


def _why(exc: BaseException) -> str:
    """An OSError's reason without its errno number, the same on every event loop:
    ``Connection refused`` (asyncio's own says ``Connect call failed (...)``)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    own_text = isinstance(exc, ssl.SSLError | socket.gaierror)  # errno is not errno's there
    if isinstance(exc, OSError) and not own_text and exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
