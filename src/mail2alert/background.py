"""Background work that must never die quietly: restart on error, with back-off.

Every long-running task of the service (delivery, the managers' keepers, held mail, the
configuration watch) runs under :func:`supervised`. An unexpected error is logged at ERROR
the moment it happens, and the task starts again after a back-off. Storage trouble (a full or
read-only ``data-dir``, an I/O error) goes away when the operator fixes the disk, so it is
retried for as long as it lasts. Any other error is a bug: after :attr:`RestartPolicy.attempts`
failures in a row the service is told to fail, so the process exits non-zero and its own
supervisor (systemd, Docker) restarts it, rather than go on accepting mail it would never
deliver.

:class:`RestartPolicy` is pure (it is given the time), so the policy is specified by fast
tests; :func:`supervised` is the loop around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mail2alert.errors import OutboxError

log = logging.getLogger(__name__)


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk's trouble (it may pass), not a bug in mail2alert."""
    return isinstance(exc, OutboxError | sqlite3.OperationalError | OSError)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the file system has no space left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return False


@dataclass(frozen=True)
class RestartPolicy:
    """When a failed task starts again, and when to stop trying.

    The wait doubles from ``initial`` to ``maximum`` with each failure in a row; a task that
    ran ``healthy_after`` seconds before failing starts the count afresh. Storage errors are
    retried for ever; other errors ``attempts`` times in a row, then the service fails.
    """

    initial: float = 0.5
    maximum: float = 30.0
    attempts: int = 5
    healthy_after: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next start, after ``failures`` failures in a row."""
        return float(min(self.maximum, self.initial * 2 ** max(0, failures - 1)))

    def failures_after(self, failures: int, ran_for: float) -> int:
        """The count of failures in a row once a run of ``ran_for`` seconds failed."""
        return 1 if ran_for >= self.healthy_after else failures + 1

    def gives_up(self, failures: int, exc: BaseException) -> bool:
        """Whether the service must fail rather than start the task again."""
        return not is_storage_error(exc) and failures >= self.attempts


async def supervised(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    stop: asyncio.Event,
    fail: Callable[[str], None],
    policy: RestartPolicy = RestartPolicy(),
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``run()`` until ``stop`` is set, starting it again whenever it fails.

    ``run`` returning normally means it saw ``stop``; returning before that is a failure too
    (a loop that ended by mistake). ``fail(reason)`` is called once, when the policy gives up.
    """
    failures = 0
    while not stop.is_set():
        started = clock()
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it was, it is logged and retried
            error: BaseException = exc
        else:
            if stop.is_set():
                return
            error = RuntimeError("it stopped by itself")
        failures = policy.failures_after(failures, clock() - started)
        if policy.gives_up(failures, error):
            reason = f"{name} failed {failures} times in a row: {_describe(error)}"
            log.error("%s; stopping so that mail2alert is restarted", reason)
            fail(reason)
            return
        delay = policy.delay(failures)
        if is_storage_error(error):
            log.error("%s failed: %s; retrying in %.3gs", name, _describe(error), delay)
        else:
            log.error(
                "%s failed; retrying in %.3gs",
                name,
                delay,
                exc_info=(type(error), error, error.__traceback__),
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
