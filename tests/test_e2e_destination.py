"""End to end: the destination is down, not each item.

When ``remote-smtp`` cannot be reached, items wait for the destination: they spend none of
their own attempts, only one probe at a time tries it, and new mail is still tried at once;
the first answer releases the whole backlog. A 5xx is an answer about one item, not a sign
that the destination is down.

mail2alert runs in a thread. Upstreams here are real listeners on 127.0.0.1: the capture
server, and :class:`~mail2alert.testing.TcpListener`, which counts the TCP connections it
accepts and then either hangs up at once or never says a word.
"""

from __future__ import annotations

import email.utils
import smtplib
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mail2alert.testing import CaptureServer, TcpListener, free_port
from tests.helpers import OutboxView, Reply, compose, field_value, relay, wait_until

#: Back-offs far longer than any test here: a scheduled probe never happens during one.
SLOW_RETRY: dict[str, Any] = {
    "retry-initial": "60s",
    "retry-max": "120s",
    "give-up-after": "1h",
    "timeout": "5s",
}


def relayed(message_id: str) -> bytes:
    """A message no manager wants: relayed unchanged, one item."""
    return compose(sender="Someone <someone@example.net>", subject="report", message_id=message_id)


def new_id() -> str:
    return email.utils.make_msgid(domain="destination.test.example.com")


def send_many(port: int, messages: Sequence[bytes]) -> list[tuple[float, Reply]]:
    """Send ``messages`` in one SMTP session; (monotonic time of the reply, reply) each."""
    replies: list[tuple[float, Reply]] = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as client:
        for data in messages:
            client.ehlo_or_helo_if_needed()
            code, text = client.mail("someone@example.net")
            assert code == 250, text
            code, text = client.rcpt("admin@example.com")
            assert code == 250, text
            code, text = client.data(data)
            replies.append((time.monotonic(), Reply(code, text.decode("utf-8", "replace"))))
    return replies


def every_item_has_an_error(outbox: OutboxView, queue_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The one item of each message once every one has a ``last_error``; else []."""
    rows = [outbox.item(q) for q in queue_ids]
    return rows if all(r["last_error"] for r in rows) else []


@pytest.fixture
def port() -> int:
    """The port of ``remote-smtp``, shared by the listeners that play it in turn."""
    return free_port()


@pytest.fixture
def hanging_up(port: int) -> Iterator[TcpListener]:
    """``remote-smtp`` closing every connection at once."""
    with TcpListener(hang_up=True, port=port) as listener:
        yield listener


def test_items_wait_for_a_down_destination_and_its_first_answer_releases_them_all(
    tmp_path: Path, port: int, hanging_up: TcpListener
) -> None:
    """While ``remote-smtp`` cannot be reached, each new message is tried once at once (one
    connection each), spends no attempt of its own and then waits, with no retry for 60 s;
    a message sent once the server is back is delivered at once, and with it the whole
    backlog, long before the 60 s back-off."""
    upstream = CaptureServer(port=port)
    ids = [new_id() for _ in range(6)]
    with relay(tmp_path, upstream, [], delivery=SLOW_RETRY) as mail2alert:
        queue_ids: list[str] = []
        for number, message_id in enumerate(ids, start=1):
            queue_ids.append(mail2alert.send(relayed(message_id)).queue_id)
            # The first marks the destination down; each later one is tried at once all the
            # same, within seconds of its arrival (a free probe), not after 60 s.
            assert hanging_up.wait_count(number, timeout=5), f"message {number} was not tried"
            mail2alert.outbox.wait_attempted(queue_ids[-1], timeout=5)
        waiting = [mail2alert.outbox.item(q) for q in queue_ids]
        tried = hanging_up.count

        hanging_up.stop()
        with upstream:
            started = time.monotonic()
            probe_id = new_id()
            probe = mail2alert.send(relayed(probe_id))
            mail2alert.outbox.wait_state(probe.queue_id, "done", timeout=5)
            for queue_id in queue_ids:
                mail2alert.outbox.wait_state(queue_id, "done", timeout=15)
            elapsed = time.monotonic() - started
    assert tried == 6
    assert [(w["state"], w["attempts"], w["waiting"]) for w in waiting] == [
        ("pending", 0, "smtp")
    ] * 6
    assert all(f"127.0.0.1:{port}" in w["last_error"] for w in waiting)
    assert elapsed < 15
    got = Counter(field_value(m.data, "message-id") for m in upstream.messages)
    assert got == dict.fromkeys([*ids, probe_id], 1)


def test_a_silent_upstream_gets_one_connection_per_worker_and_then_one_probe_at_a_time(
    tmp_path: Path, port: int
) -> None:
    """An upstream that accepts connections and never answers is tried by at most
    ``connections`` (4) connections at first; once the timeouts mark it down, the 20
    queued items wait for it and only one probe at a time tries it, with the back-off: far
    fewer connections than one per item, and no item spends an attempt."""
    timeout, retry_initial, workers = 1.0, 1.0, 4
    delivery = {
        "retry-initial": "1s",
        "retry-max": "2s",
        "give-up-after": "1h",
        "timeout": "1s",
        "connections": workers,
    }
    upstream = CaptureServer(port=port)  # never started: the silent listener plays it
    with (
        TcpListener(hang_up=False, port=port) as silent,
        relay(tmp_path, upstream, [], delivery=delivery) as mail2alert,
    ):
        replies = send_many(mail2alert.port, [relayed(new_id()) for _ in range(20)])
        queue_ids = [reply.queue_id for _, reply in replies]
        silent.wait_count(workers + 2, timeout=10)
        with silent.changed:
            accepted, open_then = list(silent.accepted), list(silent.open_then)
        window = time.monotonic() - accepted[0]
        items = wait_until(
            lambda: every_item_has_an_error(mail2alert.outbox, queue_ids),
            what="every item to have been tried or to wait",
        )
    # Mail accepted after the first timeouts could have marked the destination down is
    # new mail, tried once at once (a free probe); normally none is that late.
    late = sum(at > accepted[0] + timeout for at, _ in replies)
    # A probe comes no sooner than a timeout plus a back-off after the one before.
    spacing = timeout + retry_initial
    probes = 0 if window < spacing else 1 + int((window - spacing) // spacing)
    bound = workers + late + probes + 1
    figures = f"{len(accepted)} connections in {window:.1f}s, {late} late, bound {bound}"
    print(f"silent upstream: {figures}; open at each connection: {open_then}")
    assert max(open_then) <= workers, figures
    # Every later connection is a probe that finds no other open: one at a time.
    assert max(open_then[workers:], default=1) <= 1 + late, (figures, open_then)
    assert len(accepted) <= bound, figures
    assert len(accepted) < len(queue_ids), figures
    assert [(i["state"], i["attempts"]) for i in items] == [("pending", 0)] * 20
    assert all("timed out" in i["last_error"].lower() for i in items), items


def test_a_5xx_for_one_recipient_is_an_answer_about_the_item_and_leaves_the_destination_up(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    """A recipient refused with 550 makes its item dead after one attempt, and the
    destination stays up: the next item, queued with it by the same message, is delivered
    at once, not after the 60 s a down destination would make it wait."""
    upstream.refuse_rcpt("gone@example.org", "550 5.1.1 no such user")
    managers = [
        {
            "name": "mail",
            "messages-we-want": {"to": "alerts@example.com"},
            "rules": [
                {
                    "actions": ["mailto:gone@example.org"],
                    "filter": {"function": "mail.in_subject", "args": ["disk"]},
                }
            ],
        }
    ]
    # One connection: the items are tried one after the other, the refused one first.
    delivery = {**SLOW_RETRY, "connections": 1}
    message_id = new_id()
    with relay(tmp_path, upstream, managers, delivery=delivery) as mail2alert:
        reply = mail2alert.send(
            compose(subject="Disk almost full", message_id=message_id),
            rcpt_tos=["alerts@example.com", "other@example.org"],
        )
        settled = wait_until(
            lambda: (
                rows
                if len(rows := mail2alert.outbox.items(reply.queue_id)) == 2
                and all(r["state"] != "pending" for r in rows)
                else None
            ),
            timeout=10,
            what="both items to be settled",
        )
        recipients = mail2alert.outbox.recipients(reply.queue_id)
        second = mail2alert.send(relayed(new_id()))
        mail2alert.outbox.wait_state(second.queue_id, "done", timeout=5)
    refused, passed_on = settled
    assert (refused["state"], refused["attempts"], refused["waiting"]) == ("dead", 1, "")
    assert "550 5.1.1 no such user" in refused["last_error"]
    assert recipients["gone@example.org"]["state"] == "dead"
    assert (passed_on["state"], passed_on["attempts"]) == ("done", 1)
    assert [m.rcpt_tos for m in upstream.messages[:1]] == [("other@example.org",)]
    assert len(upstream.messages) == 2
