"""Helpers for mail2alert's tests and for operators' own: capture servers (and a TCP listener
that is no SMTP server), a service in a thread, fake chat services (a manager type's own
fakes live in its package).

The capture servers and fake services use real sockets on loopback; nothing is mocked.
For the fast tests under them, :class:`RecordingTransport` and :class:`FakeClock` stand in
for the network and the time: the dispatcher's policy runs against them with no socket
and no sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import selectors
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mail2alert.config import Config
from mail2alert.outbox import Item, RecipientResult
from mail2alert.transports import Attempt


class FakeClock:
    """A clock that moves only when told: ``clock()`` is the time, ``advance`` moves it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        self.now += seconds


@dataclass(frozen=True)
class Sent:
    """One attempt a :class:`RecordingTransport` saw: the item's id, kind, recipients, data."""

    item: int
    kind: str
    recipients: tuple[str, ...]
    data: bytes


Answer = Callable[[Item], Attempt]


def accept_all(item: Item) -> Attempt:
    """What a server that takes everything answers: every recipient done."""
    return Attempt(tuple(RecipientResult(r, "done") for r in item.recipients))


class RecordingTransport:
    """A :class:`~mail2alert.transports.Transport` that answers from a script and records
    every attempt; no network.

    ``answers`` are used one per attempt, in order, then ``otherwise`` (by default every
    recipient is done). :meth:`wait_for` returns once ``count`` attempts were made.
    """

    def __init__(
        self,
        answers: tuple[Answer, ...] = (),
        *,
        otherwise: Answer = accept_all,
        address: str = "recording",
    ) -> None:
        self.sent: list[Sent] = []
        self._answers = list(answers)
        self._otherwise = otherwise
        self._address = address
        self._changed: asyncio.Event | None = None
        self.closed = False

    @property
    def address(self) -> str:
        return self._address

    def script(self, *answers: Answer) -> None:
        """Answer the next attempts with ``answers``, in order."""
        self._answers.extend(answers)

    async def send(self, item: Item) -> Attempt:
        self.sent.append(Sent(item.id, item.kind, item.recipients, item.data))
        answer = self._answers.pop(0) if self._answers else self._otherwise
        if self._changed is not None:
            self._changed.set()
        return answer(item)

    async def wait_for(self, count: int) -> list[Sent]:
        """The attempts so far, once there are at least ``count`` (bound the wait with
        ``asyncio.timeout``)."""
        self._changed = self._changed or asyncio.Event()
        while len(self.sent) < count:
            self._changed.clear()
            await self._changed.wait()
        return list(self.sent)

    async def close_if_idle(self, idle: float) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: Debian's Chromium, which the console's browser test and its screenshot script drive.
CHROMIUM = "/usr/bin/chromium"
#: Headless, and nothing that would reach beyond loopback (updates, sync, QUIC probes).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def free_ports(count: int, *hosts: str) -> int:
    """The first of ``count`` consecutive TCP ports free a moment ago on every one of
    ``hosts`` (default 127.0.0.1), for a service that listens on a port and the ones after it.

    They are picked below Linux's ephemeral range (32768 and up), where outgoing connections
    take their ports: the port after one the kernel chose as free may be any connection's.
    """
    rng = random.Random()  # noqa: S311 - test ports, not secrets
    for _ in range(200):
        first = rng.randrange(20000, 32768 - count)
        try:
            for port in range(first, first + count):
                for host in hosts or ("127.0.0.1",):
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    with socket.socket(family) as s:
                        s.bind((host, port))
        except OSError:
            continue
        return first
    raise OSError(f"no {count} consecutive free ports found on {', '.join(hosts)}")


@dataclass(frozen=True)
class Captured:
    """One message as an SMTP server received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


@dataclass
class _Script:
    data_replies: list[str] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)


class _CaptureHandler:
    def __init__(self, owner: CaptureServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.owner.pipelining:
            # aiosmtpd reads commands one after another from its stream, so it takes them
            # pipelined; it only does not say so.
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.owner.script.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        with self.owner.changed:
            if self.owner.script.data_replies:
                reply = self.owner.script.data_replies.pop(0)
                self.owner.refused += 1
                self.owner.changed.notify_all()
                return reply
            content = envelope.content
            data = content if isinstance(content, bytes) else (content or "").encode()
            self.owner.messages.append(
                Captured(envelope.mail_from or "", tuple(envelope.rcpt_tos), data)
            )
            self.owner.changed.notify_all()
        if self.owner.echo:
            print(_show(self.owner.messages[-1]), flush=True)
        return "250 2.0.0 OK captured"


def _show(message: Captured) -> str:
    text = message.data.decode("utf-8", "replace").replace("\r\n", "\n")
    line = "-" * 72
    return (
        f"{line}\nMAIL FROM: <{message.mail_from}>\nRCPT TO: "
        f"{', '.join(f'<{r}>' for r in message.rcpt_tos)}\n\n{text.rstrip()}\n{line}"
    )


class _Session(SMTP):
    """aiosmtpd's session, except that it holds every reply over TLS while its server is
    stalled (a smarthost that completes the TLS handshake, then says nothing)."""

    def __init__(self, handler: _CaptureHandler, flowing: asyncio.Event, **options: Any) -> None:
        super().__init__(handler, **options)
        self._flowing = flowing

    async def push(self, status: AnyStr) -> None:
        transport = self.transport
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            await self._flowing.wait()
        await super().push(status)


class CaptureServer:
    """An SMTP server on loopback that keeps what it receives, in its own thread.

    It can be told to refuse: ``refuse_data("451 4.3.0 busy")`` answers the next DATA so,
    ``refuse_rcpt(addr, "550 5.1.1 no such user")`` refuses a recipient. ``stop()`` and
    ``start()`` again keep the same port, to play an upstream that goes down and comes back.

    A smarthost: with ``tls`` it offers STARTTLS (``require_starttls``: and nothing before
    it), or with ``implicit`` speaks TLS from the first byte; with ``users`` (name ->
    password) it offers AUTH on TLS only, and takes mail only from who logged in.
    :attr:`logins` records who did.

    Faults of a smarthost: ``stall()`` completes the TLS handshake of new sessions and then
    answers nothing over TLS, in any session, until ``resume()``; ``replace_certificate(tls)``
    restarts it with another certificate, as a renewed or replaced server would.

    It offers PIPELINING, as every smarthost does; ``pipelining=False`` plays one that does
    not, and is answered one command at a time.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        echo: bool = False,
        pipelining: bool = True,
        tls: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        implicit: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.echo = echo
        self.pipelining = pipelining
        self.tls = tls
        self.require_starttls = require_starttls
        self.implicit = implicit
        self.users = users
        self.logins: list[str] = []
        self.messages: list[Captured] = []
        self.refused = 0
        self.connections = 0
        """How many connections it accepted, over all its starts."""
        self.script = _Script()
        self.changed = threading.Condition()
        self.stalled = False
        self._flowing: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    def refuse_data(self, *replies: str) -> None:
        """Answer the next DATA commands with these replies, in order."""
        with self.changed:
            self.script.data_replies.extend(replies)

    def refuse_rcpt(self, address: str, reply: str) -> None:
        """Answer RCPT TO for ``address`` with ``reply`` until told otherwise."""
        self.script.rcpt_replies[address.lower()] = reply

    def accept_rcpt(self, address: str) -> None:
        """Accept ``address`` again."""
        self.script.rcpt_replies.pop(address.lower(), None)

    def stall(self) -> None:
        """From now on, answer nothing once a session is over TLS (until :meth:`resume`)."""
        self.stalled = True
        self._set_flowing(False)

    def resume(self) -> None:
        """Answer again, stalled sessions too."""
        self.stalled = False
        self._set_flowing(True)

    def _set_flowing(self, flowing: bool) -> None:
        loop, event = self._loop, self._flowing
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set if flowing else event.clear)

    def replace_certificate(self, tls: ssl.SSLContext) -> CaptureServer:
        """Restart with the certificate of ``tls`` on the same port; connections are closed."""
        self.stop()
        self.tls = tls
        return self.start()

    def start(self) -> CaptureServer:
        """Listen (again) on the server's port."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            flowing = asyncio.Event()
            if not self.stalled:
                flowing.set()
            self._loop, self._flowing = loop, flowing
            handler = _CaptureHandler(self)
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        lambda: self._session(handler, flowing),
                        self.host,
                        self.port,
                        reuse_address=True,
                        ssl=self.tls if self.implicit else None,
                    )
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"capture-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def _session(self, handler: _CaptureHandler, flowing: asyncio.Event) -> SMTP:
        with self.changed:
            self.connections += 1
            self.changed.notify_all()
        with warnings.catch_warnings():
            # On implicit TLS, AUTH without "auth_require_tls" is right: the whole session is
            # TLS, which aiosmtpd cannot tell and warns about.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            return _Session(handler, flowing, **self._session_options())

    def _session_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"enable_SMTPUTF8": True, "decode_data": False}
        if self.tls is not None and not self.implicit:
            options["tls_context"] = self.tls
            options["require_starttls"] = self.require_starttls
        if self.users is not None:
            options["authenticator"] = self._authenticate
            options["auth_required"] = True
            options["auth_require_tls"] = not self.implicit
        return options

    def _authenticate(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, mechanism: str, data: Any
    ) -> AuthResult:
        users = self.users or {}
        login = data.login.decode() if isinstance(data, LoginPassword) else ""
        password = data.password.decode() if isinstance(data, LoginPassword) else None
        if users.get(login) is None or users.get(login) != password:
            return AuthResult(success=False, handled=False)
        with self.changed:
            self.logins.append(login)
        return AuthResult(success=True)

    def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        def shut() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_later(0.05, loop.stop)

        loop.call_soon_threadsafe(shut)
        self._thread.join(10)
        self._loop = None

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Captured]:
        """Wait until ``count`` messages have arrived; return them. Raises TimeoutError."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"expected {count} messages, got {len(self.messages)}")
            return list(self.messages)

    def wait_refused(self, count: int, timeout: float = 15.0) -> None:
        """Wait until ``count`` DATA commands have been refused as scripted."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.refused >= count, timeout):
                raise TimeoutError(f"expected {count} refusals, got {self.refused}")

    def __enter__(self) -> CaptureServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TcpListener:
    """A TCP server on 127.0.0.1 in a thread that counts the connections it accepts: an
    upstream that is reachable but is no SMTP server.

    With ``hang_up`` it closes each connection at once, before any greeting (a server that
    is going away); else it keeps it open and never answers (a hung server). It records when
    each connection came, how many were open then (itself included), and every byte it was
    sent (:attr:`received`).
    """

    def __init__(self, *, hang_up: bool, port: int = 0) -> None:
        self.hang_up = hang_up
        self.port = port or free_port()
        self.accepted: list[float] = []
        """``time.monotonic()`` of each accepted connection."""
        self.open_then: list[int] = []
        """For each accepted connection, how many were open once it was (itself included)."""
        self.received = b""
        self.changed = threading.Condition()
        self._open: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: socket.socket | None = None

    def start(self) -> TcpListener:
        """Listen on the port and serve in a thread."""
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        server.setblocking(False)
        self._server = server
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"listener-{self.port}")
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._server is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    if key.fileobj is self._server:
                        self._accept(selector)
                    elif isinstance(key.fileobj, socket.socket):
                        self._read(selector, key.fileobj)
            for conn in list(self._open):
                selector.unregister(conn)
                conn.close()
            self._open.clear()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        assert self._server is not None
        try:
            conn, _ = self._server.accept()
        except BlockingIOError:
            return
        with self.changed:
            self.accepted.append(time.monotonic())
            if self.hang_up:
                conn.close()
            else:
                conn.setblocking(False)
                self._open.add(conn)
                selector.register(conn, selectors.EVENT_READ)
            self.open_then.append(len(self._open) or 1)
            self.changed.notify_all()

    def _read(self, selector: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        with self.changed:
            self.received += data
            if not data:  # the client gave up: the connection is over
                selector.unregister(conn)
                conn.close()
                self._open.discard(conn)
            self.changed.notify_all()

    @property
    def count(self) -> int:
        """How many connections were accepted so far."""
        with self.changed:
            return len(self.accepted)

    def wait_count(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` connections were accepted; whether they were."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.accepted) >= count, timeout)

    def stop(self) -> None:
        """Close every connection and stop listening."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._server is not None:
            self._server.close()

    def __enter__(self) -> TcpListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_capture(host: str, port: int) -> None:
    """Run a printing capture server until interrupted (``mail2alert capture``)."""
    server = CaptureServer(host, port, echo=True).start()
    print(f"capturing mail on {host}:{port}; every message received is printed here", flush=True)
    stop = threading.Event()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


class ServiceThread:
    """A mail2alert :class:`~mail2alert.app.Service` running in a thread on uvloop, as
    ``serve`` runs it, for end-to-end tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.service: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: list[BaseException] = []

    @property
    def port(self) -> int:
        """The port mail2alert listens on."""
        return int(self.service.addresses[0][1])

    @property
    def http_url(self) -> str:
        """``http://host:port`` of its /metrics and health checks (``http`` must be set)."""
        from mail2alert.web import Monitoring

        monitoring = self.service.component(Monitoring)
        if monitoring is None or not monitoring.addresses:
            raise RuntimeError("mail2alert has no http listener (http: null)")
        host, port = monitoring.addresses[0]
        return f"http://{host}:{port}"

    def start(self) -> ServiceThread:
        """Start the service; raise what start-up raised."""
        from mail2alert.app import Service

        async def main() -> None:
            self.service = Service(self.config)
            try:
                await self.service.start()
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                self._failure.append(exc)
                self._ready.set()
                return
            self._ready.set()
            await self.service.wait()

        def run() -> None:
            # The loop `serve` runs on (supervisor._run_loop): uvloop.
            import uvloop

            loop = uvloop.new_event_loop()
            self._loop = loop
            loop.run_until_complete(main())
            # A transport closes its socket a turn of the loop after close() or abort(): let
            # those turns run, or the sockets the service closed last wait for the garbage
            # collector, which warns of them in whatever test runs then.
            for _ in range(3):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="mail2alert", daemon=True)
        self._thread.start()
        self._ready.wait(15)
        if self._failure:
            self._thread.join()
            raise self._failure[0]
        return self

    def call(self, coroutine: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine (e.g. ``service.reload()``) in the service's loop; its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self) -> None:
        """Stop gracefully, as SIGTERM would."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.service.request_stop)
            self._thread.join(30)

    def __enter__(self) -> ServiceThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- HTTP fakes ------------------------------------------------------------------------------


class LoopbackHttp:
    """An aiohttp server on 127.0.0.1 in a thread of its own; stop and start keep the port."""

    def __init__(self, port: int, name: str, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.name = name
        self.tls = tls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, method: str, handle: Callable[[Any], Awaitable[Any]]) -> None:
        """Answer every ``method`` request on any path with ``handle``."""
        from aiohttp import web

        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route(method, "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(
                runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.tls
            )
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"{self.name}-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        """Stop answering: connections are refused until the next start."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None


class EndlessAnswer:
    """An HTTP server on loopback that answers its first request ``200`` with a chunked body
    that never ends (it stops at ``limit`` bytes): a server, or a proxy, gone wrong.

    :attr:`sent` is how much of the body it sent before the client hung up; :attr:`done` is
    set once it has stopped. Its :attr:`url` is where a gocd manager's ``url`` (or
    ``slack-api-url``) points.
    """

    CHUNK = 64 * 1024

    def __init__(self, limit: int = 512 * 1024 * 1024) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # a look at _closing between waits for a client
        self._closing = threading.Event()
        self.port = int(self._listener.getsockname()[1])
        self.limit = limit
        self.sent = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="endless-answer", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/go"

    def _serve(self) -> None:
        conn = None
        while conn is None and not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self._listener.accept()
        if conn is None:  # closed before anyone came
            self.done.set()
            return
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                more = conn.recv(4096)
                if not more:
                    break
                head += more
            chunk = f"{self.CHUNK:x}\r\n".encode() + b" " * self.CHUNK + b"\r\n"
            try:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                while self.sent < self.limit:
                    conn.sendall(chunk)
                    self.sent += self.CHUNK
            except OSError:
                pass  # the client hung up: what it should do
        self.done.set()

    def __enter__(self) -> EndlessAnswer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.done.wait(15)
        self._listener.close()


@dataclass(frozen=True)
class ChatCall:
    """One HTTP request a fake chat service received, and what it answered."""

    at: float
    """``time.time()`` when the request arrived, to measure waits between attempts."""
    path: str
    headers: dict[str, str]
    body: Any
    """The request's JSON body (None when it was not JSON)."""
    status: int
    answer: Any
    """The JSON the fake answered (None for a bare error status)."""


class _FakeHttp:
    """An aiohttp server on 127.0.0.1 in its own thread that records every POST.

    ``stop()`` and ``start()`` again keep the port. Subclasses decide each answer in
    :meth:`_answer`; scripted failures (:meth:`fail`) come first.
    """

    name = "fake-http"

    def __init__(self) -> None:
        self.port = free_port()
        self.calls: list[ChatCall] = []
        self.changed = threading.Condition()
        self._script: list[tuple[int, dict[str, str]]] = []
        self._failing: int | None = None
        self._http = LoopbackHttp(self.port, self.name)

    def fail(self, count: int = 1, *, status: int = 500, retry_after: float | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (and a Retry-After header)."""
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        with self.changed:
            self._script.extend([(status, headers)] * count)

    def fail_until_recovered(self, status: int = 500) -> None:
        """Answer every request with ``status`` until :meth:`recover` is called."""
        with self.changed:
            self._failing = status

    def recover(self) -> None:
        """Answer normally again (scripted failures still pending are dropped)."""
        with self.changed:
            self._failing = None
            self._script.clear()

    def _answer(self, path: str, call_headers: dict[str, str], body: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def _respond(
        self, path: str, headers: dict[str, str], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        import time

        with self.changed:
            extra: dict[str, str] = {}
            if self._script:
                status, extra = self._script.pop(0)
                answer: Any = None
            elif self._failing is not None:
                status, answer = self._failing, None
            else:
                status, answer = self._answer(path, headers, body)
            self.calls.append(ChatCall(time.time(), path, headers, body, status, answer))
            self.changed.notify_all()
        return status, answer, extra

    def start(self) -> Any:
        """Serve (again) on the fake's port; returns the fake."""
        import json

        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = None
            status, answer, extra = self._respond(request.path, dict(request.headers), body)
            if answer is None:
                return web.Response(status=status, headers=extra, text=f"HTTP {status}")
            return web.json_response(answer, status=status, headers=extra)

        self._http.start("POST", handle)
        return self

    def stop(self) -> None:
        """Stop answering; connections are refused until ``start()``."""
        self._http.stop()

    def wait_for(self, count: int, timeout: float = 15.0, *, ok: bool = False) -> list[ChatCall]:
        """Wait until ``count`` requests (with ``ok``: successful ones) arrived; return them."""

        def chosen() -> list[ChatCall]:
            return [c for c in self.calls if not ok or self._succeeded(c)]

        with self.changed:
            if not self.changed.wait_for(lambda: len(chosen()) >= count, timeout):
                raise TimeoutError(f"expected {count} requests, got {self.calls}")
            return chosen()

    @property
    def succeeded(self) -> list[ChatCall]:
        """The requests that were answered with success."""
        with self.changed:
            return [c for c in self.calls if self._succeeded(c)]

    @staticmethod
    def _succeeded(call: ChatCall) -> bool:
        return call.status == 200


class FakeSlack(_FakeHttp):
    """Slack's Web API ``chat.postMessage`` (and ``auth.test``) on loopback, answering as
    Slack does.

    A request without ``Authorization: Bearer <token>`` is answered 200 with
    ``{"ok": false, "error": "invalid_auth"}``; a good one with ``{"ok": true, "channel":
    "C0123", "ts": ...}``, every ``ts`` unique. ``fail(1, status=429, retry_after=1)`` plays
    Slack's rate limit, ``fail(2)`` a Slack that answers 500 twice.
    """

    name = "fake-slack"
    CHANNEL = "C0123"
    TEAM = "Example Team"

    def __init__(self, token: str = "xoxb-test-token") -> None:  # noqa: S107 - a test token
        super().__init__()
        self.token = token
        self._next_ts = 100

    @property
    def api_url(self) -> str:
        """What ``slack-api-url`` is set to."""
        return f"http://127.0.0.1:{self.port}/api"

    def _answer(self, path: str, call_headers: dict[str, str], body: Any) -> tuple[int, Any]:
        if call_headers.get("Authorization") != f"Bearer {self.token}":
            return 200, {"ok": False, "error": "invalid_auth"}
        if path.endswith("/auth.test"):
            return 200, {"ok": True, "team": self.TEAM, "user": "mail2alert"}
        if not isinstance(body, dict) or not body.get("channel"):
            return 200, {"ok": False, "error": "invalid_arguments"}
        ts = f"1700000000.{self._next_ts:06d}"
        self._next_ts += 100
        return 200, {"ok": True, "channel": self.CHANNEL, "ts": ts}

    @staticmethod
    def _succeeded(call: ChatCall) -> bool:
        return call.status == 200 and isinstance(call.answer, dict) and bool(call.answer["ok"])

    def start(self) -> FakeSlack:
        """Serve (again) on the fake's port."""
        super().start()
        return self

    def __enter__(self) -> FakeSlack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HookReceiver(_FakeHttp):
    """A webhook endpoint on loopback for Apprise's ``json://`` notifications.

    Every POST, to any path, is recorded with its JSON body and answered 200; ``fail(n)``
    answers the next ``n`` with 500, ``fail_until_recovered()`` all of them until
    ``recover()``.
    """

    name = "hook-receiver"

    @property
    def url(self) -> str:
        """A ``json://`` action URL posting to this receiver's ``/hook``."""
        return self.json_url()

    def json_url(
        self, path: str = "/hook", *, user: str | None = None, password: str | None = None
    ) -> str:
        """A ``json://`` action URL posting to ``path``, with basic auth when ``user`` is set."""
        auth = "" if user is None else f"{user}:{password}@" if password is not None else f"{user}@"
        return f"json://{auth}127.0.0.1:{self.port}/{path.lstrip('/')}"

    def _answer(self, path: str, call_headers: dict[str, str], body: Any) -> tuple[int, Any]:
        return 200, {"ok": True}

    def start(self) -> HookReceiver:
        """Serve (again) on the receiver's port."""
        super().start()
        return self

    def __enter__(self) -> HookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
