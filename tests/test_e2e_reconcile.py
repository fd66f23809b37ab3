"""Reconciliation end to end: smtplib -> mail2alert -> capture server, with a fake GoCD over
HTTP completing stage runs whose mails never came (see test_gocd_reconcile.py for the pure
policy and the keeper alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mail2alert import cli
from mail2alert.components import own_envelope
from mail2alert.config import load
from mail2alert.gocd.memory import RUNS
from mail2alert.gocd.reconcile import BASELINE
from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.message import RawMessage
from mail2alert.testing import CaptureServer
from tests.helpers import OutboxView, example_managers, running, send, wait_until, write_config
from tests.test_gocd_reconcile import GROUPS, REVISIONS


def test_a_made_mail_comes_from_and_goes_to_the_managers_own_address() -> None:
    config = load(Path(__file__).parent.parent / "examples" / "configuration.yml")
    envelope = own_envelope(config.routing[0])
    assert envelope.mail_from == "mail2alert@example.com"
    assert envelope.rcpt_tos == ("mail2alert@example.com",)


# -- end to end ------------------------------------------------------------------------------

CAT = ("cat@example.com",)
OPS = ("ops@example.com",)


def _manager(url: str) -> dict[str, Any]:
    manager = example_managers("gocd")[0]
    manager.update({"url": url, "poll-interval": 0.1, "reconcile-after": 0.5})
    manager["rules"] = [
        {
            "actions": ["mailto:cat@example.com"],
            "filter": {
                "function": "pipelines.in_group",
                "args": ["my-group"],
                "events": ["BREAKS", "FAILS"],
            },
        },
        {
            "actions": ["mailto:ops@example.com"],
            "filter": {"function": "pipelines.in_group", "args": ["infra"], "events": ["FIXED"]},
        },
    ]
    return manager


@pytest.fixture
def gocd() -> Iterator[FakeGoCD]:
    # Each stage's last run (in 2024) passed: before any baseline, and so never made up.
    passed = {("my-pipeline", "build"): "Failure", ("ppp", "test"): "Success"}
    with FakeGoCD(GROUPS, cctray={**passed, ("deploy-infra", "deploy"): "Failure"}) as server:
        yield server


@pytest.fixture
def config(tmp_path: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD) -> Path:
    return write_config(
        tmp_path / "configuration.yml",
        remote_port=upstream.port,
        data_dir=data_dir,
        managers=[_manager(gocd.url)],
    )


def _baseline(data_dir: Path) -> None:
    wait_until(lambda: OutboxView(data_dir).notes(BASELINE), what="the baseline")


def _polls(gocd: FakeGoCD, count: int) -> None:
    """Wait until mail2alert has read cctray.xml ``count`` more times."""
    seen = sum("cctray" in p for p, _, _ in gocd.requests)
    gocd.wait_requests("cctray.xml", seen + count)


def _subjects(upstream: CaptureServer) -> list[tuple[str, tuple[str, ...]]]:
    return [(RawMessage.parse(m.data).get("subject"), m.rcpt_tos) for m in list(upstream.messages)]


def test_a_run_whose_mail_never_came_is_delivered_once_after_reconcile_after(
    config: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    with running(config):
        _baseline(data_dir)
        _polls(gocd, 2)
        assert upstream.messages == []  # nothing made up at the first start
        gocd.complete("ppp", "test", "Failed", changes=REVISIONS)
        [made] = upstream.wait_for(1)
        _polls(gocd, 5)
    assert _subjects(upstream) == [("Stage [ppp/2/test/1] is broken", CAT)]
    assert b"X-Mail2alert-Recovered: gocd-api" in made.data
    assert b"modified by Jane Doe <jane@example.com>" in made.data
    [queue_id] = OutboxView(data_dir).queue_ids()
    message = OutboxView(data_dir).message(queue_id)
    assert message is not None
    assert "recovered: made by mail2alert from gocd-api" in message["reason"]


def test_queue_show_says_the_alert_was_recovered(
    config: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD, capsys: Any
) -> None:
    with running(config):
        _baseline(data_dir)
        gocd.complete("my-pipeline", "build", "Cancelled")
        wait_until(lambda: OutboxView(data_dir).queue_ids(), what="the made alert")
    [queue_id] = OutboxView(data_dir).queue_ids()
    capsys.readouterr()
    assert cli.main(["queue", "--config", str(config), "show", queue_id]) == 0
    shown = capsys.readouterr().out
    assert "Stage [my-pipeline/2/build/1] is cancelled" in shown
    assert "recovered: made by mail2alert from gocd-api" in shown


def test_the_real_mail_first_is_delivered_and_nothing_is_made(
    config: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    with running(config) as service:
        _baseline(data_dir)
        locator = gocd.complete("ppp", "test", "Failed")
        subject = f"Stage [{locator}] is broken"
        send(service.port, gocd_stage_mail(subject), rcpt_tos=["mail2alert@example.com"])
        upstream.wait_for(1)
        _polls(gocd, 8)  # 0.8s: well past reconcile-after
    assert _subjects(upstream) == [(subject, CAT)]


def test_the_real_mail_arriving_late_is_the_same_event_and_not_delivered_again(
    config: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    """GoCD's mail says "failed" (it compared with a cancelled run); the made one "is
    broken": one run, one result, one alert."""
    with running(config) as service:
        _baseline(data_dir)
        locator = gocd.complete("ppp", "test", "Failed")
        upstream.wait_for(1)
        late = gocd_stage_mail(f"Stage [{locator}] failed")
        reply = send(service.port, late, rcpt_tos=["mail2alert@example.com"])
        wait_until(lambda: OutboxView(data_dir).message(reply.queue_id), what="the late mail kept")
        message = OutboxView(data_dir).message(reply.queue_id)
        _polls(gocd, 2)
    assert message is not None
    assert message["outcome"] == "duplicate"
    assert _subjects(upstream) == [(f"Stage [{locator}] is broken", CAT)]


def test_runs_completed_while_mail2alert_was_down_are_each_made_once_by_their_rules(
    config: Path, upstream: CaptureServer, data_dir: Path, gocd: FakeGoCD
) -> None:
    with running(config):
        _baseline(data_dir)
    # Down: GoCD's three mails fail (connection refused) and are gone.
    broken = gocd.complete("ppp", "test", "Failed")
    fixed = gocd.complete("deploy-infra", "deploy", "Passed")
    failed = gocd.complete("my-pipeline", "build", "Failed")
    with running(config):
        upstream.wait_for(3)
        _polls(gocd, 5)
    with running(config):  # and once only, across another restart
        _polls(gocd, 8)
    assert sorted(_subjects(upstream)) == sorted(
        [
            (f"Stage [{broken}] is broken", CAT),
            (f"Stage [{fixed}] is fixed", OPS),
            (f"Stage [{failed}] failed", CAT),
        ]
    )
    assert OutboxView(data_dir).notes(RUNS) == {
        ("ppp", "test"): "2/1",
        ("deploy-infra", "deploy"): "2/1",
        ("my-pipeline", "build"): "2/1",
    }
