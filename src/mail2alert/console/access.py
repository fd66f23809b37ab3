"""Who may see the console and who may change the outbox through it.

- :class:`Logins`: HTTP basic auth against ``http.users-file`` (the format of SMTP AUTH's
  users file, :mod:`mail2alert.users`). Checking a bcrypt or argon2 hash is slow by design,
  so it runs in the event loop's default executor, never on the loop; a successful check is
  remembered for :data:`REMEMBERED` seconds, so a page and its next few clicks cost one.
  The file is read again whenever it changes (a user added or removed counts at once). A
  wrong password is answered after a delay that doubles per failure from the same address,
  as SMTP AUTH's (:class:`~mail2alert.session.AuthThrottle`).
- :class:`Csrf`: the token every form that changes something carries. It is an HMAC, under a
  key made when the process starts, of the user and when it was issued: a page of another
  site cannot read it (the browser's same-origin rule), so it cannot make a form that posts
  a valid one. Tokens last :data:`TOKEN_LIFE` seconds and die with the process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from mail2alert.session import AuthThrottle
from mail2alert.users import read_users, verify

log = logging.getLogger(__name__)

#: How long (seconds) a successful login is taken again without checking its hash.
REMEMBERED = 60.0
#: How long (seconds) a form's token is valid.
TOKEN_LIFE = 12 * 3600.0

_Stamp = tuple[int, int, int]


class UsersUnreadable(Exception):
    """The users file cannot be read now: nobody is let in."""


def credentials(header: str | None) -> tuple[str, str] | None:
    """The name and password of an ``Authorization: Basic ...`` header, or None."""
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:  # not base64 (a non-ASCII character too), or not UTF-8
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else None


class Logins:
    """Basic-auth checks against a users file, off the event loop, good ones remembered."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._throttle = AuthThrottle()
        self._key = secrets.token_bytes(32)
        self._users: tuple[Path, _Stamp, Mapping[str, str]] | None = None
        #: (file, its stamp, name, HMAC of the password) -> until when it counts.
        self._good: dict[tuple[Path, _Stamp, str, bytes], float] = {}

    async def check(self, users_file: Path, header: str | None, peer: str) -> str | None:
        """The user the ``Authorization`` header names if its password is theirs, else None
        (after the delay the failures from ``peer``, the client's address, have earned).

        Raises :class:`UsersUnreadable` when the file cannot be read.
        """
        given = credentials(header)
        if given is None:
            return None
        name, password = given
        loop = asyncio.get_running_loop()
        stamp, users = await loop.run_in_executor(None, self._read, users_file)
        digest = hmac.new(self._key, password.encode("utf-8"), hashlib.sha256).digest()
        key = (users_file, stamp, name, digest)
        now = self._clock()
        if self._good.get(key, 0.0) > now:
            return name
        if not await loop.run_in_executor(None, verify, users, name, password):
            await self._sleep(self._throttle.delay(peer, now))
            return None
        self._throttle.succeeded(peer)
        self._good = {k: until for k, until in self._good.items() if until > now}
        self._good[key] = now + REMEMBERED
        return name

    def _read(self, path: Path) -> tuple[_Stamp, Mapping[str, str]]:
        """The users of ``path`` (read again only when the file changed), and its stamp."""
        try:
            found = path.stat()
            stamp = (found.st_mtime_ns, found.st_size, found.st_ino)
            kept = self._users
            if kept is not None and kept[:2] == (path, stamp):
                return stamp, kept[2]
            users = read_users(path)
        except (OSError, ValueError) as exc:
            raise UsersUnreadable(str(exc)) from None
        self._users = (path, stamp, users)
        return stamp, users


class Csrf:
    """Issues and checks the tokens of the console's forms."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._key = secrets.token_bytes(32)

    def _mac(self, user: str, issued: str) -> str:
        message = f"{user}\n{issued}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def token(self, user: str) -> str:
        """A token for a form shown to ``user`` ("" without logins)."""
        issued = str(int(self._clock()))
        return f"{issued}.{self._mac(user, issued)}"

    def valid(self, token: str | None, user: str) -> bool:
        """Whether ``token`` was issued by this process to ``user`` and is still fresh."""
        issued, _, mac = (token or "").partition(".")
        if not issued.isdigit() or not mac:
            return False
        if not hmac.compare_digest(mac, self._mac(user, issued)):
            return False
        return 0 <= self._clock() - int(issued) <= TOKEN_LIFE
