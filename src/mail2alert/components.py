"""The parts a mail2alert process is made of, each with ``start``, ``stop`` and a reload.

A reload is all or nothing: every component first *prepares* the new configuration
(acquiring what it needs, such as a new listener, or refusing with :class:`ReloadRefused`),
and only when all of them have does each *switch* to it; if any refused, those that had
prepared *abort* and every one keeps the configuration it runs. :mod:`mail2alert.app` puts
components together into a service; :mod:`mail2alert.supervisor` adds the ones that link
the processes of ``serve`` (the main process's intake workers, a worker's parent).

Threads and SQLite connections (each connection is used by one thread only):

===============  ====================================================  ======================
component        thread that uses its connection                       connection
===============  ====================================================  ======================
NotesWatch       ``notes-reader`` (reads other processes' notes)       outbox, not durable
Intake           ``outbox-writer`` (the group commit)                  outbox, synced after
Delivery         the event loop's (claims, results)                    outbox, not durable
Holds            ``holds`` (held mail, notes learnt from outside)      outbox, durable
===============  ====================================================  ======================

"Synced after": the group commit writes without an fsync, lets go of the writers' lock, then
syncs the WAL (:meth:`~mail2alert.outbox.Outbox.sync`) before it answers.

Everything else (SMTP sessions, routing, keepers, the watches) runs on the event loop and
touches no database: routing reads :class:`Knowledge`, which only the event loop's thread
changes. Delivery's outbox calls are short: reads never wait in WAL mode, and a write waits
for the writers' lock as long as another writer's transaction lasts (with its fsync, for the
durable ones: Holds, ``queue`` commands), or runs a WAL checkpoint now and then; handing
each call to a thread of its own cost more CPU than the SQL itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from aiosmtpd.smtp import SMTP

from mail2alert.background import supervised
from mail2alert.config import Config
from mail2alert.dispatcher import Dispatcher
from mail2alert.errors import Mail2AlertError, StartupError
from mail2alert.managers.base import Context
from mail2alert.managers.health import KeeperHealth, Reporting
from mail2alert.managers.memory import Feed, Keeper, Key, Note, Recovered
from mail2alert.model import Envelope
from mail2alert.outbox import Accepted, GroupCommitter, Outbox, new_queue_id
from mail2alert.planning import accept, remember
from mail2alert.routing import Manager, find_manager
from mail2alert.server import Handler, decided, describe, duplicate
from mail2alert.session import Access, AfterHandshake, smtp_factory
from mail2alert.settings import HostPort

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a stop waits for SMTP sessions in the middle of a transaction.
GRACE = 10.0
#: The longest a TLS handshake on an implicit-TLS listener may take (at most the listener's
#: ``timeout``): until it is done the connection counts against no limit.
HANDSHAKE_TIMEOUT = 10.0
#: How often held mail is looked at even when no new snapshot arrived (for hold-max).
HOLD_CHECK = 5.0
#: How often an intake process looks for a new snapshot in data-dir.
SNAPSHOT_CHECK = 1.0
#: How often the configuration file is looked at for changes.
CONFIG_CHECK = 2.0
#: How often routing's notes are compared with what other processes committed (seconds).
NOTES_EVERY = 0.5

Notes = dict[str, dict[tuple[str, ...], str]]


class ReloadRefused(Mail2AlertError):
    """A component cannot run the new configuration; the message says why."""


@dataclass(frozen=True)
class Change:
    """A configuration to switch to, and the listener the main process bound for it."""

    config: Config
    sockets: tuple[socket.socket, ...] | None = None


class Crew:
    """What every component of one service shares: the stop request and the supervision."""

    def __init__(self, fail: Callable[[str], None]) -> None:
        self.stopping = asyncio.Event()
        self.fail = fail

    def keep(
        self, name: str, run: Callable[[], Any], stop: asyncio.Event | None = None
    ) -> asyncio.Task[None]:
        """Run ``run()`` in the background, started again whenever it fails."""
        return asyncio.create_task(
            supervised(name, run, stop=stop or self.stopping, fail=self.fail), name=name
        )

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


class Knowledge:
    """What routing reads besides the message: the managers, their snapshots, the notes.

    Changed only on the event loop's thread, and a message reads ``managers`` and
    ``context`` once, so it is routed wholly by what was known when it arrived.
    """

    def __init__(self, managers: Sequence[Manager]) -> None:
        self.managers = managers
        #: By table and key; the context's ``state`` is this very mapping.
        self.notes: Notes = {}
        self.context = Context(state=self.notes)
        #: The notes remembered since a refresh began to read the outbox (None: no refresh
        #: under way): applied again over what it read, which may be older.
        self._since_read: list[Note] | None = None
        #: Set when a snapshot arrives: held mail may be routable now.
        self.news = asyncio.Event()

    def snapshot(self, label: str, snapshot: object) -> None:
        """A manager's keeper has a new snapshot."""
        if self.context.snapshots.get(label) is snapshot:
            return
        snapshots = {**self.context.snapshots, label: snapshot}
        self.context = replace(self.context, snapshots=snapshots)
        self.news.set()

    def forget_snapshots(self, labels: set[str]) -> None:
        """Forget the snapshots of managers that are gone or whose source changed (another
        GoCD, say): what their new source says is not known yet."""
        kept = {k: v for k, v in self.context.snapshots.items() if k not in labels}
        self.context = replace(self.context, snapshots=kept)

    def remember(self, notes: Sequence[Note]) -> None:
        """Notes of a decision that is durable now."""
        remember(self.notes, notes)
        if self._since_read is not None:
            self._since_read.extend(notes)

    def reading(self) -> None:
        """A refresh begins to read the notes from the outbox (see :meth:`replace_notes`)."""
        self._since_read = []

    def learn(self, notes: Sequence[Note]) -> None:
        """Notes learnt from outside: kept only where nothing is known yet."""
        for note in notes:
            self.notes.setdefault(note.table, {}).setdefault(note.key, note.value)

    def replace_notes(self, fresh: Mapping[str, Mapping[tuple[str, ...], str]]) -> None:
        """Everything committed, as read back from the outbox since :meth:`reading`; the
        notes this process remembered meanwhile are applied again over it (the read may have
        come before their commit).

        A new mapping replaces the old one whole: routing in another thread (the holds) may
        be reading the old one, which must never be seen half emptied.
        """
        notes: Notes = {table: dict(rows) for table, rows in fresh.items()}
        for table in self.notes:
            notes.setdefault(table, {})
        remember(notes, self._since_read or ())
        self._since_read = None
        self.notes = notes
        self.context = replace(self.context, state=notes)


class Component:
    """A part of the service. By default it has nothing to prepare or abort on a reload."""

    async def start(self) -> None:
        """Open what it owns and start its work; raise StartupError if it cannot."""

    async def prepare(self, change: Change) -> None:
        """Acquire what ``change`` needs without using it yet; raise ReloadRefused if not."""

    async def switch(self, change: Change) -> None:
        """Run by ``change`` from now on (every component has prepared it)."""

    async def abort(self) -> None:
        """Release what :meth:`prepare` acquired: another component refused the change."""

    async def stop(self) -> None:
        """Finish its work and close what it owns (a stop was requested on the crew)."""

    def describe(self) -> str | None:
        """What it does, for the line a process logs when it is up."""
        return None

    def unready(self) -> str | None:
        """Why it cannot do its work now, for /readyz; None when it can."""
        return None


def _open(data_dir: Path, opening: Callable[[], T]) -> T:
    try:
        return opening()
    except Mail2AlertError as exc:
        raise StartupError(f"data-dir {str(data_dir)!r}: {exc}") from None


def _access_of(config: Config, processes: int) -> Access:
    """The listener's access rules, with its certificate and users loaded; ``processes``
    intake processes share its ``max-sessions``."""
    try:
        return Access.of(config.listener, processes=processes)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ReloadRefused(f"local-smtp: {exc}") from None


def _implicit_tls(config: Config) -> bool:
    """Whether the listening socket itself carries TLS."""
    tls = config.listener.tls
    return tls is not None and tls.mode == "implicit"


def bind(address: HostPort) -> list[socket.socket]:
    """Listening sockets for ``address`` (every address the host name resolves to).

    Port 0 binds one ephemeral port on the first address. Raises StartupError.
    """
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, kind, proto, _, sockaddr in infos:
            if sockaddr in seen:
                continue
            seen.add(sockaddr)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(1024)
            sock.setblocking(False)
            if address.port == 0:
                break
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    return sockets


def shown(addresses: Sequence[tuple[str, int]]) -> str:
    """Addresses as an operator writes them."""
    return ", ".join(str(HostPort(h, p)) for h, p in addresses)


class NotesWatch(Component):
    """Keeps the notes routing sees current with what other processes commit."""

    def __init__(self, knowledge: Knowledge, config: Config, crew: Crew) -> None:
        self._knowledge = knowledge
        self._data_dir = config.data_dir
        self._sender = config.upstream.sender
        self._crew = crew
        self._outbox: Outbox | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="notes-reader")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._outbox = _open(self._data_dir, lambda: Outbox(self._data_dir, durable=False))
        self._knowledge.reading()
        self._knowledge.replace_notes(self._outbox.notes())
        self._task = self._crew.keep("notes watch", self._follow)

    async def _follow(self) -> None:
        assert self._outbox is not None
        outbox = self._outbox
        loop = asyncio.get_running_loop()
        seen = await loop.run_in_executor(self._reader, outbox.version)
        while not self._crew.stopping.is_set():
            await self._crew.pause(NOTES_EVERY)
            version = await loop.run_in_executor(self._reader, outbox.version)
            if version != seen:
                seen = version
                self._knowledge.reading()
                fresh = await loop.run_in_executor(self._reader, outbox.notes)
                self._knowledge.replace_notes(fresh)

    async def stop(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._reader.shutdown(wait=True)
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None


class Intake(Component):
    """SMTP sessions on ``local-smtp``: route each message, commit it, then answer."""

    def __init__(
        self,
        knowledge: Knowledge,
        config: Config,
        crew: Crew,
        *,
        wake: Callable[[], None],
        held: Callable[[], None] = lambda: None,
        sockets: Sequence[socket.socket] | None = None,
    ) -> None:
        """``wake`` tells delivery that a message was committed; ``held``, that one was held
        (its manager waits for data that this process may lack and the holds' process has)."""
        self._knowledge = knowledge
        self.config = config
        self._crew = crew
        self._wake = wake
        self._held = held
        self._sockets = sockets
        self.committer: GroupCommitter | None = None
        self.handler: Handler | None = None
        self.addresses: list[tuple[str, int]] = []
        self._servers: list[asyncio.Server] = []
        self._next: tuple[list[asyncio.Server], list[tuple[str, int]]] | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._access: Access | None = None
        #: How many intake processes run (and share max-sessions) until the next restart.
        self._processes = config.intake_workers
        #: The TLS context the listening servers were bound with (implicit TLS only).
        self._bound_tls: ssl.SSLContext | None = None
        self._next_access: Access | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._access = _access_of(self.config, self._processes)
        except ReloadRefused as exc:
            raise StartupError(str(exc)) from None
        data_dir = self.config.data_dir
        self.committer = _open(
            data_dir, lambda: GroupCommitter(data_dir, on_death=self._writer_died)
        )
        self.handler = Handler(
            self.committer,
            lambda: self._knowledge.managers,
            lambda: self._knowledge.context,
            on_commit=self._committed,
            sender=lambda: self.config.upstream.sender,
        )
        sockets = list(self._sockets) if self._sockets is not None else bind(self.config.local_smtp)
        self._servers, self.addresses = await self._serve(sockets, start=True)
        if _implicit_tls(self.config):
            self._bound_tls = self._access.tls_context

    def describe(self) -> str:
        return f"listening on {shown(self.addresses)}"

    def unready(self) -> str | None:
        if any(server.is_serving() for server in self._servers):
            return None
        return "not listening"

    def _writer_died(self, exc: BaseException) -> None:
        """From the writer thread: intake cannot commit any more, so the process must end."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                self._crew.fail, f"the outbox writer stopped: {type(exc).__name__}"
            )

    def _committed(self, accepted: Accepted) -> None:
        """A message is durable: routing sees its notes from now on, and delivery wakes."""
        self._knowledge.remember(accepted.notes)
        self._wake()
        if accepted.decision.outcome == "hold":
            self._held()

    async def _serve(
        self, sockets: Sequence[socket.socket], *, start: bool
    ) -> tuple[list[asyncio.Server], list[tuple[str, int]]]:
        assert self.handler is not None
        # Spooled DATA goes to data-dir, not /tmp, which is memory in many containers.
        make = smtp_factory(
            self.handler, spool_dir=str(self.config.data_dir), access=lambda: self._access
        )
        # Implicit TLS wraps every connection of the listening socket.
        access = self._next_access or self._access
        context = access.tls_context if access is not None and access.implicit_tls else None

        def session() -> SMTP:
            made: SMTP = make()
            self._sessions.add(made)
            return made

        def factory() -> asyncio.Protocol:
            return session() if context is None else AfterHandshake(session)

        loop = asyncio.get_running_loop()
        servers: list[asyncio.Server] = []
        # A connection still in its handshake has no session yet, so neither max-sessions
        # nor the session's timeout holds it: the handshake has a timeout of its own.
        tls: dict[str, Any] = {}
        if context is not None and access is not None:
            handshake = min(access.listener.timeout, HANDSHAKE_TIMEOUT)
            tls = {"ssl": context, "ssl_handshake_timeout": handshake}
        try:
            for sock in sockets:
                servers.append(
                    await loop.create_server(factory, sock=sock, start_serving=start, **tls)
                )
        except OSError as exc:
            for server in servers:
                server.close()
            for sock in sockets:
                sock.close()
            raise ReloadRefused(f"cannot listen: {exc.strerror or exc}") from None
        return servers, [sock.getsockname()[:2] for sock in sockets]

    async def prepare(self, change: Change) -> None:
        # intake-workers changes at the next restart: as many processes share it until then.
        self._next_access = _access_of(change.config, self._processes)
        new = change.config.local_smtp
        if new == self.config.local_smtp:
            if _implicit_tls(change.config) != _implicit_tls(self.config):
                raise ReloadRefused(
                    "local-smtp: implicit TLS is set up when the listener is bound;"
                    " restart mail2alert to change it, or change the address too"
                )
            return
        if change.sockets is not None:
            sockets = list(change.sockets)
        else:
            try:
                sockets = bind(new)
            except StartupError as exc:
                raise ReloadRefused(str(exc)) from None
        self._next = await self._serve(sockets, start=False)

    async def switch(self, change: Change) -> None:
        self.config = change.config
        self._access, self._next_access = self._next_access or self._access, None
        if self._next is None:
            self._renew_certificate()
            return
        (servers, addresses), self._next = self._next, None
        access = self._access
        self._bound_tls = access.tls_context if access and _implicit_tls(self.config) else None
        for server in servers:
            await server.start_serving()
        # Sessions already open on the old listener go on; only new connections move.
        for old in self._servers:
            old.close()
        self._servers, self.addresses = servers, addresses
        log.info("now listening on %s", shown(addresses))

    def _renew_certificate(self) -> None:
        """On an implicit-TLS listener that stays, the certificate as the files hold it now
        (a renewed one): its servers keep the TLS context they were bound with, so the new
        certificate goes into that context; sessions under way keep theirs."""
        tls = self.config.listener.tls
        bound = self._bound_tls
        if tls is None or tls.mode != "implicit" or bound is None:
            return
        try:
            bound.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:  # the files changed again since the check
            log.error("local-smtp: the certificate could not be loaded again: %s", exc)

    async def abort(self) -> None:
        self._next_access = None
        if self._next is not None:
            for server in self._next[0]:
                server.close()
            self._next = None

    @property
    def busy(self) -> bool:
        """Whether a session is in the middle of a transaction."""
        if self.handler is not None and self.handler.in_flight:
            return True
        return any(
            s.transport is not None and s.envelope is not None and s.envelope.mail_from is not None
            for s in self._sessions
        )

    async def stop(self) -> None:
        await self.abort()
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GRACE
        # Sessions signal nothing when a transaction ends; polling their state is the way.
        while self.busy and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self.committer is not None:
            await loop.run_in_executor(None, self.committer.close)
            self.committer = None


def _delivery_settings(config: Config) -> tuple[object, ...]:
    return (config.upstream, config.delivery, config.chat_settings())


class Delivery(Component):
    """The dispatcher: delivers every outbox item; made anew when its settings change."""

    def __init__(self, config: Config, crew: Crew) -> None:
        self.config = config
        self._crew = crew
        self.dispatcher: Dispatcher | None = None
        #: A dispatcher made for a reload under way, run when it switches.
        self._next: Dispatcher | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _make(self, config: Config | None = None) -> Dispatcher:
        cfg = config or self.config
        return Dispatcher(
            cfg.data_dir,
            cfg.remote_smtp,
            cfg.delivery,
            chat=cfg.chat_settings(),
            upstream=cfg.upstream,
            history=cfg.history,
        )

    async def start(self) -> None:
        self.dispatcher = _open(self.config.data_dir, self._make)
        self._run()

    def describe(self) -> str:
        return f"delivering to {self.config.remote_smtp}"

    def _run(self) -> None:
        """Deliver with the dispatcher made at start (or reload); a new one after a failure."""
        first = self.dispatcher

        async def deliver() -> None:
            nonlocal first
            if first is None:
                self.dispatcher = self._make()
            first = None
            assert self.dispatcher is not None
            await self.dispatcher.run(self._stop)

        self._task = self._crew.keep("delivery", deliver, self._stop)

    def wake(self) -> None:
        """New items were committed (never blocks)."""
        if self.dispatcher is not None:
            self.dispatcher.wake()

    async def prepare(self, change: Change) -> None:
        # The new dispatcher is made here, so that one that cannot be made (the outbox
        # unusable) refuses the reload before anything switched.
        self._discard_next()
        if _delivery_settings(self.config) != _delivery_settings(change.config):
            try:
                self._next = _open(change.config.data_dir, partial(self._make, change.config))
            except StartupError as exc:
                raise ReloadRefused(str(exc)) from None

    async def abort(self) -> None:
        self._discard_next()

    def _discard_next(self) -> None:
        if self._next is not None:
            self._next.close()
            self._next = None

    async def switch(self, change: Change) -> None:
        self.config = change.config
        dispatcher, self._next = self._next, None
        if dispatcher is None:
            if self.dispatcher is not None:
                # Read at its next purge: no need to stop deliveries in flight for it.
                self.dispatcher.history = change.config.history
            return
        await self._finish()
        if self._crew.stopping.is_set():  # stopped while deliveries under way finished
            dispatcher.close()
            return
        self._stop = asyncio.Event()
        self.dispatcher = dispatcher
        self._run()
        log.info("now delivering to %s", self.config.remote_smtp)

    async def _finish(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        await self._finish()


class Holds(Component):
    """Held mail, routed again when a snapshot arrives (or after ``hold-max``); and the
    notes learnt from outside, kept in the outbox."""

    def __init__(
        self,
        knowledge: Knowledge,
        config: Config,
        crew: Crew,
        *,
        released: Callable[[], None],
    ) -> None:
        self._knowledge = knowledge
        self._data_dir = config.data_dir
        self._sender = config.upstream.sender
        self._crew = crew
        self._released = released
        self._outbox: Outbox | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="holds")
        self._task: asyncio.Task[None] | None = None
        self._poked = asyncio.Event()
        #: The greatest Held.row looked at so far: a poke looks only at mail held since.
        self._looked_at = 0

    async def start(self) -> None:
        self._outbox = _open(self._data_dir, lambda: Outbox(self._data_dir))
        self._task = self._crew.keep("held mail", self._release_until_stopped)

    async def switch(self, change: Change) -> None:
        self._sender = change.config.upstream.sender

    def poke(self) -> None:
        """On the event loop: a message was held, maybe by an intake process that has no
        snapshot yet where this one has: look at the mail held since the last look now, not
        at the next check (which looks at all of it)."""
        self._poked.set()

    def learn(self, notes: Sequence[Note]) -> None:
        """On the event loop (a keeper's callback): notes learnt from outside (such as a CI
        server's last results), kept only where nothing is known yet, in the outbox and in
        what routing sees at once."""
        assert self._outbox is not None
        # The connection belongs to the holds thread: the write goes there.
        written = asyncio.get_running_loop().run_in_executor(
            self._executor, self._outbox.learn, notes, time.time()
        )
        written.add_done_callback(_log_learn_failure)
        self._knowledge.learn(notes)

    async def recover(self, recovered: Recovered) -> str:
        """On the event loop (a keeper's): route a message a keeper made, because the
        sender's own never came, as one that arrived, and commit it; its queue id once it
        is durable. Raises OutboxError when it cannot be kept."""
        loop = asyncio.get_running_loop()
        managers, context = self._knowledge.managers, self._knowledge.context
        accepted = await loop.run_in_executor(
            self._executor, self._put_recovered, recovered, managers, context
        )
        self._knowledge.remember(accepted.notes)
        self._released()
        return accepted.queue_id

    def _put_recovered(
        self, recovered: Recovered, managers: Sequence[Manager], context: Context
    ) -> Accepted:
        assert self._outbox is not None
        manager = find_manager(managers, recovered.label)
        if manager is None:
            raise Mail2AlertError(f"{recovered.label} is no longer configured")
        envelope = own_envelope(manager)
        data = (
            f"From: {envelope.mail_from}\r\nTo: {envelope.rcpt_tos[0]}\r\n".encode()
            + recovered.data
        )
        accepted = accept(new_queue_id(), envelope, data, managers, context, sender=self._sender)
        committed = self._outbox.put([accepted])
        if accepted.queue_id in committed.failed:
            raise committed.failed[accepted.queue_id]
        original = committed.duplicates.get(accepted.queue_id)
        line = duplicate(accepted, original) if original else describe(accepted)
        log.info("%s", line, extra=decided(accepted, original))
        return accepted if original is None else replace(accepted, notes=())

    async def _release_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        news = self._knowledge.news
        only_new = False
        while not self._crew.stopping.is_set():
            managers = self._knowledge.managers
            every = min([HOLD_CHECK] + [m.type.hold_max(m.options) / 2 for m in managers])
            release = partial(self.release, only_new=only_new)
            try:
                released = await loop.run_in_executor(self._executor, release)
            except Mail2AlertError as exc:
                log.error("held mail could not be released: %s", exc)
                released = 0
            if released:
                self._released()
            waiters = [
                asyncio.ensure_future(event.wait())
                for event in (news, self._poked, self._crew.stopping)
            ]
            woken, _ = await asyncio.wait(waiters, timeout=every, return_when="FIRST_COMPLETED")
            for waiter in waiters:
                waiter.cancel()
            # A poke alone looks at the mail held since the last look: while GoCD is down,
            # every message is held and pokes, and each look at all of them routes them all.
            only_new = bool(woken) and self._poked.is_set() and not news.is_set()
            news.clear()
            self._poked.clear()

    def release(self, *, only_new: bool = False) -> int:
        """Route held messages again (``only_new``: those held since the last call); those
        held longer than their manager type's ``hold_max`` stop waiting. How many went."""
        assert self._outbox is not None
        managers = self._knowledge.managers
        context = self._knowledge.context
        now = time.time()
        released = 0
        waiting = self._outbox.held(after=self._looked_at if only_new else 0)
        self._looked_at = max([self._looked_at] + [h.row for h in waiting])
        for one in waiting:
            manager = next((m for m in managers if m.wanted_recipients(one.envelope)), None)
            hold_max = manager.type.hold_max(manager.options) if manager else 0.0
            accepted = accept(
                one.queue_id,
                one.envelope,
                one.raw,
                managers,
                context,
                received_at=one.received,
                stop_holding=now - one.received >= hold_max,
                sender=self._sender,
            )
            if accepted.decision.outcome == "hold":
                continue
            released_as = self._outbox.release(accepted)
            if released_as is None:
                log.info("%s: deleted while held: not released", one.queue_id)
                continue
            original = released_as.duplicate_of
            line = duplicate(accepted, original) if original is not None else describe(accepted)
            held = now - one.received
            log.info("%s (after holding %.0fs)", line, held, extra=decided(accepted, original))
            released += 1
        return released

    async def stop(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None


def own_envelope(manager: Manager) -> Envelope:
    """The envelope of a message a manager's keeper made: from the sender the manager wants
    (else its own address) to its own address (else that sender)."""
    ours = manager.wants_to[0] if manager.wants_to else None
    sender = manager.wants_from[0] if manager.wants_from else ours
    assert sender is not None, "a manager wants mail to or from someone"
    return Envelope(sender, (ours or sender,))


def _log_learn_failure(written: asyncio.Future[None]) -> None:
    exc = None if written.cancelled() else written.exception()
    if exc is not None:
        log.error("notes learnt from outside could not be kept (will be learnt again): %s", exc)


def _kept_by_keepers(config: Config) -> list[tuple[str, dict[str, object]]]:
    return [(m.label, dict(m.options)) for m in config.routing if m.type.background]


def _changed_sources(old: Config, new: Config) -> set[str]:
    """The labels of managers with background work that are gone, new, or whose options
    changed: their snapshots (of the old source) no longer hold."""
    before, after = dict(_kept_by_keepers(old)), dict(_kept_by_keepers(new))
    labels = before.keys() | after.keys()
    return {label for label in labels if before.get(label) != after.get(label)}


class Keepers(Component):
    """Each manager type's background work (a poller, say): keeps its snapshot fresh."""

    def __init__(
        self,
        knowledge: Knowledge,
        config: Config,
        crew: Crew,
        *,
        learn: Callable[[Sequence[Note]], None],
        recover: Callable[[Recovered], Awaitable[str]],
    ) -> None:
        self._knowledge = knowledge
        self.config = config
        self._crew = crew
        self._learn = learn
        self._recover = recover
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: The keepers running, by manager label, with their manager type's name.
        self.keepers: dict[str, tuple[str, Keeper]] = {}
        #: Keepers made for a reload under way, started when it switches.
        self._next: dict[str, tuple[str, Keeper]] | None = None

    def health(self) -> dict[str, tuple[str, KeeperHealth]]:
        """How each keeper that reports it fares, by manager label (with its type's name)."""
        return {
            label: (kind, keeper.health())
            for label, (kind, keeper) in self.keepers.items()
            if isinstance(keeper, Reporting)
        }

    async def start(self) -> None:
        try:
            keepers = self._make(self.config)
        except ReloadRefused as exc:
            raise StartupError(str(exc)) from None
        self._run(keepers)

    def _make(self, config: Config) -> dict[str, tuple[str, Keeper]]:
        """The keepers of ``config``, not started. Raises ReloadRefused when one cannot be
        made (a CA file that is no CA bundle, say)."""
        feed = Feed(
            snapshot=self._knowledge.snapshot,
            notes=self._learn,
            recall=self._recall,
            recover=self._recover,
        )
        keepers: dict[str, tuple[str, Keeper]] = {}
        for manager in config.routing:
            background = manager.type.background
            if background is None:
                continue
            try:
                keeper = background.keeper(manager.label, manager.options, config.data_dir, feed)
            except Exception as exc:  # noqa: BLE001 - whatever it is, this manager cannot run
                raise ReloadRefused(f"{manager.label}: {type(exc).__name__}: {exc}") from None
            if keeper is not None:
                keepers[manager.label] = (manager.type.name, keeper)
        return keepers

    def _run(self, keepers: dict[str, tuple[str, Keeper]]) -> None:
        self._stop = asyncio.Event()
        self.keepers = keepers
        for label, (_, keeper) in keepers.items():
            if keeper.snapshot is not None:
                self._knowledge.snapshot(label, keeper.snapshot)
        stop = self._stop
        self._tasks = [
            self._crew.keep(k.name, partial(k.run, stop), stop) for _, k in keepers.values()
        ]

    def _recall(self, table: str, key: Key) -> str | None:
        # Read each time: the context is replaced as snapshots and notes arrive.
        return self._knowledge.context.recall(table, key)

    async def prepare(self, change: Change) -> None:
        # Made here, so that one that cannot be made refuses the reload before anything
        # switched (in any process).
        self._next = None
        if _kept_by_keepers(self.config) != _kept_by_keepers(change.config):
            self._next = self._make(change.config)

    async def abort(self) -> None:
        self._next = None

    async def switch(self, change: Change) -> None:
        old, self.config = self.config, change.config
        keepers, self._next = self._next, None
        if keepers is None:
            return
        await self.stop()
        self._knowledge.forget_snapshots(_changed_sources(old, change.config))
        if not self._crew.stopping.is_set():
            self._run(keepers)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


class SnapshotWatch(Component):
    """In an intake worker: picks up the snapshots the main process's keepers save."""

    def __init__(self, knowledge: Knowledge, config: Config, crew: Crew) -> None:
        self._knowledge = knowledge
        self.config = config
        self._data_dir = config.data_dir
        self._sender = config.upstream.sender
        self._crew = crew
        self._task: asyncio.Task[None] | None = None
        #: When each manager's saved snapshot was last read (its file's mtime).
        self._seen: dict[str, float] = {}

    async def start(self) -> None:
        self._task = self._crew.keep("snapshot watch", self._follow)

    async def switch(self, change: Change) -> None:
        old, self.config = self.config, change.config
        changed = _changed_sources(old, change.config)
        self._knowledge.forget_snapshots(changed)
        for label in changed:
            self._seen.pop(label, None)

    async def _follow(self) -> None:
        seen = self._seen
        while not self._crew.stopping.is_set():
            # Recomputed each time: a reload may change the managers and their sources.
            for manager in self._knowledge.managers:
                background = manager.type.background
                if background is None:
                    continue
                path = background.saved(manager.options, self._data_dir)
                if path is None:
                    continue
                with contextlib.suppress(OSError):
                    mtime = path.stat().st_mtime
                    if seen.get(manager.label) != mtime:
                        seen[manager.label] = mtime
                        snapshot = background.load(path)
                        if snapshot is not None:
                            self._knowledge.snapshot(manager.label, snapshot)
            await self._crew.pause(SNAPSHOT_CHECK)

    async def stop(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


class ConfigWatch(Component):
    """Reloads when the configuration file changes (as SIGHUP does)."""

    def __init__(
        self, config: Config, crew: Crew, *, reload: Callable[[], Awaitable[object]]
    ) -> None:
        self._path = Path(config.path)
        # Compared with the file as it was loaded: a change made while starting counts too.
        self._seen = config.stamp
        self._crew = crew
        self._reload = reload
        self._task: asyncio.Task[None] | None = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reading(self) -> None:
        """The file is about to be read for a reload (a SIGHUP's): the file as it is now needs
        no second reload from the watch. Stamped before reading, so a write that lands while
        it is read is still noticed."""
        self._seen = self._stamp() or self._seen

    async def start(self) -> None:
        self._seen = self._seen or self._stamp()
        self._task = self._crew.keep("configuration watch", self._watch)

    async def _watch(self) -> None:
        while not self._crew.stopping.is_set():
            await self._crew.pause(CONFIG_CHECK)
            now = self._stamp()
            if now is not None and now != self._seen:
                self._seen = now
                log.info("%s changed; reloading", self._path)
                await self._reload()

    async def stop(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
