"""Build and run the service: the components a process runs, graceful stop, reload.

:class:`Service` is what ``mail2alert serve`` runs and what the end-to-end tests start in a
thread (see :mod:`mail2alert.testing`). Start-up failures raise
:class:`~mail2alert.errors.StartupError` before anything listens, so a process is never left
running without its listener.

A process's role is which components (:mod:`mail2alert.components`, where the thread and
connection map is) it runs:

* ``all``: notes watch, delivery, holds, keepers, configuration watch, the http listener
  (:mod:`mail2alert.web`), intake;
* ``delivery`` (the main process beside intake workers): the same without intake (the
  supervisor adds its link to the workers);
* ``intake`` (a worker): notes watch, snapshot watch, intake (the supervisor adds its link
  to the main process).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

from mail2alert.components import (
    Change,
    Component,
    ConfigWatch,
    Crew,
    Delivery,
    Holds,
    Intake,
    Keepers,
    Knowledge,
    NotesWatch,
    ReloadRefused,
    SnapshotWatch,
    bind,
    shown,
)
from mail2alert.config import Config
from mail2alert.config import load as load_config
from mail2alert.console import Running
from mail2alert.dispatcher import Dispatcher
from mail2alert.errors import ConfigError, StartupError
from mail2alert.managers.base import Context
from mail2alert.metrics import Status, config_hash
from mail2alert.routing import Manager
from mail2alert.web import Check, Monitoring

__all__ = ["ReloadStatus", "Role", "Service", "bind", "warn_if_unreachable"]

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Component)


@dataclass(frozen=True)
class ReloadStatus:
    """How the last configuration (re)load went."""

    ok: bool
    at: float
    message: str


def warn_if_unreachable(addresses: list[tuple[str, int]]) -> None:
    """Say so when a container's mail2alert listens on loopback: nothing outside can connect."""
    in_container = (
        Path("/.dockerenv").exists()
        or Path("/run/.containerenv").exists()
        or ("container" in os.environ)
    )
    if in_container and all(ipaddress.ip_address(h).is_loopback for h, _ in addresses):
        log.warning(
            "listening on %s inside a container: only this container can connect; "
            "set local-smtp: 0.0.0.0:%d to take mail from outside",
            shown(addresses),
            addresses[0][1],
        )


Role = Literal["all", "intake", "delivery"]


class Service:
    """mail2alert running: the components of one process, started, reloaded and stopped
    together.

    ``role`` chooses the components (see the module docstring); ``sockets`` is the listener
    the supervisor bound, ``wake_fd`` the pipe through which an intake worker tells the main
    process what it committed (see :func:`write_wake`).
    """

    def __init__(
        self,
        config: Config,
        *,
        role: Role = "all",
        sockets: list[socket.socket] | None = None,
        wake_fd: int | None = None,
        name: str = "mail2alert",
        http_sockets: list[socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.crew = Crew(self.fail)
        self.knowledge = Knowledge(config.routing)
        # Only the main process serves http (an intake worker has nothing of its own to say).
        monitoring = None
        if role != "intake":
            monitoring = Monitoring(
                config,
                checks=self.readiness,
                status=self.status,
                sockets=http_sockets,
                running=self.running,
            )
        self.components: list[Component] = _components(
            role, config, self.crew, self.knowledge, self.reload, sockets, wake_fd, monitoring
        )
        self._started: list[Component] = []
        self._pending: Change | None = None
        self._reloading = asyncio.Lock()
        #: Why the service stopped itself, when a part of it failed for good.
        self.failure: str | None = None
        #: How the last reload went, for operators and /readyz.
        self.reload_status = ReloadStatus(ok=True, at=time.time(), message="loaded at start")
        #: Reloads since start, by result (``ok``, ``failed``), for /metrics.
        self.reloads = {"ok": 0, "failed": 0}

    def add(self, component: Component) -> None:
        """Run ``component`` too (before :meth:`start`); it is started last, stopped first."""
        self.components.append(component)

    def component(self, kind: type[C]) -> C | None:
        """This service's component of ``kind``, if it runs one."""
        return next((c for c in self.components if isinstance(c, kind)), None)

    @property
    def managers(self) -> Sequence[Manager]:
        """The managers routing uses now."""
        return self.knowledge.managers

    @property
    def context(self) -> Context:
        """What routing knows now beyond each message."""
        return self.knowledge.context

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where intake listens (empty where this process runs no intake)."""
        intake = self.component(Intake)
        return intake.addresses if intake is not None else []

    @property
    def dispatcher(self) -> Dispatcher | None:
        """The dispatcher, in the roles that deliver."""
        delivery = self.component(Delivery)
        return delivery.dispatcher if delivery is not None else None

    def status(self) -> Status:
        """What /metrics tells of this process beyond the outbox."""
        keepers = self.component(Keepers)
        return Status(
            config_hash(self.config.source),
            reloads=dict(self.reloads),
            keepers=keepers.health() if keepers is not None else {},
        )

    def running(self) -> Running:
        """What the web console shows of this process beyond the outbox."""
        keepers = self.component(Keepers)
        delivery = self.component(Delivery)
        return Running(
            self.config,
            self.reload_status,
            keepers.health() if keepers is not None else {},
            self.knowledge.context,
            wake=delivery.wake if delivery is not None else lambda: None,
        )

    def readiness(self) -> dict[str, Check]:
        """The checks of /readyz that the service itself answers (the listener adds the
        outbox's): intake listens, the configuration is loaded."""
        intake = self.component(Intake)
        if self.stopping:
            listening = Check(False, "stopping")
        elif intake is None:
            listening = Check(True, f"intake workers listen on {self.config.local_smtp}")
        elif why := intake.unready():
            listening = Check(False, why)
        else:
            listening = Check(True, f"listening on {shown(intake.addresses)}")
        last = self.reload_status
        loaded = f"{self.config.path} ({config_hash(self.config.source)}): {self.config.summary()}"
        if not last.ok:
            loaded += f"; the last reload failed, the running configuration stays: {last.message}"
        return {"listening": listening, "config": Check(True, loaded)}

    def woken(self, told: bytes) -> None:
        """Act on what intake workers wrote to the wake pipe (``told``, see
        :data:`COMMITTED`): delivery looks for items, and after a :data:`HELD` the holds look
        at the mail held since their last look."""
        delivery, holds = self.component(Delivery), self.component(Holds)
        if delivery is not None:
            delivery.wake()
        if holds is not None and HELD in told:
            holds.poke()

    def release_held(self) -> int:
        """Route held mail again now (see :meth:`Holds.release`); how many were released."""
        holds = self.component(Holds)
        return holds.release() if holds is not None else 0

    async def start(self) -> None:
        """Start every component in order; raise StartupError (having stopped those started)
        if one cannot start. A reload asked for meanwhile (SIGHUP) waits until all started."""
        try:
            async with self._reloading:
                for component in self.components:
                    await component.start()
                    self._started.append(component)
        except StartupError:
            await self.stop()
            raise
        parts = [d for d in (c.describe() for c in reversed(self.components)) if d]
        log.info("%s %s; %s", self.name, ", ".join(parts), self.config.summary())

    def fail(self, reason: str) -> None:
        """A part failed for good: stop, so that the process exits non-zero and is restarted."""
        if self.failure is None:
            self.failure = reason
        self.request_stop()

    def request_stop(self) -> None:
        """Ask the service to stop (what SIGTERM and SIGINT do)."""
        self.crew.stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self.crew.stopping.is_set()

    async def stopped(self) -> None:
        """Return once a stop is requested (without stopping anything yet)."""
        await self.crew.stopping.wait()

    async def wait(self) -> None:
        """Run until a stop is requested, then stop gracefully."""
        await self.stopped()
        await self.stop()

    async def reload(self) -> bool:
        """Load the configuration file again; switch to it only if it is entirely valid and
        every component (in every process) can run it.

        A message is routed wholly by the old or wholly by the new configuration: routing reads
        the managers once per message. A changed ``local-smtp`` is bound before anything
        switches; if that fails, the running configuration stays. Returns whether it switched.
        """
        async with self._reloading:
            if self.stopping:
                log.info("not reloading: %s is stopping", self.name)
                return False
            path = self.config.path
            watch = self.component(ConfigWatch)
            if watch is not None:
                watch.reading()
            try:
                new = load_config(path)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("%s", problem)
                count = len(exc.problems)
                return self._refused(f"{path} is invalid ({count} problem{'s' * (count != 1)})")
            if new.intake_workers != self.config.intake_workers:
                log.warning("intake-workers changes take effect at the next restart")
            why = await self._prepare(Change(new))
            if why is not None:
                return self._refused(why)
            if self.stopping:  # asked while the parts prepared: nothing switches now
                await self._abort(self.components)
                log.info("not reloading: %s is stopping", self.name)
                return False
            await self._switch()
            log.info("configuration reloaded from %s: %s", path, new.summary())
            return True

    async def prepare(self, change: Change) -> str | None:
        """The first half of a reload driven by another process: None, or why not."""
        async with self._reloading:
            if self.stopping:
                return f"{self.name} is stopping"
            return await self._prepare(change)

    async def commit(self) -> None:
        """The second half: switch to what :meth:`prepare` accepted (unless stopping)."""
        async with self._reloading:
            if self.stopping:
                await self._abort(self.components)
                return
            await self._switch()

    async def abort(self) -> None:
        """Or keep the running configuration after all."""
        async with self._reloading:
            await self._abort(self.components)

    async def _prepare(self, change: Change) -> str | None:
        if change.config.data_dir.resolve() != self.config.data_dir.resolve():
            return "data-dir cannot change while running; restart"
        prepared: list[Component] = []
        try:
            for component in self.components:
                await component.prepare(change)
                prepared.append(component)
        except ReloadRefused as exc:
            await self._abort(prepared)
            return str(exc)
        except Exception as exc:  # a part that cannot take it refuses it
            part = type(component).__name__
            log.exception("preparing %s for the new configuration failed", part)
            await self._abort(prepared)
            return f"{part}: {type(exc).__name__}: {exc}"
        self._pending = change
        return None

    async def _abort(self, prepared: Sequence[Component]) -> None:
        self._pending = None
        for component in reversed(prepared):
            await component.abort()

    async def _switch(self) -> None:
        change, self._pending = self._pending, None
        if change is None:
            return
        self.config = change.config
        self.knowledge.managers = change.config.routing
        for component in self.components:
            try:
                await component.switch(change)
            except Exception as exc:
                # Some parts run the new configuration, this one cannot: rather than run on
                # a mix, stop (and be restarted on the file as it is).
                part = type(component).__name__
                log.exception("switching %s to the new configuration failed", part)
                self.fail(f"a reload could not switch {part}: {exc}")
                return
        self.reload_status = ReloadStatus(True, time.time(), f"reloaded: {change.config.summary()}")
        self.reloads["ok"] += 1

    def _refused(self, why: str) -> bool:
        log.error("configuration reload failed, keeping the running configuration: %s", why)
        self.reload_status = ReloadStatus(False, time.time(), why)
        self.reloads["failed"] += 1
        return False

    async def stop(self) -> None:
        """Stop accepting, let sessions in a transaction finish, flush, close; newest first.
        A reload under way ends first (none starts once stopping)."""
        self.crew.stopping.set()
        async with self._reloading:
            pass
        for component in reversed(self._started):
            await component.stop()
        self._started = []
        log.info("%s stopped", self.name)


def _components(
    role: Role,
    config: Config,
    crew: Crew,
    knowledge: Knowledge,
    reload: Callable[[], Awaitable[object]],
    sockets: list[socket.socket] | None,
    wake_fd: int | None,
    monitoring: Component | None,
) -> list[Component]:
    """The components of a process by its role; intake comes last, so nothing listens before
    everything else has started."""
    notes = NotesWatch(knowledge, config, crew)
    if role == "intake":
        return [
            notes,
            SnapshotWatch(knowledge, config, crew),
            Intake(
                knowledge,
                config,
                crew,
                wake=partial(write_wake, wake_fd, COMMITTED),
                held=partial(write_wake, wake_fd, HELD),
                sockets=sockets,
            ),
        ]
    delivery = Delivery(config, crew)
    holds = Holds(knowledge, config, crew, released=delivery.wake)
    parts: list[Component] = [
        notes,
        delivery,
        holds,
        Keepers(knowledge, config, crew, learn=holds.learn, recover=holds.recover),
        ConfigWatch(config, crew, reload=reload),
    ]
    if monitoring is not None:
        parts.append(monitoring)
    if role == "all":
        parts.append(
            Intake(knowledge, config, crew, wake=delivery.wake, held=holds.poke, sockets=sockets)
        )
    return parts


#: What an intake worker writes to the main process through the wake pipe: a message was
#: committed (delivery looks for items), or one was held (the holds look at held mail).
COMMITTED = b"."
HELD = b"h"


def write_wake(fd: int | None, what: bytes) -> None:
    """From an intake worker: tell the main process what it committed (:data:`COMMITTED`,
    :data:`HELD`); the supervisor reads the pipe and hands it to :meth:`Service.woken`.

    Never blocks: with the pipe full (64 KiB the main process has not read), what is told
    is dropped, and the main process finds the items by its own look a moment later (held
    mail, at the holds' next check).
    """
    if fd is not None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, what)
