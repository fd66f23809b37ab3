"""THE rule engine: managers + rules + one message -> a :class:`~mail2alert.model.Decision`.

``serve`` calls :func:`route` for every message, and so does every command that shows or tests
routing, so what an operator tests is exactly what runs. It is pure and synchronous: the
caller supplies everything it may know (the message, each manager's snapshot, the notes
earlier decisions kept) in a :class:`~mail2alert.managers.base.Context`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from mail2alert.actions import for_committers
from mail2alert.managers.base import Context, ManagerType, Predicate, RuleFunction
from mail2alert.message import RawMessage
from mail2alert.model import Alert, ChatTemplate, Decision, Envelope, RuleTrace


@dataclass(frozen=True)
class Rule:
    """One configured rule, compiled: a predicate, optional events, and actions."""

    function: RuleFunction
    args: tuple[str, ...]
    predicate: Predicate
    actions: tuple[str, ...]
    events: frozenset[str] | None = None
    line: int = 0
    template: ChatTemplate = field(default_factory=ChatTemplate)

    def judge(
        self, index: int, alert: Alert, context: Context, fallback: tuple[str, ...] = ()
    ) -> tuple[RuleTrace, bool]:
        """This rule's verdict on ``alert`` and whether it waits for a snapshot.

        A matching rule's ``committers:`` actions become the committers' ``mailto:``
        actions; when that leaves the rule no one to tell, it uses ``fallback`` (its
        manager's) instead.
        """
        if self.events is not None:
            if alert.event is None:
                return RuleTrace(index, False, "the message has no event"), False
            if alert.event not in self.events:
                wanted = ", ".join(sorted(self.events))
                return RuleTrace(index, False, f"event {alert.event} is not one of {wanted}"), False
        verdict = self.predicate(alert, context)
        if not verdict.matched:
            return RuleTrace(index, False, verdict.reason), verdict.waiting
        actions, found = for_committers(self.actions, alert)
        reason = verdict.reason if found is None else f"{verdict.reason}; {found}"
        if not actions and fallback:
            actions, reason = fallback, f"{reason}: fallback actions"
        return RuleTrace(index, True, reason, actions), verdict.waiting


@dataclass(frozen=True)
class Manager:
    """One configured manager: its type, the mail it wants and its rules, in config order."""

    type: ManagerType
    index: int
    wants_to: tuple[str, ...] = ()
    wants_from: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    fallback: tuple[str, ...] = ()
    line: int = 0
    options: Mapping[str, object] = field(default_factory=dict)
    """The manager type's own keys (``url``, ``hold-max``...), validated."""

    @property
    def label(self) -> str:
        """How logs, reports and the outbox name this manager: its type and its position
        among all managers, e.g. ``ci#0``."""
        return f"{self.type.name}#{self.index}"

    def rule_text(self, index: int) -> str:
        """A rule as one line: ``ci.in_team('a') events FAILED``."""
        rule = self.rules[index]
        args = ", ".join(repr(a) for a in rule.args)
        wanted = [e for e in self.type.events if e in (rule.events or ())]
        return f"{rule.function.name}({args})" + (f" events {','.join(wanted)}" if wanted else "")

    def wanted_recipients(self, envelope: Envelope) -> tuple[str, ...] | None:
        """The recipients this manager takes, or None when it does not want the message.

        Every key that is set must match (``to`` one of the recipients, ``from`` the sender),
        case-insensitively. With ``to``, only the matching recipients are taken; the others
        still get the message unchanged.
        """
        if self.wants_from and envelope.mail_from.lower() not in self.wants_from:
            return None
        if not self.wants_to:
            return envelope.rcpt_tos
        taken = tuple(r for r in envelope.rcpt_tos if r.lower() in self.wants_to)
        return taken or None


def find_manager(managers: Sequence[Manager], label: str | None) -> Manager | None:
    """The manager a decision names (``ci#0``), or None."""
    return next((m for m in managers if m.label == label), None)


def route(
    managers: Sequence[Manager], envelope: Envelope, message: RawMessage, context: Context
) -> Decision:
    """Decide what happens to one message: deliver to actions, drop, hold, or relay.

    The first manager (in configuration order) that wants the message decides. All its rules
    are judged; the actions of every matching rule are collected, de-duplicated, in the order
    first seen. If any rule can only be judged with a snapshot that is not there yet, the
    decision is ``hold``, even when other rules matched: the message is routed once, wholly,
    when the snapshot has come (or given up on: see ``hold-max``), never half now and half
    later.
    """
    for manager in managers:
        taken = manager.wanted_recipients(envelope)
        if taken is None:
            continue
        if manager.label in context.snapshots:
            context = replace(context, snapshot=context.snapshots[manager.label])
        alert = manager.type.read(message, envelope, context)
        rest = tuple(r for r in envelope.rcpt_tos if r not in taken)
        traces: list[RuleTrace] = []
        actions: dict[str, ChatTemplate] = {}
        waiting = False
        for index, rule in enumerate(manager.rules):
            trace, rule_waits = rule.judge(index, alert, context, manager.fallback)
            traces.append(trace)
            waiting = waiting or rule_waits
            for action in trace.actions:
                actions.setdefault(action, rule.template)
        if waiting:
            return Decision(
                "hold",
                manager.label,
                manager.type.waiting,
                trace=tuple(traces),
                alert=alert,
                passthrough=rest,
            )
        matched = sum(t.matched for t in traces)
        if actions:
            reason = f"{matched} of {len(traces)} rules matched"
            return Decision(
                "deliver",
                manager.label,
                reason,
                tuple(actions),
                tuple(traces),
                alert,
                rest,
                templates=actions,
            )
        if manager.fallback:
            return Decision(
                "deliver",
                manager.label,
                "no rule matched: fallback actions",
                manager.fallback,
                tuple(traces),
                alert,
                rest,
            )
        return Decision(
            "drop",
            manager.label,
            f"{matched} of {len(traces)} rules matched, with no one to send to"
            if matched
            else "no rule matched",
            trace=tuple(traces),
            alert=alert,
            passthrough=rest,
        )
    return Decision("relay", None, "no manager wants it")
