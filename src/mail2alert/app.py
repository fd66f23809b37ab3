"""Build and run the service: listener, intake, outbox, dispatcher; graceful stop.

:class:`Service` is what ``mail2alert serve`` runs and what the end-to-end tests start in a
thread (see :mod:`mail2alert.testing`). Start-up failures raise
:class:`~mail2alert.errors.StartupError` before anything listens, so a process is never left
running without its listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from aiosmtpd.smtp import SMTP

from mail2alert.config import Config, HostPort
from mail2alert.dispatcher import Dispatcher
from mail2alert.errors import Mail2AlertError, StartupError
from mail2alert.gocd.poller import GroupPoller, client_from_options
from mail2alert.managers.base import Context
from mail2alert.model import PipelineGroups
from mail2alert.outbox import GroupCommitter, HistoryView, Outbox
from mail2alert.routing import Manager
from mail2alert.server import Handler, accept, describe, smtp_factory

log = logging.getLogger(__name__)

#: How long a stop waits for SMTP sessions in the middle of a transaction.
GRACE = 10.0
#: How often held mail is looked at even when no new GoCD data arrived (for hold-max).
HOLD_CHECK = 5.0


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


class Service:
    """mail2alert running: SMTP intake on ``local-smtp`` and delivery to ``remote-smtp``."""

    def __init__(self, config: Config) -> None:
        self.config = config
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
        self._history: HistoryView | None = None
        self._holds: Outbox | None = None
        self._holds_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="holds")
        self._held_wake = asyncio.Event()
        self._pollers: list[GroupPoller] = []
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Open the outbox, bind the listener and start delivering. Raises StartupError."""
        cfg = self.config
        try:
            self._committer = GroupCommitter(cfg.data_dir)
            self._dispatcher = Dispatcher(cfg.data_dir, cfg.remote_smtp, cfg.delivery)
            self._history = HistoryView(cfg.data_dir)
            self._holds = Outbox(cfg.data_dir)
        except Mail2AlertError as exc:
            raise StartupError(f"data-dir {str(cfg.data_dir)!r}: {exc}") from None
        try:
            sockets = bind(cfg.local_smtp)
        except StartupError:
            await asyncio.get_running_loop().run_in_executor(None, self._committer.close)
            raise
        self._handler = Handler(
            self._committer,
            lambda: self.managers,
            lambda: self.context,
            on_commit=self._dispatcher.wake,
        )
        make = smtp_factory(self._handler)

        def factory() -> SMTP:
            session: SMTP = make()
            self._sessions.add(session)
            return session

        loop = asyncio.get_running_loop()
        for sock in sockets:
            self._servers.append(await loop.create_server(factory, sock=sock))
            self.addresses.append(sock.getsockname()[:2])
        self._dispatch_task = asyncio.create_task(self._dispatcher.run(self._stop))
        self._start_gocd()
        shown = ", ".join(str(HostPort(h, p)) for h, p in self.addresses)
        log.info(
            "mail2alert listening on %s, delivering to %s; %s",
            shown,
            cfg.remote_smtp,
            cfg.summary(),
        )

    def _start_gocd(self) -> None:
        """Start a poller per gocd manager with a url, and the task that releases held mail."""
        for manager in self.managers:
            if "url" not in manager.options:
                continue
            poller = GroupPoller(
                manager.label,
                client_from_options(manager.options),
                interval=manager.seconds("poll-interval", 30.0),
                data_dir=self.config.data_dir,
                on_snapshot=self._on_snapshot,
                on_cctray=self._seed_history,
            )
            self._pollers.append(poller)
            if poller.snapshot is not None:
                self._on_snapshot(manager.label, poller.snapshot)
            self._background.append(asyncio.create_task(poller.run(self._stop)))
        assert self._history is not None
        self.context = replace(self.context, last_results=self._history)
        self._background.append(asyncio.create_task(self._release_held_until_stopped()))

    def _on_snapshot(self, label: str, groups: PipelineGroups) -> None:
        if self.context.snapshots.get(label) is groups:
            return
        self.context = replace(self.context, snapshots={**self.context.snapshots, label: groups})
        self._held_wake.set()

    def _seed_history(self, results: Mapping[tuple[str, str], str]) -> None:
        assert self._holds is not None
        self._holds.seed_history(dict(results), time.time())

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
            label = next((m.label for m in self.managers if m.wanted_recipients(envelope)), None)
            manager = next((m for m in self.managers if m.label == label), None)
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

    async def wait(self) -> None:
        """Run until a stop is requested, then stop gracefully."""
        await self._stop.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, let sessions in a transaction finish, flush, close."""
        self._stop.set()
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
        await asyncio.gather(*self._background, return_exceptions=True)
        self._holds_executor.shutdown(wait=True)
        for closable in (self._holds, self._history):
            if closable is not None:
                closable.close()
        if self._committer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._committer.close)
        log.info("mail2alert stopped")

    def _busy(self) -> bool:
        if self._handler is not None and self._handler.in_flight:
            return True
        return any(
            s.transport is not None and s.envelope is not None and s.envelope.mail_from is not None
            for s in self._sessions
        )


async def serve(config: Config, *, ready: Callable[[Service], None] = lambda s: None) -> None:
    """Run the service until SIGTERM or SIGINT; raise StartupError if it cannot start."""
    service = Service(config)
    await service.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    ready(service)
    try:
        await service.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(config: Config) -> None:
    """``serve`` on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(config))
