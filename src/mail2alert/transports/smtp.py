"""Deliver outbox items to ``remote-smtp`` with aiosmtplib, one reused connection per worker."""

from __future__ import annotations

import time

import aiosmtplib

from mail2alert.outbox import Item, RecipientResult
from mail2alert.transports import Attempt


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


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
        reused = self._smtp is not None
        try:
            return await self._send(item)
        except aiosmtplib.SMTPServerDisconnected:
            await self.close()
            if not reused:
                return Attempt((), f"connection to {self.address} lost")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            return _failure(exc, self.address)
        # The server may close an idle connection we kept; that is no failure of the item.
        try:
            return await self._send(item)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            return _failure(exc, self.address)

    async def _send(self, item: Item) -> Attempt:
        smtp = await self._connection()
        options: list[str] = []
        if not all(a.isascii() for a in (item.mail_from, *item.recipients)):
            if not smtp.supports_extension("smtputf8"):
                # Like Postfix: a non-ASCII address cannot be sent to a server without SMTPUTF8.
                return Attempt(
                    (),
                    f"{self.address} does not support SMTPUTF8 (non-ASCII address)",
                    permanent=True,
                )
            options.append("SMTPUTF8")
        try:
            refused, _ = await smtp.sendmail(
                item.mail_from, list(item.recipients), item.data, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return Attempt(tuple(_refusal(e.recipient, e.code, e.message) for e in exc.recipients))
        self._last_used = time.monotonic()
        results = []
        for rcpt in item.recipients:
            if rcpt in refused:
                results.append(_refusal(rcpt, refused[rcpt].code, refused[rcpt].message))
            else:
                results.append(RecipientResult(rcpt, "done"))
        return Attempt(tuple(results))

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
        await smtp.connect()
        self._smtp = smtp
        # EHLO now: the server's extensions (SMTPUTF8) must be known before MAIL FROM.
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            await smtp.helo()
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


def _failure(exc: BaseException, address: str) -> Attempt:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Attempt((), _reply(exc.code, exc.message), permanent=500 <= exc.code < 600)
    if isinstance(exc, aiosmtplib.SMTPConnectError | OSError):
        return Attempt((), f"cannot connect to {address}: {exc}")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Attempt((), f"timed out talking to {address}")
    return Attempt((), f"{type(exc).__name__} from {address}: {exc}")
