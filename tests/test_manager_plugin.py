"""End to end: a manager type from outside the core, registered with one line, in ``serve``.

The ``teams`` type below is what a third manager type (say for Jenkins mails) needs: a
reader, a rule function that reads a snapshot, and a keeper that keeps the snapshot fresh in
the background. Registering it is one entry in the registry; nothing else changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mail2alert import cli
from mail2alert.explain import synthetic_message
from mail2alert.managers.base import Context, ManagerType, Predicate, RuleFunction, Verdict
from mail2alert.managers.base import read_alert as read_plain
from mail2alert.managers.explaining import Explaining, Facts, Probe, SnapshotFile
from mail2alert.managers.memory import Background, Feed
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.model import Alert, Envelope
from mail2alert.routing import Manager
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


def _job(alert: Alert) -> str:
    return alert.subject.split()[1] if alert.subject.startswith("Build ") else ""


def _team_facts(alert: Alert, label: str | None, known: bool) -> Facts:
    job = _job(alert)
    return Facts(f"job {job}" if job else "not a build mail", {"job": job} if job else None)


@dataclass(frozen=True)
class TeamCoverage:
    """Where a failed build of every job the teams snapshot knows would go."""

    routes: Mapping[str, tuple[str, ...]]

    def as_dict(self) -> dict[str, Any]:
        return {"jobs": {job: list(actions) for job, actions in self.routes.items()}}

    def lines(self) -> list[str]:
        return [f"job {job}: {', '.join(actions) or '-'}" for job, actions in self.routes.items()]


def _coverage(
    managers: Sequence[Manager], snapshots: Mapping[str, object], probe: Probe
) -> TeamCoverage:
    routes: dict[str, tuple[str, ...]] = {}
    for manager in managers:
        teams = snapshots.get(manager.label)
        for job in sorted(teams if isinstance(teams, dict) else {}):
            envelope = Envelope("jenkins@example.com", ("ci@example.com",))
            mail = synthetic_message(envelope.mail_from, "ci@example.com", f"Build {job} failed")
            routes[job] = probe(envelope, mail).actions
    return TeamCoverage(routes)


def _teams_from_file(path: Path) -> object:
    return json.loads(path.read_text())


TEAMS_TYPE = ManagerType(
    name="teams",
    summary="routes build mails by team",
    read=read_plain,
    functions={IN_TEAM.name: IN_TEAM},
    background=BACKGROUND,
    explaining=Explaining(
        facts=_team_facts,
        held="the teams are known",
        coverage=_coverage,
        snapshot_file=SnapshotFile("--teams-file", "FILE.json", "job -> team", _teams_from_file),
    ),
)

TEAMS_MANAGER = {
    "name": "teams",
    "messages-we-want": {"to": "ci@example.com"},
    "rules": [
        {
            "actions": ["mailto:a@example.com"],
            "filter": {"function": "teams.in_team", "args": ["team-a"]},
        }
    ],
}


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one registration line."""
    monkeypatch.setitem(MANAGER_TYPES, TEAMS_TYPE.name, TEAMS_TYPE)  # type: ignore[index]


@pytest.mark.usefixtures("registered")
def test_a_third_manager_type_is_configured_kept_fresh_and_routes_in_serve(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=tmp_path / "data",
        managers=[TEAMS_MANAGER],
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


@pytest.fixture
def teams_config(tmp_path: Path) -> Path:
    path = write_config(
        tmp_path / "configuration.yml",
        remote_port=2525,
        data_dir=tmp_path / "data",
        managers=[TEAMS_MANAGER],
    )
    (tmp_path / "teams.json").write_text(json.dumps(TEAMS))
    return path


@pytest.mark.usefixtures("registered")
def test_route_shows_a_third_types_facts_and_takes_its_snapshot_from_a_file(
    teams_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teams = str(teams_config.parent / "teams.json")
    made_up = ("--from", "j@example.com", "--to", "ci@example.com", "--subject", "Build app failed")
    code = cli.main(["route", "--config", str(teams_config), "--teams-file", teams, *made_up])
    out = capsys.readouterr().out
    assert code == 0
    assert "facts:    job app\n" in out
    assert "outcome:  deliver to mailto:a@example.com" in out


@pytest.mark.usefixtures("registered")
def test_route_says_what_held_mail_of_a_third_type_waits_for(
    teams_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def nothing(label: str, options: Mapping[str, object], data_dir: Path) -> Any:
        return None, "no teams known"

    blind = dataclasses.replace(
        TEAMS_TYPE, background=dataclasses.replace(BACKGROUND, fetch=nothing)
    )
    monkeypatch.setitem(MANAGER_TYPES, TEAMS_TYPE.name, blind)  # type: ignore[index]
    made_up = ("--from", "j@example.com", "--to", "ci@example.com", "--subject", "Build app failed")
    cli.main(["route", "--config", str(teams_config), *made_up])
    assert "outcome:  hold until the teams are known" in capsys.readouterr().out


@pytest.mark.usefixtures("registered")
def test_coverage_includes_a_third_types_inventory(
    teams_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teams = str(teams_config.parent / "teams.json")
    args = ["coverage", "--config", str(teams_config), "--teams-file", teams]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "job app: mailto:a@example.com" in lines
    assert "job db: -" in lines
    assert cli.main([*args, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["jobs"] == {"app": ["mailto:a@example.com"], "db": []}
