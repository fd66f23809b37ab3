"""End to end: a manager type from outside the core, registered with one line, in ``serve``.

The ``teams`` type below is what a third manager type (say for Jenkins mails) needs: a
reader, a rule function that reads a snapshot, and a keeper that keeps the snapshot fresh in
the background. Registering it is one entry in the registry; nothing else changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest

from mail2alert.managers.base import Context, ManagerType, Predicate, RuleFunction, Verdict
from mail2alert.managers.base import read_alert as read_plain
from mail2alert.managers.memory import Background, Feed
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.model import Alert
from mail2alert.testing import CaptureServer
from tests.helpers import compose, running, send, wait_until, write_config

TEAMS = {"app": "team-a", "db": "team-b"}


class TeamsKeeper:
    """Feeds which job belongs to which team once, then waits: a stand-in for a poller."""

    def __init__(self, label: str, feed: Feed) -> None:
        self.name = f"teams keeper of {label}"
        self.snapshot: object | None = None
        self.label = label
        self.feed = feed

    async def run(self, stop: asyncio.Event) -> None:
        self.snapshot = dict(TEAMS)
        self.feed.snapshot(self.label, self.snapshot)
        await stop.wait()


async def _fetch(
    label: str, options: Mapping[str, object], data_dir: Path
) -> tuple[object | None, str]:
    return dict(TEAMS), ""


BACKGROUND = Background(
    keeper=lambda label, options, data_dir, feed: TeamsKeeper(label, feed),
    saved=lambda options, data_dir: None,
    load=lambda path: None,
    fetch=_fetch,
)


def _compile_in_team(args: tuple[str, ...]) -> Predicate:
    (team,) = args

    def in_team(alert: Alert, context: Context) -> Verdict:
        teams = context.snapshot
        if not isinstance(teams, dict):
            return Verdict(False, "no teams yet", waiting=True)
        job = alert.subject.split()[1] if alert.subject.startswith("Build ") else ""
        return Verdict(teams.get(job) == team, f"job {job!r} of {teams.get(job)!r}")

    return in_team


IN_TEAM = RuleFunction(
    "teams.in_team", "the job is the team's", (("team", "word"),), _compile_in_team
)
TEAMS_TYPE = ManagerType(
    name="teams",
    summary="routes build mails by team",
    read=read_plain,
    functions={IN_TEAM.name: IN_TEAM},
    background=BACKGROUND,
)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one registration line."""
    monkeypatch.setitem(MANAGER_TYPES, TEAMS_TYPE.name, TEAMS_TYPE)  # type: ignore[index]


@pytest.mark.usefixtures("registered")
def test_a_third_manager_type_is_configured_kept_fresh_and_routes_in_serve(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    manager = {
        "name": "teams",
        "messages-we-want": {"to": "ci@example.com"},
        "rules": [
            {
                "actions": ["mailto:a@example.com"],
                "filter": {"function": "teams.in_team", "args": ["team-a"]},
            }
        ],
    }
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[manager],
    )
    with running(path) as service:
        wait_until(
            lambda: "teams#0" in service.service.context.snapshots, what="the keeper's snapshot"
        )
        # The other team's first: once the team's mail is upstream, the other was decided.
        for job in ("db", "app"):
            send(
                service.port,
                compose(subject=f"Build {job} failed", to="ci@example.com"),
                rcpt_tos=["ci@example.com"],
            )
        (got,) = upstream.wait_for(1)

    assert got.rcpt_tos == ("a@example.com",)
    assert len(upstream.messages) == 1
    assert b"Subject: Build app failed" in got.data
