"""The SMTP session: :class:`LeanSMTP`, aiosmtpd's commands answered as they arrive.

It reads commands and DATA, enforces the listener's limits, access rules, STARTTLS and AUTH,
and hands each complete message to its handler (:class:`mail2alert.server.Handler` in
``serve``), whose answer it sends. It knows nothing of routing or the outbox.

Its own warnings are logged as ``mail2alert.server``, where intake's lines have always been
(operators filter on that name); aiosmtpd's, as ``mail.log``.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import enum
import inspect
import logging
import re
import resource
import socket
import ssl
import tempfile
import time
import traceback
from base64 import b64decode, b64encode
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MethodType
from typing import IO, Any, AnyStr, Protocol, cast, runtime_checkable

from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    DATA_SIZE_DEFAULT,
    MISSING,
    SMTP,
    AuthResult,
    LoginPassword,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    syntax,
)
from aiosmtpd.smtp import __ident__ as AIOSMTPD_IDENT

from mail2alert.logs import loggable
from mail2alert.message import DOT_ATOM
from mail2alert.settings import Listener
from mail2alert.users import read_users, verify

# Intake's log lines kept their logger when the session moved here from server.py.
log = logging.getLogger("mail2alert.server")

REPLY_NO_SPACE = "452 4.3.1 Insufficient system storage, try again later"
REPLY_TOO_MANY = "421 4.3.2 too many connections, try again later"
REPLY_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
REPLY_BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
REPLY_RELAY_DENIED = "554 5.7.1 Relay access denied: this client may not send through mail2alert"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
REPLY_STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
REPLY_AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
REPLY_AUTH_OK = "235 2.7.0 Authentication successful"
REPLY_TOO_MANY_SESSIONS = "421 4.7.0 Too many sessions, try again later"
REPLY_TIMEOUT = "421 4.4.2 Timeout exceeded, closing the connection"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address without SMTPUTF8"
REPLY_COMMAND_TOO_LONG = "500 5.5.2 Command line too long"

#: The longest command line taken, CRLF not counted (Postfix's ``line_length_limit``):
#: room for a long address with every MAIL parameter, where aiosmtpd allows 512.
COMMAND_LIMIT = 2048

_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\d+)(?:\s|$)", re.IGNORECASE)

#: The wait before answering a failed AUTH from an address: this, doubled for each failure
#: in a row from it, up to :data:`AUTH_DELAY_MAX` (Postfix's ``smtpd_error_sleep_time``).
AUTH_DELAY = 1.0
AUTH_DELAY_MAX = 30.0
#: Failures from an address are forgotten after this long without one.
AUTH_FORGET = 3600.0


class EscapeClientText(logging.Filter):
    """Escapes what :func:`loggable` escapes in every record of the logger it filters.

    aiosmtpd logs commands, HELO names and addresses as the client sent them (``%s``), so an
    escape sequence or a bare CR from a client would reach the operator's terminal or forge
    a log line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's to report, not ours
            return True
        safe = loggable(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


logging.getLogger("mail.log").addFilter(EscapeClientText())


_NAMES: dict[tuple[type, tuple[str, ...]], tuple[str, ...]] = {}


def _aiosmtpd_names(cls: type, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """The attributes of ``cls`` whose names start with one of ``prefixes`` (a session's
    commands and AUTH mechanisms, a handler's hooks, which are methods of its class), found
    once per class: aiosmtpd looked through every attribute at every new session."""
    names = _NAMES.get((cls, prefixes))
    if names is None:
        names = _NAMES[cls, prefixes] = tuple(n for n in dir(cls) if n.startswith(prefixes))
    return names


def _clear_frames(error: BaseException | None) -> None:
    """Empty the frames in the tracebacks of ``error`` and of the errors it was raised from
    or during (a future keeps the traceback it was given apart from its error, so only
    emptying the frames lets go of what they held).

    Call it only once the code those frames ran has finished: emptying the frame of a
    suspended coroutine closes that coroutine (a running frame is left as it is).
    """
    seen: set[int] = set()
    pending = [error]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        pending += [error.__cause__, error.__context__]


@runtime_checkable
class IntakeHandler(Protocol):
    """What a session needs of its handler besides aiosmtpd's hooks (``handle_DATA``)."""

    hostname: str
    """The name the session greets with, unless :func:`smtp_factory` is given another."""

    def rejected(self) -> None:
        """A message was refused for good (5xx): counted for /metrics."""


#: DATA up to this size is kept in memory; above it, the message goes to an unlinked temporary
#: file as it arrives and is read back in one piece, so that its bytes are held once, not twice.
SPOOL_THRESHOLD = 1 << 20


class _Spool:
    """A message's bytes as they arrive: in memory, then in a temporary file past a threshold."""

    def __init__(self, threshold: int, directory: str | None) -> None:
        self._threshold = threshold
        self._directory = directory
        self._memory = bytearray()
        self._file: IO[bytes] | None = None

    def write(self, piece: bytes | memoryview) -> None:
        """Keep ``piece``; raises OSError when the temporary file cannot take it."""
        if self._file is None:
            self._memory += piece
            if len(self._memory) <= self._threshold:
                return
            # Closed by close(), which DATA calls however it ends.
            self._file = tempfile.TemporaryFile(buffering=0, dir=self._directory)  # noqa: SIM115
            piece, self._memory = memoryview(self._memory), bytearray()
        view = memoryview(piece)
        while view:
            written = self._file.write(view)
            view = view[written or 0 :]

    def getvalue(self) -> bytes:
        """Everything written, as one bytes object."""
        if self._file is None:
            return bytes(self._memory)
        self._file.seek(0)
        # An unbuffered file reads its whole size into one bytes object of that size.
        return self._file.read()

    def close(self) -> None:
        """Let go of the memory and remove the file."""
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None


class DataState(enum.Enum):
    """How DATA went: aiosmtpd's three states, and a spool that could not be written."""

    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()
    NO_SPACE = enum.auto()


class DataDecoder:
    """DATA's transparency undone block by block, with aiosmtpd's limits and replies.

    aiosmtpd reads DATA a line at a time into a list of ``bytearray`` lines and joins them at
    the end: a 31 MB message cost ~400,000 objects, the join, and ~10 times its size in memory
    at the peak. Here each block read from the connection is checked (line length, total
    size), dot-unstuffed with one ``replace`` and appended to a :class:`_Spool`. Feed it
    blocks that end either anywhere or just after a ``.\r\n`` (the only place the end line
    can be); :attr:`done` says when the end line has been seen.
    """

    def __init__(
        self,
        *,
        size_limit: int | None,
        line_limit: int,
        spool_threshold: int = SPOOL_THRESHOLD,
        spool_dir: str | None = None,
    ) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.state = DataState.NOMINAL
        self.error: OSError | None = None
        self.done = False
        self.size = 0
        self._line = 0  # bytes of the current line seen so far: 0 at the start of a line
        self._carry = b""  # a CR at the end of a block: half a line break, or not
        self._spool = _Spool(spool_threshold, spool_dir)

    def feed(self, block: bytes) -> None:
        """Take the next block of DATA as it came over the wire."""
        if not block.endswith(b".\r\n"):
            self._take(block)
            return
        self._take(block[:-3])
        if self._line == 0 and not self._carry:
            self.done = True
            return
        self._take(b".\r\n")

    def content(self) -> bytes:
        """The message, unstuffed; raises OSError when the spool cannot be read back."""
        return self._spool.getvalue()

    def close(self) -> None:
        """Release the spool (memory and temporary file)."""
        self._spool.close()

    def _take(self, data: bytes) -> None:
        if self._carry:
            data, self._carry = self._carry + data, b""
        if data.endswith(b"\r"):
            data, self._carry = data[:-1], b"\r"
        if not data:
            return
        at_line_start = self._line == 0
        self.size += len(data)
        # Too big is the answer that matters when a message is both too big and has a line
        # too long: it says what to change.
        if self.size_limit and self.size > self.size_limit:
            self._fail(DataState.TOO_MUCH)
        if self._longest_line(data) > self.line_limit - 2:
            self._fail(DataState.TOO_LONG)
        if self.state is not DataState.NOMINAL:
            return
        piece = data.replace(b"\r\n.", b"\r\n")
        try:
            self._spool.write(
                memoryview(piece)[1:] if at_line_start and piece[:1] == b"." else piece
            )
        except OSError as exc:
            self.error = exc
            self._fail(DataState.NO_SPACE)

    def _longest_line(self, data: bytes) -> int:
        """The longest line (without CRLF) that ``data`` ends or holds; tracks the open one."""
        first = data.find(b"\r\n")
        if first < 0:
            self._line += len(data)
            return self._line
        longest = self._line + first
        last = data.rfind(b"\r\n")
        if last > first:
            longest = max(longest, *map(len, data[first + 2 : last].split(b"\r\n")))
        self._line = len(data) - last - 2
        return max(longest, self._line)

    def _fail(self, state: DataState) -> None:
        if self.state is DataState.NOMINAL:
            self.state = state
            # What was kept is of no use any more; the rest is read only to find the end.
            self._spool.close()


_DATA_REPLIES = {
    DataState.TOO_LONG: "500 Line too long (see RFC5321 4.5.3.1.6)",
    DataState.TOO_MUCH: "552 Error: Too much mail data",
    DataState.NO_SPACE: REPLY_NO_SPACE,
}


# <local@domain> with both parts plain dot-atoms (RFC 5322 3.2.3), then plain parameters;
# everything else (comments, quoted parts, line breaks) goes through aiosmtpd's full parser.
_SIMPLE_ADDRESS = re.compile(rf"[ \t]*<({DOT_ATOM}@{DOT_ATOM})>((?:[ \t]*[^ \t(\r\n][^(\r\n]*)?)\Z")
#: What :meth:`LeanSMTP._take_line` gives for a line too long for a command (compared by
#: identity: no line read is this very object).
_TOO_LONG = b"<too long>"
#: A line of a multi-line reply that is not its last (RFC 5321 4.2.1: ``250-SIZE 1000``).
_CONTINUED = re.compile(r"[0-9]{3}-")
#: C0 controls and DEL, which no address may hold; a tab may only separate parameters.
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass
class SessionCount:
    """Open sessions of one process against its share of ``max-sessions``."""

    limit: int
    active: int = 0


@dataclass
class AuthThrottle:
    """Failed logins per client address, for the delay before the next answer (one per
    process; every session of that process shares it)."""

    failures: dict[str, tuple[int, float]] = field(default_factory=dict)

    def delay(self, peer: str, now: float) -> float:
        """Record a failure from ``peer``; how long to wait before answering it."""
        count, last = self.failures.get(peer, (0, 0.0))
        count = 1 if now - last > AUTH_FORGET else count + 1
        self.failures[peer] = (count, now)
        if len(self.failures) > 10_000:  # bounded: the oldest go first
            for old in sorted(self.failures, key=lambda p: self.failures[p][1])[:1000]:
                del self.failures[old]
        return float(min(AUTH_DELAY_MAX, AUTH_DELAY * 2 ** (count - 1)))

    def succeeded(self, peer: str) -> None:
        self.failures.pop(peer, None)


@dataclass(frozen=True)
class Access:
    """What sessions on the listener may and must do: ``local-smtp``, its TLS context and
    the users who may authenticate, as of the last (re)load."""

    listener: Listener
    tls_context: ssl.SSLContext | None = None
    users: Mapping[str, str] = field(default_factory=dict)
    sessions_per_process: int = 200
    """This process's share of ``max-sessions`` (it is one of the intake processes)."""

    @classmethod
    def of(cls, listener: Listener, *, processes: int = 1) -> Access:
        """Load the certificate and the users file; OSError, ssl.SSLError or ValueError if
        they cannot be used (the configuration check has said so already)."""
        context = None
        if listener.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(listener.tls.cert, listener.tls.key)
        users = read_users(listener.auth.users_file) if listener.auth is not None else {}
        share = -(-listener.max_sessions // max(1, processes))
        return cls(listener, context, users, share)

    @property
    def implicit_tls(self) -> bool:
        """TLS from the first byte: the listening socket wraps every connection."""
        return self.listener.tls is not None and self.listener.tls.mode == "implicit"


class _Waiting:
    """A command that ran until it had to wait, driven on to its end by a task.

    Python 3.12's eager tasks (``asyncio.eager_task_factory``) by hand, for 3.11: a command
    runs at once in ``data_received``, and only one that has to wait becomes a task. Unlike
    an eager task, no task is current while the command first runs, so a handler must not
    use ``asyncio.timeout()`` or a ``TaskGroup`` before it first waits.

    The task waits for what the command waits for, then resumes it, and the command reads
    the outcome itself (the future's result, its error, or its cancellation), as under a
    task of its own. :meth:`cancel` cancels what it waits for, or, when that is done already
    or nothing (a bare yield), throws the cancellation into it when it is resumed.
    """

    def __init__(self, step: Coroutine[Any, Any, None], waiting_for: object) -> None:
        self._step = step
        self._waiting_for = waiting_for
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        if isinstance(self._waiting_for, asyncio.Future):
            self._waiting_for.cancel()

    async def run(self) -> None:
        step = self._step
        while True:
            waiting_for = self._waiting_for
            try:
                if waiting_for is None:  # a bare yield: asyncio.sleep(0)
                    await asyncio.sleep(0)
                else:
                    future = cast(asyncio.Future[Any], waiting_for)
                    # Set by the await that yielded it, for the task that takes it, as a
                    # task does.
                    future._asyncio_future_blocking = False
                    await future
            except asyncio.CancelledError:
                self._cancelled = True  # this task, or what it waited for
            except Exception:  # noqa: BLE001, S110 - the command reads the future's error itself
                pass
            cancelled_future = isinstance(waiting_for, asyncio.Future) and waiting_for.cancelled()
            try:
                if self._cancelled and not cancelled_future:
                    self._cancelled = False
                    self._waiting_for = step.throw(asyncio.CancelledError())
                else:
                    # A cancelled future raises the cancellation in the command itself.
                    self._cancelled = False
                    self._waiting_for = step.send(None)
            except StopIteration:
                return

    def abandoned(self) -> None:
        """The task was cancelled before it could resume the command (before its first
        step): the cancellation goes into the command now, as its own task would have put
        it, and the command is closed if it goes on waiting."""
        step = self._step
        if inspect.getcoroutinestate(step) != inspect.CORO_SUSPENDED:
            return
        try:
            step.throw(asyncio.CancelledError())
        except (StopIteration, asyncio.CancelledError):
            return
        except Exception:
            log.exception("a cancelled SMTP command failed")
            return
        step.close()


#: aiosmtpd's logger: where its warnings about a session have always gone.
_session_log = logging.getLogger("mail.log")


def _current_loop() -> asyncio.AbstractEventLoop:
    """The running loop, else the current one (a session made outside a loop, in a test)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.get_event_loop_policy().get_event_loop()


_Table = tuple[tuple[str, Callable[..., Any]], ...]
_TABLES: dict[tuple[type, str], _Table] = {}


def _name(attribute: str, method: Callable[..., Any]) -> str:
    """A command's or an AUTH mechanism's name, as aiosmtpd makes it from its method."""
    if attribute.startswith("smtp_"):
        return attribute.replace("smtp_", "")
    default = attribute.replace("auth_", "").replace("__", "-")
    return str(getattr(method, "__auth_mechanism_name__", default))


def _methods(cls: type, prefix: str) -> _Table:
    """The commands (``smtp_``) or AUTH mechanisms (``auth_``) of a session class by name,
    with their functions: found once per class."""
    table = _TABLES.get((cls, prefix))
    if table is None:
        functions = ((n, getattr(cls, n)) for n in _aiosmtpd_names(cls, (prefix,)))
        table = _TABLES[cls, prefix] = tuple((_name(n, f), f) for n, f in functions)
    return table


class LeanSMTP(SMTP):
    """An SMTP session: aiosmtpd's commands, answered as they arrive, and hardened.

    aiosmtpd's session runs a task per connection that reads a stream line by line; this one
    answers each command in :meth:`data_received` and waits only for what has to be waited
    for (see :meth:`_start`). aiosmtpd's ``smtp_*`` methods still parse and answer every
    command, with the same replies (tests/test_smtp_engine.py serves random command streams
    to both). Plain ``<local@domain>`` addresses are read by a regular expression instead of
    the full RFC 5322 header parser; anything else still goes through aiosmtpd's parser,
    which gives the same result.

    Hardened: an address with a control character is refused at MAIL or RCPT, and HELP lists
    only the commands EHLO offers.

    Access (:class:`Access`): a client outside ``allowed-clients`` must authenticate before
    MAIL (530 5.7.0 where AUTH can be offered, else 554 5.7.1), logged once per session;
    ``starttls-required`` refuses MAIL before STARTTLS; AUTH PLAIN and LOGIN are offered only
    on a TLS session, checked against the users file in a thread, and a failure is answered
    after a delay that doubles per failure from the same address.
    """

    def __init__(
        self,
        handler: Any,
        *,
        hostname: str | None = None,
        ident: str | None = None,
        data_size_limit: int | None = DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = False,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 300,
        auth_required: bool = False,
        auth_require_tls: bool = True,
        command_limit: int | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """A session for ``handler`` (its ``handle_*`` hooks), with aiosmtpd's options of the
        same names; ``command_limit`` is the longest command line (CRLF not counted).

        aiosmtpd's own set-up is not run: it made a stream reader and writer this session
        does not read or write, and looked through every attribute of the session and of its
        handler for commands, AUTH mechanisms and hooks, at every connection (about 20 µs);
        here the commands and mechanisms are found once per class. A new session takes
        about 6 µs.
        """
        self.loop = loop or _current_loop()
        self.event_handler = handler
        self.hostname = hostname or socket.getfqdn()
        self.__ident__ = ident or AIOSMTPD_IDENT
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = False  # DATA's content is bytes, as it came
        self.tls_context = tls_context
        self.require_starttls = False
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._auth_required = auth_required
        self._auth_require_tls = auth_require_tls
        # For a handler's own AUTH mechanism that asks aiosmtpd's _authenticate: no login.
        self._authenticator = None
        self._auth_callback = login_always_fail
        if command_limit is not None:
            self.line_length_limit = command_limit + 2
            self.command_size_limit = command_limit
        limit = self.command_size_limit
        # Per session: aiosmtpd's is one dict for all sessions, grown by every EHLO.
        self.command_size_limits = collections.defaultdict(lambda: limit)
        self._smtp_methods = {
            name: MethodType(f, self) for name, f in _methods(type(self), "smtp_")
        }
        self._auth_methods = {
            name: _AuthMechAttr(MethodType(f, self), True)
            for name, f in _methods(type(self), "auth_")
        }
        self._handle_hooks = {}
        for attribute in _aiosmtpd_names(type(handler), ("handle_", "auth_")):
            method = getattr(handler, attribute)
            if attribute.startswith("auth_"):
                self._auth_methods[_name(attribute, method)] = _AuthMechAttr(method, False)
            else:
                self._handle_hooks[attribute.replace("handle_", "")] = method
        self._ehlo_hook_ver = None
        if "EHLO" in self._handle_hooks:
            parameters = inspect.signature(self._handle_hooks["EHLO"]).parameters
            self._ehlo_hook_ver = "new" if len(parameters) == 5 else "old"
        self._continued = []
        self._buffer = bytearray()
        self._bogus = BOGUS_LIMIT

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        found = _SIMPLE_ADDRESS.match(arg)
        if found is None:
            return super()._getaddr(arg)
        # aiosmtpd's parser drops the white space after the closing bracket; so do we.
        address, rest = found.group(1), found.group(2).lstrip()
        local = address.rpartition("@")[0]
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return address, rest

    spool_dir: str | None = None
    """Where DATA bigger than :attr:`spool_threshold` is spooled (None: the temp dir)."""
    spool_threshold: int = SPOOL_THRESHOLD
    gate: SessionGate | None = None
    """Refuses sessions near the file descriptor limit (None: every session is served)."""
    _turned_away = False
    access: Access | None = None
    throttle: AuthThrottle | None = None
    sessions: SessionCount | None = None
    """This process's open sessions (None: no limit but the descriptors')."""
    max_recipients: int | None = None
    data_line_limit: int | None = None
    """The longest line DATA takes (None: ``line_length_limit``, as aiosmtpd)."""
    too_big_reply = "552 Error: Too much mail data"
    too_long_reply = "500 Command line too long"
    _refusal_logged = False
    _counted = False
    _continued: list[str]
    """The lines of a multi-line reply pushed so far, sent with its last line."""
    _buffer: bytearray
    """What the client sent that no command has taken yet."""
    _decoder: DataDecoder | None = None
    """DATA's, from its 354 to its end line."""
    _busy: asyncio.Task[None] | None = None
    _waiting: _Waiting | None = None
    """The command that had to wait, while it waits: the next ones wait for it."""
    _line_wanted: asyncio.Future[None] | None = None
    _skipping = False
    """A command line too long is being skipped to its end."""
    _held = False
    """Reading paused: much came while a command waited."""
    _eof = False
    """The client half-closed the connection: it closes once what came is answered."""
    _starting_tls = False
    """STARTTLS was taken: the connection is TLS's from its 220 on."""
    _replies_back_up = False
    _drained: asyncio.Future[None] | None = None
    _reading_paused = False
    _deadline = 0.0
    """When the session times out, as of its last command."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Greet the client, or tell it 421 when descriptors or sessions run short; after
        STARTTLS, start over on the TLS transport (RFC 3207 4.2)."""
        self._continued.clear()  # nothing said in clear text goes on over TLS
        # Anything the client sent in clear text after STARTTLS is dropped (RFC 3207 5).
        self._buffer.clear()
        self._set_rset_state()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd
        self.session = self._create_session()
        self.session.peer = transport.get_extra_info("peername")
        if self._tls_protocol is not None:  # the handshake STARTTLS began is done
            self.transport = transport
            self.session.ssl = self._tls_protocol._extra
            hook = self._handle_hooks.get("STARTTLS")
            self._tls_handshake_okay = hook is None or hook(self, self.session, self.envelope)
            self._reset_timeout()
            return
        sock = transport.get_extra_info("socket")
        if self.gate is not None and sock is not None and not self.gate.admits(sock.fileno()):
            self._turn_away(transport, REPLY_TOO_MANY)
            return
        if self.sessions is not None:
            if self.sessions.active >= self.sessions.limit:
                self._turn_away(transport, REPLY_TOO_MANY_SESSIONS)
                return
            self.sessions.active += 1
            self._counted = True
        self.transport = transport
        self._reset_timeout()
        self._reply(f"220 {self.hostname} {self.__ident__}")

    def _turn_away(self, transport: asyncio.BaseTransport, reply: str) -> None:
        self._turned_away = True
        # uvloop's transports write, but are no asyncio.WriteTransport by class.
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(reply.encode("ascii") + b"\r\n")
        writer.close()
        self._let_go()

    def data_received(self, data: bytes) -> None:
        """Take the client's bytes: commands are answered here and now, and only a command
        that has to wait (for the outbox's commit, a password check, a TLS handshake) leaves
        the rest for when it is done."""
        if self.transport is None:
            return
        if self._decoder is not None:
            # In DATA the timeout counts from the last bytes received: a slow upload goes on,
            # a stalled one is cut off (aiosmtpd counts from the DATA command).
            self._reset_timeout()
        self._buffer += data
        if self._busy is None:
            self._advance()
            return
        if self._line_wanted is not None:  # the waiting command reads lines itself
            if not self._line_wanted.done():
                self._line_wanted.set_result(None)
        elif len(self._buffer) > self.line_length_limit:
            # The client goes on while its command waits: let TCP hold the rest.
            self._held = True
            self._read_or_not()

    def eof_received(self) -> bool | None:
        """The client is done sending. Over plain TCP it may still read (a half-close): what
        it sent is answered first, a message being committed included, and then the
        connection closes; a message committed but never answered would be sent again, and
        delivered twice. Over TLS, or while a command waits for more from the client (an
        AUTH answer), the session ends at once and what waits is cancelled, as aiosmtpd
        does."""
        transport = self.transport
        if transport is None:
            return False
        if self._eof:  # told again, after reading was paused and resumed
            return True
        if (
            self._line_wanted is None
            and not self._starting_tls
            and transport.get_extra_info("ssl_object") is None
        ):
            self._eof = True
            self._advance()
            return True  # keep the transport open for the answers
        self._stop()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted and self.sessions is not None:
            self._counted = False
            self.sessions.active -= 1
        if self.transport is None:  # turned away, or already ended (a failed STARTTLS)
            return
        self.transport = None
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
            self._timeout_handle = None
        if self._original_transport is not None:
            # The TCP transport under the TLS one: closed too, or it reports its EOF later.
            self._original_transport.close()
        if self._decoder is not None:
            log.info("connection lost during DATA")
            self._decoder.close()
            self._decoder = None
        if self._waiting is None:
            self._let_go()
        else:  # its last steps may still use the session
            self._waiting.cancel()

    def _stop(self) -> None:
        """End the session: what waits is cancelled, the connection closed."""
        if self._waiting is not None:
            self._waiting.cancel()
        ssl_protocol = self._tls_protocol
        if ssl_protocol is not None and self.session is not None and self.session.ssl is None:
            # In the handshake STARTTLS began: asyncio's SSL protocol would abort the
            # connection without a word to the session, which it has not connected yet.
            if self._original_transport is not None:
                cast(asyncio.Transport, self._original_transport).abort()
            self.connection_lost(None)
            return
        if self.transport is not None:
            self.transport.close()

    def _let_go(self) -> None:
        """Break the reference cycles of an ended session, so that reference counting frees
        it at once.

        A session refers to itself: its tables of bound ``smtp_*`` and ``auth_*`` methods and,
        after STARTTLS, asyncio's SSL protocol. Left so, every ended session waited for a
        full collection of the cyclic garbage collector, and with it, after STARTTLS,
        asyncio's 256 KiB buffer and OpenSSL's state: ~300 KB a session, tens of sessions per
        intake worker, and its RSS rose by the heap's high-water mark (bench/README.md,
        "Soak").
        """
        self._smtp_methods = {}
        self._auth_methods = {}
        self._tls_protocol = None

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Moved forward at every command: a deadline read when the timer fires, rather than a
        # timer cancelled and set again each time (a heap push and a cancellation a command).
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timed_out)

    def _timed_out(self) -> None:
        early = self._deadline - self.loop.time()
        if early > 0:
            # uvloop keeps timers to the millisecond: a shorter wait would fire at once.
            self._timeout_handle = self.loop.call_later(max(early, 0.001), self._timed_out)
            return
        self._timeout_handle = None
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        # aiosmtpd closes an idle session without a word; say why first (RFC 5321 4.5.3.2).
        if self.transport is not None and not self.transport.is_closing():
            cast(asyncio.WriteTransport, self.transport).write(
                REPLY_TIMEOUT.encode("ascii") + b"\r\n"
            )
        _session_log.info("%r connection timeout", self._peer)
        self._stop()
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and transport.get_write_buffer_size():
            # A client that reads nothing would keep the connection, and its session's
            # place among max-sessions, for ever: close() waits for the replies to go out.
            transport.abort()

    def pause_writing(self) -> None:
        # The client does not read its replies: answer and read no more commands until it
        # does.
        self._replies_back_up = True
        self._read_or_not()

    def resume_writing(self) -> None:
        self._replies_back_up = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._read_or_not()
        if self._busy is None:
            self._advance()

    def _read_or_not(self) -> None:
        """Pause or resume reading: not while replies back up, nor while a command waits and
        more than a command line has come after it."""
        pause = self._replies_back_up or self._held
        transport = cast(asyncio.ReadTransport | None, self.transport)
        if pause != self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _advance(self) -> None:
        """Answer the commands that have come in full, until one has to wait."""
        while self._busy is None and not self._replies_back_up:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if self._decoder is not None:
                if not self._feed_data(self._decoder):
                    break
                continue
            line = self._take_line()
            if line is None:
                break
            if line is _TOO_LONG:
                self._reply(self.too_long_reply)
                continue
            self._command(line)
        else:
            return  # a command waits, or the client is not reading: more later
        if self._eof:  # all the client sent is answered, and no more will come
            self._stop()

    def _take_line(self) -> bytes | None:
        """The next whole line the client sent, its LF taken off; :data:`_TOO_LONG` for one
        longer than a command line may be (skipped to its end), None while none has come
        in full."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > self.line_length_limit:
                self._skipping = True
                buffer.clear()
            return None
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if self._skipping or end > self.line_length_limit:
            self._skipping = False
            return _TOO_LONG
        return line

    def _command(self, line: bytes) -> None:
        """One command line (its LF taken off), checked and answered as aiosmtpd's session
        checks and answers it."""
        assert self.session is not None
        line = line.rstrip(b"\r\n")
        if not line:
            self._reply("500 Error: bad syntax")
            return
        command_bytes, _, arg_bytes = line.partition(b" ")
        try:
            command = command_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            self._reply("500 Error: bad syntax")
            return
        arg: str | None = None
        if arg_bytes:
            arg_bytes = arg_bytes.strip()
            # Non-UTF-8 bytes survive as surrogates, to be encoded back as they came.
            if self.enable_SMTPUTF8:
                arg = str(arg_bytes, encoding="utf-8", errors="surrogateescape")
            else:
                try:
                    arg = str(arg_bytes, encoding="ascii", errors="strict")
                except UnicodeDecodeError:
                    self._reply("500 Error: strict ASCII mode")
                    return
        limit = (
            self.command_size_limits[command]
            if self.session.extended_smtp
            else self.command_size_limit
        )
        if len(line) > limit:
            self._reply("500 Command line too long")
            return
        if not self._tls_handshake_okay and command != "QUIT":
            self._reply("554 Command refused due to lack of security")
            return
        if (
            self.require_starttls
            and not self._tls_protocol
            and command not in ALLOWED_BEFORE_STARTTLS
        ):
            self._reply("530 Must issue a STARTTLS command first")
            return
        method = self._smtp_methods.get(command)
        if method is None:
            _session_log.warning("%r unrecognised: %s", self.session.peer, command)
            self._bogus -= 1
            if self._bogus < 1:
                _session_log.warning("%r too many bogus commands", self.session.peer)
                self._reply("502 5.5.1 Too many unrecognized commands, goodbye.")
                self._stop()
                return
            self._reply(f'500 Error: command "{command}" not recognized')
            return
        self._reset_timeout()
        self._start(method(arg))

    def _failed(self, error: Exception) -> None:
        """A command raised ``error``: answered as aiosmtpd answers it, or, when a STARTTLS
        handshake failed, the session ends."""
        if isinstance(error, TLSSetupException):
            self._stop()
            self.connection_lost(error)
            # Its frames, and those of the SSL error it was raised from, hold the session and
            # asyncio's SSL protocol: let go of them, or they wait for a full collection.
            _clear_frames(error)
            return
        self._start(self._answer_error(error))

    async def _answer_error(self, error: Exception) -> None:
        try:
            status = await self.handle_exception(error)
        except Exception as inner:  # noqa: BLE001 - answered, as aiosmtpd answers it
            _session_log.exception("%r Exception in handle_exception()", self._peer)
            status = f"500 Error: ({inner.__class__.__name__}) {inner}"
        self._reply(status)

    async def handle_exception(self, error: Exception) -> str:
        """The handler's answer to ``error``, else aiosmtpd's: logged with its traceback
        (given, not taken from the exception being handled: an error of a command that had
        to wait is answered after its task has ended)."""
        hook = getattr(self.event_handler, "handle_exception", None)
        if hook is not None:
            return str(await hook(error))
        assert self.session is not None
        _session_log.error("%r SMTP session exception", self.session.peer, exc_info=error)
        return f"500 Error: ({error.__class__.__name__}) {error}"

    def _start(self, step: Coroutine[Any, Any, None]) -> None:
        """Run ``step`` as far as it goes without waiting; if it has to wait, it goes on as a
        task, and the commands after it wait for it (see :class:`_Waiting`). An error it
        raises is answered (:meth:`_failed`)."""
        try:
            waiting_for = step.send(None)
        except StopIteration:
            return
        except Exception as error:  # noqa: BLE001 - answered, as aiosmtpd answers it
            self._failed(error)
            return
        self._waiting = _Waiting(step, waiting_for)
        self._busy = self.loop.create_task(self._waiting.run())
        self._busy.add_done_callback(self._done_waiting)

    def _done_waiting(self, task: asyncio.Task[None]) -> None:
        error = None
        try:
            if task.cancelled():
                if self._waiting is not None:
                    self._waiting.abandoned()
            else:
                error = task.exception()
        finally:
            self._busy = None
            self._waiting = None
        if isinstance(error, Exception):
            if self.transport is not None:
                self._failed(error)
            elif not isinstance(error, TLSSetupException):  # no one to answer: said
                _session_log.error("%r SMTP session exception", self._peer, exc_info=error)
        self._line_wanted = None
        if self.transport is None:  # the session ended meanwhile
            self._let_go()
            return
        if self._held:
            self._held = False
            self._read_or_not()
        self._advance()

    async def _next_line(self) -> bytes | None:
        """The next line the client sends while a command waits for it (an AUTH answer),
        without its line break; None when it is longer than a command line may be."""
        if self._held:  # the command reads on now: so must the connection
            self._held = False
            self._read_or_not()
        while (line := self._take_line()) is None:
            self._line_wanted = self.loop.create_future()
            if self._eof:
                # The client half-closed before this command asked (it came after a message
                # whose commit was waited for): no answer will come. End the session as an
                # EOF during the wait does, which cancels the wait below.
                self.loop.call_soon(self._stop)
            await self._line_wanted
        self._line_wanted = None
        return None if line is _TOO_LONG else line.rstrip(b"\r")

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:
        """Ask the client (``334``) and read its answer, decoded; MISSING when it aborts with
        ``*`` or cannot be decoded (each told why), as aiosmtpd's."""
        if isinstance(challenge, str):
            challenge = challenge.encode()
        self._reply(b"334 " + (b64encode(challenge) if encode_to_b64 else challenge))
        line = await self._next_line()
        if line is None:
            self._reply(REPLY_COMMAND_TOO_LONG)
            return MISSING
        blob = line.strip()
        if blob == b"*":
            _session_log.warning("%r aborted AUTH with '*'", self._peer)
            self._reply("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except ValueError:
            self._reply("501 5.5.2 Can't decode base64")
            return MISSING

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS as aiosmtpd's, but once only: aiosmtpd would start TLS inside TLS."""
        if self._tls_protocol is not None:
            self._reply("554 5.5.1 Error: TLS already active")
            return
        # From here the connection is TLS's, even while its 220 waits to go out: the end of
        # the client's sending ends the session (no half-close over TLS).
        self._starting_tls = True
        await super().smtp_STARTTLS(arg)

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        if arg:
            self._reply("501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT")
        self._reply("221 Bye" if status is MISSING else status)
        if self.transport is not None:
            self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA as aiosmtpd's, its bytes fed to a :class:`DataDecoder` as they come."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            self._reply("503 Error: need RCPT command")
            return
        if arg:
            self._reply("501 Syntax: DATA")
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self._decoder = DataDecoder(
            size_limit=self.data_size_limit,
            line_limit=self.data_line_limit or self.line_length_limit,
            spool_threshold=self.spool_threshold,
            spool_dir=self.spool_dir,
        )

    def _feed_data(self, decoder: DataDecoder) -> bool:
        """Feed DATA what has come; whether its end line was among it, and if so, answer.

        A block ends just after a ``.\\r\\n`` (maybe the end line) or two bytes short of what
        has come (which might begin one): so the end line is always whole in one block, and
        the bytes after it stay for the next command.
        """
        buffer = self._buffer
        start = 0
        while not decoder.done:
            end = buffer.find(b".\r\n", start)
            if end < 0:
                keep = max(start, len(buffer) - 2)
                if keep > start:
                    decoder.feed(bytes(buffer[start:keep]))
                del buffer[:keep]
                return False
            decoder.feed(bytes(buffer[start : end + 3]))
            start = end + 3
        del buffer[:start]
        self._decoder = None
        self._start(self._data_ended(decoder))
        return True

    async def _data_ended(self, decoder: DataDecoder) -> None:
        """Answer DATA: refused as it came, or the handler's answer to its content."""
        assert self.envelope is not None
        try:
            content = decoder.content() if decoder.state is DataState.NOMINAL else None
        except OSError as exc:
            decoder.error = exc
            decoder.state = DataState.NO_SPACE
            content = None
        finally:
            decoder.close()
        if content is None:
            if decoder.error is not None:
                log.error("DATA not kept, sender told to retry: %s", decoder.error)
            if decoder.state in (DataState.TOO_MUCH, DataState.TOO_LONG):
                self._rejected()
            reply = _DATA_REPLIES[decoder.state]
            self._set_post_data_state()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd
            self._reply(self.too_big_reply if decoder.state is DataState.TOO_MUCH else reply)
            return
        self.envelope.content = self.envelope.original_content = content
        del content  # the handler may drop the envelope's references, and so free the bytes
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]  # unannotated in aiosmtpd
        self._reply("250 OK" if status is MISSING else status)

    def _syntax_available(self, method: Callable[..., Any]) -> bool:
        # HELP would list AUTH, which EHLO does not offer without TLS (and we have no TLS).
        if method == self.smtp_AUTH and self._auth_require_tls and not self._tls_protocol:
            return False
        return bool(super()._syntax_available(method))

    def _has_control(self, arg: str | None, keyword: str) -> bool:
        """Whether a MAIL/RCPT argument holds a control character, but for a tab between parts."""
        if arg is None:
            return False
        if _CONTROL_BUT_TAB.search(arg):
            return True
        if "\t" not in arg:
            return False
        stripped = self._strip_command_keyword(keyword, arg)
        if stripped is None:
            return False
        if stripped.startswith("<") and "\t" in stripped.partition(">")[0]:
            return True
        address, params = self._getaddr(stripped)
        if address is None or params is None:
            return False
        # The parser turns a tab inside a quoted local part into a space; so look at the text
        # the address was read from, not at what it was read as.
        source = stripped[: len(stripped) - len(params)].strip(" \t")
        return "\t" in source

    # aiosmtpd's parser takes a NUL or an escape sequence for part of an address, and the
    # address would go into the envelope, the outbox and the upstream's MAIL FROM as it is.
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL as aiosmtpd's, but an address with a control character is a syntax error,
        and the listener's access rules come first."""
        refusal = self._refusal()
        if refusal is not None:
            await self.push(refusal)
            return
        if self._has_control(arg, "FROM:"):
            await self.push(REPLY_BAD_SENDER)
            return
        if self.access is not None and arg is not None:
            declared = _SIZE_PARAM.search(arg)
            if declared and self.data_size_limit and int(declared.group(1)) > self.data_size_limit:
                self._rejected()
                await self.push(REPLY_TOO_BIG)
                return
            if not arg.isascii() and "SMTPUTF8" not in arg.upper().split(">")[-1]:
                await self.push(REPLY_NEEDS_SMTPUTF8)
                return
        await super().smtp_MAIL(arg)

    @property
    def _on_tls(self) -> bool:
        return self._tls_protocol is not None or (
            self.access is not None and self.access.implicit_tls
        )

    @property
    def _peer(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else str(peer)

    def _rejected(self) -> None:
        """A message was refused for good: counted, when the handler counts refusals."""
        if isinstance(self.event_handler, IntakeHandler):
            self.event_handler.rejected()

    def _refusal(self) -> str | None:
        """Why MAIL may not start a transaction here (a reply), or None when it may."""
        access = self.access
        if access is None or self.session is None:
            return None
        listener = access.listener
        tls = listener.tls
        if tls is not None and tls.mode == "starttls-required" and not self._on_tls:
            return REPLY_STARTTLS_FIRST
        if self.session.authenticated or listener.allows(self._peer):
            return None
        if not self._refusal_logged:
            self._refusal_logged = True
            log.warning(
                "refused a client at %s: not in allowed-clients, and not authenticated",
                loggable(self._peer),
            )
        return REPLY_AUTH_REQUIRED if listener.auth is not None else REPLY_RELAY_DENIED

    async def push(self, status: AnyStr) -> None:
        """Send a reply (aiosmtpd's commands await this). It waits only while replies back
        up, as aiosmtpd's did: STARTTLS must not hand the connection to TLS before its 220
        has gone."""
        self._reply(status)
        if self._replies_back_up:
            self._drained = self.loop.create_future()
            await self._drained

    def _reply(self, status: str | bytes) -> None:
        """Send a reply. Nothing waits for the client to read it: while replies back up, no
        more commands are read (:meth:`pause_writing`)."""
        reply = status
        # aiosmtpd lists AUTH on every TLS session, with no mechanism when none is set up.
        if (
            self.access is not None
            and self.access.listener.auth is None
            and isinstance(reply, str)
            and reply.startswith("250-AUTH")
        ):
            return
        # aiosmtpd pushes a multi-line reply (EHLO's) a line at a time, each its own send()
        # and TCP segment: its lines wait here for the last one and go out with it.
        if isinstance(reply, str) and _CONTINUED.match(reply, reply.rfind("\n") + 1):
            self._continued.append(reply)
            return
        encoding = "utf-8" if self.enable_SMTPUTF8 else "ascii"
        data = reply.encode(encoding) if isinstance(reply, str) else reply
        if self._continued:
            data = ("\r\n".join(self._continued) + "\r\n").encode(encoding) + data
            self._continued.clear()
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None:
            transport.write(data + b"\r\n")

    async def _first_answer(self, args: list[str], challenge: str) -> bytes | AuthResult:
        """The client's first answer to AUTH: given with the command (base64), or asked for
        with ``challenge``; the AuthResult to end with when there is none to take."""
        if len(args) == 1:
            answer = await self.challenge_auth(challenge)
            return AuthResult(success=False) if answer is MISSING else answer
        try:
            return b64decode(args[1].encode("ascii"), validate=True)
        except ValueError:
            await self.push("501 5.5.2 Cannot decode the base64 answer")
            return AuthResult(success=False, handled=True)

    async def auth_PLAIN(self, _: object, args: list[str]) -> AuthResult:
        """AUTH PLAIN: ``authzid NUL login NUL password``, given with the command or after
        an empty challenge."""
        data = await self._first_answer(args, "")
        if isinstance(data, AuthResult):
            return data
        parts = data.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Expected authzid NUL login NUL password")
            return AuthResult(success=False, handled=True)
        return await self._check_login(parts[1], parts[2])

    async def auth_LOGIN(self, _: object, args: list[str]) -> AuthResult:
        """AUTH LOGIN: the user name (with the command or asked for), then the password."""
        login = await self._first_answer(args, self.AuthLoginUsernameChallenge)
        if isinstance(login, AuthResult):
            return login
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        return await self._check_login(login, password)

    async def _check_login(self, login: bytes, password: bytes) -> AuthResult:
        access = self.access
        if access is None or access.listener.auth is None:
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_INVALID)
        name = login.decode("utf-8", "replace")
        secret = password.decode("utf-8", "replace")
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, verify, access.users, name, secret)
        peer = self._peer
        if ok:
            if self.throttle is not None:
                self.throttle.succeeded(peer)
            log.info("%s authenticated as %s", loggable(peer), loggable(name))
            return AuthResult(success=True, auth_data=LoginPassword(login, b""))
        delay = self.throttle.delay(peer, time.monotonic()) if self.throttle else 0.0
        log.warning("failed login as %s from %s", loggable(name), loggable(peer))
        await asyncio.sleep(delay)
        return AuthResult(success=False, handled=False, message=REPLY_AUTH_INVALID)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT as aiosmtpd's, but an address with a control character is a syntax error."""
        if self._has_control(arg, "TO:"):
            await self.push(REPLY_BAD_RECIPIENT)
            return
        envelope = self.envelope
        if self.access is not None and envelope is not None and envelope.mail_from is not None:
            if self.max_recipients and len(envelope.rcpt_tos) >= self.max_recipients:
                await self.push(REPLY_TOO_MANY_RECIPIENTS)
                return
            if arg is not None and not arg.isascii() and not envelope.smtp_utf8:
                await self.push(REPLY_NEEDS_SMTPUTF8)
                return
        await super().smtp_RCPT(arg)


class SessionGate:
    """Refuses new SMTP sessions with 421 before the process runs out of file descriptors.

    At the limit of open files, accept() fails: asyncio logs that every second, uvloop closes
    the connection unanswered, and idle sessions could so lock every sender out unseen. A
    session whose socket got a descriptor number of ``ceiling`` or more (the kernel hands out
    the lowest free one, so every one below is taken) is told 421 and closed, which leaves
    the descriptors above the ceiling to the outbox, delivery and spool files. The first
    refusal is logged as an error, once until a session is admitted again.
    """

    def __init__(self, limit: int | None) -> None:
        """A gate for a process that may open ``limit`` descriptors (None: no limit); it keeps
        64 of them (at most a quarter) for everything but sessions."""
        self.limit = limit
        self.ceiling = None if limit is None else limit - min(64, limit // 4)
        self.refused = 0
        """Sessions refused since the gate last admitted one."""
        self._refusing = False

    @classmethod
    def for_this_process(cls) -> SessionGate:
        """A gate for this process's RLIMIT_NOFILE (its soft limit)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return cls(None if soft == resource.RLIM_INFINITY else soft)

    def admits(self, fd: int) -> bool:
        """Whether a new session on descriptor ``fd`` may go on (logs the turn of the tide)."""
        if self.ceiling is None or fd < self.ceiling:
            if self._refusing:
                self._refusing = False
                log.warning(
                    "accepting SMTP sessions again (%d refused with 421 meanwhile)", self.refused
                )
                self.refused = 0
            return True
        self.refused += 1
        if not self._refusing:
            self._refusing = True
            log.error(
                "too many open files: %d of the %d descriptors this process may open are in"
                " use; new SMTP sessions are told 421 until some close (raise LimitNOFILE /"
                " ulimit -n, or look for idle clients)",
                fd,
                self.limit,
            )
        return False


_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def return_big_buffers_to_the_os(threshold: int = SPOOL_THRESHOLD) -> bool:
    """Have glibc's malloc map every buffer of ``threshold`` bytes or more on its own.

    glibc raises its mmap threshold to the size of each big buffer freed (up to 32 MiB), so
    after one big message the next ones are carved from the heap, and a heap does not shrink:
    16 concurrent 31 MB messages left the process at 1.05 GB for good, 250 MB with a fixed
    threshold, which keeps every big buffer mapped on its own and unmapped when freed
    (``malloc_trim`` after big messages gained nothing more). Whether it could be set (False
    without glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


class AfterHandshake(asyncio.Protocol):
    """What a connection to an implicit-TLS listener has until its TLS handshake is done:
    then the session is made, and takes the connection over.

    A handshake that fails, or a client that connects and goes (a port scan, a TCP health
    check), so costs only this small object, freed as the connection ends. An aiosmtpd
    session refers to itself from the start, and one never connected never gets to break
    those cycles (:meth:`LeanSMTP._let_go`): each waited for a full garbage collection.
    """

    def __init__(self, make: Callable[[], asyncio.Protocol]) -> None:
        self._make = make

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        session = self._make()
        transport.set_protocol(session)
        session.connection_made(transport)


def smtp_factory(
    handler: IntakeHandler,
    *,
    hostname: str | None = None,
    spool_dir: str | None = None,
    access: Callable[[], Access | None] = lambda: None,
) -> Callable[[], Any]:
    """A protocol factory for ``loop.create_server``: sessions with SMTPUTF8 and 8BITMIME.

    DATA bigger than :data:`SPOOL_THRESHOLD` is spooled in ``spool_dir`` (default: the
    system's temporary directory) while it arrives. Each new session takes the listener's
    access rules as ``access()`` gives them then (None: anyone may send, no TLS, no AUTH).
    """
    return_big_buffers_to_the_os()
    gate = SessionGate.for_this_process()
    throttle = AuthThrottle()
    sessions = SessionCount(0)
    fixed: dict[str, Any] = {
        "enable_SMTPUTF8": True,
        "hostname": hostname or handler.hostname,
        "ident": "mail2alert ESMTP",
    }

    def make() -> SMTP:
        now = access()
        options: dict[str, Any] = {}
        if now is not None:
            auth = now.listener.auth
            options = {
                "data_size_limit": now.listener.max_message_size,
                "timeout": now.listener.timeout,
                "tls_context": None if now.implicit_tls else now.tls_context,
                # On an implicit TLS listener the whole session is TLS.
                "auth_require_tls": not now.implicit_tls,
                "auth_required": bool(auth and auth.required),
                "command_limit": COMMAND_LIMIT,
            }
        session = LeanSMTP(handler, loop=asyncio.get_running_loop(), **fixed, **options)
        session.spool_dir = spool_dir
        session.gate = gate
        session.access = now
        session.throttle = throttle
        if now is not None:
            session.sessions = sessions
            sessions.limit = now.sessions_per_process
            session.max_recipients = now.listener.max_recipients
            # Lines of any length, up to the size limit, as Postfix takes them.
            session.data_line_limit = now.listener.max_message_size + 2
            session.too_big_reply = REPLY_TOO_BIG
            session.too_long_reply = REPLY_COMMAND_TOO_LONG
        return session

    return make
