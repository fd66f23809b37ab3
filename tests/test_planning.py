"""The planner and the manager plugin's stateful half, specified without sockets or SQL.

A tiny ``builds`` manager type defined here (the kind of thing a Jenkins plugin would be)
shows that the core needs nothing of GoCD: its own reader, rule function and memory are
enough for routing, threading, notes, de-duplication and labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mail2alert.components import Knowledge
from mail2alert.managers.base import (
    Context,
    ManagerType,
    Predicate,
    RuleFunction,
    Verdict,
    read_alert,
)
from mail2alert.managers.memory import Claim, Conversation, Note
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.message import RawMessage
from mail2alert.model import Alert, ChatPost, Envelope
from mail2alert.outbox import Accepted
from mail2alert.planning import THREADS, accept
from mail2alert.routing import Manager, Rule, route
from tests.helpers import compose, field_value

_BUILD = re.compile(r"^Build (?P<job>\S+) (?P<word>failed|fixed|passed)$")
_EVENTS = {"failed": "RED", "fixed": "GREEN", "passed": "OK"}


def read_build(message: RawMessage, envelope: Envelope, context: Context) -> Alert:
    alert = read_alert(message, envelope, context)
    found = _BUILD.match(alert.subject)
    if found is None:
        return alert
    return Alert(
        alert.envelope,
        alert.subject,
        alert.from_header,
        alert.message_id,
        event=_EVENTS[found["word"]],
    )


def _job(alert: Alert) -> str:
    found = _BUILD.match(alert.subject)
    return found["job"] if found else ""


class BuildMemory:
    """Builds of one job are a conversation: a failure starts it, the fix answers it."""

    def conversation(self, alert: Alert) -> Conversation | None:
        if alert.event is None:
            return None
        role = {"RED": "start", "GREEN": "answer"}.get(alert.event)
        return Conversation(("builds", _job(alert)), role)

    def notes(self, alert: Alert) -> tuple[Note, ...]:
        return (Note("history", ("builds", _job(alert)), alert.event or ""),)

    def claim(self, alert: Alert, label: str, options: Mapping[str, object]) -> Claim | None:
        return Claim(f"{label}:{alert.subject}", 60.0) if alert.event else None

    def label(self, alert: Alert, snapshot: object | None) -> str | None:
        return "nightly" if _job(alert).endswith("-nightly") else None


def _compile_any_build(args: tuple[str, ...]) -> Predicate:
    def any_build(alert: Alert, context: Context) -> Verdict:
        return Verdict(alert.event is not None, "a build mail" if alert.event else "no build")

    return any_build


ANY_BUILD = RuleFunction("builds.any", "any build mail", (), _compile_any_build)
BUILDS = ManagerType(
    name="builds",
    summary="a manager type of a test",
    read=read_build,
    functions={ANY_BUILD.name: ANY_BUILD},
    events=("RED", "GREEN", "OK"),
    memory=BuildMemory(),
)


def builds_manager(*actions: str) -> Manager:
    rule = Rule(ANY_BUILD, (), ANY_BUILD.compile(()), actions)
    return Manager(BUILDS, 0, wants_to=("ci@example.com",), rules=(rule,))


ENVELOPE = Envelope("ci@example.com", ("ci@example.com",))


def accepted(
    subject: str, context: Context, *actions: str, message_id: str = "<m@ci.example.com>"
) -> Accepted:
    data = compose(subject=subject, message_id=message_id, to="ci@example.com")
    managers = [builds_manager(*actions or ("mailto:team@example.com",))]
    return accept("Q1", ENVELOPE, data, managers, context, received_at=1000.0)


def kept(context: Context, a: Accepted) -> Context:
    """The context after ``a`` was committed: its notes kept, as the outbox keeps them."""
    state = {table: dict(rows) for table, rows in context.state.items()}
    for note in a.notes:
        rows = state.setdefault(note.table, {})
        if note.value:
            rows[note.key] = note.value
        else:
            rows.pop(note.key, None)
    return Context(state=state)


def test_a_manager_type_from_outside_the_core_routes_with_its_own_reader_and_rules() -> None:
    a = accepted("Build app failed", Context())

    assert (a.decision.outcome, a.decision.manager) == ("deliver", "builds#0")
    assert a.decision.alert is not None
    assert a.decision.alert.event == "RED"
    assert [i.recipients for i in a.items] == [("team@example.com",)]


def test_the_mail_that_starts_a_conversation_is_remembered_with_the_managers_notes() -> None:
    a = accepted("Build app failed", Context(), message_id="<red@ci.example.com>")

    assert set(a.notes) == {
        Note("history", ("builds", "app"), "RED"),
        Note(THREADS, ("builds", "app"), "<red@ci.example.com>"),
    }


def test_the_answer_is_threaded_under_the_start_and_ends_the_conversation() -> None:
    first = accepted("Build app failed", Context(), message_id="<red@ci.example.com>")

    fix = accepted("Build app fixed", kept(Context(), first), message_id="<green@ci.example.com>")

    (mail,) = fix.items
    assert field_value(mail.data, "in-reply-to") == "<red@ci.example.com>"
    assert Note(THREADS, ("builds", "app"), "") in fix.notes


def test_an_answer_without_a_known_start_is_not_threaded_and_forgets_nothing() -> None:
    fix = accepted("Build app fixed", Context())

    (mail,) = fix.items
    assert field_value(mail.data, "in-reply-to") == ""
    assert all(note.table != THREADS for note in fix.notes)


def test_the_claim_and_the_label_come_from_the_managers_memory() -> None:
    a = accepted("Build app-nightly failed", Context())

    assert a.claim == Claim("builds#0:Build app-nightly failed", 60.0)
    assert a.label == "nightly"


def test_a_chat_post_carries_the_conversation_so_the_fix_replies_in_the_breakages_thread() -> None:
    hook = "json://127.0.0.1:9/hook"
    start = accepted("Build app failed", Context(), hook)
    answer = accepted("Build app fixed", Context(), hook)

    (post,) = [ChatPost.from_json(i.data) for i in start.items if i.kind == "chat"]
    (reply,) = [ChatPost.from_json(i.data) for i in answer.items if i.kind == "chat"]
    assert (post.thread_key, post.thread) == (("builds", "app"), "start")
    assert (reply.thread_key, reply.thread) == (("builds", "app"), "reply")


def test_the_mail_manager_remembers_nothing() -> None:
    mail = MANAGER_TYPES["mail"]
    rule_fn = mail.functions["mail.in_subject"]
    rule = Rule(rule_fn, ("backup",), rule_fn.compile(("backup",)), ("mailto:ops@example.com",))
    manager = Manager(mail, 0, rules=(rule,))
    data = compose(subject="backup done", message_id="<b@example.com>")

    a = accept("Q2", Envelope("a@example.com", ("b@example.com",)), data, [manager], Context())

    assert a.decision.outcome == "deliver"
    assert (a.notes, a.claim, a.label) == ((), None, None)


def test_a_rule_waiting_for_a_snapshot_holds_the_message_even_when_another_rule_matched() -> None:
    """Held mail is routed once, wholly, when the snapshot has come: never half now."""
    gocd = MANAGER_TYPES["gocd"]
    any_fn, group_fn = gocd.functions["pipelines.any"], gocd.functions["pipelines.in_group"]
    rules = (
        Rule(any_fn, (), any_fn.compile(()), ("mailto:all@example.com",)),
        Rule(group_fn, ("g",), group_fn.compile(("g",)), ("mailto:g@example.com",)),
    )
    manager = Manager(gocd, 0, rules=rules)
    data = compose(subject="Stage [p/1/s/1] is broken")

    a = accept("Q3", Envelope("go@example.com", ("m@example.com",)), data, [manager], Context())

    assert a.decision.outcome == "hold"
    assert [t.matched for t in a.decision.trace] == [True, False]
    assert a.notes == ()
    assert a.claim is None


# -- route(), the one rule engine ------------------------------------------------------------


def mail_rule(word: str, *actions: str) -> Rule:
    fn = MANAGER_TYPES["mail"].functions["mail.in_subject"]
    return Rule(fn, (word,), fn.compile((word,)), actions)


def test_the_first_manager_that_wants_the_message_decides() -> None:
    first = Manager(
        MANAGER_TYPES["mail"],
        0,
        wants_to=("a@example.com",),
        rules=(mail_rule("x", "mailto:1@example.com"),),
    )
    second = Manager(MANAGER_TYPES["mail"], 1, rules=(mail_rule("x", "mailto:2@example.com"),))
    envelope = Envelope("s@example.com", ("a@example.com",))

    decision = route([first, second], envelope, RawMessage.parse(compose(subject="x")), Context())

    assert (decision.manager, decision.actions) == ("mail#0", ("mailto:1@example.com",))


def test_recipients_the_deciding_manager_did_not_take_get_the_message_unchanged() -> None:
    manager = Manager(
        MANAGER_TYPES["mail"],
        0,
        wants_to=("a@example.com",),
        rules=(mail_rule("x", "mailto:1@example.com"),),
    )
    envelope = Envelope("s@example.com", ("a@example.com", "b@example.com"))

    decision = route([manager], envelope, RawMessage.parse(compose(subject="x")), Context())

    assert decision.passthrough == ("b@example.com",)


def test_actions_of_every_matching_rule_are_collected_once_in_the_order_first_seen() -> None:
    rules = (
        mail_rule("disk", "mailto:1@example.com", "mailto:2@example.com"),
        mail_rule("full", "mailto:2@example.com", "mailto:3@example.com"),
        mail_rule("cpu", "mailto:4@example.com"),
    )
    manager = Manager(MANAGER_TYPES["mail"], 0, rules=rules)
    message = RawMessage.parse(compose(subject="disk full"))

    decision = route([manager], ENVELOPE, message, Context())

    assert decision.actions == (
        "mailto:1@example.com",
        "mailto:2@example.com",
        "mailto:3@example.com",
    )
    assert decision.reason == "2 of 3 rules matched"


def test_with_no_rule_matching_the_fallback_actions_are_used_or_the_message_is_dropped() -> None:
    rules = (mail_rule("cpu", "mailto:1@example.com"),)
    with_fallback = Manager(
        MANAGER_TYPES["mail"], 0, rules=rules, fallback=("mailto:ops@example.com",)
    )
    without = Manager(MANAGER_TYPES["mail"], 0, rules=rules)
    message = RawMessage.parse(compose(subject="disk full"))

    fell_back = route([with_fallback], ENVELOPE, message, Context())
    dropped = route([without], ENVELOPE, message, Context())

    assert (fell_back.outcome, fell_back.actions) == ("deliver", ("mailto:ops@example.com",))
    assert (dropped.outcome, dropped.actions) == ("drop", ())


def test_a_message_no_manager_wants_is_relayed() -> None:
    manager = Manager(MANAGER_TYPES["mail"], 0, wants_from=("go@example.com",))

    decision = route([manager], ENVELOPE, RawMessage.parse(compose()), Context())

    assert (decision.outcome, decision.manager) == ("relay", None)


# -- never back to mail2alert -----------------------------------------------------------------


def to_ourselves(*actions: str, fallback: tuple[str, ...] = ()) -> Accepted:
    """A mail to the manager's own address, routed by one matching rule with ``actions``."""
    manager = Manager(
        MANAGER_TYPES["mail"],
        0,
        wants_to=("alerts@example.com",),
        rules=(mail_rule("disk", *actions),),
        fallback=fallback,
    )
    envelope = Envelope("go@example.com", ("alerts@example.com",))
    return accept("Q", envelope, compose(subject="disk full"), [manager], Context())


def test_routed_mail_is_not_sent_to_an_address_mail2alert_takes_mail_for() -> None:
    """Upstream would hand it straight back to mail2alert, which would route it again."""
    a = to_ourselves("mailto:team@example.com", "mailto:Alerts@Example.com")

    assert [item.recipients for item in a.items] == [("team@example.com",)]
    assert a.decision.reason == (
        "1 of 1 rules matched; Alerts@Example.com left out (mail2alert's own address)"
    )


def test_with_no_one_else_to_send_to_the_fallback_actions_are_used_without_ours() -> None:
    fallback = ("mailto:alerts@example.com", "mailto:ops@example.com")

    a = to_ourselves("mailto:alerts@example.com", fallback=fallback)

    assert (a.decision.outcome, a.decision.actions) == ("deliver", ("mailto:ops@example.com",))
    assert [item.recipients for item in a.items] == [("ops@example.com",)]


def test_with_no_one_else_and_no_fallback_the_mail_is_dropped_and_the_reason_says_why() -> None:
    a = to_ourselves("mailto:alerts@example.com")

    assert (a.decision.outcome, a.items) == ("drop", ())
    assert a.decision.reason == (
        "1 of 1 rules matched; alerts@example.com left out (mail2alert's own address):"
        " no one left to send to"
    )


def test_chat_actions_still_go_when_the_only_mail_recipient_is_ours() -> None:
    a = to_ourselves("mailto:alerts@example.com", "slack:#ops")

    assert (a.decision.outcome, a.decision.actions) == ("deliver", ("slack:#ops",))
    assert [item.kind for item in a.items] == ["chat"]


# -- a sender of our own (hosted smarthosts take mail only from their login) ------------------


def sent_with(sender: str | None, **mail: str) -> bytes:
    manager = Manager(MANAGER_TYPES["mail"], 0, rules=(mail_rule("x", "mailto:1@example.com"),))
    envelope = Envelope("go@example.com", ("a@example.com",))
    a = accept("Q", envelope, compose(subject="x", **mail), [manager], Context(), sender=sender)
    (item,) = a.items
    assert item.mail_from == "go@example.com"  # the transport puts the sender on MAIL FROM
    return item.data


def test_with_a_sender_routed_mail_is_from_it_and_replies_go_to_the_original_author() -> None:
    data = sent_with("alerts@example.com")
    assert field_value(data, "From") == "alerts@example.com"
    assert field_value(data, "Reply-To") == "Go Server <go@example.com>"


def test_a_reply_to_of_the_message_is_kept_as_it_is() -> None:
    data = sent_with("alerts@example.com", headers=("Reply-To: team@example.com",))
    assert field_value(data, "Reply-To") == "team@example.com"


def test_without_a_sender_routed_mail_is_from_the_envelope_sender_as_before() -> None:
    data = sent_with(None)
    assert field_value(data, "From") == "Go Server <go@example.com>"
    assert field_value(data, "Reply-To") == ""


# -- what routing knows while another process's notes are read -----------------------------------


def test_a_note_remembered_while_the_notes_are_read_again_survives_the_read() -> None:
    """The read began before this process's commit: what it read is older than what the
    commit taught, which must not be lost (a ``failed`` after it would not be a breakage)."""
    knowledge = Knowledge(())
    knowledge.reading()
    read_before_the_commit: dict[str, dict[tuple[str, ...], str]] = {"history": {}}
    knowledge.remember([Note("history", ("p", "s"), "passed")])
    knowledge.replace_notes(read_before_the_commit)
    assert knowledge.context.recall("history", ("p", "s")) == "passed"


def test_notes_read_again_replace_the_old_whole_and_never_empty_them() -> None:
    """Routing in another thread (the holds) may hold the old notes while they are read
    again: it sees them as they were, never half emptied."""
    knowledge = Knowledge(())
    knowledge.reading()
    knowledge.replace_notes({"history": {("p", "s"): "failed"}})
    before = knowledge.context
    knowledge.reading()
    knowledge.replace_notes({"history": {("p", "s"): "passed"}})
    assert before.recall("history", ("p", "s")) == "failed"
    assert knowledge.context.recall("history", ("p", "s")) == "passed"
