"""Deliver outbox items to ``remote-smtp``, one reused connection per worker.

The wire is :mod:`mail2alert.transports.smtpclient`'s; this module decides what to say and
what each answer means. Where the server offers PIPELINING (every smarthost does), MAIL, the
RCPTs and DATA go out in one write and the message in a second: two round trips a message.
A refused recipient is dead (5xx) or tried again later (4xx) on its own; a refused sender or
data refuses the item as a whole.

MAIL FROM and RCPT TO carry the addresses exactly as they were received: the null
reverse-path ``<>`` of a bounce, a quoted local part, and the bytes of an address that is not
UTF-8 go out as they came in. What cannot be sent on a command line (a line break, a NUL) is
refused for good, never sent.

DATA goes out as the wire wants it: every line ended by CRLF (a bare LF becomes one, as every
SMTP server reads it) and every line that starts with a dot stuffed, so no sequence in a
message can end its DATA early (``<LF>.<LF>``, ``<CR>.<CR>``: SMTP smuggling). A bare CR in
the header section is folded instead (:func:`~mail2alert.message.fold_bare_cr`): made a line
end, it would start a header field the message did not have. A line longer than SMTP's 998
bytes is broken into shorter ones, as Postfix's ``smtp_line_length_limit`` does
(:func:`~mail2alert.message.fold_long_lines`): a strict smarthost would refuse it for good.

A big message goes out in blocks, each written once the socket has taken the one before:
handing all of a 31 MB message to the transport at once, with its copies, cost some 150 MB
more while it was sent.

TLS and AUTH follow ``remote-smtp`` (:class:`~mail2alert.settings.Upstream`): ``may`` uses
STARTTLS when offered without checking the certificate (Postfix's ``may``), ``starttls`` and
``implicit`` always use TLS and verify it. A setup that fails (a certificate that does not
verify, no STARTTLS where it is required, a refused login) is the destination's trouble,
not the item's: the items wait for it with that reason and are tried again; nothing is sent
in clear text that should not be, and a password never goes over a connection without TLS.
With ``sender`` set, it is the envelope sender of everything sent upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Iterator

from mail2alert.message import fold_bare_cr, fold_long_lines
from mail2alert.outbox import Item, RecipientResult
from mail2alert.settings import HostPort, Upstream
from mail2alert.transports import Attempt
from mail2alert.transports.smtpclient import Client, ConnectFailed, Garbled, Lost, Reply

#: Characters no address may carry onto an SMTP command line.
_UNSENDABLE = frozenset("\r\n\0")

#: The most recipients whose RCPTs go out in one write; an item with more (``max-recipients``
#: set high) goes one command at a time, and the replies queued unread stay few.
PIPELINED_RCPTS = 1000

#: Messages up to this size go out in one write; bigger ones in blocks this big.
DATA_BLOCK = 1024 * 1024

_LINE_ENDING = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def data_blocks(data: bytes, size: int = DATA_BLOCK) -> Iterator[bytes]:
    """``data`` as it goes on the wire after DATA, in blocks of about ``size`` bytes.

    As every SMTP client does it (aiosmtplib is the tests' oracle): every line ends in CRLF
    (a lone CR or LF becomes one), a leading dot is doubled, and the last line is ended; the
    terminating ``.`` line is not included.
    Each block ends after a line feed, so that no CRLF and no line start is cut in two, and
    its lines too long for SMTP are broken (:func:`~mail2alert.message.fold_long_lines`).
    """
    start = 0
    while start < len(data):
        cut = data.find(b"\n", start + size)
        end = len(data) if cut == -1 else cut + 1
        block = fold_long_lines(data[start:end])
        # Most mail has CRLF line ends and no line that starts with a dot: three counts and
        # two finds are cheaper than rebuilding it with the same bytes.
        ends = block.count(b"\r\n")
        if block.count(b"\n") != ends or block.count(b"\r") != ends:
            block = _LINE_ENDING.sub(b"\r\n", block)
        if block.startswith(b".") or b"\n." in block:
            block = _LEADING_DOT.sub(b"..", block)
        if end == len(data) and not block.endswith(b"\r\n"):
            block += b"\r\n"
        yield block
        start = end


def _path(address: str) -> bytes:
    """``<address>`` as bytes for MAIL/RCPT; surrogate escapes become their original bytes."""
    return b"<" + address.encode("utf-8", "surrogateescape") + b">"


class _DestinationDown(Exception):
    """The server answered for itself, not for the item (421, a failed greeting or EHLO)."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class _SetupFailed(Exception):
    """The connection could not be set up as configured (TLS, AUTH): the reason, no secret."""


def tls_context(upstream: Upstream) -> ssl.SSLContext:
    """The client TLS context for ``upstream``: verified unless ``may`` or ``verify: false``.

    A verified context reads the system's CA bundle (20-80 ms): callers build it once per
    connection, off the event loop. An unverified one needs no CA at all, so none is read.
    """
    if upstream.tls == "may" or not upstream.verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(
        cafile=str(upstream.ca_file) if upstream.ca_file is not None else None
    )


#: The longest ``check`` waits for the connection to be closed after QUIT.
CLOSE_WAIT = 2.0


class SmtpConnection:
    """One connection to the upstream server, opened on demand and reused across items."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        local_hostname: str,
        upstream: Upstream | None = None,
    ) -> None:
        """``upstream`` says how to talk to it (TLS, login, sender); None: in clear text,
        with no login."""
        self.host = host
        self.port = port
        self.timeout = timeout
        self.upstream = upstream
        self.local_hostname = (upstream.helo if upstream else None) or local_hostname
        self._context: ssl.SSLContext | None = None
        self._smtp: Client | None = None
        self._last_used = 0.0
        self._answered = False  # the server answered the current transaction's MAIL
        self._busy = False  # a transaction was begun and has not ended

    @classmethod
    def to(cls, upstream: Upstream, *, timeout: float, local_hostname: str) -> SmtpConnection:
        """A connection to ``upstream`` as it is configured."""
        address = upstream.address
        return cls(
            address.host,
            address.port,
            timeout=timeout,
            local_hostname=local_hostname,
            upstream=upstream,
        )

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
        while True:
            try:
                return await self._send(item)
            except Lost as exc:
                self._drop()
                # A server may close a connection we kept idle; it shows when we next use
                # it. That is no failure of the item if nothing of it was answered yet (then
                # it goes once more, on a new connection); once it was, sending it again at
                # once might send it twice.
                if not reused or self._answered:
                    return _failure(exc, self.address)
                reused = False
            except _FAILURES as exc:
                await self._end(exc)
                return _failure(exc, self.address)

    async def _send(self, item: Item) -> Attempt:
        smtp = await self._connection()
        self._answered = False
        self._busy = True
        attempt = await self._transaction(smtp, item)
        self._busy = False
        return attempt

    async def _transaction(self, smtp: Client, item: Item) -> Attempt:
        """MAIL, RCPT, DATA and the message; raises for the destination's trouble."""
        options = b""
        if not all(a.isascii() for a in (item.mail_from, *item.recipients)):
            if not smtp.supports("smtputf8"):
                # Like Postfix: a non-ASCII address cannot be sent to a server without SMTPUTF8.
                return Attempt(
                    (),
                    f"{self.address} does not support SMTPUTF8 (non-ASCII address)",
                    permanent=True,
                )
            options += b" SMTPUTF8"
        if smtp.supports("8bitmime") and not item.data.isascii():
            options += b" BODY=8BITMIME"
        sender = self.upstream.sender if self.upstream and self.upstream.sender else item.mail_from
        mail = b"MAIL FROM:" + _path(sender) + options
        rcpts = [b"RCPT TO:" + _path(rcpt) for rcpt in item.recipients]
        if smtp.supports("pipelining") and len(rcpts) <= PIPELINED_RCPTS:
            return await self._pipelined(smtp, item, mail, rcpts)
        answer = await smtp.command(mail)
        self._answered = True
        if answer.code != 250:
            await self._reset(smtp, answer)
            return _refused_whole(answer)
        results: dict[str, RecipientResult] = {}
        accepted = []
        for rcpt, line in zip(item.recipients, rcpts, strict=True):
            if _taken(await smtp.command(line), rcpt, results):
                accepted.append(rcpt)
        if not accepted:
            await self._reset(smtp, None)
            return _each(item, results)
        return await self._data(smtp, item, await smtp.command(b"DATA"), accepted, results)

    async def _pipelined(
        self, smtp: Client, item: Item, mail: bytes, rcpts: list[bytes]
    ) -> Attempt:
        """MAIL, every RCPT and DATA in one write (RFC 2920), then their replies in order."""
        smtp.write((mail, *rcpts, b"DATA"))
        answer = await smtp.reply()
        self._answered = True
        if answer.code == 421:
            raise _DestinationDown(str(answer))
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        try:
            for rcpt in item.recipients:
                reply = await smtp.reply()  # after a refused MAIL, only read
                if answer.code == 250 and _taken(reply, rcpt, results):
                    accepted.append(rcpt)
            start = await smtp.reply()
        except (Lost, Garbled, TimeoutError):
            # A server may refuse and hang up (Exim's "drop"): what it refused stays refused.
            if answer.code == 250 and (accepted or len(results) < len(item.recipients)):
                raise
            self._drop()
            return _refused_whole(answer) if answer.code != 250 else _each(item, results)
        if answer.code != 250 or not accepted:
            if start.code == 354:
                # DATA was taken with nothing to send it to: an empty message ends it, and
                # the server refuses that (RFC 2920, 3.1).
                smtp.write_data(b".\r\n")
                if (await smtp.reply()).code == 421:
                    self._drop()  # it is closing; what it refused stays refused
            elif start.code == 421:
                self._drop()
            else:
                await self._reset(smtp, None)
            return _refused_whole(answer) if answer.code != 250 else _each(item, results)
        return await self._data(smtp, item, start, accepted, results)

    async def _data(
        self,
        smtp: Client,
        item: Item,
        start: Reply,
        accepted: list[str],
        results: dict[str, RecipientResult],
    ) -> Attempt:
        """The message after DATA's reply ``start``, and what the server said of it."""
        if start.code != 354:
            await self._reset(smtp, start)
            return _refused_whole(start)
        data = fold_bare_cr(item.data)
        if len(data) <= DATA_BLOCK:
            smtp.write_data(b"".join(data_blocks(data)) + b".\r\n")
        else:  # one block at a time in memory and in flight
            for block in data_blocks(data):
                smtp.write_data(block)
                await smtp.drained()
            smtp.write_data(b".\r\n")
        end = await smtp.reply()
        self._last_used = time.monotonic()
        if end.code == 421:
            raise _DestinationDown(str(end))
        if end.code != 250:
            # The data was refused: that is the answer about the item as a whole.
            return _refused_whole(end)
        for rcpt in accepted:
            results[rcpt] = RecipientResult(rcpt, "done")
        return _each(item, results, reply=str(end))

    async def _reset(self, smtp: Client, answer: Reply | None) -> None:
        """End a transaction the server refused (its ``answer``), so that the connection can
        be reused; a connection that does not take RSET is dropped, the refusal stands."""
        if answer is not None and answer.code == 421:
            raise _DestinationDown(str(answer))
        try:
            reset = (await smtp.command(b"RSET")).code == 250
        except (Lost, Garbled, TimeoutError):
            reset = False
        if not reset:
            self._drop()

    async def _tls(self) -> ssl.SSLContext:
        """The TLS context, built on first use in a thread: reading the CA bundle on the event
        loop would stall every SMTP session of the process while it lasts."""
        if self._context is None:
            upstream = self.upstream or Upstream(address=HostPort(self.host, self.port))
            try:
                self._context = await asyncio.to_thread(tls_context, upstream)
            except OSError as exc:  # ssl.SSLError too: a CA file that is not one
                raise _SetupFailed(f"no TLS for {self.address}: {exc}") from None
        return self._context

    async def _connection(self) -> Client:
        if self._smtp is not None and self._smtp.usable:
            return self._smtp
        self._drop()
        mode = self.upstream.tls if self.upstream is not None else "none"
        smtp = await Client.connect(
            self.host,
            self.port,
            within=self.timeout,
            tls=await self._tls() if mode == "implicit" else None,
        )
        self._smtp = smtp
        if smtp.greeting.code != 220:
            # A 4xx/5xx greeting (421 "too busy"): the server speaks for itself, not the item.
            raise _DestinationDown(str(smtp.greeting))
        # EHLO now: the server's extensions (SMTPUTF8) must be known before MAIL FROM.
        await self._hello(smtp)
        if mode in ("may", "starttls") and smtp.supports("starttls"):
            answer = await smtp.starttls(await self._tls())
            if answer.code != 220:
                raise _SetupFailed(f"{self.address} refused STARTTLS: {answer}")
            await self._hello(smtp)
        elif mode == "starttls":
            raise _SetupFailed(
                f"{self.address} does not offer STARTTLS, and tls: starttls never sends in"
                " clear text"
            )
        await self._login(smtp)
        return smtp

    async def _hello(self, smtp: Client) -> None:
        answer = await smtp.ehlo(self.local_hostname)
        if answer.code == 421:
            raise _DestinationDown(str(answer))
        if answer.code != 250:
            answer = await smtp.helo(self.local_hostname)
            if answer.code != 250:
                raise _DestinationDown(str(answer))

    async def _login(self, smtp: Client) -> None:
        upstream = self.upstream
        if upstream is None or upstream.user is None or upstream.passwd is None:
            return
        if not smtp.secure:
            raise _SetupFailed(
                f"{self.address} offers no STARTTLS: the password for {upstream.user} is never"
                " sent in clear text"
            )
        if not smtp.supports("auth"):
            raise _SetupFailed(f"{self.address}: no login as {upstream.user}: it offers no AUTH")
        try:
            answer = await smtp.login(upstream.user, upstream.passwd.reveal())
        except ValueError as exc:
            raise _SetupFailed(f"{self.address}: no login as {upstream.user}: {exc}") from None
        if answer.code == 421:
            raise _DestinationDown(str(answer))
        if answer.code != 235:
            raise _SetupFailed(f"{self.address} refused the login as {upstream.user}: {answer}")

    async def check(self) -> str | None:
        """Connect, greet, STARTTLS and log in as configured, send nothing, and say goodbye;
        None when all of it worked, else what failed (never the password)."""
        try:
            smtp = await self._connection()
        except (Lost, *_FAILURES) as exc:
            await self._end(exc)
            return _failure(exc, self.address).error
        # A command's loop may end right after: wait until TLS is shut down and the socket
        # closed.
        await self.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(self.timeout, CLOSE_WAIT)):
                await asyncio.shield(smtp.closed)
        return None

    async def close_if_idle(self, idle: float) -> None:
        """Close the connection when it has not been used for ``idle`` seconds."""
        if self._smtp is not None and time.monotonic() - self._last_used > idle:
            await self.close()

    async def close(self) -> None:
        """Say QUIT if we can, then drop the connection; in the middle of a transaction (a
        send that was cancelled), drop it at once: QUIT would land in the message."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        if self._busy:
            smtp.abort()
        else:
            await smtp.quit()

    async def _end(self, failure: BaseException) -> None:
        """Let go of the connection after ``failure``: with QUIT where the server is fine and
        only the setup was refused (a login, STARTTLS), else at once."""
        if isinstance(failure, _SetupFailed):
            await self.close()
        else:
            self._drop()

    def _drop(self) -> None:
        """Forget the connection after a failure, without a word more to the server."""
        self._busy = False
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.abort()


#: What ends an attempt as the destination's trouble (or the setup's), not the item's.
_FAILURES = (Garbled, ConnectFailed, OSError, TimeoutError, _DestinationDown, _SetupFailed)


def _taken(answer: Reply, rcpt: str, results: dict[str, RecipientResult]) -> bool:
    """Whether RCPT's ``answer`` took ``rcpt``; else its refusal goes into ``results``."""
    if answer.code in (250, 251):
        return True
    if answer.code == 421:
        raise _DestinationDown(str(answer))
    results[rcpt] = _refusal(rcpt, answer)
    return False


def _each(item: Item, results: dict[str, RecipientResult], reply: str = "") -> Attempt:
    """The attempt's outcome as ``results`` has it for each of the item's recipients."""
    return Attempt(tuple(results[r] for r in item.recipients), reply=reply)


def _refusal(rcpt: str, answer: Reply) -> RecipientResult:
    state = "dead" if 500 <= answer.code < 600 else "pending"
    return RecipientResult(rcpt, state, str(answer))


def _refused_whole(answer: Reply) -> Attempt:
    return Attempt((), str(answer), permanent=500 <= answer.code < 600)


def _failure(exc: BaseException, address: str) -> Attempt:
    if isinstance(exc, _DestinationDown):
        return Attempt((), f"{address} answered {exc.reply}", unreachable=True)
    if isinstance(exc, _SetupFailed):
        return Attempt((), str(exc), unreachable=True)
    if isinstance(exc, ConnectFailed):
        return Attempt((), f"cannot connect to {address}: {exc}", unreachable=True)
    if isinstance(exc, Garbled):
        return Attempt((), f"{address} answered {exc}", unreachable=True)
    if isinstance(exc, TimeoutError):
        return Attempt((), f"timed out talking to {address}", unreachable=True)
    return Attempt((), f"connection to {address} lost: {exc}", unreachable=True)
