"""Keep each gocd manager's pipeline groups fresh, in the background, and seed its history.

Routing never waits on GoCD: it reads the last good snapshot. The snapshot is kept in memory
and in ``data-dir`` (so a restart while GoCD is down still routes by group). Failures are
logged once per change of state, with the URL and status; recovery is logged too.

Each poll reads pipeline groups, then, until it has been done once, seeds the history: the
stages cctray.xml lists, each with the result its stage history gives (cctray's own status
cannot tell a failed run from a cancelled one). Then, with ``reconcile`` on, it reads the
latest completed run of each stage from cctray.xml and makes the alert of each run GoCD
sent no mail for (see :mod:`mail2alert.gocd.reconcile`). A 401 ends the poll there, and
the next one waits twice as long, up to ten poll intervals: each poll with wrong
credentials is a failed login, and enough of them lock an LDAP account.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mail2alert.errors import Mail2AlertError
from mail2alert.gocd.client import UNAUTHORIZED, GocdClient, GocdError, GocdStarting, parse_groups
from mail2alert.gocd.memory import HISTORY
from mail2alert.gocd.model import PipelineGroups, StageRun
from mail2alert.gocd.reconcile import BASELINE, Recall, due, mailed, recovered_mail
from mail2alert.gocd.settings import GocdSettings
from mail2alert.managers.health import KeeperHealth
from mail2alert.managers.memory import Background, Feed, Note, Recovered

log = logging.getLogger(__name__)


def snapshot_path(data_dir: Path, url: str) -> Path:
    """Where the last good snapshot of GoCD at ``url`` is kept."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return data_dir / f"gocd-groups-{digest}.json"


def save_snapshot(path: Path, groups: PipelineGroups) -> None:
    """Write the snapshot atomically (a crash leaves the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    payload = {
        "fetched_at": groups.fetched_at,
        "source": groups.source,
        "groups": [{"name": g, "pipelines": list(p)} for g, p in groups.groups.items()],
    }
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_snapshot(path: Path) -> PipelineGroups | None:
    """The snapshot kept at ``path``, or None when there is none (or it is unreadable)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        groups = parse_groups(payload["groups"], source=str(payload.get("source", "")))
    except (OSError, ValueError, KeyError, TypeError, GocdError):
        return None
    return PipelineGroups(groups.groups, float(payload.get("fetched_at", 0)), groups.source)


def client_from_options(options: Mapping[str, object]) -> GocdClient:
    """A GoCD client from a gocd manager's configured options."""
    return GocdClient.of(GocdSettings.of(options))


#: The longest wait between polls after 401s, in poll intervals.
BACKOFF_MAX = 10


def next_delay(interval: float, delay: float, status: int | None) -> float:
    """The wait before the next poll after one that failed with ``status`` (None: no HTTP
    answer) and was itself waited for ``delay``: doubled after a 401, up to
    ``interval`` x :data:`BACKOFF_MAX`; any other failure waits ``interval``."""
    if status != UNAUTHORIZED:
        return interval
    return min(delay * 2, interval * BACKOFF_MAX)


@dataclass(frozen=True)
class Reconciling:
    """What reconciliation needs from the core and the manager's keys."""

    after: float
    window: float
    recall: Recall
    """The notes routing sees (the runs mails came for, the history, the baseline)."""
    learn: Callable[[Sequence[Note]], None]
    """Keep the baseline (only where none is kept yet)."""
    recover: Callable[[bytes], Awaitable[str]]
    """Route and commit a made-up mail as one that arrived; its queue id."""


#: How long GoCD may say that it is starting (its dashboard 202, other endpoints 503) before
#: that is logged as trouble: a big GoCD takes minutes to start.
STILL_STARTING = 900.0


class GroupPoller:
    """Polls one GoCD for pipeline groups every ``interval`` seconds; keeps the last good."""

    def __init__(
        self,
        label: str,
        client: GocdClient,
        *,
        interval: float,
        data_dir: Path,
        on_snapshot: Callable[[str, PipelineGroups], None] = lambda label, groups: None,
        on_history: Callable[[Mapping[tuple[str, str], str]], None] | None = None,
        reconciling: Reconciling | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.label = label
        self.name = f"GoCD poller of {label}"
        self.client = client
        self.interval = interval
        self.delay = interval
        """The wait before the next poll: ``interval``, longer after 401s."""
        self.path = snapshot_path(data_dir, client.url)
        self.on_snapshot = on_snapshot
        self.on_history = on_history
        self.seeded = on_history is None
        self.snapshot: PipelineGroups | None = load_snapshot(self.path)
        self.state = "starting"
        #: Polls of pipeline groups since start, by result (ok, starting, failed): /metrics.
        self.polls = {"ok": 0, "starting": 0, "failed": 0}
        self._seed_trouble = ""
        self._starting_since: float | None = None
        """When GoCD began to say that it is starting (None: it does not)."""
        self.reconciling = reconciling
        self.clock = clock
        self._reconcile_trouble = ""
        self._made: set[str] = set()
        """Locators of the runs whose alert this poller made (before its note is seen)."""
        self._too_old: set[str] = set()
        #: When the last poll ended, and the last trouble with GoCD and when (the console).
        self.last_poll: float | None = None
        self.last_error = ""
        self.last_error_at: float | None = None
        if self.snapshot is not None:
            age = time.time() - self.snapshot.fetched_at
            log.info(
                "%s: using the pipeline groups kept from %s (%d groups, %.0fs old)",
                label,
                client.url,
                len(self.snapshot.groups),
                age,
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            await self.poll_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.delay)

    async def poll_once(self) -> None:
        """One poll: pipeline groups, kept if good, then the history's seed until it is done;
        any failure ends the poll. Each change of state is logged once."""
        try:
            await self._poll()
        finally:
            self.last_poll = self.clock()

    async def _poll(self) -> None:
        try:
            groups = await self.client.pipeline_groups()
        except GocdStarting as exc:
            self._still_starting(exc)
            return
        except GocdError as exc:
            self._starting_since = None
            self.polls["failed"] += 1
            self._failed(exc)
            return
        self._starting_since = None
        self.polls["ok"] += 1
        self.delay = self.interval
        await self._keep(groups)
        if not self.seeded:
            await self._seed_history()
        if self.reconciling is not None and not self.state.startswith("failing"):
            await self._reconcile(self.reconciling)

    def health(self) -> KeeperHealth:
        """How polling fares, for /metrics and /readyz (the core's words: polls, age)."""
        age = None if self.snapshot is None else max(0.0, time.time() - self.snapshot.fetched_at)
        return KeeperHealth(
            ok=self.state.startswith("ok"),
            state=self.state,
            polls=dict(self.polls),
            snapshot_age=age,
            last_poll=self.last_poll,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
        )

    def _trouble(self, what: str) -> None:
        self.last_error, self.last_error_at = what, self.clock()

    async def _keep(self, groups: PipelineGroups) -> None:
        changed = self.snapshot is None or dict(groups.groups) != dict(self.snapshot.groups)
        self.snapshot = groups
        self.on_snapshot(self.label, groups)
        endpoint = self.client.endpoint.path if self.client.endpoint else "?"
        self._set_state(f"ok via {endpoint}")
        if changed:
            log.info(
                "%s: %d pipeline groups, %d pipelines from %s%s",
                self.label,
                len(groups.groups),
                sum(len(p) for p in groups.groups.values()),
                self.client.url,
                endpoint,
            )
            await asyncio.get_running_loop().run_in_executor(None, save_snapshot, self.path, groups)

    async def _seed_history(self) -> None:
        assert self.on_history is not None
        try:
            stages = await self.client.cctray()
            results = await self.client.latest_results(sorted(stages))
        except GocdError as exc:
            if exc.status == UNAUTHORIZED:
                self._failed(exc)
            elif str(exc) != self._seed_trouble:
                self._trouble(f"history not seeded: {exc}")
                self._seed_trouble = str(exc)
                log.warning(
                    "%s: history not seeded yet (tried again each poll): %s", self.label, exc
                )
            return
        self.on_history({(p.lower(), s.lower()): result for (p, s), result in results.items()})
        self.seeded = True
        log.info(
            "%s: history seeded with %d of the %d stages in cctray.xml, from their stage history",
            self.label,
            len(results),
            len(stages),
        )

    async def _reconcile(self, r: Reconciling) -> None:
        """Make the alert of each completed run GoCD sent no mail for (see
        :mod:`mail2alert.gocd.reconcile`)."""
        now = self.clock()
        try:
            runs = await self.client.cctray_runs()
        except GocdError as exc:
            self._reconcile_failed(exc)
            return
        kept = r.recall(BASELINE, (self.client.url,))
        if kept is None:
            # The first read of this GoCD: what completed before it is no one's to make up.
            r.learn([Note(BASELINE, (self.client.url,), str(int(now)))])
            log.info(
                "%s: reconciliation starts: a stage run that completes from now on and whose"
                " mail does not come within %.0fs is made from GoCD's API",
                self.label,
                r.after,
            )
            return
        try:
            baseline = float(kept)
        except ValueError:
            baseline = now  # a note no mail2alert wrote: make up nothing from before now
        # Only the latest run of each stage is looked at: what is remembered of the others
        # can go.
        shown = {run.locator for run in runs}
        self._made &= shown
        self._too_old &= shown
        self._log_too_old(runs, r, baseline, now)
        for run in due(runs, r.recall, baseline=baseline, now=now, after=r.after, window=r.window):
            if run.locator not in self._made and not await self._make(run, r, now):
                return
        self._reconcile_trouble = ""

    async def _make(self, run: StageRun, r: Reconciling, now: float) -> bool:
        """Make and hand over the alert of ``run``; False when the poll is to end."""
        try:
            found = await self.client.run_result(run)
        except GocdError as exc:
            self._reconcile_failed(exc)
            return False
        # GoCD before 20.9 has no stage history: cctray's status is all there is, and its
        # "failed" may be a cancel.
        result = found.result if found is not None else run.status
        if not result:
            return True  # not on the history's first page: nothing sure to say
        try:
            changes = await self.client.changes(run.pipeline, run.pipeline_counter)
        except GocdError as exc:
            if exc.status == UNAUTHORIZED:
                self._failed(exc)
                return False
            changes = ""  # the alert matters more than its changes: GoCD's page has them
        data = recovered_mail(
            run,
            result,
            r.recall,
            now=now,
            cancelled_by=found.cancelled_by if found else "",
            changes=changes,
            known=found is not None or result != "failed",
        )
        try:
            await r.recover(data)
        except Mail2AlertError as exc:
            why = f"the alert of {run.locator} could not be kept (tried again each poll): {exc}"
            if why != self._reconcile_trouble:
                self._trouble(why)
                self._reconcile_trouble = why
                log.error("%s: %s", self.label, why)
            return False
        self._made.add(run.locator)
        return True

    def _log_too_old(
        self, runs: Sequence[StageRun], r: Reconciling, baseline: float, now: float
    ) -> None:
        """Say once which runs with no mail completed too long ago to be made."""
        old = [
            run
            for run in runs
            if run.completed_at >= baseline
            and now - run.completed_at > r.window
            and run.locator not in self._too_old
            and not mailed(run, r.recall)
        ]
        if not old:
            return
        self._too_old.update(run.locator for run in old)
        shown = ", ".join(run.locator for run in old[:5]) + (", ..." if len(old) > 5 else "")
        log.warning(
            "%s: no mail came for %d stage runs that completed more than reconcile-window"
            " (%.0fs) ago; their alerts are not made: %s",
            self.label,
            len(old),
            r.window,
            shown,
        )

    def _reconcile_failed(self, exc: GocdError) -> None:
        if exc.status == UNAUTHORIZED:
            self._failed(exc)
        elif str(exc) != self._reconcile_trouble:
            self._trouble(f"reconciliation not done: {exc}")
            self._reconcile_trouble = str(exc)
            log.warning("%s: reconciliation not done (tried again each poll): %s", self.label, exc)

    def _still_starting(self, exc: GocdStarting) -> None:
        """GoCD says it is starting: said at INFO, unless it has said so for
        :data:`STILL_STARTING`, which is trouble (a GoCD that never comes up, or a proxy
        answering 503 for it)."""
        now = self.clock()
        if self._starting_since is None:
            self._starting_since = now
        if now - self._starting_since < STILL_STARTING:
            self.polls["starting"] += 1
            self.delay = self.interval
            self._set_state(f"starting: {exc}")
            return
        self.polls["failed"] += 1
        longer = f"{exc}, for over {STILL_STARTING / 60:.0f} minutes"
        self._failed(GocdError(longer, status=exc.status))

    def _failed(self, exc: GocdError) -> None:
        self._trouble(str(exc))
        self.delay = next_delay(self.interval, self.delay, exc.status)
        self._set_state(f"failing: {exc}")

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        if state.startswith("failing"):
            kept = "keeping the last snapshot" if self.snapshot else "no snapshot yet"
            log.warning("%s: GoCD %s (%s)", self.label, state, kept)
        elif state.startswith("starting"):
            log.info("%s: GoCD %s", self.label, state.removeprefix("starting: "))
        elif previous.startswith("failing"):
            log.info("%s: GoCD recovered, %s", self.label, state)
        elif previous.startswith("starting: "):
            log.info("%s: GoCD has started, %s", self.label, state)


def keeper(
    label: str, options: Mapping[str, object], data_dir: Path, feed: Feed
) -> GroupPoller | None:
    """The poller of a gocd manager with a ``url`` (None without one): it feeds pipeline
    groups as snapshots, the stage results it seeds the history with as notes, and, with
    ``reconcile`` on, the alerts of stage runs GoCD sent no mail for as recovered messages."""
    settings = GocdSettings.of(options)
    if settings.url is None:
        return None

    def learnt(results: Mapping[tuple[str, str], str]) -> None:
        feed.notes([Note(HISTORY, key, result) for key, result in results.items()])

    reconciling = None
    take = feed.recover
    if settings.reconcile and take is not None:

        async def recover(data: bytes) -> str:
            assert take is not None
            return await take(Recovered(label, data))

        reconciling = Reconciling(
            after=settings.reconcile_after,
            window=settings.reconcile_window,
            recall=feed.recall,
            learn=feed.notes,
            recover=recover,
        )
    return GroupPoller(
        label,
        client_from_options(options),
        interval=settings.poll_interval,
        data_dir=data_dir,
        on_snapshot=feed.snapshot,
        on_history=learnt,
        reconciling=reconciling,
    )


def saved(options: Mapping[str, object], data_dir: Path) -> Path | None:
    """Where the poller of a gocd manager keeps its snapshot (None without a ``url``)."""
    url = GocdSettings.of(options).url
    return None if url is None else snapshot_path(data_dir, url)


async def fetch(
    label: str, options: Mapping[str, object], data_dir: Path
) -> tuple[PipelineGroups | None, str]:
    """Pipeline groups for one gocd manager: live, else as kept in data-dir; and a note."""
    if "url" not in options:
        return None, ""
    client = client_from_options(options)
    try:
        return await client.pipeline_groups(), ""
    except GocdError as exc:
        kept = load_snapshot(snapshot_path(data_dir, client.url))
        if kept is None:
            return None, f"{label}: GoCD not read ({exc}); no pipeline groups known"
        return kept, f"{label}: GoCD not read ({exc}); using the groups kept in {data_dir}"


async def probe(label: str, options: Mapping[str, object]) -> tuple[bool, str]:
    """``check --online``: does GoCD give this manager its pipeline groups?"""
    if "url" not in options:
        return True, "no url: GoCD is not asked"
    client = client_from_options(options)
    try:
        groups = await client.pipeline_groups()
    except GocdError as exc:
        return False, f"GoCD {exc}"
    return True, f"GoCD {client.url} answered: {len(groups.groups)} pipeline groups"


GOCD_BACKGROUND = Background(
    keeper=keeper, saved=saved, load=load_snapshot, fetch=fetch, probe=probe
)
