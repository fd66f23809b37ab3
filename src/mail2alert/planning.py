"""THE planner: a routing decision -> what the outbox keeps and what goes out. Pure.

:func:`accept` parses a received message, routes it (:func:`mail2alert.routing.route`) and
plans it: the outgoing items (the rewritten mail, one chat post per chat action, the
unchanged copy for recipients no manager took), the notes the deciding manager keeps, its
de-duplication claim and its label, and its facts and rule trace for the history. ``serve``
calls it for every message and for held mail it releases, and so do ``route``, ``test`` and
``coverage``: what an operator tests is what runs. It does no I/O: everything it may know
comes in the :class:`~mail2alert.managers.base.Context`.

Conversations are the planner's own policy, in any manager's words: the mail that starts
one is remembered (its Message-ID, in the ``mail_threads`` notes), and the mail that answers
it is threaded under it (``In-Reply-To``) and ends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from mail2alert.actions import mask, outgoing_for
from mail2alert.managers.base import Context
from mail2alert.managers.explaining import Facts
from mail2alert.managers.memory import RECOVERED_HEADER, Claim, Conversation, Note
from mail2alert.message import RawMessage, received_header
from mail2alert.model import Decision, Envelope, Outgoing, RuleTrace
from mail2alert.outbox import Accepted
from mail2alert.routing import Manager, find_manager, route

log = logging.getLogger(__name__)

#: The notes of conversations: the Message-ID of the mail that started each one.
THREADS = "mail_threads"


@dataclass(frozen=True)
class Plan:
    """What one decision turns into."""

    items: tuple[Outgoing, ...]
    notes: tuple[Note, ...] = ()
    """Facts to keep once committed; a note with an empty value forgets its key."""
    claim: Claim | None = None
    label: str | None = None
    facts: Facts | None = None
    """What the deciding manager's type reads the alert as, for the history and ``route``."""
    trace: tuple[str, ...] = ()
    """Each rule's verdict as ``route --trace`` prints it (:func:`trace_lines`)."""


def plan(
    decision: Decision,
    envelope: Envelope,
    message: RawMessage,
    managers: Sequence[Manager],
    context: Context,
    *,
    received: bytes,
    sender: str | None = None,
    queue_id: str = "",
) -> Plan:
    """Plan ``decision`` for the message; ``received`` is the trace field to prepend,
    ``sender``, when set, the From: of routed mail, and ``queue_id`` the id routed mail
    names."""
    manager = find_manager(managers, decision.manager)
    alert = decision.alert
    if manager is None or alert is None:
        items = outgoing_for(
            decision, envelope, message, received, sender=sender, queue_id=queue_id
        )
        trace = trace_lines(manager, decision.trace) if manager else ()
        return Plan(tuple(items), trace=trace)
    memory = manager.type.memory
    snapshot = context.snapshots.get(manager.label, context.snapshot)
    label = memory.label(alert, snapshot)
    facts = manager.type.explaining.facts(alert, label, snapshot is not None)
    trace = trace_lines(manager, decision.trace)
    conversation = memory.conversation(alert)
    answers = _answered(conversation, context)
    items = outgoing_for(
        decision,
        envelope,
        message,
        received,
        label=label,
        in_reply_to=answers,
        conversation=conversation,
        shown=manager.type.presentation,
        sender=sender,
        queue_id=queue_id,
    )
    if decision.outcome == "hold":
        return Plan(tuple(items), label=label, facts=facts, trace=trace)
    notes = list(memory.notes(alert))
    if conversation is not None and conversation.role == "start" and alert.message_id:
        notes.append(Note(THREADS, conversation.key, alert.message_id))
    elif conversation is not None and answers:
        notes.append(Note(THREADS, conversation.key, ""))
    claim = memory.claim(alert, manager.label, manager.options)
    return Plan(tuple(items), tuple(notes), claim, label, facts, trace)


def remember(state: dict[str, dict[tuple[str, ...], str]], notes: Sequence[Note]) -> None:
    """Apply committed ``notes`` to an in-memory snapshot of the notes, as the outbox did."""
    for note in notes:
        rows = state.setdefault(note.table, {})
        if note.value:
            rows[note.key] = note.value
        else:
            rows.pop(note.key, None)


def _answered(conversation: Conversation | None, context: Context) -> str | None:
    """The Message-ID of the mail that started the conversation this one answers."""
    if conversation is None or conversation.role != "answer":
        return None
    return context.recall(THREADS, conversation.key) or None


def accept(
    queue_id: str,
    envelope: Envelope,
    data: bytes,
    managers: Sequence[Manager],
    context: Context,
    *,
    helo: str = "",
    peer: str = "",
    hostname: str = "localhost",
    received_at: float | None = None,
    stop_holding: bool = False,
    sender: str | None = None,
    parsed: RawMessage | None = None,
) -> Accepted:
    """Route one received message and plan what the outbox must keep; never raises.

    If routing itself fails (our bug, never the sender's), the message is relayed unchanged
    and the error logged with its queue id. With ``stop_holding``, a message that would be
    held again goes to its manager's ``fallback`` actions, or is relayed unchanged.
    ``sender`` (``remote-smtp``'s) is the From: of routed mail. ``parsed`` is ``data`` split
    already, by a caller that had to read its header first.
    """
    now = time.time() if received_at is None else received_at
    message = RawMessage.parse(data) if parsed is None else parsed
    try:
        decision = route(managers, envelope, message, context)
    except Exception:
        log.exception("%s: routing failed; relaying the message unchanged", queue_id)
        decision = Decision("relay", None, "routing failed: relayed unchanged")
    if decision.outcome == "hold" and stop_holding:
        decision = _stop_holding(queue_id, decision, managers)
    decision = _not_to_ourselves(queue_id, decision, managers)
    made_from = message.get(RECOVERED_HEADER)
    if made_from:
        # The reason is what the log line, ``queue show`` and ``route`` print.
        why = f"recovered: made by mail2alert from {made_from}, the sender's own mail never came"
        decision = replace(decision, reason=f"{decision.reason}; {why}")
    single = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
    received = received_header(
        helo=helo,
        peer=peer,
        hostname=hostname,
        queue_id=queue_id,
        recipient=single,
        newline=message.newline,
    )
    planned = plan(
        decision,
        envelope,
        message,
        managers,
        context,
        received=received,
        sender=sender,
        queue_id=queue_id,
    )
    alert = decision.alert
    facts = planned.facts
    return Accepted(
        queue_id,
        now,
        envelope,
        alert.subject if alert else message.get("subject"),
        decision,
        planned.items,
        raw=data if decision.outcome == "hold" else None,
        notes=planned.notes,
        claim=planned.claim,
        label=planned.label,
        facts=facts.line if facts else "",
        facts_data=facts.data if facts else None,
        trace=planned.trace,
        headers=message.data[: message.header_end],
    )


def trace_lines(manager: Manager, trace: Sequence[RuleTrace]) -> tuple[str, ...]:
    """Each rule's verdict in one line, as ``route --trace`` prints it and the history keeps
    it: ``✓ rule 1 (line 12): ci.in_group('a') events BREAKS: matched -> mailto:a@b``."""
    lines = []
    for t in trace:
        mark = "✓" if t.matched else "✗"
        rule = manager.rules[t.index] if t.index < len(manager.rules) else None
        where = f" (line {rule.line})" if rule is not None else ""
        text = manager.rule_text(t.index) if rule is not None else ""
        then = f" -> {', '.join(mask(a) for a in t.actions)}" if t.actions else ""
        lines.append(f"{mark} rule {t.index + 1}{where}: {text}: {t.reason}{then}")
    return tuple(lines)


def _not_to_ourselves(queue_id: str, decision: Decision, managers: Sequence[Manager]) -> Decision:
    """``decision`` without the recipients mail2alert itself takes mail for.

    Sent upstream, a mail to a manager's ``messages-we-want: to:`` address comes straight back
    and is routed again: a loop. Those recipients are left out (logged once); when nothing is
    left, the manager's fallback actions are used as for a match without actions, else the
    message is dropped, and the decision's reason says why.
    """
    if decision.outcome != "deliver":
        return decision
    ours = {address.lower() for manager in managers for address in manager.wants_to}
    looping = [a for a in decision.actions if _mail_to(a) in ours]
    if not looping:
        return decision
    left_out = ", ".join(a[len("mailto:") :] for a in looping)
    log.warning(
        "%s: not sent to %s: mail2alert takes mail for it, so it would come back (a loop)",
        queue_id,
        left_out,
    )
    why = f"{decision.reason}; {left_out} left out (mail2alert's own address)"
    kept = tuple(a for a in decision.actions if a not in looping)
    if kept:
        return replace(decision, actions=kept, reason=why)
    manager = find_manager(managers, decision.manager)
    fallback = tuple(a for a in manager.fallback if _mail_to(a) not in ours) if manager else ()
    if fallback:
        return replace(decision, actions=fallback, reason=f"{why}: fallback actions")
    return replace(decision, outcome="drop", actions=(), reason=f"{why}: no one left to send to")


def _mail_to(action: str) -> str | None:
    """The address of a ``mailto:`` action, in lower case; None for any other action."""
    return action[len("mailto:") :].lower() if action.lower().startswith("mailto:") else None


def _stop_holding(queue_id: str, decision: Decision, managers: Sequence[Manager]) -> Decision:
    manager = find_manager(managers, decision.manager)
    why = manager.type.gave_up if manager is not None else "held too long"
    if manager is not None and manager.fallback:
        log.warning("%s: %s; sending to %s's fallback actions", queue_id, why, manager.label)
        return replace(
            decision,
            outcome="deliver",
            reason=f"{why}: fallback actions",
            actions=manager.fallback,
        )
    log.warning("%s: %s and no fallback; relaying unchanged", queue_id, why)
    return replace(decision, outcome="relay", reason=f"{why}: relayed unchanged")
