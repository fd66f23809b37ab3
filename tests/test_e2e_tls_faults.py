"""End to end: a smarthost with STARTTLS and AUTH that fails in every way a real one does,
and a GoCD that answers 503 or too late; every fault bounded, on loopback only.

The smarthost is :class:`~mail2alert.testing.CaptureServer` with a certificate made here by
trustme (``require_starttls``, a login required), or a :class:`~mail2alert.testing.TcpListener`
on its port that accepts connections and never says a word. mail2alert runs in a thread and
verifies the certificate against the test's CA. What must hold through each fault: the mail
stays pending with the reason in the outbox (what ``mail2alert queue`` shows) and spends
none of its own attempts; nothing goes out without TLS, no password either; the outage is
logged once, and its end once; delivery resumes by itself when the fault ends; nothing is
lost.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme

from mail2alert.gocd import poller
from mail2alert.gocd.client import GocdClient
from mail2alert.gocd.testing import FakeGoCD, gocd_stage_mail
from mail2alert.testing import CaptureServer, TcpListener, free_port
from tests.helpers import (
    FAST_DELIVERY,
    Relay,
    ca_file,
    compose,
    example_managers,
    field_value,
    relay,
    send_session,
    server_tls,
    wait_until,
)

PASSWORD = "s3cret-smtp-pass"
#: A second to notice a fault, half a second to probe again: each test runs in seconds.
QUICK: dict[str, Any] = {
    "retry-initial": "0.5s",
    "retry-max": "1s",
    "give-up-after": "1h",
    "timeout": "1s",
}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The CA mail2alert trusts for remote-smtp."""
    return trustme.CA()


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_PASSWD", PASSWORD)


@pytest.fixture
def remote(tmp_path: Path, ca: trustme.CA) -> dict[str, Any]:
    """``remote-smtp``: STARTTLS always, the certificate verified against ``ca``, a login."""
    return {
        "tls": "starttls",
        "ca-file": str(ca_file(ca, tmp_path / "ca.pem")),
        "user": "alerts",
        "passwd": "$SMTP_PASSWD",
    }


def smarthost(ca: trustme.CA, *, port: int = 0, expired: bool = False) -> CaptureServer:
    """A smarthost that takes nothing before STARTTLS and mail only from who logged in."""
    return CaptureServer(
        port=port,
        tls=server_tls(ca, expired=expired),
        require_starttls=True,
        users={"alerts": PASSWORD},
    )


def new_id() -> str:
    return email.utils.make_msgid(domain="tls-faults.test.example.com")


def relayed(message_id: str) -> bytes:
    """A message no manager wants: relayed unchanged, one item."""
    return compose(sender="Someone <someone@example.net>", subject="report", message_id=message_id)


def arrived(upstream: CaptureServer) -> Counter[str]:
    """How often each Message-ID arrived upstream."""
    return Counter(field_value(m.data, "message-id") for m in upstream.messages)


def destination_changes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """``down`` and ``up``, in order, for each time the dispatcher logged that remote-smtp
    went down or answered again."""
    changes: list[str] = []
    for record in list(caplog.records):
        text = record.getMessage()
        if record.name != "mail2alert.dispatcher":
            continue
        if " is down (" in text:
            changes.append("down")
        elif " answers again" in text:
            changes.append("up")
    return changes


# -- the smarthost ---------------------------------------------------------------------------


def through_fault(
    mail2alert: Relay, upstream: CaptureServer, message_id: str, mend: Callable[[], None]
) -> tuple[dict[str, Any], list[str]]:
    """Send a message while the smarthost is at fault; once delivery was tried, take its
    item (as ``queue`` shows it) and the logins the smarthost saw so far, then end the fault
    with ``mend`` and wait until the message is delivered. (The item, the logins.)"""
    queue_id = mail2alert.send(relayed(message_id)).queue_id
    waiting = mail2alert.outbox.wait_attempted(queue_id)
    logins = list(upstream.logins)
    mend()
    mail2alert.outbox.wait_state(queue_id, "done", timeout=15)
    return waiting, logins


def test_a_smarthost_that_accepts_tcp_and_never_answers_gets_not_a_byte_and_the_mail_waits(
    tmp_path: Path, ca: trustme.CA, remote: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A smarthost that accepts the connection and never greets: the mail stays pending,
    untried, with "timed out" as the reason; not a byte is sent there (no EHLO, no password,
    no mail); the outage is logged once though it is probed again; once a real smarthost
    answers on that port the mail is delivered, over TLS, after a login."""
    caplog.set_level(logging.WARNING)
    port = free_port()
    upstream = smarthost(ca, port=port)
    message_id = new_id()

    def answer() -> None:
        assert silent.wait_count(2, timeout=15), "no probe after the first attempt"
        silent.stop()
        upstream.start()

    try:
        with (
            TcpListener(hang_up=False, port=port) as silent,
            relay(tmp_path, upstream, [], delivery=QUICK, remote=remote) as mail2alert,
        ):
            waiting, _ = through_fault(mail2alert, upstream, message_id, answer)
    finally:
        upstream.stop()
    assert (waiting["state"], waiting["attempts"]) == ("pending", 0)
    assert f"127.0.0.1:{port}" in waiting["last_error"]
    assert "timed out" in waiting["last_error"].lower()
    assert silent.received == b""
    assert upstream.logins == ["alerts"]
    assert arrived(upstream) == {message_id: 1}
    assert destination_changes(caplog) == ["down", "up"]
    assert PASSWORD not in caplog.text


def test_a_smarthost_that_stalls_after_the_tls_handshake_keeps_the_mail_pending_until_it_answers(
    tmp_path: Path, ca: trustme.CA, remote: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A smarthost that completes the TLS handshake and then answers nothing: the mail stays
    pending, untried, with "timed out" as the reason; no login is made and nothing is sent
    (a retry without TLS would be refused and the item would be dead, not pending); the
    outage is logged once however often it is probed; when the server answers again the
    mail is delivered once."""
    caplog.set_level(logging.WARNING)
    upstream = smarthost(ca)
    upstream.stall()
    message_id = new_id()

    def resume() -> None:
        wait_until(lambda: upstream.connections >= 3, what="two probes of the stalled server")
        upstream.resume()

    with upstream, relay(tmp_path, upstream, [], delivery=QUICK, remote=remote) as mail2alert:
        waiting, logins = through_fault(mail2alert, upstream, message_id, resume)
    assert (waiting["state"], waiting["attempts"]) == ("pending", 0)
    assert f"timed out talking to 127.0.0.1:{upstream.port}" in waiting["last_error"]
    assert logins == []
    assert arrived(upstream) == {message_id: 1}
    assert destination_changes(caplog) == ["down", "up"]


def test_an_expired_certificate_keeps_the_mail_pending_with_the_reason_until_it_is_renewed(
    tmp_path: Path, ca: trustme.CA, remote: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A smarthost whose certificate has expired gets no login and no mail: the mail stays
    pending, untried, with the verification error as its reason; the outage is logged once.
    Once the server restarts with a renewed certificate, the mail goes out, once."""
    caplog.set_level(logging.WARNING)
    upstream = smarthost(ca, expired=True)
    message_id = new_id()

    def renew() -> None:
        upstream.replace_certificate(server_tls(ca))

    with upstream, relay(tmp_path, upstream, [], delivery=QUICK, remote=remote) as mail2alert:
        waiting, logins = through_fault(mail2alert, upstream, message_id, renew)
    assert (waiting["state"], waiting["attempts"]) == ("pending", 0)
    assert "certificate has expired" in waiting["last_error"]
    assert logins == []
    assert upstream.logins == ["alerts"]
    assert arrived(upstream) == {message_id: 1}
    assert destination_changes(caplog) == ["down", "up"]


def test_a_certificate_from_another_ca_stops_delivery_until_the_right_one_is_back(
    tmp_path: Path, ca: trustme.CA, remote: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A smarthost that restarts with a certificate from a CA mail2alert does not trust (a
    replaced server, or someone in between) gets no login and no mail: the next mail stays
    pending, untried, with the verification error as its reason. When the server comes back
    with its own certificate, that mail is delivered, and each mail arrived once."""
    caplog.set_level(logging.WARNING)
    upstream = smarthost(ca)
    before, during = new_id(), new_id()

    def restore() -> None:
        upstream.replace_certificate(server_tls(ca))

    with upstream, relay(tmp_path, upstream, [], delivery=QUICK, remote=remote) as mail2alert:
        mail2alert.send(relayed(before))
        upstream.wait_for(1)
        upstream.replace_certificate(server_tls(trustme.CA()))
        waiting, logins = through_fault(mail2alert, upstream, during, restore)
    assert (waiting["state"], waiting["attempts"]) == ("pending", 0)
    assert "certificate verify failed" in waiting["last_error"].lower()
    assert logins == ["alerts"]  # the first mail's, before the change
    assert upstream.logins == ["alerts", "alerts"]
    assert arrived(upstream) == {before: 1, during: 1}
    assert destination_changes(caplog) == ["down", "up"]


MESSAGES = 1000
FLAPS = 3
CONNECTIONS = 4
SESSIONS = 4


def test_a_smarthost_that_flaps_while_1000_queued_messages_go_out_over_tls_and_auth_loses_none(
    tmp_path: Path, ca: trustme.CA, remote: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 messages are queued while the smarthost (STARTTLS, AUTH) is down; it comes up,
    and goes down three more times while they are delivered, each time until mail2alert has
    noticed. Every message arrives; each outage is logged once and its end once (the lines
    alternate); each new connection logs in again over TLS; and each flap sends at most one
    message per connection twice (those whose 250 was lost when the server went away)."""
    caplog.set_level(logging.WARNING)
    upstream = smarthost(ca)
    ids = [new_id() for _ in range(MESSAGES)]
    delivery = {**FAST_DELIVERY, "connections": CONNECTIONS}
    try:
        with relay(tmp_path, upstream, [], delivery=delivery, remote=remote) as mail2alert:

            def session(part: list[str]) -> list[str]:
                replies = send_session(mail2alert.port, [relayed(i) for i in part])
                return [reply.queue_id for reply in replies]

            with ThreadPoolExecutor(SESSIONS) as pool:
                parts = pool.map(session, [ids[i::SESSIONS] for i in range(SESSIONS)])
                queue_ids = [queue_id for part in parts for queue_id in part]
            upstream.start()
            upstream_at_flaps: list[int] = []
            for flap in range(1, FLAPS + 1):
                share = flap * MESSAGES // (FLAPS + 1)
                wait_until(
                    lambda share=share: len(upstream.messages) >= share,
                    timeout=30,
                    what=f"{share} messages upstream",
                )
                upstream.stop()
                upstream_at_flaps.append(len(upstream.messages))
                wait_until(
                    lambda flap=flap: destination_changes(caplog).count("down") > flap,
                    what=f"flap {flap} noticed",
                )
                upstream.start()
            upstream.wait_for(MESSAGES, timeout=60)
            wait_until(
                lambda: mail2alert.outbox.unfinished(queue_ids) == 0,
                timeout=60,
                what="every message delivered",
            )
    finally:
        upstream.stop()
    got = arrived(upstream)
    duplicates = sum(count - 1 for count in got.values())
    changes = destination_changes(caplog)
    figures = (
        f"{duplicates} duplicates, {len(upstream.logins)} logins, upstream at the flaps"
        f" {upstream_at_flaps} of {MESSAGES}, destination {changes}"
    )
    print(figures)
    assert upstream_at_flaps[-1] < MESSAGES, f"all delivered before the last flap: {figures}"
    assert set(got) == set(ids), figures
    assert duplicates <= FLAPS * CONNECTIONS, figures
    assert changes == ["down", "up"] * (len(changes) // 2), figures
    assert changes.count("down") >= FLAPS + 1, figures
    assert len(upstream.logins) >= FLAPS + 1, figures
    assert PASSWORD not in caplog.text


# -- GoCD ------------------------------------------------------------------------------------

GROUPS = {"my-group": ["my-pipeline"], "infra": ["deploy-infra"]}
GOCD_TO = "mail2alert@example.com"


def gocd_manager(gocd: FakeGoCD) -> dict[str, Any]:
    """The example's gocd manager (BREAKS in my-group -> cat@), reading ``gocd`` often."""
    return {**example_managers("gocd")[0], "url": gocd.url, "poll-interval": 0.2}


def stage_broken(stage: str) -> bytes:
    """GoCD's mail for a stage of my-pipeline that broke (each stage its own event)."""
    return gocd_stage_mail(f"Stage [my-pipeline/6/{stage}/1] is broken")


def poller_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """What the GoCD poller logged that contains ``text``."""
    return [
        r.getMessage()
        for r in list(caplog.records)
        if r.name == "mail2alert.gocd.poller" and text in r.getMessage()
    ]


def test_gocd_answering_503_holds_its_mail_and_routes_it_once_gocd_answers(
    tmp_path: Path, upstream: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """GoCD answers 503 to every request (a restart under way) before mail2alert has any
    pipeline groups: a stage mail that needs them is answered 250 and held; GoCD starting is
    logged once, at INFO with the status (no trouble to shout about); once GoCD answers,
    the mail is routed by its group, and that GoCD has started is logged once."""
    caplog.set_level(logging.INFO)
    gocd = FakeGoCD(GROUPS)
    gocd.failing = 503
    with gocd, relay(tmp_path, upstream, [gocd_manager(gocd)]) as mail2alert:
        queue_id = mail2alert.send(stage_broken("build"), rcpt_tos=[GOCD_TO]).queue_id
        gocd.wait_requests("pipeline_groups", count=3)
        held = mail2alert.outbox.message(queue_id)
        gocd.failing = None
        (routed,) = upstream.wait_for(1)
    assert held is not None
    assert held["outcome"] == "hold"
    assert routed.rcpt_tos == ("cat@example.com",)
    (starting,) = poller_lines(caplog, "GoCD is starting")
    assert "answered HTTP 503" in starting
    assert poller_lines(caplog, "GoCD failing") == []
    assert len(poller_lines(caplog, "GoCD has started")) == 1


class _QuickClient(GocdClient):
    """GoCD's client with a 1 s timeout instead of 10 s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "timeout": 1.0})


def test_gocd_answering_after_30s_holds_its_mail_while_intake_answers_250_and_then_routes_it(
    tmp_path: Path,
    upstream: CaptureServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GoCD answers every request after 30 s, later than mail2alert waits for it: stage mails
    that need pipeline groups are answered 250 at once, without waiting for GoCD, and held;
    the failing polls are logged once; when GoCD answers in time again, the held mail is
    routed by its group and delivered, and the recovery is logged once.

    Scaled: the client's timeout is lowered from 10 s to 1 s (GoCD's 30 s stay), so the polls
    that time out take a second each instead of ten; what the operator sees is the same.
    """
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(poller, "GocdClient", _QuickClient)
    gocd = FakeGoCD(GROUPS)
    gocd.delay = 30.0
    with gocd, relay(tmp_path, upstream, [gocd_manager(gocd)]) as mail2alert:
        answered: list[tuple[float, str]] = []
        for stage in ("build", "test", "deploy"):
            started = time.monotonic()
            reply = mail2alert.send(stage_broken(stage), rcpt_tos=[GOCD_TO])
            answered.append((time.monotonic() - started, reply.queue_id))
        # cctray.xml and three polls of pipeline groups, each given up after the timeout.
        gocd.wait_arrived(4, timeout=20)
        held = [mail2alert.outbox.message(q) for _, q in answered]
        delivered_while_slow = len(upstream.messages)
        gocd.delay = 0.0
        routed = upstream.wait_for(3)
    assert max(seconds for seconds, _ in answered) < 1.0, answered
    assert [m["outcome"] if m else None for m in held] == ["hold"] * 3
    assert delivered_while_slow == 0
    assert [m.rcpt_tos for m in routed] == [("cat@example.com",)] * 3
    (failing,) = poller_lines(caplog, "GoCD failing")
    assert "timed out" in failing
    assert len(poller_lines(caplog, "GoCD recovered")) == 1
