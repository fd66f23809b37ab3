"""Delivery workers: claim due items from the outbox, send them, record done / retry / dead.

One dispatcher runs per data dir. Items it has claimed are tracked in memory only; after a
crash every pending item is simply due again, so nothing accepted is ever forgotten (at worst an
item whose delivery was not yet recorded is sent twice).

Retries back off exponentially from ``retry-initial`` to ``retry-max``; an item still not
delivered ``give-up-after`` its arrival, or refused with a 5xx, is dead, with the reason kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from mail2alert.config import Delivery, HostPort
from mail2alert.model import ChatSettings
from mail2alert.outbox import Item, Outbox, RecipientResult
from mail2alert.transports import Attempt
from mail2alert.transports.chat import ChatSender, ThreadStore
from mail2alert.transports.smtp import SmtpConnection

log = logging.getLogger(__name__)

T = TypeVar("T")
Result = tuple[Item, Sequence[RecipientResult], float | None, str]

#: How long an idle upstream connection is kept open for reuse.
IDLE_CLOSE = 5.0
#: The longest the dispatcher sleeps before looking at the outbox again.
POLL = 0.25
#: How often delivered items and old records are purged from the outbox (they are kept a week).
PURGE_EVERY = 3600.0


def backoff(attempts: int, delivery: Delivery) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 = the first)."""
    return float(min(delivery.retry_max, delivery.retry_initial * 2 ** max(0, attempts - 1)))


def _shown(item: Item, rcpt: str) -> str:
    """A recipient as logs show it: a chat item's action (masked), else the address."""
    if item.kind != "chat":
        return rcpt
    try:
        return str(json.loads(item.data).get("action", rcpt))
    except ValueError:
        return rcpt


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g}{unit}"
    return f"{seconds:.3g}s"


class Dispatcher:
    """Delivers everything pending in the outbox of ``data_dir`` to ``remote``."""

    def __init__(
        self,
        data_dir: Path,
        remote: HostPort,
        delivery: Delivery,
        *,
        chat: ChatSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.remote = remote
        self.delivery = delivery
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-reader")
        self._outbox = Outbox(data_dir, durable=False)
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._inflight: set[int] = set()
        self._results: list[Result] = []
        self._wake = asyncio.Event()
        self._recorded = asyncio.Event()
        self._idle = asyncio.Event()
        self._hostname = socket.gethostname()
        self._chat = ChatSender(
            chat or ChatSettings(),
            ThreadStore(
                get=lambda key: self._db(partial(self._outbox.chat_thread, key)),
                put=lambda key, channel, ts: self._db(
                    partial(self._outbox.set_chat_thread, key, channel, ts)
                ),
                drop=lambda key: self._db(partial(self._outbox.drop_chat_thread, key)),
            ),
        )

    def wake(self) -> None:
        """Look at the outbox now (new items were committed)."""
        self._wake.set()

    async def _db(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then finish the attempts under way and return."""
        workers = [
            asyncio.create_task(self._worker(), name=f"delivery-{i}")
            for i in range(self.delivery.connections)
        ]
        recorder = asyncio.create_task(self._recorder(), name="delivery-recorder")
        try:
            await self._fetch_until(stop)
        finally:
            await self._drain(workers, recorder)

    async def _fetch_until(self, stop: asyncio.Event) -> None:
        stopper = asyncio.create_task(stop.wait())
        purged = 0.0
        try:
            while not stop.is_set():
                free = 4 * self.delivery.connections - len(self._inflight)
                now = self.clock()
                if now - purged >= PURGE_EVERY:
                    purged = now
                    await self._purge(now)
                if free > 0:
                    exclude = tuple(self._inflight)
                    items = await self._db(partial(self._outbox.due, now, free, exclude))
                    for item in items:
                        self._inflight.add(item.id)
                        self._queue.put_nowait(item)
                    if len(items) == free:
                        await self._wait_for(self._recorded, stopper, POLL)
                        continue
                exclude = tuple(self._inflight)
                next_due = await self._db(partial(self._outbox.next_due, exclude))
                delay = POLL if next_due is None else min(POLL, next_due - self.clock())
                await self._wait_for(self._wake, stopper, max(delay, 0.01))
        finally:
            stopper.cancel()

    async def _purge(self, now: float) -> None:
        """Forget delivered items and old records (pending, dead and held ones stay)."""
        try:
            await self._db(partial(self._outbox.purge, now))
        except sqlite3.Error as exc:
            log.warning("could not purge old outbox records (will try again): %s", exc)

    @staticmethod
    async def _wait_for(event: asyncio.Event, stopper: asyncio.Task[bool], seconds: float) -> None:
        waiter = asyncio.create_task(event.wait())
        await asyncio.wait({waiter, stopper}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        event.clear()

    async def _worker(self) -> None:
        connection = SmtpConnection(
            self.remote.host,
            self.remote.port,
            timeout=self.delivery.timeout,
            local_hostname=self._hostname,
        )
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self._queue.get(), IDLE_CLOSE)
                except TimeoutError:
                    await connection.close_if_idle(IDLE_CLOSE)
                    continue
                try:
                    if item.kind == "chat":
                        attempt = await self._chat.send(item)
                    else:
                        attempt = await connection.send(item)
                except Exception as exc:
                    # A bug must not end this worker: its item would stay claimed until restart.
                    log.exception("%s: delivery attempt failed unexpectedly", item.message_id)
                    await connection.close()
                    attempt = Attempt((), f"internal error: {type(exc).__name__}: {exc}")
                via = "chat" if item.kind == "chat" else connection.address
                self._results.append(self._judge(item, attempt, via))
                self._idle.set()
        finally:
            await connection.close()

    def _judge(self, item: Item, attempt: Attempt, address: str) -> Result:
        now = self.clock()
        done = [_shown(item, r.rcpt) for r in attempt.recipients if r.state == "done"]
        dead = [r for r in attempt.recipients if r.state == "dead"]
        retry = [r for r in attempt.recipients if r.state == "pending"]
        if done:
            log.info("%s: delivered to %s via %s", item.message_id, ", ".join(done), address)
        for r in dead:
            log.error("%s: %s refused by %s: %s", item.message_id, r.rcpt, address, r.reason)
        if not attempt.recipients and attempt.permanent:
            log.error("%s: refused by %s, giving up: %s", item.message_id, address, attempt.error)
            return item, (), None, attempt.error
        if not attempt.recipients or retry:
            error = attempt.error or "; ".join(f"{r.rcpt}: {r.reason}" for r in retry)
            age = now - item.created
            if age >= self.delivery.give_up_after:
                reason = f"gave up after {_age(age)}: {error}"
                log.error("%s: %s", item.message_id, reason)
                return item, attempt.recipients, None, reason
            delay = attempt.retry_after or backoff(item.attempts + 1, self.delivery)
            log.warning("%s: deferred (%s), next try in %s", item.message_id, error, _age(delay))
            return item, attempt.recipients, now + delay, error
        return item, attempt.recipients, 0.0, "; ".join(f"{r.rcpt}: {r.reason}" for r in dead)

    async def _recorder(self) -> None:
        while True:
            await self._idle.wait()
            self._idle.clear()
            await self._flush()

    async def _flush(self) -> None:
        results, self._results = self._results, []
        if not results:
            return
        await self._db(lambda: self._outbox.record(results))
        for item, *_ in results:
            self._inflight.discard(item.id)
        self._recorded.set()
        self._wake.set()

    async def _drain(self, workers: list[asyncio.Task[None]], recorder: asyncio.Task[None]) -> None:
        """Let attempts under way finish (bounded by the SMTP timeout), record them, close."""
        deadline = time.monotonic() + self.delivery.timeout
        while not self._queue.empty():
            self._inflight.discard(self._queue.get_nowait().id)
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01) if not self._results else await self._flush()
        recorder.cancel()
        for task in workers:
            task.cancel()
        await asyncio.gather(recorder, *workers, return_exceptions=True)
        await self._flush()
        await self._chat.close()
        await self._db(self._outbox.close)
        self._executor.shutdown(wait=True)
