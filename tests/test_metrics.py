"""/metrics' pure half and what it reads: the counts the outbox keeps, rendered in the
Prometheus text format; a keeper's health; the JSON log formatter. (Over HTTP after real
SMTP traffic: tests/test_http.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mail2alert.gocd.poller import GroupPoller, keeper
from mail2alert.gocd.testing import FakeGoCD
from mail2alert.logs import JsonFormatter
from mail2alert.managers.health import KeeperHealth
from mail2alert.managers.memory import Feed
from mail2alert.metrics import Status, config_hash, render
from mail2alert.model import Secret
from mail2alert.outbox import DELIVERY_BUCKETS, Counter, Gauges, GroupCommitter, Outbox


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by name and labels (parsed as Prometheus would)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_pending_and_dead_items_and_the_oldest_pending_are_gauges() -> None:
    """A pure rendering: what the outbox holds now, and the buckets as Prometheus sums them."""
    counters = [
        Counter("delivery_seconds_bucket", (("le", repr(DELIVERY_BUCKETS[0])),), 2),
        Counter("delivery_seconds_bucket", (("le", "+Inf"),), 1),
        Counter("delivery_seconds_sum", (), 90000.5),
    ]
    text = render(counters, Gauges(3, 1, 2, 1000.0), Status("abc"), now=1060.0).decode()
    got = samples(text)
    assert got[("mail2alert_outbox_items", (("state", "pending"),))] == 3
    assert got[("mail2alert_outbox_items", (("state", "dead"),))] == 1
    assert got[("mail2alert_outbox_items", (("state", "held"),))] == 2
    assert got[("mail2alert_outbox_oldest_pending_seconds", ())] == 60
    assert got[("mail2alert_delivery_seconds_bucket", (("le", "1.0"),))] == 2
    assert got[("mail2alert_delivery_seconds_bucket", (("le", "86400.0"),))] == 2
    assert got[("mail2alert_delivery_seconds_bucket", (("le", "+Inf"),))] == 3
    assert got[("mail2alert_delivery_seconds_count", ())] == 3
    assert config_hash("x") == hashlib.sha256(b"x").hexdigest()[:12]


def test_the_json_formatter_keeps_an_exception_in_its_line() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, "f", 1, "failed %s", ("here",), sys.exc_info()
        )
    record.created = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, 0)) - time.timezone
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed here"
    assert line["time"] == "2026-01-02T03:04:05.000+00:00"
    assert line["exception"].endswith("ValueError: bad")


def test_a_keepers_polls_and_snapshot_age_are_named_after_its_manager_type() -> None:
    keepers = {
        "gocd#0": ("gocd", KeeperHealth(True, "ok", {"ok": 5, "failed": 2}, 12.5)),
        "gocd#1": ("gocd", KeeperHealth(False, "failing: 401", {"failed": 1}, None)),
    }
    text = render([], Gauges(0, 0, 0, None), Status("abc", keepers=keepers), now=0.0).decode()
    got = samples(text)
    polls = "mail2alert_gocd_polls_total"
    assert got[(polls, (("manager", "gocd#0"), ("result", "ok")))] == 5
    assert got[(polls, (("manager", "gocd#0"), ("result", "failed")))] == 2
    assert got[(polls, (("manager", "gocd#1"), ("result", "failed")))] == 1
    assert got[("mail2alert_gocd_snapshot_age_seconds", (("manager", "gocd#0"),))] == 12.5
    assert ("mail2alert_gocd_snapshot_age_seconds", (("manager", "gocd#1"),)) not in got


def test_refusals_counted_by_intake_are_kept_in_the_outbox_without_a_message(
    tmp_path: Path,
) -> None:
    committer = GroupCommitter(tmp_path)
    committer.count("messages", manager="", outcome="rejected")
    committer.count("messages", manager="", outcome="rejected")
    committer.close()
    outbox = Outbox(tmp_path)
    try:
        counters = outbox.counters()
        gauges = outbox.gauges()
        outbox.check_writable()
    finally:
        outbox.close()
    assert counters == [Counter("messages", (("manager", ""), ("outcome", "rejected")), 2.0)]
    assert gauges == Gauges(pending=0, dead=0, held=0, oldest_pending=None)


def test_the_gocd_poller_reports_its_polls_state_and_snapshot_age(tmp_path: Path) -> None:
    fed = Feed(snapshot=lambda label, snapshot: None, notes=lambda notes: None)
    with FakeGoCD({"g": ["p"]}, user="olle", password="pelle") as gocd:
        options = {"url": gocd.url, "user": "olle", "poll-interval": 1.0}
        good = keeper("gocd#0", {**options, "passwd": Secret("pelle")}, tmp_path, fed)
        bad = keeper("gocd#1", {**options, "passwd": Secret("wrong")}, tmp_path / "bad", fed)
        assert isinstance(good, GroupPoller)
        assert isinstance(bad, GroupPoller)

        async def poll() -> None:
            await good.poll_once()
            await good.poll_once()
            await bad.poll_once()

        asyncio.run(poll())
    fine, failing = good.health(), bad.health()
    assert (fine.ok, fine.polls) == (True, {"ok": 2, "starting": 0, "failed": 0})
    assert fine.state.startswith("ok via ")
    assert fine.snapshot_age is not None
    assert 0 <= fine.snapshot_age < 5
    assert (failing.ok, failing.polls) == (False, {"ok": 0, "starting": 0, "failed": 1})
    assert failing.state.startswith("failing: ")
    assert "401" in failing.state
    assert failing.snapshot_age is None
