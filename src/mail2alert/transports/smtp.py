"""Deliver outbox items to ``remote-smtp`` with aiosmtplib, one reused connection per worker.

MAIL FROM and RCPT TO carry the addresses exactly as they were received: the null
reverse-path ``<>`` of a bounce, a quoted local part, and the bytes of an address that is not
UTF-8 go out as they came in (aiosmtplib's own ``sendmail`` would re-parse them, and refuses
an empty sender). What cannot be sent on a command line (a line break, a NUL) is refused for
good, never sent.

A big message goes out in blocks, each written once the socket has taken the one before:
aiosmtplib's ``data()`` makes three copies of a message and hands all of it to the transport
at once, which made one 31 MB message cost some 150 MB more while it was sent.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import aiosmtplib

from mail2alert.outbox import Item, RecipientResult
from mail2alert.transports import Attempt

#: Characters no address may carry onto an SMTP command line.
_UNSENDABLE = frozenset("\r\n\0")

#: Messages up to this size go through aiosmtplib's ``data()``; bigger ones in blocks this big.
DATA_BLOCK = 1024 * 1024

_LINE_ENDING = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def data_blocks(data: bytes, size: int = DATA_BLOCK) -> Iterator[bytes]:
    """``data`` as it goes on the wire after DATA, in blocks of about ``size`` bytes.

    As aiosmtplib does it: every line ends in CRLF (a lone CR or LF becomes one), a leading
    dot is doubled, and the last line is ended; the terminating ``.`` line is not included.
    Each block ends after a line feed, so that no CRLF and no line start is cut in two.
    """
    start = 0
    while start < len(data):
        cut = data.find(b"\n", start + size)
        end = len(data) if cut == -1 else cut + 1
        block = _LEADING_DOT.sub(b"..", _LINE_ENDING.sub(b"\r\n", data[start:end]))
        if end == len(data) and not block.endswith(b"\r\n"):
            block += b"\r\n"
        yield block
        start = end


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


def _path(address: str) -> bytes:
    """``<address>`` as bytes for MAIL/RCPT; surrogate escapes become their original bytes."""
    return b"<" + address.encode("utf-8", "surrogateescape") + b">"


class _DestinationDown(Exception):
    """The server answered for itself, not for the item (421, a failed greeting or EHLO)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class SmtpConnection:
    """One connection to the upstream server, opened on demand and reused across items."""

    def __init__(self, host: str, port: int, *, timeout: float, local_hostname: str) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.local_hostname = local_hostname
        self._smtp: aiosmtplib.SMTP | None = None
        self._last_used = 0.0

    @property
    def address(self) -> str:
        """``host:port`` of the upstream server, for log lines."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def send(self, item: Item) -> Attempt:
        """Try to deliver ``item`` to its pending recipients; never raises for SMTP trouble."""
        bad = [a for a in (item.mail_from, *item.recipients) if _UNSENDABLE & set(a)]
        if bad:
            return Attempt((), f"address {bad[0]!r} cannot be sent over SMTP", permanent=True)
        reused = self._smtp is not None
        try:
            return await self._send(item)
        except aiosmtplib.SMTPServerDisconnected:
            await self.close()
            if not reused:
                return Attempt((), f"connection to {self.address} lost", unreachable=True)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, _DestinationDown) as exc:
            await self.close()
            return _failure(exc, self.address)
        # The server may close an idle connection we kept; that is no failure of the item.
        try:
            return await self._send(item)
        except aiosmtplib.SMTPServerDisconnected:
            await self.close()
            return Attempt((), f"connection to {self.address} lost", unreachable=True)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, _DestinationDown) as exc:
            await self.close()
            return _failure(exc, self.address)

    async def _send(self, item: Item) -> Attempt:
        smtp = await self._connection()
        options: list[bytes] = []
        if not all(a.isascii() for a in (item.mail_from, *item.recipients)):
            if not smtp.supports_extension("smtputf8"):
                # Like Postfix: a non-ASCII address cannot be sent to a server without SMTPUTF8.
                return Attempt(
                    (),
                    f"{self.address} does not support SMTPUTF8 (non-ASCII address)",
                    permanent=True,
                )
            options.append(b"SMTPUTF8")
        if smtp.supports_extension("8bitmime") and not item.data.isascii():
            options.append(b"BODY=8BITMIME")
        answer = await smtp.execute_command(b"MAIL", b"FROM:" + _path(item.mail_from), *options)
        if answer.code != 250:
            await self._reset(smtp, answer.code)
            return _refused_whole(answer.code, answer.message)
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        for rcpt in item.recipients:
            answer = await smtp.execute_command(b"RCPT", b"TO:" + _path(rcpt))
            if answer.code in (250, 251):
                accepted.append(rcpt)
            else:
                if answer.code == 421:
                    raise _DestinationDown(_reply(answer.code, answer.message))
                results[rcpt] = _refusal(rcpt, answer.code, answer.message)
        if not accepted:
            await self._reset(smtp, 0)
            return Attempt(tuple(results[r] for r in item.recipients))
        try:
            if len(item.data) <= DATA_BLOCK:
                await smtp.data(item.data)
            else:
                await self._data_in_blocks(smtp, item.data)
        except aiosmtplib.SMTPDataError as exc:
            if exc.code == 421:
                raise _DestinationDown(_reply(exc.code, exc.message)) from None
            # The data was refused: that is the answer about the item as a whole.
            self._last_used = time.monotonic()
            return _refused_whole(exc.code, exc.message)
        self._last_used = time.monotonic()
        for rcpt in accepted:
            results[rcpt] = RecipientResult(rcpt, "done")
        return Attempt(tuple(results[r] for r in item.recipients))

    async def _data_in_blocks(self, smtp: aiosmtplib.SMTP, data: bytes) -> None:
        """DATA as ``smtp.data()`` sends it, with one block at a time in memory and in flight."""
        start = await smtp.execute_command(b"DATA")
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        protocol = smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        # aiosmtplib's flow control: waits while the transport's buffer is over its high-water
        # mark; without it (another aiosmtplib) every block is buffered, as data() would.
        drain = getattr(protocol, "_drain_helper", None)
        for block in data_blocks(data):
            protocol.write(block)
            if drain is not None:
                await asyncio.wait_for(drain(), self.timeout)
        end = await smtp.execute_command(b".")
        if end.code != 250:
            raise aiosmtplib.SMTPDataError(end.code, end.message)

    async def _reset(self, smtp: aiosmtplib.SMTP, code: int) -> None:
        """End a transaction the server refused, so that the connection can be reused."""
        if code == 421:
            raise _DestinationDown(f"{code} closing the connection")
        try:
            await smtp.rset()
        except aiosmtplib.SMTPResponseException:
            await self.close()

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
            start_tls=False,
        )
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            # A 4xx/5xx greeting (421 "too busy"): the server speaks for itself, not the item.
            raise _DestinationDown(_reply(exc.code, exc.message)) from None
        self._smtp = smtp
        # EHLO now: the server's extensions (SMTPUTF8) must be known before MAIL FROM.
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            try:
                await smtp.helo()
            except aiosmtplib.SMTPHeloError as exc:
                raise _DestinationDown(_reply(exc.code, exc.message)) from None
        return smtp

    async def close_if_idle(self, idle: float) -> None:
        """Close the connection when it has not been used for ``idle`` seconds."""
        if self._smtp is not None and time.monotonic() - self._last_used > idle:
            await self.close()

    async def close(self) -> None:
        """Say QUIT if we can, then drop the connection."""
        smtp, self._smtp = self._smtp, None
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            smtp.close()


def _refusal(rcpt: str, code: int, message: str) -> RecipientResult:
    state = "dead" if 500 <= code < 600 else "pending"
    return RecipientResult(rcpt, state, _reply(code, message))


def _refused_whole(code: int, message: str) -> Attempt:
    return Attempt((), _reply(code, message), permanent=500 <= code < 600)


def _failure(exc: BaseException, address: str) -> Attempt:
    if isinstance(exc, _DestinationDown):
        return Attempt((), f"{address} answered {exc.reply}", unreachable=True)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if exc.code == 421:
            reply = _reply(exc.code, exc.message)
            return Attempt((), f"{address} answered {reply}", unreachable=True)
        return Attempt((), _reply(exc.code, exc.message), permanent=500 <= exc.code < 600)
    if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        return Attempt((), f"cannot connect to {address}: {exc}", unreachable=True)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Attempt((), f"timed out talking to {address}", unreachable=True)
    return Attempt((), f"{type(exc).__name__} from {address}: {exc}", unreachable=True)
