"""Deliver outbox items to ``remote-smtp`` with aiosmtplib, one reused connection per worker.

MAIL FROM and RCPT TO carry the addresses exactly as they were received: the null
reverse-path ``<>`` of a bounce, a quoted local part, and the bytes of an address that is not
UTF-8 go out as they came in (aiosmtplib's own ``sendmail`` would re-parse them, and refuses
an empty sender). What cannot be sent on a command line (a line break, a NUL) is refused for
good, never sent.

DATA goes out as the wire wants it: every line ended by CRLF (a bare LF becomes one, as every
SMTP server reads it) and every line that starts with a dot stuffed, so no sequence in a
message can end its DATA early (``<LF>.<LF>``, ``<CR>.<CR>``: SMTP smuggling). A bare CR in
the header section is folded instead (:func:`~mail2alert.message.fold_bare_cr`): made a line
end, it would start a header field the message did not have. A line longer than SMTP's 998
bytes is broken into shorter ones, as Postfix's ``smtp_line_length_limit`` does
(:func:`~mail2alert.message.fold_long_lines`): a strict smarthost would refuse it for good.

A big message goes out in blocks, each written once the socket has taken the one before:
aiosmtplib's ``data()`` makes three copies of a message and hands all of it to the transport
at once, which made one 31 MB message cost some 150 MB more while it was sent.

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
import re
import ssl
import time
from collections.abc import Iterator

import aiosmtplib

from mail2alert.message import fold_bare_cr, fold_long_lines
from mail2alert.outbox import Item, RecipientResult
from mail2alert.settings import HostPort, Upstream
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
    Each block ends after a line feed, so that no CRLF and no line start is cut in two, and
    its lines too long for SMTP are broken (:func:`~mail2alert.message.fold_long_lines`).
    """
    start = 0
    while start < len(data):
        cut = data.find(b"\n", start + size)
        end = len(data) if cut == -1 else cut + 1
        folded = fold_long_lines(data[start:end])
        block = _LEADING_DOT.sub(b"..", _LINE_ENDING.sub(b"\r\n", folded))
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
        """``upstream`` says how to talk to it (TLS, login, sender); None: as ``may`` with
        no login."""
        self.host = host
        self.port = port
        self.timeout = timeout
        self.upstream = upstream
        self.local_hostname = (upstream.helo if upstream else None) or local_hostname
        self._context: ssl.SSLContext | None = None
        self._smtp: aiosmtplib.SMTP | None = None
        self._last_used = 0.0

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
        try:
            return await self._send(item)
        except aiosmtplib.SMTPServerDisconnected:
            await self.close()
            if not reused:
                return Attempt((), f"connection to {self.address} lost", unreachable=True)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, _DestinationDown) as exc:
            await self.close()
            return _failure(exc, self.address)
        except _SetupFailed as exc:
            await self.close()
            return Attempt((), str(exc), unreachable=True)
        # The server may close an idle connection we kept; that is no failure of the item.
        try:
            return await self._send(item)
        except aiosmtplib.SMTPServerDisconnected:
            await self.close()
            return Attempt((), f"connection to {self.address} lost", unreachable=True)
        except (aiosmtplib.SMTPException, OSError, TimeoutError, _DestinationDown) as exc:
            await self.close()
            return _failure(exc, self.address)
        except _SetupFailed as exc:
            await self.close()
            return Attempt((), str(exc), unreachable=True)

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
        sender = self.upstream.sender if self.upstream and self.upstream.sender else item.mail_from
        answer = await smtp.execute_command(b"MAIL", b"FROM:" + _path(sender), *options)
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
        data = fold_bare_cr(item.data)
        try:
            if len(data) <= DATA_BLOCK:
                taken = await smtp.data(fold_long_lines(data))
            else:  # the blocks are folded one at a time
                taken = await self._data_in_blocks(smtp, data)
        except aiosmtplib.SMTPDataError as exc:
            if exc.code == 421:
                raise _DestinationDown(_reply(exc.code, exc.message)) from None
            # The data was refused: that is the answer about the item as a whole.
            self._last_used = time.monotonic()
            return _refused_whole(exc.code, exc.message)
        self._last_used = time.monotonic()
        for rcpt in accepted:
            results[rcpt] = RecipientResult(rcpt, "done")
        reply = _reply(taken.code, taken.message)
        return Attempt(tuple(results[r] for r in item.recipients), reply=reply)

    async def _data_in_blocks(self, smtp: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
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
        return end

    async def _reset(self, smtp: aiosmtplib.SMTP, code: int) -> None:
        """End a transaction the server refused, so that the connection can be reused."""
        if code == 421:
            raise _DestinationDown(f"{code} closing the connection")
        try:
            await smtp.rset()
        except aiosmtplib.SMTPResponseException:
            await self.close()

    async def _tls(self) -> ssl.SSLContext:
        """The TLS context, built on first use in a thread: reading the CA bundle on the event
        loop would stall every SMTP session of the process while it lasts."""
        if self._context is None:
            upstream = self.upstream or Upstream(address=HostPort(self.host, self.port))
            self._context = await asyncio.to_thread(tls_context, upstream)
        return self._context

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        mode = self.upstream.tls if self.upstream is not None else "none"
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
            start_tls=False,
            use_tls=mode == "implicit",
            tls_context=await self._tls() if mode == "implicit" else None,
        )
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            # A 4xx/5xx greeting (421 "too busy"): the server speaks for itself, not the item.
            raise _DestinationDown(_reply(exc.code, exc.message)) from None
        self._smtp = smtp
        # EHLO now: the server's extensions (SMTPUTF8) must be known before MAIL FROM.
        await self._hello(smtp)
        secure = mode == "implicit"
        if mode in ("may", "starttls") and smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(tls_context=await self._tls())
            except aiosmtplib.SMTPResponseException as exc:
                raise _SetupFailed(
                    f"{self.address} refused STARTTLS: {_reply(exc.code, exc.message)}"
                ) from None
            await self._hello(smtp)
            secure = True
        elif mode == "starttls":
            raise _SetupFailed(
                f"{self.address} does not offer STARTTLS, and tls: starttls never sends in"
                " clear text"
            )
        await self._login(smtp, secure=secure)
        return smtp

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            try:
                await smtp.helo()
            except aiosmtplib.SMTPHeloError as exc:
                raise _DestinationDown(_reply(exc.code, exc.message)) from None

    async def _login(self, smtp: aiosmtplib.SMTP, *, secure: bool) -> None:
        upstream = self.upstream
        if upstream is None or upstream.user is None or upstream.passwd is None:
            return
        if not secure:
            raise _SetupFailed(
                f"{self.address} offers no STARTTLS: the password for {upstream.user} is never"
                " sent in clear text"
            )
        try:
            await smtp.login(upstream.user, upstream.passwd.reveal())
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _SetupFailed(
                f"{self.address} refused the login as {upstream.user}:"
                f" {_reply(exc.code, exc.message)}"
            ) from None
        except aiosmtplib.SMTPException as exc:
            raise _SetupFailed(f"{self.address}: no login as {upstream.user}: {exc}") from None

    async def check(self) -> str | None:
        """Connect, greet, STARTTLS and log in as configured, send nothing, and say goodbye;
        None when all of it worked, else what failed (never the password)."""
        try:
            smtp = await self._connection()
        except (aiosmtplib.SMTPException, OSError, TimeoutError, _DestinationDown) as exc:
            await self.close()
            return _failure(exc, self.address).error
        except _SetupFailed as exc:
            await self.close()
            return str(exc)
        # A command's loop may end right after: wait until TLS is shut down and the socket
        # closed. aiosmtplib has no public way to wait for that (its protocol's close future
        # is never resolved in 5.x), but its protocol lets go of the transport once it is lost.
        protocol = smtp.protocol
        await self.close()
        deadline = time.monotonic() + min(self.timeout, CLOSE_WAIT)
        while getattr(protocol, "transport", None) is not None and time.monotonic() < deadline:  # noqa: ASYNC110 - nothing signals the loss
            await asyncio.sleep(0.005)
        return None

    async def close_if_idle(self, idle: float) -> None:
        """Close the connection when it has not been used for ``idle`` seconds."""
        if self._smtp is not None and time.monotonic() - self._last_used > idle:
            await self.close()

    async def close(self) -> None:
        """Say QUIT if we can, then drop the connection."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        if not smtp.is_connected:
            smtp.close()  # what a failed handshake may have left open
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
    # A TimeoutError is an OSError: without this first, a server that stalls once connected
    # (after TLS, say) would read "cannot connect".
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiosmtplib.SMTPConnectError):
        return Attempt((), f"timed out talking to {address}", unreachable=True)
    if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        return Attempt((), f"cannot connect to {address}: {exc}", unreachable=True)
    return Attempt((), f"{type(exc).__name__} from {address}: {exc}", unreachable=True)
