"""The HTTP listener of the main process (``http:``): ``/metrics``, ``/healthz``, ``/readyz``,
and the web console (:mod:`mail2alert.console`) on every other path.

It runs in the main process only (intake workers have none): the counts it serves are in the
outbox, which every process writes (see :mod:`mail2alert.metrics`). Its SQLite connection is
used by its own ``http`` thread only; aiohttp runs on the event loop.

- ``/healthz``: 200 while the process runs (the event loop answers).
- ``/readyz``: 200 when every check passes, else 503 naming the failing check: intake
  listens (in this process or its intake workers), the outbox takes a write, the
  configuration is loaded. How each manager's keeper fares (its source unreachable, say) is
  in the body, never failing. Both answer JSON.

These three stay open for monitoring; the console's pages need a login when
``http.users-file`` is set.

A reload that moves ``http.address`` binds the new address before anything switches (all or
nothing, as ``local-smtp``); ``http: null`` closes the listener, an address opens it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from mail2alert import metrics
from mail2alert.components import Change, Component, ReloadRefused, bind, shown
from mail2alert.config import Config
from mail2alert.console import Console, Running
from mail2alert.errors import Mail2AlertError, OutboxError, StartupError
from mail2alert.outbox import Outbox

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """One readiness check: passed or not, and one line on what was found."""

    ok: bool
    detail: str


#: The service's own checks (intake listening, configuration loaded), by name.
Readiness = Callable[[], Mapping[str, Check]]


class Monitoring(Component):
    """Serves ``/metrics``, ``/healthz``, ``/readyz`` and, given ``running``, the web console
    on ``http.address``."""

    def __init__(
        self,
        config: Config,
        *,
        checks: Readiness,
        status: Callable[[], metrics.Status],
        sockets: Sequence[socket.socket] | None = None,
        running: Callable[[], Running] | None = None,
    ) -> None:
        self.config = config
        self._checks = checks
        self._status = status
        self._running = running
        self._sockets = sockets
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http")
        self._outbox: Outbox | None = None
        self._runner: web.AppRunner | None = None
        self._sites: list[web.SockSite] = []
        self._next: list[socket.socket] | None = None
        self._moving = False
        self._trouble: str | None = None
        #: Where it listens (empty with ``http: null``).
        self.addresses: list[tuple[str, int]] = []

    async def start(self) -> None:
        data_dir = self.config.data_dir
        try:
            self._outbox = await self._in_thread(lambda: Outbox(data_dir, durable=False))
        except Mail2AlertError as exc:
            raise StartupError(f"data-dir {str(data_dir)!r}: {exc}") from None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        if self._running is not None:
            Console(self._read, self._running).add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        http = self.config.http
        if http is None:
            return
        try:
            sockets = list(self._sockets) if self._sockets is not None else bind(http.address)
        except StartupError as exc:
            await self.stop()  # a component that did not start is not stopped by the service
            raise StartupError(f"http: {exc}") from None
        await self._serve(sockets)

    def describe(self) -> str | None:
        if not self.addresses:
            return None
        console = "console, " if self._running is not None else ""
        return f"{console}metrics and health on http://{shown(self.addresses)}"

    async def _serve(self, sockets: Sequence[socket.socket]) -> None:
        assert self._runner is not None
        sites = [web.SockSite(self._runner, sock) for sock in sockets]
        for site in sites:
            await site.start()
        self._sites = sites
        self.addresses = [sock.getsockname()[:2] for sock in sockets]

    async def _close(self) -> None:
        for site in self._sites:
            await site.stop()
        self._sites, self.addresses = [], []

    # -- reload -------------------------------------------------------------------------

    async def prepare(self, change: Change) -> None:
        new, old = change.config.http, self.config.http
        if (new and new.address) == (old and old.address):
            return
        self._moving = True
        if new is None:
            return
        try:
            self._next = bind(new.address)
        except StartupError as exc:
            self._moving = False
            raise ReloadRefused(f"http: {exc}") from None

    async def switch(self, change: Change) -> None:
        self.config = change.config
        if not self._moving:
            return
        self._moving = False
        await self._close()
        sockets, self._next = self._next, None
        if sockets:
            await self._serve(sockets)
            log.info("metrics and health now on http://%s", shown(self.addresses))
        else:
            log.info("the http listener is closed (http: null)")

    async def abort(self) -> None:
        self._moving = False
        for sock in self._next or ():
            sock.close()
        self._next = None

    async def stop(self) -> None:
        await self.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._sites, self.addresses = [], []
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            await self._in_thread(outbox.close)
        self._thread.shutdown(wait=True)

    # -- the endpoints ------------------------------------------------------------------

    async def _in_thread(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def _read(self, work: Callable[[Outbox], T]) -> T:
        """``work`` with this listener's outbox, on its thread (the console's reads)."""
        outbox = self._outbox
        if outbox is None:
            raise OutboxError("the outbox is not open")
        return await self._in_thread(lambda: work(outbox))

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = dict(self._checks())
        checks["outbox"] = await self._outbox_check()
        ready = all(check.ok for check in checks.values())
        body = {
            "status": "ready" if ready else "not ready",
            "failing": sorted(name for name, check in checks.items() if not check.ok),
            "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
            # A manager's source in trouble is said, not failed: routing goes on with the
            # last snapshot kept (or holds mail until one comes).
            "managers": {
                label: {
                    "ok": health.ok,
                    "state": health.state,
                    "snapshot_age_seconds": health.snapshot_age,
                }
                for label, (_, health) in self._status().keepers.items()
            },
        }
        return _json(200 if ready else 503, body)

    async def _outbox_check(self) -> Check:
        outbox = self._outbox
        if outbox is None:
            return Check(False, "not open")
        try:
            await self._in_thread(outbox.check_writable)
        except Mail2AlertError as exc:
            return Check(False, f"cannot be written: {exc}")
        return Check(True, f"writable in {self.config.data_dir}")

    async def _metrics(self, request: web.Request) -> web.Response:
        outbox = self._outbox
        if outbox is None:
            return web.Response(status=503, text="the outbox is not open\n")
        try:
            counters, gauges = await self._in_thread(lambda: (outbox.counters(), outbox.gauges()))
        except Mail2AlertError as exc:
            if self._trouble != str(exc):
                self._trouble = str(exc)
                log.error("/metrics: the outbox cannot be read: %s", exc)
            return web.Response(status=503, text=f"the outbox cannot be read: {exc}\n")
        self._trouble = None
        body = metrics.render(counters, gauges, self._status(), now=time.time())
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def _json(status: int, body: object) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body, indent=1) + "\n", content_type="application/json"
    )
