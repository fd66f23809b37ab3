"""Build and run the service: listener, intake, outbox, dispatcher, keepers; graceful stop.

:class:`Service` is what ``mail2alert serve`` runs and what the end-to-end tests start in a
thread (see :mod:`mail2alert.testing`). Start-up failures raise
:class:`~mail2alert.errors.StartupError` before anything listens, so a process is never left
running without its listener.

A :class:`Service` can play one role of several processes (see :mod:`mail2alert.supervisor`):
intake only, delivery only, or everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.smtp import SMTP

from mail2alert.background import supervised
from mail2alert.config import Config, HostPort
from mail2alert.config import load as load_config
from mail2alert.dispatcher import Dispatcher
from mail2alert.errors import ConfigError, Mail2AlertError, StartupError
from mail2alert.managers.base import Context
from mail2alert.managers.memory import Feed, Keeper, Note
from mail2alert.outbox import Accepted, GroupCommitter, Outbox
from mail2alert.planning import accept, remember
from mail2alert.routing import Manager
from mail2alert.server import Handler, describe, smtp_factory

log = logging.getLogger(__name__)

#: How long a stop waits for SMTP sessions in the middle of a transaction.
GRACE = 10.0
#: How often held mail is looked at even when no new snapshot arrived (for hold-max).
HOLD_CHECK = 5.0
#: How often an intake process looks for a new snapshot in data-dir.
SNAPSHOT_CHECK = 1.0
#: How often the configuration file is looked at for changes.
CONFIG_CHECK = 2.0
#: How often routing's notes are compared with what other processes committed (seconds).
NOTES_EVERY = 0.5


@dataclass(frozen=True)
class ReloadStatus:
    """How the last configuration (re)load went."""

    ok: bool
    at: float
    message: str


def _delivery_settings(config: Config) -> tuple[object, ...]:
    return (config.remote_smtp, config.delivery, config.chat_settings())


def _log_learn_failure(written: asyncio.Future[None]) -> None:
    exc = None if written.cancelled() else written.exception()
    if exc is not None:
        log.error("notes learnt from outside could not be kept (will be learnt again): %s", exc)


def _dispatcher(config: Config) -> Dispatcher:
    return Dispatcher(
        config.data_dir, config.remote_smtp, config.delivery, chat=config.chat_settings()
    )


def warn_if_unreachable(addresses: list[tuple[str, int]]) -> None:
    """Say so when a container's mail2alert listens on loopback: nothing outside can connect."""
    in_container = (
        Path("/.dockerenv").exists()
        or Path("/run/.containerenv").exists()
        or ("container" in os.environ)
    )
    if in_container and all(ipaddress.ip_address(h).is_loopback for h, _ in addresses):
        shown = ", ".join(str(HostPort(h, p)) for h, p in addresses)
        log.warning(
            "listening on %s inside a container: only this container can connect; "
            "set local-smtp: 0.0.0.0:%d to take mail from outside",
            shown,
            addresses[0][1],
        )


def bind(address: HostPort, *, reuse_port: bool = False) -> list[socket.socket]:
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
            if reuse_port:
                # Intake workers that rebind after a reload share the new port this way.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


Role = Literal["all", "intake", "delivery"]


class Service:
    """mail2alert running: SMTP intake on ``local-smtp`` and delivery to ``remote-smtp``.

    ``role`` splits the work for several processes: ``intake`` listens and commits,
    ``delivery`` delivers, runs the keepers (GoCD pollers) and releases held mail; ``all``
    does everything.
    """

    def __init__(
        self,
        config: Config,
        *,
        role: Role = "all",
        sockets: list[socket.socket] | None = None,
        wake_fd: int | None = None,
        lifeline_fd: int | None = None,
    ) -> None:
        self.config = config
        self._lifeline_fd = lifeline_fd
        self.role = role
        self._sockets = sockets
        self._wake_fd = wake_fd
        self.managers: Sequence[Manager] = config.routing
        self.context = Context()
        self.addresses: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._servers: list[asyncio.Server] = []
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._committer: GroupCommitter | None = None
        self._dispatcher: Dispatcher | None = None
        self._dispatch_task: asyncio.Task[None] | None = None
        self._handler: Handler | None = None
        self._history: Outbox | None = None
        #: The notes routing sees, by table and key: mutated only on the event loop's thread.
        self._notes: dict[str, dict[tuple[str, str], str]] = {}
        self._notes_reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="notes-reader")
        self._holds: Outbox | None = None
        self._holds_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="holds")
        self._held_wake = asyncio.Event()
        self._pollers: list[Keeper] = []
        self._poller_tasks: list[asyncio.Task[None]] = []
        self._pollers_stop = asyncio.Event()
        self._dispatch_stop = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._reloading = asyncio.Lock()
        #: Why the service stopped itself, when a part of it failed for good.
        self.failure: str | None = None
        #: How the last reload went, for operators and for the metrics to come.
        self.reload_status = ReloadStatus(ok=True, at=time.time(), message="loaded at start")
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called after every successful reload (the supervisor forwards it to its workers).
        self.on_reload: Callable[[], None] = lambda: None

    async def start(self) -> None:
        """Open the outbox, bind the listener and start delivering. Raises StartupError."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        try:
            # Routing reads the notes decisions kept from memory, never SQL on the event loop:
            # this process applies its own notes once committed, and a connection of its own
            # (used only from the notes-reader thread) picks up other processes'.
            self._history = Outbox(cfg.data_dir, durable=False)
            self._notes = self._history.notes()
            self.context = replace(self.context, state=self._notes)
            if self.role != "delivery":
                self._committer = GroupCommitter(cfg.data_dir, on_death=self._writer_died)
            if self.role != "intake":
                self._dispatcher = _dispatcher(cfg)
                self._holds = Outbox(cfg.data_dir)
        except Mail2AlertError as exc:
            await self._close_storage()
            raise StartupError(f"data-dir {str(cfg.data_dir)!r}: {exc}") from None
        self._background.append(self._keep("notes watch", self._follow_notes))
        if self.role != "intake":
            self._start_delivery()
            self._start_pollers()
            self._background.append(self._keep("held mail", self._release_held_until_stopped))
            self._background.append(self._keep("configuration watch", self._watch_config))
        else:
            self._background.append(self._keep("snapshot watch", self._follow_snapshots))
            if self._lifeline_fd is not None:
                asyncio.get_running_loop().add_reader(self._lifeline_fd, self._parent_gone)
        if self.role == "delivery":
            log.info("delivering to %s; %s", cfg.remote_smtp, cfg.summary())
            return
        try:
            await self._listen()
        except StartupError:
            await self.stop()
            raise

    def _keep(
        self,
        name: str,
        run: Callable[[], Any],
        stop: asyncio.Event | None = None,
    ) -> asyncio.Task[None]:
        """Run ``run()`` in the background, started again whenever it fails."""
        return asyncio.create_task(
            supervised(name, run, stop=stop or self._stop, fail=self.fail), name=name
        )

    def _writer_died(self, exc: BaseException) -> None:
        """From the writer thread: intake cannot commit any more, so the process must end."""
        reason = f"the outbox writer stopped: {type(exc).__name__}"
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.fail, reason)

    def fail(self, reason: str) -> None:
        """A part failed for good: stop, so that the process exits non-zero and is restarted."""
        if self.failure is None:
            self.failure = reason
        self.request_stop()

    def _start_delivery(self) -> None:
        """Deliver with the dispatcher made at start (or reload); a new one after a failure."""
        first = self._dispatcher
        config = self.config

        async def deliver() -> None:
            nonlocal first
            if first is None:
                self._dispatcher = _dispatcher(config)
            first = None
            assert self._dispatcher is not None
            await self._dispatcher.run(self._dispatch_stop)

        self._dispatch_task = self._keep("delivery", deliver, self._dispatch_stop)

    async def _listen(self) -> None:
        cfg = self.config
        sockets = self._sockets if self._sockets is not None else bind(cfg.local_smtp)
        await self._serve_on(sockets)
        shown = ", ".join(str(HostPort(h, p)) for h, p in self.addresses)
        if self.role == "intake":
            log.info("intake worker %d listening on %s", os.getpid(), shown)
            return
        log.info(
            "mail2alert listening on %s, delivering to %s; %s",
            shown,
            cfg.remote_smtp,
            cfg.summary(),
        )

    async def _serve_on(self, sockets: list[socket.socket]) -> None:
        """Accept SMTP sessions on ``sockets`` (in place of any earlier listener)."""
        assert self._committer is not None
        self._handler = Handler(
            self._committer,
            lambda: self.managers,
            lambda: self.context,
            on_commit=self._committed,
        )
        # Spooled DATA goes to data-dir, not /tmp, which is memory in many containers.
        make = smtp_factory(self._handler, spool_dir=str(self.config.data_dir))

        def factory() -> SMTP:
            session: SMTP = make()
            self._sessions.add(session)
            return session

        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(factory, sock=sock) for sock in sockets]
        # Sessions already open on an old listener go on; only new connections move.
        for old in self._servers:
            old.close()
        self._servers = servers
        self.addresses = [sock.getsockname()[:2] for sock in sockets]

    def _start_pollers(self) -> None:
        """Start each manager's keeper (a GoCD poller); routing uses their snapshots."""
        self._pollers_stop = asyncio.Event()
        self._pollers = []
        feed = Feed(snapshot=self._on_snapshot, notes=self._learn)
        for manager in self.managers:
            background = manager.type.background
            if background is None:
                continue
            keeper = background.keeper(manager.label, manager.options, self.config.data_dir, feed)
            if keeper is None:
                continue
            self._pollers.append(keeper)
            if keeper.snapshot is not None:
                self._on_snapshot(manager.label, keeper.snapshot)
        stop = self._pollers_stop
        self._poller_tasks = [self._keep(k.name, partial(k.run, stop), stop) for k in self._pollers]

    async def _stop_pollers(self) -> None:
        self._pollers_stop.set()
        await asyncio.gather(*self._poller_tasks, return_exceptions=True)
        self._poller_tasks = []

    def _parent_gone(self) -> None:
        """The lifeline pipe closed: the parent died (even by kill -9), so stop too."""
        assert self._lifeline_fd is not None
        asyncio.get_running_loop().remove_reader(self._lifeline_fd)
        if not self.stopping:
            log.warning("intake worker %d: the main process is gone; stopping", os.getpid())
        self.request_stop()

    async def _follow_notes(self) -> None:
        """Keep the notes routing sees current with what other processes commit."""
        assert self._history is not None
        history = self._history
        loop = asyncio.get_running_loop()
        seen = await loop.run_in_executor(self._notes_reader, history.version)
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), NOTES_EVERY)
            version = await loop.run_in_executor(self._notes_reader, history.version)
            if version == seen:
                continue
            seen = version
            fresh = await loop.run_in_executor(self._notes_reader, history.notes)
            for table, rows in fresh.items():
                kept = self._notes.setdefault(table, {})
                kept.clear()
                kept.update(rows)

    def _committed(self, accepted: Accepted) -> None:
        """A message is durable: routing sees its notes from now on, and delivery wakes."""
        remember(self._notes, accepted.notes)
        self._wake_delivery()

    def _wake_delivery(self) -> None:
        """Tell delivery that new items were committed (never blocks)."""
        if self._dispatcher is not None:
            self._dispatcher.wake()
        elif self._wake_fd is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._wake_fd, b".")

    async def _follow_snapshots(self) -> None:
        """In an intake process: pick up the snapshots the delivery process saves."""
        seen: dict[str, float] = {}
        while not self._stop.is_set():
            # Recomputed each time: a reload may change the managers and their sources.
            for manager in self.managers:
                background = manager.type.background
                if background is None:
                    continue
                path = background.saved(manager.options, self.config.data_dir)
                if path is None:
                    continue
                with contextlib.suppress(OSError):
                    mtime = path.stat().st_mtime
                    if seen.get(manager.label) != mtime:
                        seen[manager.label] = mtime
                        snapshot = background.load(path)
                        if snapshot is not None:
                            self._on_snapshot(manager.label, snapshot)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), SNAPSHOT_CHECK)

    def _on_snapshot(self, label: str, snapshot: object) -> None:
        if self.context.snapshots.get(label) is snapshot:
            return
        self.context = replace(self.context, snapshots={**self.context.snapshots, label: snapshot})
        self._held_wake.set()

    def _learn(self, notes: Sequence[Note]) -> None:
        """On the event loop (a keeper's callback): notes learnt from outside (such as
        a CI server's last results), kept only where nothing is known yet, in the outbox and in what
        routing sees at once."""
        assert self._holds is not None
        # The holds connection belongs to the holds thread: the write goes there.
        written = asyncio.get_running_loop().run_in_executor(
            self._holds_executor, self._holds.learn, notes, time.time()
        )
        written.add_done_callback(_log_learn_failure)
        for note in notes:
            self._notes.setdefault(note.table, {}).setdefault(note.key, note.value)

    async def _release_held_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        every = min([HOLD_CHECK] + [m.seconds("hold-max", 600.0) / 2 for m in self.managers])
        while not self._stop.is_set():
            try:
                released = await loop.run_in_executor(self._holds_executor, self.release_held)
            except Mail2AlertError as exc:
                log.error("held mail could not be released: %s", exc)
                released = 0
            if released and self._dispatcher is not None:
                self._dispatcher.wake()
            waiter = asyncio.ensure_future(self._held_wake.wait())
            stopper = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=every, return_when="FIRST_COMPLETED")
            waiter.cancel()
            stopper.cancel()
            self._held_wake.clear()

    def release_held(self) -> int:
        """Route held messages again; those still waiting past ``hold-max`` stop waiting."""
        assert self._holds is not None
        now = time.time()
        released = 0
        for queue_id, received, envelope, raw in self._holds.held():
            manager = next((m for m in self.managers if m.wanted_recipients(envelope)), None)
            hold_max = manager.seconds("hold-max", 600.0) if manager else 0.0
            accepted = accept(
                queue_id,
                envelope,
                raw,
                self.managers,
                self.context,
                received_at=received,
                stop_holding=now - received >= hold_max,
            )
            if accepted.decision.outcome == "hold":
                continue
            self._holds.release(accepted)
            log.info("%s (after holding %.0fs)", describe(accepted), now - received)
            released += 1
        return released

    def request_stop(self) -> None:
        """Ask the service to stop (what SIGTERM and SIGINT do)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    @property
    def dispatcher(self) -> Dispatcher | None:
        """The dispatcher, in the roles that deliver."""
        return self._dispatcher

    async def stopped(self) -> None:
        """Return once a stop is requested (without stopping anything yet)."""
        await self._stop.wait()

    async def wait(self) -> None:
        """Run until a stop is requested, then stop gracefully."""
        await self._stop.wait()
        await self.stop()

    async def reload(self) -> bool:
        """Load the configuration file again; switch to it only if it is entirely valid.

        A message is routed wholly by the old or wholly by the new configuration: routing reads
        the managers once per message. A changed ``local-smtp`` is bound before anything
        switches; if that fails, the running configuration stays. Returns whether it switched.
        """
        async with self._reloading:
            path = self.config.path
            try:
                new = load_config(path)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("%s", problem)
                return self._reload_failed(f"{path} is invalid ({len(exc.problems)} problems)")
            if new.data_dir.resolve() != self.config.data_dir.resolve():
                return self._reload_failed("data-dir cannot change while running; restart")
            if new.intake_workers != self.config.intake_workers:
                log.warning("intake-workers changes take effect at the next restart")
            if self.role != "delivery" and new.local_smtp != self.config.local_smtp:
                try:
                    sockets = bind(new.local_smtp, reuse_port=self.role == "intake")
                except StartupError as exc:
                    return self._reload_failed(str(exc))
                await self._serve_on(sockets)
                log.info("now listening on %s", new.local_smtp)
            old, self.config = self.config, new
            self.managers = new.routing
            if self.role != "intake":
                await self._apply_delivery_changes(old, new)
            self.reload_status = ReloadStatus(True, time.time(), f"reloaded: {new.summary()}")
            log.info("configuration reloaded from %s: %s", path, new.summary())
            self.on_reload()
            return True

    def _reload_failed(self, why: str) -> bool:
        log.error("configuration reload failed, keeping the running configuration: %s", why)
        self.reload_status = ReloadStatus(False, time.time(), why)
        return False

    async def _apply_delivery_changes(self, old: Config, new: Config) -> None:
        if _delivery_settings(old) != _delivery_settings(new):
            self._dispatch_stop.set()
            if self._dispatch_task is not None:
                await self._dispatch_task
            self._dispatch_stop = asyncio.Event()
            self._dispatcher = _dispatcher(new)
            self._start_delivery()
            log.info("now delivering to %s", new.remote_smtp)
        kept_of = [(m.label, dict(m.options)) for m in old.routing if m.type.background]
        if kept_of != [(m.label, dict(m.options)) for m in new.routing if m.type.background]:
            await self._stop_pollers()
            labels = {m.label for m in new.routing}
            self.context = replace(
                self.context,
                snapshots={k: v for k, v in self.context.snapshots.items() if k in labels},
            )
            self._start_pollers()

    async def _watch_config(self) -> None:
        """Reload when the configuration file changes (as SIGHUP does)."""
        path = Path(self.config.path)

        def stamp() -> tuple[int, int, int] | None:
            try:
                st = path.stat()
            except OSError:
                return None
            return st.st_mtime_ns, st.st_size, st.st_ino

        # Compared with the file as it was loaded: a change made while starting counts too.
        seen = self.config.stamp or stamp()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), CONFIG_CHECK)
            now = stamp()
            if now is not None and now != seen:
                seen = now
                log.info("%s changed; reloading", path)
                await self.reload()

    async def stop(self) -> None:
        """Stop accepting, let sessions in a transaction finish, flush, close."""
        self._stop.set()
        self._dispatch_stop.set()
        self._pollers_stop.set()
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GRACE
        # Sessions signal nothing when a transaction ends; polling their state is the way.
        while self._busy() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._dispatch_task is not None:
            await self._dispatch_task
        await asyncio.gather(*self._background, *self._poller_tasks, return_exceptions=True)
        await self._close_storage()
        log.info("mail2alert stopped" if self.role == "all" else f"mail2alert {self.role} stopped")

    async def _close_storage(self) -> None:
        self._holds_executor.shutdown(wait=True)
        self._notes_reader.shutdown(wait=True)
        for closable in (self._holds, self._history):
            if closable is not None:
                closable.close()
        self._holds = self._history = None
        if self._committer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._committer.close)
            self._committer = None

    def _busy(self) -> bool:
        if self._handler is not None and self._handler.in_flight:
            return True
        return any(
            s.transport is not None and s.envelope is not None and s.envelope.mail_from is not None
            for s in self._sessions
        )
