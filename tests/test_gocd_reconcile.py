"""Reconciliation, specified: GoCD never retries a stage mail, so mail2alert makes the alert
of a completed stage run whose mail did not come, from GoCD's API, once.

Pure tests first (which runs are due, the mail made for one, cctray and stage history read
as GoCD writes them); then the keeper against a fake GoCD over HTTP with an injected clock;
end to end in test_e2e_reconcile.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mail2alert.config import load, parse
from mail2alert.errors import ConfigError, OutboxFull
from mail2alert.explain import explain, render
from mail2alert.gocd.client import parse_cctray_runs, parse_changes, parse_run_result
from mail2alert.gocd.manager import read_gocd_alert
from mail2alert.gocd.memory import GOCD_MEMORY, HISTORY, RUNS
from mail2alert.gocd.model import PipelineGroups, StageRun, stage_of
from mail2alert.gocd.poller import GroupPoller, keeper
from mail2alert.gocd.reconcile import BASELINE, due, recovered_mail
from mail2alert.gocd.settings import GocdSettings
from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.managers.base import Context
from mail2alert.managers.memory import Feed, Key, Recovered
from mail2alert.message import RawMessage
from mail2alert.model import Envelope

GROUPS = {"my-group": ["ppp", "my-pipeline"], "infra": ["deploy-infra"]}
URL = "https://ci.example.com/go/pipelines/my-pipeline/7/build/1"
#: A run that completed at t=1000 (seconds since the epoch, for these pure tests).
RUN = StageRun("my-pipeline", 7, "build", 1, 1000.0, URL, "failed")
KEY = ("my-pipeline", "build")
#: The envelope the core gives a made mail: the gocd manager's own address.
OURS = Envelope("mail2alert@example.com", ("mail2alert@example.com",))


def recall_of(**tables: dict[Key, str]) -> Callable[[str, Key], str | None]:
    return lambda table, key: tables.get(table, {}).get(key)


NOTHING = recall_of()


def _due(recall: Callable[[str, Key], str | None] = NOTHING, **at: float) -> list[StageRun]:
    when = {"baseline": 500.0, "now": 1400.0, "after": 300.0, "window": 7200.0, **at}
    return due([RUN], recall, **when)


# -- which runs are due ----------------------------------------------------------------------


def test_a_run_with_no_mail_is_due_once_reconcile_after_has_passed() -> None:
    assert _due(now=1299.0) == []
    assert _due(now=1300.0) == [RUN]


def test_a_run_that_completed_before_the_baseline_is_never_made_up() -> None:
    """The first start knows nothing of what came before it."""
    assert _due(baseline=1001.0) == []


def test_a_run_that_completed_longer_than_reconcile_window_ago_is_not_made() -> None:
    """After a long outage, no flood: only what completed within the window."""
    assert _due(now=1000.0 + 7201.0) == []
    assert _due(now=1000.0 + 7200.0) == [RUN]


@pytest.mark.parametrize(("mailed", "made"), [("7/1", False), ("8/1", False), ("7/2", False)])
def test_a_run_a_mail_came_for_or_a_later_one_is_not_made(mailed: str, made: bool) -> None:
    assert bool(_due(recall_of(**{RUNS: {KEY: mailed}}))) is made


def test_a_mail_for_an_earlier_run_does_not_count_for_this_one() -> None:
    assert _due(recall_of(**{RUNS: {KEY: "6/3"}})) == [RUN]


# -- the mail made for a run -----------------------------------------------------------------


def _made(result: str, last: str | None = None, **kw: Any) -> RawMessage:
    recall = recall_of(**{HISTORY: {KEY: last}}) if last else NOTHING
    data = recovered_mail(RUN, result, recall, now=2000.0, **kw)
    return RawMessage.parse(b"From: a@example.com\r\nTo: b@example.com\r\n" + data)


@pytest.mark.parametrize(
    ("result", "last", "verb"),
    [
        ("failed", "passed", "is broken"),
        ("failed", "failed", "failed"),
        ("failed", None, "failed"),
        ("passed", "failed", "is fixed"),
        ("passed", "passed", "passed"),
        ("passed", None, "passed"),
        ("cancelled", "passed", "is cancelled"),
    ],
)
def test_the_subject_is_the_one_gocd_would_have_sent_knowing_the_last_result(
    result: str, last: str | None, verb: str
) -> None:
    assert _made(result, last).get("subject") == f"Stage [my-pipeline/7/build/1] {verb}"


def test_the_made_mail_is_marked_and_reads_as_gocds_with_its_details_url() -> None:
    message = _made("cancelled", cancelled_by="alice")
    assert message.get("x-mail2alert-recovered") == "gocd-api"
    alert = read_gocd_alert(message, OURS, Context())
    stage = stage_of(alert)
    assert stage is not None
    assert stage.locator == "my-pipeline/7/build/1"
    assert alert.link == URL
    assert alert.event == "CANCELLED"
    assert dict(alert.facts)["cancelled_by"] == "alice"


def test_route_trace_says_the_alert_was_recovered() -> None:
    config = load(Path(__file__).parent.parent / "examples" / "configuration.yml")
    envelope = OURS
    data = b"From: mail2alert@example.com\r\nTo: mail2alert@example.com\r\n" + recovered_mail(
        RUN, "failed", recall_of(**{HISTORY: {KEY: "passed"}}), now=2000.0
    )
    context = Context(snapshots={"gocd#0": PipelineGroups({"my-group": ("my-pipeline",)})})
    shown = render(explain(config, envelope, data, context), trace=True)
    assert "deliver to mailto:cat@example.com" in shown
    assert "recovered: made by mail2alert from gocd-api" in shown


# -- the keys ----------------------------------------------------------------------------------


def test_the_reconcile_keys_are_read_with_their_defaults_and_checked_at_their_line() -> None:
    head = "remote-smtp: localhost:8025\nmanagers:\n  - name: gocd\n    url: http://ci/go\n"
    head += "    messages-we-want: {to: mail2alert@example.com}\n"
    loaded = parse(head + "    reconcile-after: 2m\n", "configuration.yml", {})
    settings = GocdSettings.of(loaded.routing[0].options)
    assert (settings.reconcile, settings.reconcile_after, settings.reconcile_window) == (
        True,
        120.0,
        7200.0,
    )
    bad = head + "    reconcile: sometimes\n    reconcile-window: 0\n"
    with pytest.raises(ConfigError) as caught:
        parse(bad, "configuration.yml", {})
    shown = [str(p) for p in caught.value.problems]
    assert shown[0].startswith("configuration.yml:6: managers[0].reconcile: expected true or false")
    assert shown[1].startswith("configuration.yml:7: managers[0].reconcile-window: expected a")


# -- cctray and the stage history as GoCD writes them ---------------------------------------

CCTRAY = """<?xml version="1.0" encoding="utf-8"?>
<Projects>
  <Project name="my-pipeline :: build" activity="Sleeping" lastBuildStatus="Failure"
           lastBuildLabel="7" lastBuildTime="2024-03-15T16:40:02Z"
           webUrl="https://ci.example.com/go/pipelines/my-pipeline/7/build/1"/>
  <Project name="my-pipeline :: build :: unit" activity="Sleeping" lastBuildStatus="Failure"
           lastBuildLabel="7" lastBuildTime="2024-03-15T16:40:02Z"
           webUrl="https://ci.example.com/go/tab/build/detail/my-pipeline/7/build/1/unit"/>
  <Project name="ppp :: test" activity="Building" lastBuildStatus="Success"
           lastBuildLabel="3" lastBuildTime="2024-03-15T16:00:00Z"
           webUrl="https://ci.example.com/go/pipelines/ppp/4/test/1"/>
  <Project name="old :: build" activity="Sleeping" lastBuildStatus="Success"
           lastBuildLabel="release-1" lastBuildTime="2024-03-15T16:40:02"
           webUrl="https://ci.example.com/go/pipelines/old/12/build/2"/>
</Projects>"""


def test_cctray_gives_each_stages_latest_completed_run_and_when_it_completed() -> None:
    """Job rows are no stages; a building stage's row names the run under way with the time
    of the one before, so it waits until it completes; a time without a zone is UTC."""
    assert parse_cctray_runs(CCTRAY) == [
        StageRun("my-pipeline", 7, "build", 1, 1710520802.0, URL, "failed"),
        StageRun(
            "old",
            12,
            "build",
            2,
            1710520802.0,
            "https://ci.example.com/go/pipelines/old/12/build/2",
            "passed",
        ),
    ]


def test_the_stage_history_says_what_became_of_one_run() -> None:
    history = {
        "stages": [
            {"pipeline_counter": 8, "counter": "1", "result": "Unknown"},
            {"pipeline_counter": 7, "counter": "1", "result": "Cancelled", "cancelled_by": "bob"},
        ]
    }
    found = parse_run_result(history, 7, 1)
    assert (found.result, found.cancelled_by) == ("cancelled", "bob")
    assert parse_run_result(history, 8, 1).result is None  # still going
    assert parse_run_result(history, 6, 1).result is None  # not on the first page


#: A pipeline run's material revisions, in the shape of GoCD's pipeline instance API.
REVISIONS = [
    {
        "changed": True,
        "material": {
            "name": "app",
            "type": "Git",
            "description": "URL: https://git.example.com/app.git, Branch: main",
        },
        "modifications": [
            {
                "revision": "1f5557f8a1c3",
                "modified_time": 1710520300000,
                "user_name": "Jane Doe <jane@example.com>",
                "comment": "Fix flaky test\n\nin the payment module",
            }
        ],
    },
    {
        "changed": True,
        "material": {"name": "upstream", "type": "Pipeline", "description": "upstream/compile"},
        "modifications": [{"revision": "upstream/881/compile/1", "modified_time": 1710520000000}],
    },
    {"changed": False, "material": {"type": "Git", "description": "tools"}, "modifications": []},
]


def test_the_changes_read_from_gocds_api_are_written_as_gocds_mail_writes_them() -> None:
    assert parse_changes({"build_cause": {"material_revisions": REVISIONS}}) == (
        "Git: URL: https://git.example.com/app.git, Branch: main\n"
        "revision: 1f5557f8a1c3, modified by Jane Doe <jane@example.com> on 2024-03-15 16:31:40\n"
        "Fix flaky test\n\nin the payment module\n\n"
        "Dependency: upstream/compile\n"
        "revision: upstream/881/compile/1, completed on 2024-03-15 16:26:40"
    )


def test_a_made_alert_names_the_committers_of_its_changes() -> None:
    changes = parse_changes({"build_cause": {"material_revisions": REVISIONS}})
    message = _made("failed", changes=changes)
    alert = read_gocd_alert(message, OURS, Context())
    assert [(p.name, p.address) for p in alert.committers] == [("Jane Doe", "jane@example.com")]


#: A package's and a plugin SCM's revisions, as the pipeline instance API shows them.
PACKAGE_AND_PLUGIN = [
    {
        "changed": True,
        "material": {"type": "Package", "description": "repo_pkg"},
        "modifications": [
            {
                "revision": "pkg-1.2.3-1.noarch",
                "modified_time": 1710520000000,
                "user_name": "Build Bot <bot@example.com>",
                "comment": '{"TYPE":"PACKAGE_MATERIAL"}',
            }
        ],
    },
    {
        "changed": True,
        "material": {"type": "SCM", "description": "my-plugin-scm"},
        "modifications": [
            {
                "revision": "deadbeef",
                "modified_time": 1710520000000,
                "user_name": "Jane Doe <jane@example.com>",
                "comment": "plugin comment",
            }
        ],
    },
]


def test_package_and_plugin_blocks_say_completed_on_and_name_no_one_as_gocds_mail() -> None:
    """As in GoCD's own mail (gocd-mails/stage-materials.eml): only version control blocks
    say who modified them, so a made alert mails no committer GoCD's mail would not name."""
    changes = parse_changes({"build_cause": {"material_revisions": PACKAGE_AND_PLUGIN}})
    assert changes == (
        "Package : repo_pkg\n"
        "revision: pkg-1.2.3-1.noarch, completed on 2024-03-15 16:26:40\n\n"
        "SCM : my-plugin-scm\n"
        "revision: deadbeef, completed on 2024-03-15 16:26:40\n"
        "plugin comment"
    )
    alert = read_gocd_alert(_made("passed", changes=changes), OURS, Context())
    assert alert.committers == ()


def test_a_made_alert_with_non_ascii_changes_is_quoted_printable_as_gocds_own() -> None:
    """No hop on the way needs 8BITMIME, as for GoCD's JavaMail."""
    changes = "Git: app\nrevision: 1f55, modified by Jöns Ångström <jons@example.com> on 2024-03-15"
    message = _made("failed", changes=changes)
    assert message.get("content-transfer-encoding") == "quoted-printable"
    alert = read_gocd_alert(message, OURS, Context())
    assert [p.name for p in alert.committers] == ["Jöns Ångström"]


def test_a_cctray_row_whose_names_gocd_would_not_allow_is_no_run() -> None:
    """They would go into the subject of the mail made from them."""
    row = (
        '<Projects><Project name="{name} :: build" activity="Sleeping" lastBuildStatus="Failure"'
        ' lastBuildTime="2024-03-15T16:40:02Z" webUrl="https://ci/go/pipelines/{name}/7/build/1"/>'
        "</Projects>"
    )
    assert parse_cctray_runs(row.format(name="p&#13;&#10;Bcc: x")) == []
    assert parse_cctray_runs(row.format(name="p q")) == []
    assert len(parse_cctray_runs(row.format(name="p-1.2_x"))) == 1


# -- the keeper, against a fake GoCD, with an injected clock ---------------------------------


class Fed:
    """A core as a keeper sees it: notes it keeps and recalls, recovered messages it takes."""

    def __init__(self) -> None:
        self.notes: dict[str, dict[Key, str]] = {}
        self.recovered: list[bytes] = []

    def learn(self, notes: Any) -> None:
        for note in notes:
            self.notes.setdefault(note.table, {}).setdefault(note.key, note.value)

    def recall(self, table: str, key: Key) -> str | None:
        return self.notes.get(table, {}).get(key)

    async def recover(self, recovered: Recovered) -> str:
        assert recovered.label == "gocd#0"
        self.recovered.append(recovered.data)
        # As the core does once it is committed: the planner's note of the run.
        subject = RawMessage.parse(recovered.data).get("subject")
        locator = subject.split("[")[1].split("]")[0].split("/")
        key = (locator[0].lower(), locator[2].lower())
        self.notes.setdefault(RUNS, {})[key] = f"{locator[1]}/{locator[3]}"
        return f"Q{len(self.recovered)}"

    def feed(self) -> Feed:
        return Feed(
            snapshot=lambda label, snapshot: None,
            notes=self.learn,
            recall=self.recall,
            recover=self.recover,
        )


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _keeper(gocd: FakeGoCD, tmp_path: Path, fed: Fed, clock: Clock) -> GroupPoller:
    options = {"url": gocd.url, "reconcile-after": 300.0, "reconcile-window": 7200.0}
    made = keeper("gocd#0", options, tmp_path, fed.feed())
    assert isinstance(made, GroupPoller)
    made.clock = clock
    return made


def _poll(poller: GroupPoller) -> None:
    asyncio.run(poller.poll_once())


def test_the_keeper_makes_a_run_with_no_mail_once_after_reconcile_after(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    fed = Fed()
    with FakeGoCD(GROUPS, cctray={("my-pipeline", "build"): "Success"}) as gocd:
        poller = _keeper(gocd, tmp_path, fed, clock)
        _poll(poller)
        assert fed.notes[BASELINE] == {(gocd.url,): "1800000000"}
        assert fed.recovered == []  # the run of 2024 is before the baseline
        gocd.complete("my-pipeline", "build", "Failed", at=clock.now + 10)
        clock.now += 300
        _poll(poller)
        assert fed.recovered == []  # 290s: its mail may still come
        clock.now += 10
        _poll(poller)
        [made] = fed.recovered
        assert b"Subject: Stage [my-pipeline/2/build/1] is broken" in made
        assert b"See details: " + gocd.url.encode() + b"/pipelines/my-pipeline/2/build/1" in made
        clock.now += 60
        _poll(poller)
        assert len(fed.recovered) == 1


def test_the_keeper_makes_nothing_for_a_run_whose_mail_came(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    fed = Fed()
    with FakeGoCD(GROUPS) as gocd:
        poller = _keeper(gocd, tmp_path, fed, clock)
        _poll(poller)
        gocd.complete("ppp", "test", "Passed", at=clock.now + 1)
        fed.notes.setdefault(RUNS, {})[("ppp", "test")] = "1/1"  # what its mail left
        clock.now += 600
        _poll(poller)
        assert fed.recovered == []


#: A GoCD before 20.9: no stage history API, so cctray.xml's status is all there is.
NO_STAGE_HISTORY = ("admin", "dashboard", "legacy", "cctray")


def made_from_cctray(tmp_path: Path, *, known: str, result: str) -> tuple[str, bytes]:
    """A run of ppp/test completes as ``result`` on a GoCD without a stage history, after a
    run whose result the keeper knew as ``known``: what cctray.xml shows of it, and the alert
    the keeper made of it once its mail did not come."""
    clock = Clock(1_800_000_000.0)
    fed = Fed()
    fed.notes[HISTORY] = {("ppp", "test"): known}
    with FakeGoCD(GROUPS, endpoints=NO_STAGE_HISTORY) as gocd:
        poller = _keeper(gocd, tmp_path, fed, clock)
        _poll(poller)
        gocd.complete("ppp", "test", result, at=clock.now + 1)
        shown = gocd.cctray[("ppp", "test")]
        clock.now += 600
        _poll(poller)
    [data] = fed.recovered
    return shown, data


def test_without_a_stage_history_a_cctray_failure_is_made_failed_and_may_be_a_cancel(
    tmp_path: Path,
) -> None:
    """cctray.xml shows a cancelled run as failed: the alert is made all the same (it may be
    a failure, and GoCD never retries its mail), as ``failed`` even after a known pass, and
    says that it may have been a cancel."""
    shown, data = made_from_cctray(tmp_path, known="passed", result="Cancelled")
    assert shown == "Failure"
    made = RawMessage.parse(b"From: a@example.com\r\nTo: b@example.com\r\n" + data)
    assert made.get("subject") == "Stage [ppp/1/test/1] failed"
    assert made.get("x-mail2alert-recovered") == "gocd-cctray"
    assert "this run may have been cancelled" in made.body_text.replace("\r\n", " ")
    alert = read_gocd_alert(made, OURS, Context(state={HISTORY: {("ppp", "test"): "passed"}}))
    assert alert.event == "FAILS"  # not BREAKS: the failure itself is not sure


def test_an_alert_made_from_cctray_alone_teaches_the_history_nothing() -> None:
    """So a later ``passed`` is not called FIXED on the strength of a ``failed`` that may
    have been a cancel; the run is still known to have had its alert."""
    made = _made("failed", known=False)
    alert = read_gocd_alert(made, OURS, Context())
    notes = {note.table: note.value for note in GOCD_MEMORY.notes(alert)}
    assert notes == {RUNS: "7/1"}
    later = RawMessage.parse(gocd_stage_mail("Stage [my-pipeline/8/build/1] passed"))
    assert read_gocd_alert(later, OURS, Context(state={})).event == "PASSES"


def test_gocds_own_mail_of_that_run_arriving_late_is_the_same_event() -> None:
    """The de-duplication claim is the mail's result (``failed``), as GoCD's own mail of the
    run makes it, even though the history does not learn it."""
    settings = {"url": "https://ci.example.com/go", "duplicate-window": 600.0}
    made = read_gocd_alert(_made("failed", known=False), OURS, Context())
    real = read_gocd_alert(
        RawMessage.parse(gocd_stage_mail("Stage [my-pipeline/7/build/1] failed")), OURS, Context()
    )
    claims = [GOCD_MEMORY.claim(a, "gocd#0", settings) for a in (made, real)]
    assert claims[0] is not None
    assert claims[0] == claims[1]


def test_without_a_stage_history_a_cctray_success_is_made_as_gocd_would_have_sent_it(
    tmp_path: Path,
) -> None:
    """A pass is a pass in cctray.xml too: after a known failure it is ``is fixed``."""
    shown, data = made_from_cctray(tmp_path, known="failed", result="Passed")
    assert shown == "Success"
    assert b"Subject: Stage [ppp/1/test/1] is fixed" in data
    assert b"X-Mail2alert-Recovered: gocd-api" in data


def test_the_keeper_says_once_which_runs_are_too_old_to_be_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(1_800_000_000.0)
    fed = Fed()
    with FakeGoCD(GROUPS) as gocd:
        poller = _keeper(gocd, tmp_path, fed, clock)
        _poll(poller)
        gocd.complete("ppp", "test", "Failed", at=clock.now + 1)
        clock.now += 3 * 3600  # down for three hours
        _poll(poller)
        _poll(poller)
        assert fed.recovered == []
    said = [r.getMessage() for r in caplog.records if "reconcile-window" in r.getMessage()]
    assert len(said) == 1
    assert "ppp/1/test/1" in said[0]


def test_an_alert_that_cannot_be_kept_is_made_again_at_the_next_poll_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(1_800_000_000.0)
    fed = Fed()
    full = True
    kept = fed.recover

    async def recover(recovered: Recovered) -> str:
        if full:
            raise OutboxFull("data-dir is full")
        return await kept(recovered)

    fed.recover = recover  # type: ignore[method-assign]
    with FakeGoCD(GROUPS) as gocd:
        poller = _keeper(gocd, tmp_path, fed, clock)
        _poll(poller)
        gocd.complete("ppp", "test", "Failed", at=clock.now + 1)
        clock.now += 600
        _poll(poller)
        _poll(poller)
        assert fed.recovered == []
        full = False
        _poll(poller)
        assert len(fed.recovered) == 1
    said = [r for r in caplog.records if "could not be kept" in r.getMessage()]
    assert len(said) == 1
