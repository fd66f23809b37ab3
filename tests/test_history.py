"""The decision history: what the outbox keeps of every message for the console, and for how
long; the fields that name a routed mail's queue id and rules.

Outbox tests use real SQLite files and times given by the test; the end-to-end tests send
through a real mail2alert to a capture server.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mail2alert import config
from mail2alert.errors import ConfigError, OutboxError
from mail2alert.explain import explain, render
from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.managers.base import Context
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.model import Decision, Envelope, Outgoing
from mail2alert.outbox import (
    DB_NAME,
    Accepted,
    Outbox,
    RecipientResult,
    Result,
)
from mail2alert.planning import accept
from mail2alert.routing import Manager, Rule
from mail2alert.settings import History
from mail2alert.testing import CaptureServer
from tests.helpers import compose, example_managers, field_value, relay, wait_until

DAY = 86400.0
GO = Envelope("go@example.com", ("ops@example.com",))


def message(
    queue_id: str,
    at: float,
    *,
    outcome: str = "deliver",
    manager: str | None = "mail#0",
    facts: dict[str, object] | None = None,
    items: int = 1,
) -> Accepted:
    decision = Decision(outcome, manager, "test")  # type: ignore[arg-type]
    mail = Outgoing("go@example.com", ("ops@example.com",), b"Subject: x\r\n\r\nbody\r\n")
    return Accepted(
        queue_id,
        at,
        GO,
        f"subject of {queue_id}",
        decision,
        (mail,) * items,
        raw=b"Subject: x\r\n\r\nbody\r\n" if outcome == "hold" else None,
        facts="the facts line" if facts else "",
        facts_data=facts,
        trace=("✓ rule 1 (line 3): mail.any(): matched -> mailto:ops@example.com",),
        headers=b"Subject: x\r\nX-Long: y\r\n",
    )


def deliver(outbox: Outbox, queue_id: str, *, state: str = "done", answer: str = "") -> None:
    for item in outbox.due(float("inf"), 100):
        if item.message_id == queue_id:
            reason = "" if state == "done" else "550 5.1.1 no such user"
            results = tuple(RecipientResult(r, state, reason) for r in item.recipients)
            outbox.record([Result(item, results, 0.0, "", answer=answer, at=42.0)])


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    opened = Outbox(tmp_path)
    yield opened  # type: ignore[misc]
    opened.close()


# -- what the history says of each message ------------------------------------------------


def test_the_history_lists_messages_newest_first_with_their_state_now(outbox: Outbox) -> None:
    outbox.put(
        [
            message("DONE", 1.0),
            message("DEAD", 2.0),
            message("PENDING", 3.0),
            message("HELD", 4.0, outcome="hold", items=0),
            message("DROPPED", 5.0, outcome="drop", items=0),
        ]
    )
    deliver(outbox, "DONE")
    deliver(outbox, "DEAD", state="dead")

    rows = outbox.history()

    assert [(r.message.id, r.state) for r in rows] == [
        ("DROPPED", "none"),
        ("HELD", "held"),
        ("PENDING", "pending"),
        ("DEAD", "dead"),
        ("DONE", "done"),
    ]
    assert rows[-1].message.subject == "subject of DONE"
    assert rows[-1].message.rcpt_tos == ("ops@example.com",)


def test_the_history_is_filtered_by_manager_state_and_facts_and_paged(outbox: Outbox) -> None:
    outbox.put(
        [
            message("A", 1.0, facts={"pipeline": "build", "event": "BREAKS"}),
            message("B", 2.0, facts={"pipeline": "build", "event": "FIXED"}),
            message("C", 3.0, facts={"pipeline": "deploy", "event": "BREAKS"}),
            message("D", 4.0, manager=None, outcome="relay"),
        ]
    )
    deliver(outbox, "A")

    def ids(**how: object) -> list[str]:
        return [r.message.id for r in outbox.history(**how)]  # type: ignore[arg-type]

    assert ids(facts={"pipeline": "build"}) == ["B", "A"]
    assert ids(facts={"pipeline": "build", "event": "BREAKS"}) == ["A"]
    assert ids(manager="mail#0", state="pending") == ["C", "B"]
    assert ids(manager="") == ["D"]
    assert ids(limit=2) == ["D", "C"]
    assert ids(limit=2, offset=2) == ["B", "A"]
    assert outbox.history(facts={"pipeline": "build"})[0].facts["event"] == "FIXED"


def test_a_filter_by_an_unknown_state_or_a_strange_fact_name_is_an_outbox_error(
    outbox: Outbox,
) -> None:
    with pytest.raises(OutboxError, match="no such state 'gone'"):
        outbox.history(state="gone")
    with pytest.raises(OutboxError, match="no such fact"):
        outbox.history(facts={'x") OR 1=1 --': "y"})


def test_a_message_page_has_its_facts_rule_trace_headers_and_every_attempt(
    outbox: Outbox,
) -> None:
    outbox.put([message("M", 1.0, facts={"pipeline": "build"})])
    (item,) = outbox.due(10.0, 10)
    retry = RecipientResult("ops@example.com", "pending", "451 4.3.0 busy")
    outbox.record([Result(item, (retry,), 20.0, "ops@example.com: 451 4.3.0 busy", at=11.0)])
    (item,) = outbox.due(30.0, 10)
    done = RecipientResult("ops@example.com", "done")
    outbox.record([Result(item, (done,), 0.0, "", answer="250 2.0.0 Ok: queued", at=31.0)])

    decided = outbox.decision("M")
    attempts = outbox.attempts_of("M")

    assert decided is not None
    assert decided.message.subject == "subject of M"
    assert decided.facts == "the facts line"
    assert decided.facts_data == {"pipeline": "build"}
    assert decided.trace == ("✓ rule 1 (line 3): mail.any(): matched -> mailto:ops@example.com",)
    assert decided.headers == b"Subject: x\r\nX-Long: y\r\n"
    assert [(a.at, a.result, a.answer) for a in attempts] == [
        (11.0, "retry", "ops@example.com: 451 4.3.0 busy"),
        (31.0, "sent", "250 2.0.0 Ok: queued"),
    ]
    assert outbox.decision("NONE") is None


def test_alerts_per_hour_are_counted_by_event_or_else_by_outcome(outbox: Outbox) -> None:
    hour = 3600.0
    outbox.put(
        [
            message("A", 10 * hour + 1, facts={"event": "BREAKS"}),
            message("B", 10 * hour + 2, facts={"event": "BREAKS"}),
            message("C", 11 * hour + 5, facts={"event": "FIXED"}),
            message("D", 11 * hour + 6, outcome="relay", manager=None),
            message("OLD", 2 * hour, facts={"event": "BREAKS"}),
        ]
    )

    assert outbox.hourly(since=10 * hour) == [
        (10 * hour, "BREAKS", 2),
        (11 * hour, "FIXED", 1),
        (11 * hour, "relay", 1),
    ]


# -- how long it is kept ------------------------------------------------------------------


def test_finished_messages_go_after_keep_and_pending_dead_and_held_ones_stay(
    outbox: Outbox,
) -> None:
    outbox.put(
        [
            message("OLD-DONE", 0.0),
            message("OLD-DROPPED", 0.0, outcome="drop", items=0),
            message("OLD-DEAD", 0.0),
            message("OLD-PENDING", 0.0),
            message("OLD-HELD", 0.0, outcome="hold", items=0),
            message("NEW-DONE", 6 * DAY),
        ]
    )
    deliver(outbox, "OLD-DONE")
    deliver(outbox, "NEW-DONE")
    deliver(outbox, "OLD-DEAD", state="dead")

    gone = outbox.purge(8 * DAY, keep=7 * DAY)

    assert gone == 2
    assert {r.message.id for r in outbox.history()} == {
        "OLD-DEAD",
        "OLD-PENDING",
        "OLD-HELD",
        "NEW-DONE",
    }
    assert outbox.attempts_of("OLD-DONE") == []
    assert len(outbox.attempts_of("NEW-DONE")) == 1


def test_beyond_max_messages_the_oldest_finished_ones_go_in_batches(outbox: Outbox) -> None:
    outbox.put([message(f"M{i:02}", float(i)) for i in range(10)])
    for i in range(10):
        if i != 1:
            deliver(outbox, f"M{i:02}")

    first = outbox.purge(20.0, keep=DAY, max_messages=4, batch=3)
    second = outbox.purge(20.0, keep=DAY, max_messages=4, batch=3)
    third = outbox.purge(20.0, keep=DAY, max_messages=4, batch=3)

    assert (first, second, third) == (3, 2, 0)
    # M01 is still pending: it stays, and the newest four stay.
    assert sorted(r.message.id for r in outbox.history()) == ["M01", "M06", "M07", "M08", "M09"]


def test_an_outbox_made_before_the_history_gets_its_columns_and_keeps_its_mail(
    tmp_path: Path,
) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript(
            """
            CREATE TABLE messages (id TEXT PRIMARY KEY, received REAL NOT NULL,
                mail_from TEXT NOT NULL, rcpt_tos TEXT NOT NULL, subject TEXT NOT NULL,
                manager TEXT, outcome TEXT NOT NULL, reason TEXT NOT NULL, raw BLOB);
            INSERT INTO messages VALUES ('OLD', 1.0, 'go@example.com', '["ops@example.com"]',
                'an old one', 'mail#0', 'drop', 'no rule matched', NULL);
            PRAGMA user_version=1;
            """
        )
    db.close()

    outbox = Outbox(tmp_path)
    try:
        outbox.put([message("NEW", 2.0, facts={"event": "BREAKS"})])
        rows = [(r.message.id, r.state) for r in outbox.history()]
        old = outbox.decision("OLD")
    finally:
        outbox.close()

    assert rows == [("NEW", "pending"), ("OLD", "none")]
    assert old is not None
    assert (old.facts, old.trace, old.headers) == ("", (), b"")


# -- its configuration --------------------------------------------------------------------

MINIMAL = "remote-smtp: localhost:25\nmanagers: []\n"


def test_history_keeps_a_week_and_100000_messages_unless_the_file_says_otherwise() -> None:
    assert config.parse(MINIMAL, "c.yml", {}).history == History(7 * DAY, 100_000)
    changed = config.parse(MINIMAL + "history:\n  keep: 2d\n  max-messages: 500\n", "c.yml", {})
    assert changed.history == History(2 * DAY, 500)


def test_mistakes_in_history_are_reported_with_file_and_line() -> None:
    text = MINIMAL + "history:\n  keep: forever\n  max-messages: 0\n  max: 3\n"
    with pytest.raises(ConfigError) as caught:
        config.parse(text, "c.yml", {})
    shown = [str(p) for p in caught.value.problems]
    assert any(s.startswith("c.yml:4: history.keep:") for s in shown), shown
    assert any(s.startswith("c.yml:5: history.max-messages:") for s in shown), shown
    assert any(s.startswith("c.yml:6: history.max: unknown key 'max'") for s in shown), shown


# -- what the planner keeps for it --------------------------------------------------------


def test_the_trace_kept_is_the_text_route_trace_prints(tmp_path: Path) -> None:
    config_file = tmp_path / "configuration.yml"
    config_file.write_text(
        "remote-smtp: localhost:25\n"
        "managers:\n"
        "  - name: gocd\n"
        "    messages-we-want: {to: mail2alert@example.com}\n"
        "    rules:\n"
        "      - actions: [mailto:other@example.com]\n"
        "        filter: {function: pipelines.any, events: [FIXED]}\n"
        "      - actions: [mailto:team@example.com]\n"
        "        filter: {function: pipelines.any, events: [BREAKS]}\n",
        encoding="utf-8",
    )
    loaded = config.load(config_file)
    envelope = Envelope("go@example.com", ("mail2alert@example.com",))
    data = gocd_stage_mail()

    accepted = accept("Q1", envelope, data, loaded.routing, Context())
    shown = render(explain(loaded, envelope, data, Context()), trace=True)

    assert len(accepted.trace) == 2
    for line in accepted.trace:
        assert f"  {line}" in shown.splitlines()
    assert accepted.trace[1].startswith("✓ rule 2 (line 8): pipelines.any() events BREAKS:")
    assert accepted.facts.startswith("pipeline my-pipeline #6, stage my-stage #1, event BREAKS")
    assert accepted.facts_data is not None
    assert accepted.facts_data["pipeline"] == "my-pipeline"
    assert accepted.headers == data[: data.index(b"\r\n\r\n") + 2]


def test_a_routed_mail_names_its_queue_id_and_the_rules_that_matched() -> None:
    gocd = MANAGER_TYPES["gocd"]
    any_stage = gocd.functions["pipelines.any"]
    rules = tuple(
        Rule(any_stage, (), any_stage.compile(()), (f"mailto:team{i}@example.com",))
        for i in range(2)
    )
    manager = Manager(gocd, 0, rules=rules)
    envelope = Envelope("go@example.com", ("mail2alert@example.com",))
    sneaky = gocd_stage_mail().replace(b"Subject:", b"X-Mail2alert-Id: FORGED\r\nSubject:", 1)

    accepted = accept("Q7", envelope, sneaky, [manager], Context())

    (mail,) = accepted.items
    assert field_value(mail.data, "x-mail2alert-id") == "Q7"
    assert field_value(mail.data, "x-mail2alert-rule") == "gocd#0 rules 1, 2"
    assert b"FORGED" not in mail.data


# -- end to end ---------------------------------------------------------------------------


def test_a_routed_mail_arrives_with_its_queue_id_and_the_history_has_every_attempt(
    tmp_path: Path, upstream: CaptureServer
) -> None:
    upstream.refuse_data("451 4.3.0 try again later")
    with relay(tmp_path, upstream, example_managers("mail")) as mail2alert:
        reply = mail2alert.send(compose(subject="Server Backup Failed"), mail_from="go@example.com")
        (got,) = upstream.wait_for(1)
        mail2alert.outbox.wait_state(reply.queue_id, "done")
        outbox = Outbox(tmp_path / "data")
        try:
            attempts = wait_until(
                lambda: (found := outbox.attempts_of(reply.queue_id)) and len(found) == 2 and found
            )
            decided = outbox.decision(reply.queue_id)
            (row,) = outbox.history()
        finally:
            outbox.close()

    assert field_value(got.data, "x-mail2alert-id") == reply.queue_id
    assert field_value(got.data, "x-mail2alert-rule").startswith("mail#0 rule")
    assert [a.result for a in attempts] == ["retry", "sent"]
    assert "451 4.3.0 try again later" in attempts[0].answer
    assert attempts[1].answer.startswith("250")
    assert decided is not None
    assert decided.trace[0].startswith("✓ rule 1")
    assert b"Subject: Server Backup Failed" in decided.headers
    assert (row.message.id, row.state, row.message.outcome) == (reply.queue_id, "done", "deliver")
