"""The gocd manager, specified: stage mails, pipeline groups from a live (fake) GoCD, history.

End-to-end tests go smtplib -> mail2alert -> capture server, with mail2alert reading pipeline
groups from :class:`mail2alert.testing.FakeGoCD` over HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import quopri
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from mail2alert.app import COMMITTED, HELD, write_wake
from mail2alert.components import Keepers
from mail2alert.gocd.client import (
    AnswerTooLong,
    GocdClient,
    GocdError,
    parse_cctray,
    parse_groups,
)
from mail2alert.gocd.manager import corrected_event, parse_subject, read_gocd_alert
from mail2alert.gocd.model import stage_of
from mail2alert.gocd.poller import STILL_STARTING, GroupPoller, keeper, snapshot_path
from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.managers.base import Context
from mail2alert.managers.memory import Feed, Note
from mail2alert.message import RawMessage
from mail2alert.model import Envelope, Secret
from mail2alert.outbox import Outbox
from mail2alert.planning import accept
from mail2alert.supervisor import woken
from mail2alert.testing import CaptureServer, EndlessAnswer, FakeClock
from tests.helpers import OutboxView, example_managers, running, send, wait_until, write_config

GROUPS = {"my-group": ["ppp", "my-pipeline"], "infra": ["deploy-infra"]}
GOCD_TO = "mail2alert@example.com"
#: Mails as GoCD 26.1's JavaMail writes them (a copy of ../shared/reference/gocd-mails).
GOCD_MAILS = Path(__file__).parent / "data" / "gocd-mails"


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "event"),
    [
        ("passed", "PASSES"),
        ("failed", "FAILS"),
        ("is broken", "BREAKS"),
        ("is fixed", "FIXED"),
        ("is cancelled", "CANCELLED"),
    ],
)
def test_every_gocd_verb_is_read_as_its_event(verb: str, event: str) -> None:
    stage = parse_subject(f"Stage [my-pipeline/6/my-stage/1] {verb}")
    assert stage is not None
    assert (stage.pipeline, stage.pipeline_counter, stage.stage, stage.stage_counter) == (
        "my-pipeline",
        6,
        "my-stage",
        1,
    )
    assert corrected_event(stage, None) == event


@pytest.mark.parametrize(
    "subject",
    [
        "Re: Stage [my-pipeline/6/my-stage/1] is broken",
        "Fwd: Stage [my-pipeline/6/my-stage/1] failed",
        "Server Backup Completed Successfully",
        "Stage [my-pipeline/label-6/my-stage/1] failed",
        "Stage [my-pipeline/6/my-stage/1] exploded",
        # No GoCD counter has thousands of digits (and int() of them raises).
        f"Stage [my-pipeline/{'9' * 5000}/my-stage/1] failed",
        # GoCD writes its counters in ASCII digits; these read as 3 and 1 (found by
        # tests/test_fuzz.py), so a stranger's subject became a GoCD stage.
        "Stage [my-pipeline/\u0663/my-stage/1] failed",
        "Stage [my-pipeline/6/my-stage/\uff11] failed",
        "",
    ],
)
def test_replies_forwards_and_other_subjects_are_not_stage_mails(subject: str) -> None:
    assert parse_subject(subject) is None


def test_a_subject_folded_by_javamail_is_unfolded_before_parsing() -> None:
    raw = gocd_stage_mail("Stage [ppp-release-1.2.3/12/deploy/2]\r\n is fixed")
    alert = read_gocd_alert(
        RawMessage.parse(raw), Envelope("go@example.com", (GOCD_TO,)), Context()
    )
    stage = stage_of(alert)
    assert stage is not None
    assert stage.pipeline == "ppp-release-1.2.3"
    assert alert.event == "FIXED"


def _read_gocd_mail(name: str) -> Any:
    raw = (GOCD_MAILS / name).read_bytes()
    return read_gocd_alert(RawMessage.parse(raw), Envelope("go@example.com", (GOCD_TO,)), Context())


@pytest.mark.parametrize(
    ("name", "locator", "event"),
    [
        ("stage-broken.eml", "my-pipeline/6/my-stage/1", "BREAKS"),
        ("stage-broken-pre26.eml", "my-pipeline/6/my-stage/1", "BREAKS"),
        ("stage-cancelled.eml", "my-pipeline/6/my-stage/1", "CANCELLED"),
        ("stage-failed.eml", "my-pipeline/6/my-stage/1", "FAILS"),
        ("stage-fixed.eml", "my-pipeline/6/my-stage/1", "FIXED"),
        ("stage-materials.eml", "my-pipeline/10/my-stage/1", "FIXED"),
        ("stage-nochanges.eml", "my-pipeline/11/my-stage/1", "PASSES"),
        ("stage-passed.eml", "my-pipeline/6/my-stage/1", "PASSES"),
        ("stage-utf8-qp.eml", "my-pipeline/8/my-stage/1", "FAILS"),
    ],
)
def test_each_stage_mail_gocd_sends_is_read_with_its_stage_event_and_details_url(
    name: str, locator: str, event: str
) -> None:
    alert = _read_gocd_mail(name)
    stage = stage_of(alert)
    assert stage is not None
    assert stage.locator == locator
    assert alert.event == event
    assert alert.link is not None
    assert alert.link.endswith(f"/go/pipelines/{locator}")
    assert "Sent by Go" not in str(alert.facts["changes"])


@pytest.mark.parametrize(
    ("name", "author"),
    [
        ("stage-broken.eml", "Jane Doe <jane@example.com>"),
        ("stage-broken-pre26.eml", "Jane Doe <jane@example.com>"),
        ("stage-utf8-qp.eml", "J\u00f6rg M\u00fcller <jm@example.com>"),
        ("stage-materials.eml", "modified by carol"),
    ],
)
def test_the_changes_of_a_gocd_mail_are_read_under_either_heading_and_any_charset(
    name: str, author: str
) -> None:
    assert author in str(_read_gocd_mail(name).facts["changes"])


@pytest.mark.parametrize(
    "name",
    [
        "backup-failed.eml",
        "backup-ok.eml",
        "disk-artifacts-low.eml",
        "disk-artifacts-none.eml",
        "disk-db-low.eml",
        "test-mail.eml",
    ],
)
def test_gocds_other_mails_are_no_stage_mails_and_have_no_event(name: str) -> None:
    alert = _read_gocd_mail(name)
    assert stage_of(alert) is None
    assert alert.event is None
    assert alert.subject


def test_details_url_and_changes_are_read_from_a_quoted_printable_body() -> None:
    body = (
        "See details: https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1\n\n"
        "-- CHANGES --\n\nGit: https://git.example.com/app.git\n"
        "revision: 1f5557f8, modified by J\u00f6rg M\u00fcller <jm@example.com> on 2024-03-15\n"
        "Fix it\n\nSent by Go on behalf of ci-robot\n"
    )
    encoded = quopri.encodestring(body.replace("\n", "\r\n").encode("utf-8")).decode("ascii")
    raw = (
        "From: go@example.com\r\nTo: mail2alert@example.com\r\n"
        "Subject: Stage [my-pipeline/6/my-stage/1] failed\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        "\r\n" + encoded
    ).encode("ascii")
    alert = read_gocd_alert(
        RawMessage.parse(raw), Envelope("go@example.com", (GOCD_TO,)), Context()
    )
    changes = str(alert.facts["changes"])
    assert alert.link == "https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1"
    assert changes
    assert "J\u00f6rg M\u00fcller" in changes
    assert "Sent by Go" not in changes


@pytest.mark.parametrize(
    ("verb", "last", "event"),
    [
        ("failed", "passed", "BREAKS"),
        ("passed", "failed", "FIXED"),
        ("failed", "failed", "FAILS"),
        ("passed", "passed", "PASSES"),
        ("is broken", "failed", "BREAKS"),
        ("is cancelled", "passed", "CANCELLED"),
        ("is cancelled", "failed", "CANCELLED"),
    ],
)
def test_the_event_is_corrected_by_the_last_known_result(verb: str, last: str, event: str) -> None:
    stage = parse_subject(f"Stage [p/1/s/1] {verb}")
    assert stage is not None
    assert corrected_event(stage, last) == event


# -- GoCD's payloads -------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["admin", "dashboard", "legacy"])
def test_all_three_payload_shapes_give_the_same_groups(endpoint: str) -> None:
    groups = parse_groups(FakeGoCD(GROUPS).payload(endpoint))
    assert dict(groups.groups) == {g: tuple(p) for g, p in GROUPS.items()}
    assert groups.in_group("PPP", "My-Group")
    assert groups.group_of("deploy-infra") == "infra"


@pytest.mark.parametrize(
    "payload", [{}, {"_embedded": {"groups": []}}, [], {"x": 1}, [{"nope": 1}]]
)
def test_an_empty_or_strange_payload_is_a_gocd_error(payload: Any) -> None:
    with pytest.raises(GocdError):
        parse_groups(payload)


def test_cctray_as_gocd_writes_it_with_a_declaration_and_breakers_lists_its_stages() -> None:
    xml = FakeGoCD(
        GROUPS, cctray={("My-Pipeline", "my-stage"): "Failure", ("ppp", "build"): "Success"}
    ).cctray_xml()
    assert xml.startswith('<?xml version="1.0" encoding="utf-8"?>')
    assert 'kind="Breakers"' in xml
    assert parse_cctray(xml.encode()) == {
        ("My-Pipeline", "my-stage"): "failed",
        ("ppp", "build"): "passed",
    }


def test_cctray_gives_stage_results_and_skips_jobs_and_unknown_statuses() -> None:
    xml = (
        '<Projects><Project name="my-pipeline :: my-stage" lastBuildStatus="Failure"/>'
        '<Project name="my-pipeline :: my-stage :: unit" lastBuildStatus="Success"/>'
        '<Project name="ppp :: build" lastBuildStatus="Success"/>'
        '<Project name="odd :: build" lastBuildStatus="Unknown"/></Projects>'
    )
    assert parse_cctray(xml) == {("my-pipeline", "my-stage"): "failed", ("ppp", "build"): "passed"}


# -- the client against a fake GoCD ----------------------------------------------------------


def _fetch(client: GocdClient) -> dict[str, tuple[str, ...]]:
    return dict(asyncio.run(client.pipeline_groups()).groups)


def test_the_admin_api_is_used_with_its_vendor_accept_header() -> None:
    with FakeGoCD(GROUPS) as gocd:
        client = GocdClient(gocd.url)
        assert _fetch(client) == {g: tuple(p) for g, p in GROUPS.items()}
        assert gocd.requests[0] == (
            "/go/api/admin/pipeline_groups",
            "application/vnd.go.cd.v1+json",
            200,
        )


def test_a_non_admin_falls_back_to_the_dashboard_api() -> None:
    with FakeGoCD(GROUPS, admin_forbidden=True) as gocd:
        client = GocdClient(gocd.url)
        assert "ppp" in _fetch(client)["my-group"]
        assert [(p, s) for p, _, s in gocd.requests] == [
            ("/go/api/admin/pipeline_groups", 403),
            ("/go/api/dashboard", 200),
        ]
        assert client.endpoint is not None
        assert client.endpoint.name == "dashboard"


def test_an_old_gocd_falls_back_to_the_legacy_api_and_it_is_remembered() -> None:
    with FakeGoCD(GROUPS, endpoints=("legacy", "cctray")) as gocd:
        client = GocdClient(gocd.url)
        _fetch(client)
        _fetch(client)
        paths = [p for p, _, _ in gocd.requests]
        assert paths == [
            "/go/api/admin/pipeline_groups",
            "/go/api/dashboard",
            "/go/api/config/pipeline_groups",
            "/go/api/config/pipeline_groups",
        ]


def test_an_unchanged_answer_is_a_304_thanks_to_the_etag_jetty_marked_gzip() -> None:
    with FakeGoCD(GROUPS) as gocd:
        client = GocdClient(gocd.url)
        first = asyncio.run(client.pipeline_groups())
        second = asyncio.run(client.pipeline_groups())
        assert [s for _, _, s in gocd.requests] == [200, 304]
        assert gocd.if_none_match[1].endswith('--gzip"')
        assert second.groups == first.groups


def test_a_304_refreshes_when_the_groups_were_fetched() -> None:
    with FakeGoCD(GROUPS) as gocd:
        client = GocdClient(gocd.url)
        first = asyncio.run(client.pipeline_groups())
        second = asyncio.run(client.pipeline_groups())
        assert [s for _, _, s in gocd.requests] == [200, 304]
        assert second.fetched_at > first.fetched_at


def test_the_etag_of_an_answer_that_was_not_accepted_is_not_sent_again() -> None:
    """GoCD answers 200 with groups mail2alert cannot use (none): had it kept that ETag, the
    next poll would get a 304 for the same useless answer, and nothing to use."""
    with FakeGoCD({}) as gocd:
        client = GocdClient(gocd.url)
        for _ in range(2):
            with pytest.raises(GocdError, match="no pipeline groups"):
                asyncio.run(client.pipeline_groups())
        assert [s for _, _, s in gocd.requests] == [200, 200]


def test_basic_auth_is_sent_and_wrong_credentials_are_an_error_without_the_password() -> None:
    with FakeGoCD(GROUPS, user="olle", password="pelle") as gocd:
        assert _fetch(GocdClient(gocd.url, user="olle", password=Secret("pelle")))
        with pytest.raises(GocdError) as caught:
            _fetch(GocdClient(gocd.url, user="olle", password=Secret("wrong-secret")))
        assert "401" in str(caught.value)
        assert "wrong-secret" not in str(caught.value)


def test_a_401_is_not_retried_on_the_other_endpoints() -> None:
    """GoCD answers 401 on every path: trying the dashboard and legacy APIs with the same
    credentials would only be two more failed logins."""
    with FakeGoCD(GROUPS, user="olle", password="pelle") as gocd:
        client = GocdClient(gocd.url, user="olle", password=Secret("wrong-secret"))
        with pytest.raises(GocdError, match="HTTP 401") as caught:
            _fetch(client)
        assert caught.value.status == 401
        assert [(p, s) for p, _, s in gocd.requests] == [("/go/api/admin/pipeline_groups", 401)]


def test_a_token_is_sent_as_a_bearer_authorization() -> None:
    with FakeGoCD(GROUPS, token="t0k3n") as gocd:
        assert _fetch(GocdClient(gocd.url, token=Secret("t0k3n")))
        with pytest.raises(GocdError):
            _fetch(GocdClient(gocd.url, token=Secret("other")))


def test_an_unreachable_gocd_is_an_error_naming_the_url() -> None:
    gocd = FakeGoCD(GROUPS)  # never started: nothing listens on its port
    with pytest.raises(
        GocdError, match=r"127\.0\.0\.1:\d+/go/api/admin/pipeline_groups unreachable"
    ):
        _fetch(GocdClient(gocd.url, timeout=5))


def test_the_stage_history_gives_the_latest_run_that_passed_or_failed() -> None:
    """Cancelled runs and runs still going say nothing of the result: the run before them
    does. A stage GoCD does not show is left out."""
    history = {
        ("my-pipeline", "cancelled"): ["Cancelled", "Passed", "Failed"],
        ("my-pipeline", "building"): ["Unknown", "Failed"],
        ("my-pipeline", "passed"): ["Passed", "Failed"],
        ("my-pipeline", "never-ended"): ["Cancelled"],
    }
    with FakeGoCD(GROUPS, history=history) as gocd:
        results = asyncio.run(GocdClient(gocd.url).latest_results([*history, ("gone", "x")]))
        assert results == {
            ("my-pipeline", "cancelled"): "passed",
            ("my-pipeline", "building"): "failed",
            ("my-pipeline", "passed"): "passed",
        }
        assert {a for p, a, _ in gocd.requests} == {"application/vnd.go.cd.v3+json"}


# -- the fake GoCD behaves as GoCD ----------------------------------------------------------


def _get(url: str, **headers: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_the_fake_gocd_answers_401_with_www_authenticate_on_every_path() -> None:
    with FakeGoCD(GROUPS, user="olle", password="pelle") as gocd:
        for path in (
            "/api/admin/pipeline_groups",
            "/api/dashboard",
            "/api/config/pipeline_groups",
            "/cctray.xml",
            "/api/stages/ppp/build/history",
            "/no/such/page",
        ):
            status, headers = _get(gocd.url + path)
            assert (status, headers.get("WWW-Authenticate")) == (401, 'Basic realm="GoCD"'), path


def test_the_fake_gocd_matches_the_accept_header_exactly() -> None:
    with FakeGoCD(GROUPS) as gocd:
        url = f"{gocd.url}/api/dashboard"
        assert _get(url, Accept="application/vnd.go.cd.v4+json")[0] == 200
        assert _get(url, Accept="application/vnd.go.cd+json")[0] == 200
        assert _get(url, Accept="application/vnd.go.cd.v4+json; charset=utf-8")[0] == 404
        assert _get(url, Accept="application/vnd.go.cd.v3+json")[0] == 404


def test_a_group_admin_sees_every_group_it_can_view_in_the_admin_api() -> None:
    """As GoCD's admin API does (PipelineConfigsService.getGroupsForUser: the groups the user
    may view), not only the groups it administers."""
    with FakeGoCD(GROUPS, admin_forbidden=True, group_admin_of=("infra",)) as gocd:
        client = GocdClient(gocd.url)
        assert _fetch(client) == {"my-group": ("ppp", "my-pipeline"), "infra": ("deploy-infra",)}
        assert client.endpoint is not None
        assert client.endpoint.path == "/api/admin/pipeline_groups"
    with FakeGoCD(GROUPS, admin_forbidden=True) as gocd:
        status = _get(
            f"{gocd.url}/api/admin/pipeline_groups", Accept="application/vnd.go.cd.v1+json"
        )[0]
        assert status == 403


# -- the poller --------------------------------------------------------------------------------


class Fed:
    """What a poller fed: snapshots and notes."""

    def __init__(self) -> None:
        self.snapshots: list[object] = []
        self.notes: list[Note] = []

    def feed(self) -> Feed:
        return Feed(
            snapshot=lambda label, snapshot: self.snapshots.append(snapshot),
            notes=lambda notes: self.notes.extend(notes),
        )


def _poller(gocd: FakeGoCD, tmp_path: Path, fed: Fed, **options: Any) -> GroupPoller:
    made = keeper(
        "gocd#0", {"url": gocd.url, "poll-interval": 1.0, **options}, tmp_path, fed.feed()
    )
    assert isinstance(made, GroupPoller)
    return made


def _polls(poller: GroupPoller, count: int) -> None:
    async def polls() -> None:
        for _ in range(count):
            await poller.poll_once()

    asyncio.run(polls())


def _history(notes: Sequence[Note]) -> dict[object, object]:
    return {n.key: n.value for n in notes if n.table == "history"}


def test_a_401_ends_the_poll_and_the_wait_doubles_up_to_ten_poll_intervals(
    tmp_path: Path,
) -> None:
    with FakeGoCD(GROUPS, user="olle", password="pelle") as gocd:
        poller = _poller(gocd, tmp_path, Fed(), user="olle", passwd=Secret("wrong"))
        waits = []
        for _ in range(5):
            _polls(poller, 1)
            waits.append(poller.delay)
        assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]
        assert {p for p, _, _ in gocd.requests} == {"/go/api/admin/pipeline_groups"}
        assert len(gocd.requests) == 5
        gocd.password = "wrong"
        _polls(poller, 1)
        assert poller.delay == 1.0


def test_the_history_is_seeded_once_from_the_stage_history_of_each_stage_in_cctray(
    tmp_path: Path,
) -> None:
    """cctray shows a cancelled run as Failure: the stage history says the run before passed."""
    with FakeGoCD(
        GROUPS,
        cctray={("My-Pipeline", "My-Stage"): "Failure"},
        history={("My-Pipeline", "My-Stage"): ["Cancelled", "Passed"]},
    ) as gocd:
        fed = Fed()
        _polls(_poller(gocd, tmp_path, fed), 2)
        assert _history(fed.notes) == {("my-pipeline", "my-stage"): "passed"}
        paths = [p for p, _, _ in gocd.requests]
        assert paths.count("/go/cctray.xml") == 1
        assert paths.count("/go/api/stages/My-Pipeline/My-Stage/history") == 1


def test_cctray_is_read_again_each_poll_until_it_has_been_read_once(tmp_path: Path) -> None:
    with FakeGoCD(
        GROUPS, cctray={("ppp", "build"): "Success"}, endpoints=("admin", "history")
    ) as gocd:
        fed = Fed()
        poller = _poller(gocd, tmp_path, fed)
        _polls(poller, 1)
        assert _history(fed.notes) == {}
        gocd.endpoints = ("admin", "history", "cctray")
        _polls(poller, 2)
        assert _history(fed.notes) == {("ppp", "build"): "passed"}
        assert [p for p, _, _ in gocd.requests].count("/go/cctray.xml") == 2


def test_a_401_from_the_stage_history_asks_about_no_further_stage() -> None:
    history = {("ppp", "build"): ["Passed"], ("ppp", "test"): ["Failed"]}
    with FakeGoCD(GROUPS, user="olle", password="pelle", history=history) as gocd:
        client = GocdClient(gocd.url, user="olle", password=Secret("wrong"))
        with pytest.raises(GocdError, match="HTTP 401") as caught:
            asyncio.run(client.latest_results(list(history)))
        assert caught.value.status == 401
        assert len(gocd.requests) == 1


def test_a_dashboard_answering_202_is_gocd_starting_logged_at_info_not_a_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeGoCD(GROUPS, admin_forbidden=True) as gocd:
        gocd.starting = True
        fed = Fed()
        poller = _poller(gocd, tmp_path, fed)
        with caplog.at_level(logging.INFO, logger="mail2alert.gocd.poller"):
            _polls(poller, 2)
            gocd.starting = False
            _polls(poller, 1)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines if level >= logging.WARNING] == []
    assert [m for _, m in lines if "GoCD is starting" in m] != []
    assert len([m for _, m in lines if "202" in m]) == 1
    assert len(fed.snapshots) == 1


def test_an_admin_polling_a_starting_gocd_sees_503_from_the_admin_api_and_does_not_shout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While GoCD starts, its dashboard answers 202 and its other endpoints 503 (the admin
    API an admin user is polled on): both are GoCD starting, said at INFO."""
    with FakeGoCD(GROUPS) as gocd:
        gocd.starting = True
        fed = Fed()
        poller = _poller(gocd, tmp_path, fed)
        with caplog.at_level(logging.INFO, logger="mail2alert.gocd.poller"):
            _polls(poller, 2)
            while_starting = (poller.state, dict(poller.polls))
            gocd.starting = False
            _polls(poller, 1)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [m for level, m in lines if level >= logging.WARNING] == []
    assert while_starting[0].startswith("starting: ")
    assert "answered HTTP 503" in while_starting[0]
    assert while_starting[1] == {"ok": 0, "starting": 2, "failed": 0}
    assert [m for _, m in lines if "GoCD has started" in m] != []
    assert len(fed.snapshots) == 1


def test_a_gocd_still_starting_after_fifteen_minutes_is_trouble_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A GoCD that never comes up, or a proxy that answers 503 for one that is gone: after
    STILL_STARTING it is a failure, warned once, and its recovery is said."""
    clock = FakeClock()
    with FakeGoCD(GROUPS) as gocd:
        gocd.failing = 503
        poller = _poller(gocd, tmp_path, Fed())
        poller.clock = clock
        with caplog.at_level(logging.INFO, logger="mail2alert.gocd.poller"):
            _polls(poller, 1)
            clock.advance(STILL_STARTING - 1)
            _polls(poller, 1)
            assert poller.health().ok is False
            assert poller.polls == {"ok": 0, "starting": 2, "failed": 0}
            clock.advance(1)
            _polls(poller, 2)
            failing = poller.health()
            gocd.failing = None
            _polls(poller, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "answered HTTP 503: GoCD is starting, for over 15 minutes" in warnings[0]
    assert failing.polls == {"ok": 0, "starting": 2, "failed": 2}
    assert "for over 15 minutes" in failing.last_error
    assert [r for r in caplog.records if "GoCD recovered" in r.getMessage()] != []


def test_a_login_written_into_the_url_is_used_and_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``url: https://olle:secret@ci.example.com/go`` works as ``user`` and ``passwd`` do, and
    the URL that log lines and errors name is the one without them."""
    with FakeGoCD(GROUPS, user="olle", password="pelle-S3cret") as gocd:
        url = gocd.url.replace("://", "://olle:pelle-S3cret@")
        poller = _poller(gocd, tmp_path, Fed(), url=url)
        with caplog.at_level(logging.INFO, logger="mail2alert.gocd.poller"):
            _polls(poller, 1)
            gocd.failing = 500
            _polls(poller, 1)
    assert poller.client.url == gocd.url
    lines = [r.getMessage() for r in caplog.records]
    assert any("2 pipeline groups" in line for line in lines)  # it logged in
    assert any("answered HTTP 500" in line for line in lines)
    assert not [line for line in lines if "S3cret" in line]
    assert "S3cret" not in poller.health().last_error


# -- end to end ------------------------------------------------------------------------------


def _gocd_manager(url: str, **extra: Any) -> dict[str, Any]:
    manager = example_managers("gocd")[0]
    manager.update({"url": url, "poll-interval": 0.2, **extra})
    return manager


@pytest.fixture
def gocd() -> Iterator[FakeGoCD]:
    with FakeGoCD(GROUPS, user="olle", password="pelle") as server:
        yield server


def _config(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, *managers: dict[str, Any]
) -> Path:
    return write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=data_dir,
        managers=list(managers) or [*example_managers("mail")],
    )


def _wait_for_groups(data_dir: Path, gocd: FakeGoCD) -> None:
    """Wait until mail2alert has pipeline groups (it saves them once it routes by them)."""
    wait_until(lambda: snapshot_path(data_dir, gocd.url).exists(), what="pipeline groups")


def _stage(subject: str, to: str = GOCD_TO) -> bytes:
    return gocd_stage_mail(subject, to=to)


def _routed(port: int, subject: str) -> str:
    return send(port, _stage(subject), rcpt_tos=[GOCD_TO]).queue_id


EXAMPLE_CASES = [
    # (subject, delivered to cat@ by the example's rules?); every case has its own stage, so
    # the history of one case does not correct the event of the next.
    ("Stage [my-pipeline/6/s1/1] is broken", True),
    ("Stage [my-pipeline/6/s2/1] is fixed", False),
    ("Stage [my-pipeline/6/s3/1] failed", False),
    ("Stage [my-pipeline/6/s4/1] passed", False),
    ("Stage [my-pipeline/6/s5/1] is cancelled", False),
    ("Stage [ppp-release-1.2.3/12/s6/2] is broken", True),
    ("Stage [ppp-release-1.2.3/12/s7/2] is fixed", True),
    ("Stage [ppp-release-1.2.3/12/s8/2] passed", False),
    ("Stage [ppp-release-1.2.3/12/s9/2] is cancelled", False),
    ("Stage [PPP-Release-2/1/s10/1] is fixed", True),
    ("Stage [deploy-infra/3/s11/1] is broken", False),
    ("Stage [unknown-pipeline/3/s12/1] is broken", False),
    ("Stage [unknown-release-2/3/s13/1] is fixed", False),
]


def test_every_event_and_rule_function_of_the_example_routes_as_described(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    gocd_manager = _gocd_manager(gocd.url)
    path = _config(tmp_path, upstream, data_dir, gocd_manager, *example_managers("mail"))
    outbox = OutboxView(data_dir)
    with running(path) as service:
        _wait_for_groups(data_dir, gocd)
        expected = 0
        for subject, delivered in EXAMPLE_CASES:
            queue_id = _routed(service.port, subject)
            row = wait_until(lambda q=queue_id: outbox.message(q), what=subject)
            assert row["outcome"] == ("deliver" if delivered else "drop"), (subject, row)
            if delivered:
                expected += 1
                got = upstream.wait_for(expected)[-1]
                assert got.rcpt_tos == ("cat@example.com",), subject
                assert f"Subject: {subject}".encode() in got.data
    assert len(upstream.messages) == expected


def test_a_gocd_mail_that_is_not_a_stage_mail_matches_only_rules_without_events(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    manager = _gocd_manager(gocd.url)
    manager["rules"] = [
        *manager["rules"],
        {
            "actions": ["mailto:ops@example.com"],
            "filter": {"function": "mail.in_subject", "args": ["disk", "space"]},
        },
        {"actions": ["mailto:never@example.com"], "filter": {"function": "pipelines.any"}},
    ]
    path = _config(tmp_path, upstream, data_dir, manager)
    with running(path) as service:
        subject = "Low artifacts disk space warning message from Go Server at 10.0.0.1"
        send(service.port, _stage(subject), rcpt_tos=[GOCD_TO])
        assert upstream.wait_for(1)[0].rcpt_tos == ("ops@example.com",)


def test_mail_is_held_while_gocd_is_down_at_start_and_routed_when_it_comes_up(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    gocd = FakeGoCD(GROUPS)
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
    outbox = OutboxView(data_dir)
    with running(path) as service:
        queue_id = _routed(service.port, "Stage [my-pipeline/6/my-stage/1] is broken")
        assert wait_until(lambda: outbox.message(queue_id))["outcome"] == "hold"
        assert upstream.messages == []
        with gocd:
            assert upstream.wait_for(1)[0].rcpt_tos == ("cat@example.com",)
        assert outbox.message(queue_id)["outcome"] == "deliver"


def test_mail_an_intake_worker_held_without_a_snapshot_goes_out_once_the_holds_are_told(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    # An intake worker reads GoCD's snapshot from data-dir a second after the main process
    # has it, and holds what arrives meanwhile; the main process heard its news before.
    manager = _gocd_manager(gocd.url, **{"poll-interval": 600})
    path = _config(tmp_path, upstream, data_dir, manager)
    with running(path) as service:
        _routed(service.port, "Stage [my-pipeline/5/my-stage/1] is broken")
        upstream.wait_for(1)  # the snapshot is here; the holds looked, and found nothing
        envelope = Envelope("go@example.com", (GOCD_TO,))
        mail = _stage("Stage [my-pipeline/6/my-stage/1] is broken")
        no_snapshot = Context()
        held = accept("HELDBYWORKER", envelope, mail, service.service.managers, no_snapshot)
        assert held.decision.outcome == "hold"
        worker = Outbox(data_dir)
        worker.put([held])
        worker.close()

        async def told() -> None:  # what the worker writes to the main process's wake pipe
            service.service.woken(COMMITTED + HELD)

        service.call(told())
        # Told, the holds look now: their next look of their own is 5 s away.
        assert upstream.wait_for(2, timeout=2.0)[1].rcpt_tos == ("cat@example.com",)


def test_a_gocd_manager_whose_keeper_cannot_be_made_refuses_the_reload(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    """A ``ca-file`` that is there but is no CA bundle (half written by config management,
    say): the reload is refused before anything switched, the poller goes on, and once the
    file is fixed the next reload takes it. (A keeper that cannot be made for another reason
    refuses it the same way, while the reload prepares.)"""
    ca_path = tmp_path / "gocd-ca.pem"
    with FakeGoCD(GROUPS) as gocd:
        path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
        with running(path) as service:
            _wait_for_groups(data_dir, gocd)
            before = service.service.managers
            ca_path.write_text("being replaced\n")
            broken = _gocd_manager(gocd.url, **{"ca-file": str(ca_path)})
            _config(tmp_path, upstream, data_dir, broken)
            first = service.call(service.service.reload())
            refused = (service.service.managers is before, service.service.reload_status)
            trustme.CA().cert_pem.write_to_path(str(ca_path))
            second = service.call(service.service.reload())
            keepers = service.service.component(Keepers)
            assert keepers is not None
            polling = [t for t in keepers._tasks if not t.done()]
    assert first is False
    assert refused[0]
    assert not refused[1].ok  # the file is checked as a CA bundle with the configuration
    assert second is True
    assert len(polling) == 1


def test_a_gocd_manager_pointed_at_another_gocd_waits_for_its_groups(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    """The old server's pipeline groups say nothing of the new one's: mail that needs them is
    held until the new GoCD answers, not routed by the old groups."""
    old = FakeGoCD(GROUPS)
    new = FakeGoCD({"other-group": ["something-else"]})  # not started: it has said nothing
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(old.url))
    outbox = OutboxView(data_dir)
    with old, running(path) as service:
        _wait_for_groups(data_dir, old)
        _config(tmp_path, upstream, data_dir, _gocd_manager(new.url))
        assert service.call(service.service.reload()) is True
        assert "gocd#0" not in service.service.context.snapshots
        queue_id = send(
            service.port, _stage("Stage [my-pipeline/6/my-stage/1] is broken"), rcpt_tos=[GOCD_TO]
        ).queue_id
        message = wait_until(lambda: outbox.message(queue_id), what="the decision")
    assert message["outcome"] == "hold"


def test_an_intake_worker_tells_the_main_process_what_it_committed_through_the_wake_pipe() -> None:
    class Main:
        def __init__(self) -> None:
            self.told: list[bytes] = []

        def woken(self, told: bytes) -> None:
            self.told.append(told)

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    try:
        write_wake(write_fd, COMMITTED)
        write_wake(write_fd, COMMITTED)
        write_wake(write_fd, HELD)
        main = Main()
        woken(read_fd, main)  # what the main process's loop calls when the pipe is readable
        woken(read_fd, main)  # nothing more to read: told nothing, never blocked
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert main.told == [COMMITTED + COMMITTED + HELD, b""]


def test_the_wake_pipe_at_its_end_is_no_more_listened_to() -> None:
    """Once every intake worker has stopped, the pipe stays readable at its end: the main
    process stops listening to it, instead of being called without end while it stops."""
    told: list[bytes] = []
    ended: list[bool] = []

    class Main:
        def woken(self, what: bytes) -> None:
            told.append(what)

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    try:
        write_wake(write_fd, COMMITTED)
        os.close(write_fd)
        woken(read_fd, Main(), lambda: ended.append(True))
        woken(read_fd, Main(), lambda: ended.append(True))
    finally:
        os.close(read_fd)
    assert (told, ended) == ([COMMITTED], [True])


def test_each_message_held_while_gocd_is_down_is_looked_at_once_not_with_every_other(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every message held pokes the holds; a poke looks at the mail held since the last look,
    # so N held messages are routed again N times, not N * (N + 1) / 2.
    looked: list[str] = []

    def counting(queue_id: str, *args: Any, **kwargs: Any) -> Any:
        looked.append(queue_id)
        return accept(queue_id, *args, **kwargs)

    monkeypatch.setattr("mail2alert.components.accept", counting)
    gocd = FakeGoCD(GROUPS)  # never started
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
    with running(path) as service:
        held = [_routed(service.port, f"Stage [p{n}/1/s/1] is broken") for n in range(30)]
        # Looked at as they are held: the periodic look at all of them is 5 s away.
        wait_until(lambda: set(held) <= set(looked), timeout=3.0, what="each looked at")
    # Once each (and once more at most, had a periodic look come meanwhile).
    assert len(looked) <= 2 * len(held)


def test_held_mail_goes_to_the_fallback_when_gocd_stays_down_past_hold_max(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gocd = FakeGoCD(GROUPS)  # never started
    manager = _gocd_manager(
        gocd.url, **{"hold-max": 0.5, "fallback": ["mailto:oncall@example.com"]}
    )
    path = _config(tmp_path, upstream, data_dir, manager)
    with caplog.at_level(logging.WARNING), running(path) as service:
        _routed(service.port, "Stage [my-pipeline/6/my-stage/1] is broken")
        assert upstream.wait_for(1)[0].rcpt_tos == ("oncall@example.com",)
    assert "fallback" in caplog.text


def test_held_mail_is_relayed_unchanged_past_hold_max_without_a_fallback(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    gocd = FakeGoCD(GROUPS)  # never started
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url, **{"hold-max": 0.5}))
    with running(path) as service:
        _routed(service.port, "Stage [my-pipeline/6/my-stage/1] is broken")
        assert upstream.wait_for(1)[0].rcpt_tos == (GOCD_TO,)


def test_the_last_snapshot_is_used_when_gocd_goes_down_later(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
    with running(path) as service:
        _wait_for_groups(data_dir, gocd)
        gocd.stop()
        _routed(service.port, "Stage [my-pipeline/6/my-stage/1] is broken")
        assert upstream.wait_for(1)[0].rcpt_tos == ("cat@example.com",)


def test_a_restart_while_gocd_is_down_routes_by_the_persisted_snapshot(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
    with running(path):
        wait_until(lambda: snapshot_path(data_dir, gocd.url).exists(), what="a snapshot file")
    gocd.stop()
    with running(path) as service:
        _routed(service.port, "Stage [ppp-release-1.2.3/12/deploy/2] is fixed")
        assert upstream.wait_for(1)[0].rcpt_tos == ("cat@example.com",)


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_groups_are_read_with_basic_auth_or_a_token_from_the_environment(
    tmp_path: Path,
    upstream: CaptureServer,
    data_dir: Path,
    auth: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOPASS", "s3cret")
    server = FakeGoCD(
        GROUPS,
        **({"user": "olle", "password": "s3cret"} if auth == "basic" else {"token": "s3cret"}),
    )
    creds = {"user": "olle", "passwd": "$GOPASS"} if auth == "basic" else {"token": "${GOPASS}"}
    manager = _gocd_manager(server.url)
    manager.pop("user")
    manager.pop("passwd")
    manager.update(creds)
    path = _config(tmp_path, upstream, data_dir, manager)
    with server, running(path) as service:
        _routed(service.port, "Stage [my-pipeline/6/my-stage/1] is broken")
        assert upstream.wait_for(1)[0].rcpt_tos == ("cat@example.com",)
        assert all(
            status in (200, 304) for p, _, status in server.requests if "pipeline_groups" in p
        )


def test_gocd_failures_are_logged_once_per_change_without_credentials(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gocd = FakeGoCD(GROUPS, user="olle", password="other-password")
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
    with caplog.at_level(logging.INFO), gocd, running(path):
        gocd.wait_requests("pipeline_groups", count=2)  # two polls 0.4s apart, the next 0.8s on
        gocd.password = "pelle"
        wait_until(lambda: "recovered" in caplog.text, what="a recovery line")
    failing = [r for r in caplog.records if "GoCD failing" in r.getMessage()]
    assert len(failing) == 1
    assert "401" in failing[0].getMessage()
    assert "pelle" not in caplog.text
    refused = [p for p, _, status in gocd.requests if status == 401]
    assert set(refused) == {"/go/api/admin/pipeline_groups"}  # no other endpoint tried


def test_the_history_corrects_a_failed_after_a_pass_to_breaks_across_a_restart(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    manager = _gocd_manager(gocd.url)
    manager["rules"] = [
        {
            "actions": ["mailto:cat@example.com"],
            "filter": {"function": "pipelines.any", "events": ["BREAKS", "FIXED"]},
        }
    ]
    path = _config(tmp_path, upstream, data_dir, manager)
    with running(path) as service:
        _routed(service.port, "Stage [my-pipeline/6/my-stage/1] passed")
        outbox = OutboxView(data_dir)
        wait_until(lambda: outbox.notes("history"), what="a history row")
    with running(path) as service:
        # GoCD lost its own memory in a restart and says "failed": it was a breakage.
        _routed(service.port, "Stage [my-pipeline/7/my-stage/1] failed")
        assert upstream.wait_for(1)[0].rcpt_tos == ("cat@example.com",)
        # fail -> cancel -> pass: GoCD says "passed"; mail2alert knows it was fixed.
        _routed(service.port, "Stage [my-pipeline/8/my-stage/1] is cancelled")
        _routed(service.port, "Stage [my-pipeline/9/my-stage/1] passed")
        assert len(upstream.wait_for(2)) == 2


def test_the_history_is_seeded_from_cctray(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path
) -> None:
    server = FakeGoCD(GROUPS, cctray={("my-pipeline", "my-stage"): "Failure"})
    manager = _gocd_manager(server.url)
    manager["rules"] = [
        {
            "actions": ["mailto:cat@example.com"],
            "filter": {"function": "pipelines.any", "events": ["FIXED"]},
        }
    ]
    path = _config(tmp_path, upstream, data_dir, manager)
    with server, running(path) as service:
        server.wait_requests("cctray.xml")
        wait_until(lambda: OutboxView(data_dir).notes("history"), what="seeding")
        _routed(service.port, "Stage [my-pipeline/6/my-stage/1] passed")
        assert upstream.wait_for(1)[0].rcpt_tos == ("cat@example.com",)


@pytest.mark.parametrize(
    ("cctray", "runs", "seed", "subject", "event"),
    [
        # A cancelled run after a pass shows as Failure: the next pass is no fix.
        ("Failure", ["Cancelled", "Passed"], "passed", "passed", "FIXED"),
        # A run building after a GoCD restart may show Success: the next failure is no break.
        ("Success", ["Unknown", "Failed"], "failed", "failed", "BREAKS"),
    ],
)
def test_a_seed_from_cctray_never_makes_a_false_fixed_or_breaks(
    tmp_path: Path,
    upstream: CaptureServer,
    data_dir: Path,
    cctray: str,
    runs: list[str],
    seed: str,
    subject: str,
    event: str,
) -> None:
    server = FakeGoCD(
        GROUPS,
        cctray={("my-pipeline", "my-stage"): cctray},
        history={("my-pipeline", "my-stage"): runs},
    )
    manager = _gocd_manager(server.url)
    manager["rules"] = [
        {
            "actions": ["mailto:cat@example.com"],
            "filter": {"function": "pipelines.any", "events": [event]},
        }
    ]
    path = _config(tmp_path, upstream, data_dir, manager)
    outbox = OutboxView(data_dir)
    key = ("my-pipeline", "my-stage")
    with server, running(path) as service:
        seeded = wait_until(lambda: service.service.context.recall("history", key), what="a seed")
        assert seeded == seed
        queue_id = _routed(service.port, f"Stage [my-pipeline/7/my-stage/1] {subject}")
        assert wait_until(lambda: outbox.message(queue_id))["outcome"] == "drop"
    assert upstream.messages == []


def test_gocds_own_stage_and_backup_mails_are_routed_by_the_example_rules(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url), *example_managers("mail"))
    with running(path) as service:
        _wait_for_groups(data_dir, gocd)
        raw = (GOCD_MAILS / "stage-broken.eml").read_bytes()
        send(service.port, raw, rcpt_tos=[GOCD_TO])
        assert upstream.wait_for(1)[0].rcpt_tos == ("cat@example.com",)
        raw = (GOCD_MAILS / "backup-failed.eml").read_bytes()
        send(service.port, raw, mail_from="go@example.com", rcpt_tos=["admin@example.com"])
        assert upstream.wait_for(2)[1].rcpt_tos == ("sys@example.com", "op@example.com")


def test_the_same_gocd_event_sent_to_several_users_is_delivered_once(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
    outbox = OutboxView(data_dir)
    with running(path) as service:
        _wait_for_groups(data_dir, gocd)
        ids = [
            _routed(service.port, "Stage [my-pipeline/6/my-stage/1] is broken") for _ in range(3)
        ]
        ids.append(_routed(service.port, "Stage [my-pipeline/7/my-stage/1] is broken"))
        upstream.wait_for(2)
        outcomes = [wait_until(lambda q=q: outbox.message(q))["outcome"] for q in ids]
    assert outcomes == ["deliver", "duplicate", "duplicate", "deliver"]
    assert len(upstream.messages) == 2


def test_a_duplicate_event_still_reaches_the_other_addresses_of_a_users_list(
    tmp_path: Path,
    upstream: CaptureServer,
    data_dir: Path,
    gocd: FakeGoCD,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A GoCD user's e-mail may be a list: one message to mail2alert@ and bob@. Only the copy
    for mail2alert@ is de-duplicated; bob@ gets the message unchanged."""
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
    real = (GOCD_MAILS / "stage-broken.eml").read_bytes()
    listed = real.replace(
        b"To: mail2alert@example.com", b"To: mail2alert@example.com, bob@example.com"
    )
    outbox = OutboxView(data_dir)
    with caplog.at_level(logging.INFO), running(path) as service:
        _wait_for_groups(data_dir, gocd)
        first = send(service.port, real, rcpt_tos=[GOCD_TO]).queue_id
        second = send(service.port, listed, rcpt_tos=[GOCD_TO, "bob@example.com"]).queue_id
        got = upstream.wait_for(2)
        assert wait_until(lambda: outbox.message(second))["outcome"] == "duplicate"
    assert (
        f"{second}: duplicate of {first} (the same event); relayed unchanged to"
        " <bob@example.com>: Stage [my-pipeline/6/my-stage/1] is broken"
    ) in caplog.messages
    assert sorted(m.rcpt_tos for m in got) == [("bob@example.com",), ("cat@example.com",)]
    (bob,) = [m for m in got if m.rcpt_tos == ("bob@example.com",)]
    # Unchanged but for the trace field on top and the CRLFs that SMTP wants of the body
    # (GoCD's ends its lines with LF and its last line with nothing).
    crlf = listed.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert bob.data.endswith(crlf + b"\r\n")


@pytest.fixture
def tls_gocd(tmp_path: Path) -> Iterator[tuple[FakeGoCD, Path]]:
    """A GoCD speaking HTTPS with a certificate from a test CA; the CA's file for ca-file."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with FakeGoCD(GROUPS, tls=server_context) as server:
        yield server, ca_file


def test_a_gocd_with_its_own_ca_is_trusted_through_ca_file(tls_gocd: tuple[FakeGoCD, Path]) -> None:
    gocd, ca_file = tls_gocd
    assert gocd.url.startswith("https://")
    assert "my-group" in _fetch(GocdClient(gocd.url, ca_file=str(ca_file)))


def test_a_gocd_certificate_that_cannot_be_verified_is_an_error(
    tls_gocd: tuple[FakeGoCD, Path],
) -> None:
    gocd, _ = tls_gocd
    with pytest.raises(GocdError, match="unreachable"):
        _fetch(GocdClient(gocd.url))


def test_verify_false_skips_the_certificate_check(tls_gocd: tuple[FakeGoCD, Path]) -> None:
    gocd, _ = tls_gocd
    assert "my-group" in _fetch(GocdClient(gocd.url, verify=False))


def test_a_duplicate_window_of_zero_delivers_every_copy(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url, **{"duplicate-window": 0}))
    with running(path) as service:
        _wait_for_groups(data_dir, gocd)
        for _ in range(2):
            _routed(service.port, "Stage [my-pipeline/6/my-stage/1] is broken")
        assert len(upstream.wait_for(2)) == 2


def test_a_stage_result_another_process_committed_corrects_the_next_event(
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    """Routing reads the history from memory, and picks up what other processes (another
    intake worker, the delivery process) commit to the outbox without a restart."""
    manager = _gocd_manager(gocd.url)
    manager["rules"] = [
        {
            "actions": ["mailto:cat@example.com"],
            "filter": {"function": "pipelines.any", "events": ["FIXED"]},
        }
    ]
    path = _config(tmp_path, upstream, data_dir, manager)
    with running(path) as service:
        other = Outbox(data_dir)  # another process's connection, as far as SQLite can tell
        try:
            other.learn([Note("history", ("my-pipeline", "my-stage"), "failed")], 0.0)
        finally:
            other.close()
        wait_until(
            lambda: service.service.context.recall("history", ("my-pipeline", "my-stage")),
            what="routing to see the committed result",
        )
        _routed(service.port, "Stage [my-pipeline/6/my-stage/1] passed")
        assert upstream.wait_for(1)[0].rcpt_tos == ("cat@example.com",)


def test_an_answer_longer_than_the_client_reads_is_an_error_on_what_it_unzips_to() -> None:
    many = {"big": [f"pipeline-{n:04d}" for n in range(400)]}
    with FakeGoCD(many) as gocd:
        assert len(_fetch(GocdClient(gocd.url))["big"]) == 400
        # The fake gzips, as GoCD's Jetty does: the limit is on what the answer unzips to.
        with pytest.raises(AnswerTooLong) as caught:
            _fetch(GocdClient(gocd.url, answer_max=4096))
    assert str(caught.value) == (
        f"{gocd.url}/api/admin/pipeline_groups answered with more than 4,096 bytes;"
        " the rest was not read"
    )


def test_an_answer_without_end_is_read_only_up_to_the_limit_then_let_go() -> None:
    with EndlessAnswer() as endless:
        with pytest.raises(AnswerTooLong):
            _fetch(GocdClient(endless.url, answer_max=1024 * 1024))
        assert endless.done.wait(15), "the client hung up"
    # What was sent beyond 1 MiB sat in the sockets' buffers: far from the 512 MiB on offer.
    assert endless.sent < 48 * 1024 * 1024
