"""The gocd manager, specified: stage mails, pipeline groups from a live (fake) GoCD, history.

End-to-end tests go smtplib -> mail2alert -> capture server, with mail2alert reading pipeline
groups from :class:`mail2alert.testing.FakeGoCD` over HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import quopri
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mail2alert.gocd.client import GocdClient, GocdError, parse_cctray, parse_groups
from mail2alert.gocd.manager import corrected_event, parse_subject, read_gocd_alert
from mail2alert.gocd.model import stage_of
from mail2alert.gocd.poller import snapshot_path
from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.managers.base import Context
from mail2alert.managers.memory import Note
from mail2alert.message import RawMessage
from mail2alert.model import Envelope, Secret
from mail2alert.outbox import Outbox
from mail2alert.testing import CaptureServer
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


def test_an_unchanged_answer_is_a_304_thanks_to_the_etag() -> None:
    with FakeGoCD(GROUPS) as gocd:
        client = GocdClient(gocd.url)
        first = asyncio.run(client.pipeline_groups())
        second = asyncio.run(client.pipeline_groups())
        assert [s for _, _, s in gocd.requests] == [200, 304]
        assert second is first


def test_basic_auth_is_sent_and_wrong_credentials_are_an_error_without_the_password() -> None:
    with FakeGoCD(GROUPS, user="olle", password="pelle") as gocd:
        assert _fetch(GocdClient(gocd.url, user="olle", password=Secret("pelle")))
        with pytest.raises(GocdError) as caught:
            _fetch(GocdClient(gocd.url, user="olle", password=Secret("wrong-secret")))
        assert "401" in str(caught.value)
        assert "wrong-secret" not in str(caught.value)


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
        gocd.wait_requests("pipeline_groups", count=12)  # four polls, each trying all three
        gocd.password = "pelle"
        wait_until(lambda: "recovered" in caplog.text, what="a recovery line")
    failing = [r for r in caplog.records if "GoCD failing" in r.getMessage()]
    assert len(failing) == 1
    assert "401" in failing[0].getMessage()
    assert "pelle" not in caplog.text


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
    tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    """A GoCD user's e-mail may be a list: one message to mail2alert@ and bob@. Only the copy
    for mail2alert@ is de-duplicated; bob@ gets the message unchanged."""
    path = _config(tmp_path, upstream, data_dir, _gocd_manager(gocd.url))
    real = (GOCD_MAILS / "stage-broken.eml").read_bytes()
    listed = real.replace(
        b"To: mail2alert@example.com", b"To: mail2alert@example.com, bob@example.com"
    )
    outbox = OutboxView(data_dir)
    with running(path) as service:
        _wait_for_groups(data_dir, gocd)
        send(service.port, real, rcpt_tos=[GOCD_TO])
        second = send(service.port, listed, rcpt_tos=[GOCD_TO, "bob@example.com"]).queue_id
        got = upstream.wait_for(2)
        assert wait_until(lambda: outbox.message(second))["outcome"] == "duplicate"
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
