"""Delivery workers: claim due items from the outbox, send them, record done / retry / dead.

One dispatcher runs per data dir. Items it has claimed are tracked in memory only; after a
crash every pending item is simply due again, so nothing accepted is ever forgotten.

**Each result is recorded before its worker takes the next item.** The recorder writes
whatever results arrived meanwhile in one transaction, so at any moment at most
``delivery.connections`` items are delivered but not yet recorded: that is the most a crash
can send twice.

**A destination is down, not each item** (as in Postfix): when the upstream server cannot be
reached (no connection, a timeout, a lost connection, a 421), the items wait for the
destination, not each on its own back-off, and do not spend their own attempts. While it is
down, one probe at a time tries the item that has waited longest, with the back-off doubling
from ``retry-initial`` to ``retry-max``; mail accepted after the destination went down is tried
at once all the same (a free probe). The first answer from the destination releases every
waiting item at once. An item's own attempts count only answers about that item (4xx or 5xx
to its recipients or its data): those back off from ``retry-initial`` to ``retry-max``, and an
item still not delivered ``give-up-after`` its arrival, or refused with a 5xx, is dead, with
the reason kept.

**Storage trouble pauses delivery, it does not end it.** When the outbox cannot be read or
written (a full or read-only disk), the dispatcher logs it at ERROR once, keeps the results it
could not record, sends nothing new, and tries again with a back-off; it goes on by itself
once the disk is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mail2alert.background import RestartPolicy, is_storage_error
from mail2alert.logs import about, loggable
from mail2alert.model import ChatSettings
from mail2alert.outbox import PURGE_BATCH, Item, Outbox, Result
from mail2alert.settings import Delivery, History, HostPort, Upstream
from mail2alert.transports import Attempt, Transport
from mail2alert.transports.chat import ChatSender, ThreadStore
from mail2alert.transports.smtp import SmtpConnection

log = logging.getLogger(__name__)

#: How long an idle upstream connection is kept open for reuse.
IDLE_CLOSE = 5.0
#: The longest the dispatcher sleeps before looking at the outbox again.
POLL = 0.25
#: How often delivered items and old records are purged from the outbox (they are kept a week).
PURGE_EVERY = 300.0
#: The most purge transactions in one go (PURGE_BATCH messages each): the rest goes next time.
PURGE_ROUNDS = 1000
#: How the dispatcher waits for storage to come back: from half a second up to 30 s.
STORAGE_RETRY = RestartPolicy(initial=0.5, maximum=30.0)
#: An item taken from the outbox longer ago than this is looked up again before it is sent:
#: ``queue delete`` may have taken it meanwhile (a slow destination keeps items waiting for
#: a free connection).
STALE_CLAIM = 1.0


def backoff(attempts: int, delivery: Delivery) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 = the first)."""
    return float(min(delivery.retry_max, delivery.retry_initial * 2 ** max(0, attempts - 1)))


def destination_of(item: Item) -> str:
    """The destination an item goes to: the upstream server, or one chat action."""
    if item.kind == "chat":
        return f"chat:{item.recipients[0] if item.recipients else ''}"
    return "smtp"


@dataclass
class Destination:
    """Whether one destination answers, and when to try it again while it does not.

    Pure state: the dispatcher tells it what happened and when; it says what to do.
    """

    name: str
    failures: int = 0
    """Failed probes in a row; 0 while the destination is up."""
    down_since: float = 0.0
    next_probe: float = 0.0
    probing: bool = False
    error: str = ""

    @property
    def down(self) -> bool:
        """Whether the destination is marked down."""
        return self.failures > 0

    def unreachable(self, now: float, error: str, delivery: Delivery, *, probe: bool) -> bool:
        """An attempt could not reach the destination; True when it just went down.

        A failed probe doubles the wait before the next; a failed free probe changes nothing.
        """
        self.error = error
        if probe:
            self.probing = False
        if not self.down:
            self.failures, self.down_since = 1, now
            self.next_probe = now + backoff(1, delivery)
            return True
        if probe:
            self.failures += 1
            self.next_probe = now + backoff(self.failures, delivery)
        return False

    def answered(self) -> bool:
        """The destination answered an attempt; True when it was down until now."""
        was_down = self.down
        self.failures, self.probing, self.error = 0, False, ""
        return was_down

    def may_probe(self, now: float) -> bool:
        """Whether the next probe is due (the destination is down and none is under way)."""
        return self.down and not self.probing and now >= self.next_probe

    def lets_through(self, item: Item) -> bool:
        """Whether ``item`` is tried now: while down, only what became due since (free probes:
        new mail, or an operator's retry)."""
        return not self.down or item.due >= self.down_since


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


def judge(
    item: Item,
    attempt: Attempt,
    *,
    now: float,
    delivery: Delivery,
    via: str,
    waiting: Destination | None = None,
) -> Result:
    """What one attempt comes to: done, dead, retry at a time, or wait for the destination.

    ``waiting`` (a destination that is down) says the attempt did not reach it: the item then
    waits for it without spending an attempt of its own, unless it is past
    ``give-up-after``. The result keeps when the attempt was made and the other side's
    answer to it, for the history. Logs what it decides.
    """

    def result(next_try: float | None, error: str, waiting_for: str = "") -> Result:
        return Result(item, attempt.recipients, next_try, error, waiting_for, attempt.reply, at=now)

    done = [_shown(item, r.rcpt) for r in attempt.recipients if r.state == "done"]
    dead = [r for r in attempt.recipients if r.state == "dead"]
    retry = [r for r in attempt.recipients if r.state == "pending"]
    qid = item.message_id
    if done:
        sent = about(qid, "delivery", result="sent")
        log.info("%s: delivered to %s via %s", qid, loggable(", ".join(done)), via, extra=sent)
    # Addresses and the other side's answers are not ours: escaped, as a client's text is.
    for r in dead:
        refused = about(qid, "delivery", result="dead")
        shown = (loggable(r.rcpt), via, loggable(r.reason))
        log.error("%s: %s refused by %s: %s", qid, *shown, extra=refused)
    if not attempt.recipients and attempt.permanent:
        refused = about(qid, "delivery", result="dead")
        shown_error = loggable(attempt.error)
        log.error("%s: refused by %s, giving up: %s", qid, via, shown_error, extra=refused)
        return result(None, attempt.error)
    if not attempt.recipients or retry:
        error = attempt.error or "; ".join(f"{r.rcpt}: {r.reason}" for r in retry)
        age = now - item.created
        if age >= delivery.give_up_after:
            reason = f"gave up after {_age(age)}: {error}"
            log.error("%s: %s", qid, loggable(reason), extra=about(qid, "delivery", result="dead"))
            return result(None, reason)
        if waiting is not None:
            return result(waiting.next_probe, error, waiting.name)
        delay = attempt.retry_after or backoff(item.attempts + 1, delivery)
        later = about(qid, "delivery", result="retry")
        log.warning(
            "%s: deferred (%s), next try in %s", qid, loggable(error), _age(delay), extra=later
        )
        return result(now + delay, error)
    return result(0.0, "; ".join(f"{r.rcpt}: {r.reason}" for r in dead))


#: What the dispatcher reads the time from (``time.time``; a fake one in fast tests).
Clock = Callable[[], float]


class Dispatcher:
    """Delivers everything pending in the outbox of ``data_dir`` to ``remote``.

    Threads: everything runs on the event loop's thread, the outbox connection's calls too.
    Reads never wait for a writer (WAL mode). A write waits for the writers' lock for as long
    as another writer's transaction lasts: an intake process's rows (it syncs after letting
    go), a durable writer's rows and fsync (held mail, a ``queue`` command); and a commit of
    delivery's own may run a WAL checkpoint, fsyncs included. Handing each call to a thread
    of its own, so that the event loop never waited, cost more CPU than the SQL itself
    (wakeups and handovers of the GIL: delivery alone took 0.39 ms of CPU per item that way,
    0.24 now); polling for the lock, so that the loop never waited for it either, cost more
    still (``bench/README.md``).

    Each worker delivers mail through a transport of its own, made by ``connect`` (an SMTP
    connection to ``remote`` unless told otherwise); chat items go through ``chat_transport``
    (Slack and Apprise unless told otherwise). ``clock`` gives the time every decision is
    taken at; ``upstream`` says how to talk to ``remote`` (TLS, login, sender).
    """

    def __init__(
        self,
        data_dir: Path,
        remote: HostPort,
        delivery: Delivery,
        *,
        chat: ChatSettings | None = None,
        connect: Callable[[], Transport] | None = None,
        chat_transport: Transport | None = None,
        clock: Clock = time.time,
        upstream: Upstream | None = None,
        history: History | None = None,
    ) -> None:
        self.remote = remote
        self.history = history or History()
        self.upstream = upstream
        self.delivery = delivery
        self._clock = clock
        self._connect = connect or self._smtp_connection
        self._outbox = Outbox(data_dir, durable=False)
        #: Items taken for delivery: whether each is a probe, and when it was taken.
        self._queue: asyncio.Queue[tuple[Item, bool, float]] = asyncio.Queue()
        self._inflight: set[int] = set()
        self._unrecorded: list[tuple[Result, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._recorded = asyncio.Event()
        self._to_record = asyncio.Event()
        self._destinations: dict[str, Destination] = {}
        #: Destinations that answer again, whose waiting items are yet to be made due.
        self._to_release: set[str] = set()
        #: Failures in a row per use of the outbox ("read", "write"); logged once for all.
        self._storage_failures: dict[str, int] = {}
        #: Set while results can be recorded: no new attempt starts while one cannot be.
        self._recordable = asyncio.Event()
        self._recordable.set()
        self._hostname = socket.gethostname()
        self._chat: Transport = chat_transport or ChatSender(
            chat or ChatSettings(),
            ThreadStore(
                get=self._chat_thread,
                put=self._set_chat_thread,
                drop=self._drop_chat_thread,
            ),
        )

    def _smtp_connection(self) -> Transport:
        return SmtpConnection(
            self.remote.host,
            self.remote.port,
            timeout=self.delivery.timeout,
            local_hostname=self._hostname,
            upstream=self.upstream,
        )

    def close(self) -> None:
        """Let go of a dispatcher that never ran (a reload that did not switch to it)."""
        self._outbox.close()

    def wake(self) -> None:
        """Look at the outbox now (new items were committed)."""
        self._wake.set()

    async def idle(self) -> None:
        """Return once nothing is under way: every item taken has its result recorded."""
        while self._inflight or self._unrecorded:
            self._recorded.clear()
            await self._recorded.wait()

    def destination(self, name: str) -> Destination:
        """The state of one destination (``smtp``, or ``chat:<action id>``)."""
        return self._destinations.setdefault(name, Destination(name))

    async def _chat_thread(self, key: Sequence[str]) -> tuple[str, str] | None:
        return self._outbox.chat_thread(key)

    async def _set_chat_thread(self, key: Sequence[str], channel: str, ts: str) -> None:
        self._outbox.set_chat_thread(key, channel, ts)

    async def _drop_chat_thread(self, key: Sequence[str]) -> None:
        self._outbox.drop_chat_thread(key)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then finish the attempts under way and return.

        Raises what a bug raised in one of its tasks (after finishing what it can), so that
        its supervisor starts a new dispatcher.
        """
        workers = [
            asyncio.create_task(self._worker(), name=f"delivery-{i}")
            for i in range(self.delivery.connections)
        ]
        recorder = asyncio.create_task(self._recorder(), name="delivery-recorder")
        fetcher = asyncio.create_task(self._fetch_until(stop), name="delivery-fetcher")
        try:
            done, _ = await asyncio.wait(
                {fetcher, recorder, *workers}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()
        finally:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)
            await self._drain(workers, recorder)

    async def _fetch_until(self, stop: asyncio.Event) -> None:
        stopper = asyncio.create_task(stop.wait())
        purged = 0.0
        started = False
        try:
            while not stop.is_set():
                full = False
                try:
                    if not started:
                        self._resume_waiting()
                        started = True
                    now = self._clock()
                    if now - purged >= PURGE_EVERY:
                        purged = now
                        await self._purge(now)
                    self._release()
                    full, next_due = self._claim(now)
                    delay = POLL if full else self._until_next(next_due)
                    self._storage_recovered("read")
                except Exception as exc:
                    if not is_storage_error(exc):
                        raise
                    delay = self._storage_failed("read", exc)
                # With no room left, the next look is when results free some; else when new
                # mail comes or the next item or probe is due.
                await self._wait_for(self._recorded if full else self._wake, stopper, delay)
        finally:
            stopper.cancel()

    def _resume_waiting(self) -> None:
        """After a start: destinations that items wait for are probed at once."""
        now = self._clock()
        for name, count in self._outbox.waiting_for().items():
            destination = self.destination(name)
            destination.failures, destination.down_since, destination.next_probe = 1, now, now
            destination.error = "not reached before the restart"
            log.info("%d items wait for %s; probing it now", count, name)

    def _claim(self, now: float) -> tuple[bool, float | None]:
        """Queue the due items and the probes that are due. Whether no room was left, and
        else when the next item not taken is due (None: none is pending)."""
        free = 4 * self.delivery.connections - len(self._inflight)
        for destination in self._destinations.values():
            if free > 0 and destination.may_probe(now):
                exclude = tuple(self._inflight)
                item = self._outbox.probe(destination.name, exclude)
                if item is not None:
                    destination.probing = True
                    self._claimed(item, probe=True)
                    free -= 1
        if free <= 0:
            return True, None
        exclude = tuple(self._inflight)
        items = self._outbox.due(now, free, exclude)
        for item in items:
            self._claimed(item, probe=False)
        if len(items) == free:
            return True, None
        return False, self._outbox.next_due((*exclude, *(item.id for item in items)))

    def _claimed(self, item: Item, *, probe: bool) -> None:
        self._inflight.add(item.id)
        self._queue.put_nowait((item, probe, self._clock()))

    def _still_pending(self, item: Item, *, probe: bool) -> bool:
        """Whether an item taken a while ago is still to be sent; if not, let go of it."""
        try:
            pending = self._outbox.still_pending(item)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            return True  # sent once more rather than not at all
        if not pending:
            log.info("%s: deleted before it was sent: not sent", item.message_id)
            self._inflight.discard(item.id)
            if probe:
                self.destination(destination_of(item)).probing = False
            self._recorded.set()
        return pending

    def _until_next(self, next_due: float | None) -> float:
        """How long to wait for the next due item or probe, at most :data:`POLL`."""
        probes = [d.next_probe for d in self._destinations.values() if d.down and not d.probing]
        soonest = min([t for t in (next_due, *probes) if t is not None], default=None)
        delay = POLL if soonest is None else min(POLL, soonest - self._clock())
        return max(delay, 0.01)

    def _storage_failed(self, doing: str, exc: BaseException) -> float:
        """Log storage trouble once, however long it lasts; the wait before trying again.

        Reading often still works on a full disk: the trouble ends only when neither reading
        nor writing fails, so it is announced once and its end once.
        """
        if not self._storage_failures:
            log.error(
                "cannot %s the outbox: %s; delivery waits until it can (nothing is lost)",
                doing,
                exc,
            )
        failures = self._storage_failures.get(doing, 0) + 1
        self._storage_failures[doing] = failures
        return STORAGE_RETRY.delay(failures)

    def _storage_recovered(self, doing: str) -> None:
        if self._storage_failures.pop(doing, None) and not self._storage_failures:
            log.warning("the outbox can be used again; delivery goes on")

    async def _purge(self, now: float) -> None:
        """Forget finished messages past ``history.keep`` or ``history.max-messages``, a
        batch per transaction so that intake waits a few milliseconds at most (pending, dead
        and held ones stay)."""
        try:
            for _ in range(PURGE_ROUNDS):
                purged = self._outbox.purge(
                    now,
                    keep=self.history.keep,
                    max_messages=self.history.max_messages,
                    batch=PURGE_BATCH,
                )
                if purged < PURGE_BATCH:
                    break
                # Deliveries go on between the batches of a long purge.
                await asyncio.sleep(0)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            log.warning("could not purge old outbox records (will try again): %s", exc)

    @staticmethod
    async def _wait_for(event: asyncio.Event, stopper: asyncio.Task[bool], seconds: float) -> None:
        waiter = asyncio.create_task(event.wait())
        await asyncio.wait({waiter, stopper}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        event.clear()

    async def _worker(self) -> None:
        connection = self._connect()
        try:
            while True:
                try:
                    item, probe, taken = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        async with asyncio.timeout(IDLE_CLOSE):
                            item, probe, taken = await self._queue.get()
                    except TimeoutError:
                        await connection.close_if_idle(IDLE_CLOSE)
                        continue
                if self._clock() - taken > STALE_CLAIM and not self._still_pending(
                    item, probe=probe
                ):
                    continue
                # A result that could not be recorded would be sent again after a crash: while
                # the outbox cannot be written, nothing new is tried.
                await self._recordable.wait()
                result = await self._attempt(connection, item, probe=probe)
                # The next item waits until this result is on disk: a crash can then send
                # again at most one item per worker.
                recorded = asyncio.get_running_loop().create_future()
                self._unrecorded.append((result, recorded))
                self._to_record.set()
                await recorded
        finally:
            await connection.close()

    async def _attempt(self, connection: Transport, item: Item, *, probe: bool) -> Result:
        destination = self.destination(destination_of(item))
        now = self._clock()
        if not probe and not destination.lets_through(item):
            # Down, and this item waited before: it waits for the destination, untried.
            return judge(
                item,
                Attempt((), destination.error),
                now=now,
                delivery=self.delivery,
                via=destination.name,
                waiting=destination,
            )
        transport = self._chat if item.kind == "chat" else connection
        try:
            attempt = await transport.send(item)
        except Exception as exc:
            # A bug must not end this worker: its item would stay claimed until restart.
            log.exception("%s: delivery attempt failed unexpectedly", item.message_id)
            await connection.close()
            attempt = Attempt((), f"internal error: {type(exc).__name__}: {exc}")
        via = transport.address
        now = self._clock()
        if attempt.unreachable:
            if destination.unreachable(now, attempt.error, self.delivery, probe=probe):
                log.warning(
                    "%s is down (%s): items wait for it, next try in %s",
                    via,
                    attempt.error,
                    _age(destination.next_probe - now),
                )
            return judge(
                item, attempt, now=now, delivery=self.delivery, via=via, waiting=destination
            )
        if destination.answered():
            log.warning("%s answers again: every item waiting for it is due now", via)
            self._to_release.add(destination.name)
            self._wake.set()
        return judge(item, attempt, now=now, delivery=self.delivery, via=via)

    def _release(self) -> None:
        """Make the items that wait for destinations that answer again due now."""
        for name in sorted(self._to_release):
            count = self._outbox.release_waiting(name, self._clock())
            self._to_release.discard(name)
            if count:
                log.info("%d items that waited for %s are due now", count, name)

    async def _recorder(self) -> None:
        retry_in: float | None = None
        while True:
            # While the outbox cannot be written, try again after a back-off (or sooner,
            # when another result comes).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._to_record.wait(), retry_in)
            self._to_record.clear()
            # One turn of the event loop first: the workers whose answers came in the same
            # turn add theirs, and one transaction records them all (a transaction costs
            # more than the results in it).
            await asyncio.sleep(0)
            ok = self._flush()
            retry_in = None if ok else STORAGE_RETRY.delay(self._storage_failures.get("write", 1))

    def _flush(self) -> bool:
        """Record what is waiting to be recorded; False when the outbox could not be written."""
        batch = list(self._unrecorded)
        if not batch:
            return True
        results = [result for result, _ in batch]
        try:
            self._outbox.record(results)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            self._storage_failed("write", exc)
            self._recordable.clear()
            return False
        self._storage_recovered("write")
        self._recordable.set()
        # Recorded: whatever fails next, these results are never recorded again.
        del self._unrecorded[: len(batch)]
        for result, recorded in batch:
            self._inflight.discard(result.item.id)
            if not recorded.done():
                recorded.set_result(None)
        waited = {r.waiting for r in results if r.waiting}
        for name in waited:
            if not self.destination(name).down:
                # It answered while this result was on its way to the disk, after its
                # waiting items were released: release again, or this one would wait for a
                # destination that is up, which nothing probes.
                self._to_release.add(name)
        if waited:
            # Only a result that waits for its destination can make others wait too long;
            # tried again with the next such result if the disk fails now.
            try:
                expired = self._expire(waited)
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                self._storage_failed("write", exc)
                expired = 0
            if expired:
                log.error("%d items waited for their destination past give-up-after: dead", expired)
        self._recorded.set()
        self._wake.set()
        return True

    def _expire(self, destinations: set[str]) -> int:
        """Items waiting for one of ``destinations`` longer than ``give-up-after`` are dead."""
        before = self._clock() - self.delivery.give_up_after
        count = 0
        for name in destinations:
            reason = f"gave up after {_age(self.delivery.give_up_after)}: "
            reason += self.destination(name).error or f"{name} could not be reached"
            count += len(self._outbox.expire_waiting(name, before, reason))
        return count

    async def _drain(self, workers: list[asyncio.Task[None]], recorder: asyncio.Task[None]) -> None:
        """Let attempts under way finish (bounded by the SMTP timeout), record them, close."""
        deadline = time.monotonic() + self.delivery.timeout
        while not self._queue.empty():
            self._inflight.discard(self._queue.get_nowait()[0].id)
        while self._inflight and not recorder.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._recorded.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recorded.wait(), remaining)
        recorder.cancel()
        for task in workers:
            task.cancel()
        await asyncio.gather(recorder, *workers, return_exceptions=True)
        if self._unrecorded and not self._flush():
            log.error(
                "%d delivery results could not be recorded; they will be sent again",
                len(self._unrecorded),
            )
        await self._chat.close()
        self._outbox.close()
