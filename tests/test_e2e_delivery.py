"""End to end: what happens after the 250, when the upstream server is down or says no.

mail2alert runs in a thread with short retry settings; the capture server plays
``remote-smtp`` (with PIPELINING and without) and is stopped, started or told to refuse.
States are read from the outbox.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mail2alert.testing import CaptureServer
from tests.helpers import FAST_DELIVERY, compose, example_managers, relay, wait_until


@pytest.fixture(params=[True, False], ids=["pipelining", "one-at-a-time"])
def upstream(request: pytest.FixtureRequest) -> Iterator[CaptureServer]:
    """The smarthost, with and without PIPELINING: every outcome is the same either way."""
    with CaptureServer(pipelining=request.param) as server:
        yield server


def managers() -> list[dict[str, Any]]:
    return example_managers("mail")


def relayed(**fields: Any) -> bytes:
    """A message the example's managers do not want: relayed as it is."""
    return compose(sender="Someone <someone@example.net>", subject="weekly report", **fields)


def test_a_message_accepted_while_upstream_is_down_is_delivered_once_it_is_up(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.stop()
    with relay(tmp_path, upstream, managers()) as mail2alert:
        reply = mail2alert.send(relayed(), mail_from="someone@example.net")
        assert reply.code == 250
        tried = mail2alert.outbox.wait_attempted(reply.queue_id)
        assert tried["state"] == "pending"
        assert "cannot connect" in tried["last_error"]

        upstream.start()

        (got,) = upstream.wait_for(1)
        mail2alert.outbox.wait_state(reply.queue_id, "done")
    assert got.rcpt_tos == ("admin@example.com",)
    assert len(upstream.messages) == 1


def test_a_line_longer_than_smtp_allows_is_broken_so_that_a_strict_smarthost_takes_it(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """The capture server, as aiosmtpd, refuses a line over 1,000 bytes for good."""
    long_line = "x" * 2500
    with relay(tmp_path, upstream, managers()) as mail2alert:
        reply = mail2alert.send(
            relayed(body=f"start\n{long_line}\nend\n"), mail_from="someone@example.net"
        )
        (got,) = upstream.wait_for(1)
        mail2alert.outbox.wait_state(reply.queue_id, "done")
    assert max(len(line) for line in got.data.split(b"\r\n")) <= 998
    assert b"\r\nstart\r\n" + long_line.encode() + b"\r\nend\r\n" in got.data.replace(b"\r\n ", b"")


def test_a_451_on_data_is_retried_and_the_message_delivered_exactly_once(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.refuse_data("451 4.3.0 try again later")
    with relay(tmp_path, upstream, managers()) as mail2alert:
        reply = mail2alert.send(relayed(), mail_from="someone@example.net")

        upstream.wait_refused(1)
        upstream.wait_for(1)
        item = mail2alert.outbox.wait_state(reply.queue_id, "done")
    assert item["attempts"] == 2
    assert len(upstream.messages) == 1


def test_a_550_on_data_makes_the_item_dead_with_the_reason_kept(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.refuse_data("550 5.7.1 not accepted here")
    with relay(tmp_path, upstream, managers()) as mail2alert:
        reply = mail2alert.send(relayed(), mail_from="someone@example.net")

        item = mail2alert.outbox.wait_state(reply.queue_id, "dead")
        sentinel = mail2alert.sentinel()
    assert "550" in item["last_error"]
    assert "not accepted here" in item["last_error"]
    assert item["attempts"] == 1
    assert upstream.messages == [sentinel]


def test_a_recipient_refused_with_550_is_dead_while_the_other_is_delivered_once(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.refuse_rcpt("gone@example.org", "550 5.1.1 no such user")
    with relay(tmp_path, upstream, managers()) as mail2alert:
        reply = mail2alert.send(
            relayed(),
            mail_from="someone@example.net",
            rcpt_tos=["gone@example.org", "here@example.org"],
        )

        (got,) = upstream.wait_for(1)
        item = wait_until(
            lambda: next(
                (i for i in mail2alert.outbox.items(reply.queue_id) if i["state"] != "pending"),
                None,
            ),
            what="the item to be settled",
        )
        recipients = mail2alert.outbox.recipients(reply.queue_id)
        sentinel = mail2alert.sentinel()
    assert got.rcpt_tos == ("here@example.org",)
    assert recipients["here@example.org"]["state"] == "done"
    assert recipients["gone@example.org"]["state"] == "dead"
    assert "550" in recipients["gone@example.org"]["last_error"]
    assert item["attempts"] == 1
    assert upstream.messages == [got, sentinel]


def test_a_recipient_deferred_with_450_is_delivered_to_later_exactly_once(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.refuse_rcpt("busy@example.org", "450 4.2.1 mailbox busy")
    with relay(tmp_path, upstream, managers()) as mail2alert:
        reply = mail2alert.send(
            relayed(),
            mail_from="someone@example.net",
            rcpt_tos=["busy@example.org", "here@example.org"],
        )
        upstream.wait_for(1)
        wait_until(
            lambda: (
                "450"
                in mail2alert.outbox.recipients(reply.queue_id)["busy@example.org"]["last_error"]
            ),
            what="the 450 to be recorded",
        )

        upstream.accept_rcpt("busy@example.org")

        upstream.wait_for(2)
        item = mail2alert.outbox.wait_state(reply.queue_id, "done")
    delivered = Counter(r for m in upstream.messages for r in m.rcpt_tos)
    assert delivered == {"here@example.org": 1, "busy@example.org": 1}
    assert item["attempts"] == 2


def test_an_item_not_delivered_within_give_up_after_is_dead_with_gave_up(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.stop()
    delivery = {**FAST_DELIVERY, "retry-initial": 0.2, "retry-max": 0.2, "give-up-after": 0.5}
    with relay(tmp_path, upstream, managers(), delivery=delivery) as mail2alert:
        reply = mail2alert.send(relayed(), mail_from="someone@example.net")

        item = mail2alert.outbox.wait_state(reply.queue_id, "dead")
    assert "gave up" in item["last_error"]
    assert "cannot connect" in item["last_error"]
    assert upstream.messages == []


def test_a_new_service_on_the_same_data_dir_delivers_what_was_pending(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    data_dir = tmp_path / "data"
    upstream.stop()
    with relay(tmp_path, upstream, managers(), data_dir=data_dir) as first:
        reply = first.send(relayed(), mail_from="someone@example.net")
        first.outbox.wait_attempted(reply.queue_id)
    upstream.start()

    with relay(tmp_path, upstream, managers(), data_dir=data_dir) as second:
        (got,) = upstream.wait_for(1)
        second.outbox.wait_state(reply.queue_id, "done")
    assert reply.queue_id.encode() in got.data
    assert len(upstream.messages) == 1
