"""What operators see and test: one message explained, test suites, and the coverage report.

Everything here calls :func:`mail2alert.server.accept`, which calls
:func:`mail2alert.routing.route`: the very code ``serve`` runs for every message. Nothing here
sends anything or writes anywhere.
"""

from __future__ import annotations

import email.header
import email.utils
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mail2alert.actions import mask
from mail2alert.config import Config
from mail2alert.errors import GocdError, UsageError
from mail2alert.gocd.client import parse_groups
from mail2alert.gocd.manager import VERBS
from mail2alert.gocd.model import EVENTS, PipelineGroups, stage_of
from mail2alert.managers.base import Context
from mail2alert.message import RawMessage
from mail2alert.model import ChatPost, Decision, Envelope
from mail2alert.planning import accept
from mail2alert.routing import Manager, find_manager

#: What ``--expect`` and test suites may say instead of a list of actions.
OUTCOME_WORDS = ("relay", "drop", "hold")


def synthetic_message(mail_from: str, to: str, subject: str) -> bytes:
    """A minimal mail with these headers, as a sender like GoCD would write it."""
    encoded = email.header.Header(subject, "utf-8").encode() if not subject.isascii() else subject
    lines = [
        f"From: {mail_from}",
        f"To: {to}",
        f"Subject: {encoded}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: {email.utils.make_msgid('route-test')}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        "(a message made up by mail2alert for testing routes)",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


@dataclass(frozen=True)
class Explanation:
    """One message's way through the routing, for ``mail2alert route``."""

    envelope: Envelope
    decision: Decision
    recipients_out: tuple[tuple[str, ...], ...]
    group: str | None
    rule_lines: tuple[int, ...] = ()
    rule_texts: tuple[str, ...] = ()
    chat: tuple[Mapping[str, Any], ...] = ()
    """The chat messages as they would be posted (action masked, title, body, colour)."""
    has_groups: bool = False
    """Whether pipeline groups from GoCD were known for the deciding manager."""

    @property
    def outcome(self) -> tuple[str, ...]:
        """What happened, as ``--expect`` compares it: the actions, or relay/drop/hold."""
        if self.decision.outcome == "deliver":
            return self.decision.actions
        return (self.decision.outcome,)

    def as_dict(self) -> dict[str, Any]:
        """The explanation as plain data (``--json``); secrets masked."""
        d = self.decision
        alert = d.alert
        stage = stage_of(alert) if alert else None
        return {
            "envelope": {"from": self.envelope.mail_from, "to": list(self.envelope.rcpt_tos)},
            "subject": alert.subject if alert else None,
            "facts": None
            if stage is None or alert is None
            else {
                "pipeline": stage.pipeline,
                "pipeline_counter": stage.pipeline_counter,
                "stage": stage.stage,
                "stage_counter": stage.stage_counter,
                "gocd_verb": stage.verb,
                "gocd_event": VERBS[stage.verb],
                "event": alert.event,
                "group": self.group,
                "details_url": alert.link,
            },
            "manager": d.manager,
            "rules": [
                {
                    "rule": t.index + 1,
                    "line": self.rule_lines[t.index] if t.index < len(self.rule_lines) else None,
                    "filter": self.rule_texts[t.index] if t.index < len(self.rule_texts) else "",
                    "matched": t.matched,
                    "reason": t.reason,
                    "actions": [mask(a) for a in t.actions],
                }
                for t in d.trace
            ],
            "outcome": d.outcome,
            "reason": d.reason,
            "actions": [mask(a) for a in d.actions],
            "passthrough": list(d.passthrough),
            "chat": [dict(c) for c in self.chat],
        }


def rule_text(manager: Manager, index: int) -> str:
    """A rule as one line: ``pipelines.in_group('my-group') events BREAKS``."""
    rule = manager.rules[index]
    args = ", ".join(repr(a) for a in rule.args)
    events = f" events {','.join(e for e in EVENTS if e in rule.events)}" if rule.events else ""
    return f"{rule.function.name}({args}){events}"


def explain(
    config: Config, envelope: Envelope, data: bytes, context: Context, *, queue_id: str = "TEST"
) -> Explanation:
    """Route one message exactly as ``serve`` would, and keep every step for display."""
    accepted = accept(queue_id, envelope, data, config.routing, context)
    d = accepted.decision
    manager = find_manager(config.routing, d.manager)
    has_groups = manager is not None and (
        context.snapshots.get(manager.label, context.snapshot) is not None
    )
    lines = tuple(r.line for r in manager.rules) if manager else ()
    texts = tuple(rule_text(manager, i) for i in range(len(manager.rules))) if manager else ()
    # As stored, and so as the chat transport will read it.
    chat = tuple(
        json.loads(ChatPost.from_json(i.data).to_json()) for i in accepted.items if i.kind == "chat"
    )
    return Explanation(
        envelope,
        d,
        tuple(item.recipients for item in accepted.items if item.kind != "chat"),
        accepted.label,
        lines,
        texts,
        chat,
        has_groups,
    )


def parse_expect(text: str) -> tuple[str, ...]:
    """``--expect``: comma-separated action URIs, or one of relay, drop, hold."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise UsageError("--expect needs action URIs (mailto:a@example.com,...) or relay/drop/hold")
    return parts


def diff(expected: Sequence[str], actual: Sequence[str]) -> str | None:
    """None when they agree (as sets), else one line saying what differs."""
    if set(expected) == set(actual):
        return None
    missing = [e for e in expected if e not in actual]
    unexpected = [a for a in actual if a not in expected]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(mask(m) for m in missing)}")
    if unexpected:
        parts.append(f"unexpected {', '.join(mask(u) for u in unexpected)}")
    return (
        f"expected {', '.join(mask(e) for e in expected)}; "
        f"got {', '.join(mask(a) for a in actual)} ({'; '.join(parts)})"
    )


def render(ex: Explanation, *, trace: bool) -> str:
    """The text ``mail2alert route`` prints."""
    d = ex.decision
    alert = d.alert
    out = [f"envelope: from=<{ex.envelope.mail_from}> to=<{', '.join(ex.envelope.rcpt_tos)}>"]
    if alert is not None:
        out.append(f"subject:  {alert.subject}")
        s = stage_of(alert)
        if s is not None:
            said = VERBS[s.verb]
            event = alert.event if alert.event == said else f"{alert.event} (GoCD said {said})"
            group = ex.group or (
                "in no group GoCD knows" if ex.has_groups else "unknown (no GoCD data)"
            )
            out.append(
                f"facts:    pipeline {s.pipeline} #{s.pipeline_counter}, stage {s.stage} "
                f"#{s.stage_counter}, event {event}, " + (f"group {group}" if ex.group else group)
            )
        else:
            out.append("facts:    not a GoCD stage mail (no pipeline, no event)")
    out.append(f"manager:  {d.manager or 'none wants it'}")
    if trace and d.trace:
        out.append("rules:")
        for t in d.trace:
            mark = "✓" if t.matched else "✗"
            line = f" (line {ex.rule_lines[t.index]})" if t.index < len(ex.rule_lines) else ""
            text = ex.rule_texts[t.index] if t.index < len(ex.rule_texts) else ""
            then = f" -> {', '.join(mask(a) for a in t.actions)}" if t.actions else ""
            out.append(f"  {mark} rule {t.index + 1}{line}: {text}: {t.reason}{then}")
    if d.outcome == "deliver":
        out.append(f"outcome:  deliver to {', '.join(mask(a) for a in d.actions)} ({d.reason})")
    elif d.outcome == "relay":
        out.append(f"outcome:  relay unchanged to remote-smtp ({d.reason})")
    elif d.outcome == "hold":
        out.append(f"outcome:  hold until GoCD's pipeline groups are known ({d.reason})")
    else:
        out.append(f"outcome:  drop ({d.reason})")
    if d.passthrough:
        out.append(f"          and relay unchanged to {', '.join(d.passthrough)}")
    for post in ex.chat:
        out.append(f"chat:     {post['action']} ({post['colour']})")
        out.append(f"          {post['title']}")
        out.extend(f"          | {line}".rstrip() for line in str(post["body"]).splitlines())
    return "\n".join(out)


# -- test suites -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One case of a test suite."""

    name: str
    envelope: Envelope
    data: bytes
    expect: tuple[str, ...]


@dataclass
class SuiteResult:
    """What running a suite found: per case a diff (None = pass), and which rules matched."""

    results: list[tuple[str, str | None]] = field(default_factory=list)
    exercised: set[tuple[str, int]] = field(default_factory=set)
    total_rules: int = 0

    @property
    def failed(self) -> int:
        """How many cases failed."""
        return sum(1 for _, d in self.results if d is not None)

    @property
    def rule_share(self) -> float:
        """Percent of all configured rules that some case made match."""
        return 100.0 * len(self.exercised) / self.total_rules if self.total_rules else 100.0


def load_suite(path: Path) -> list[Case]:
    """Read a suite file; every problem is a UsageError naming the case."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read the suite: {exc}") from None
    if not isinstance(doc, list) or not doc:
        raise UsageError(
            f"{path}: a suite is a YAML list of cases (name, eml or from/to/subject, expect)"
        )
    cases: list[Case] = []
    problems: list[str] = []
    for i, raw in enumerate(doc):
        where = f"{path}: case {i + 1}"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            problems.append(f"{where}: needs a 'name'")
            continue
        where = f"{path}: case {raw['name']!r}"
        unknown = set(raw) - {"name", "eml", "from", "to", "subject", "expect"}
        if unknown:
            problems.append(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        expect = raw.get("expect")
        if isinstance(expect, str):
            expect = [expect]
        if (
            not isinstance(expect, list)
            or not expect
            or not all(isinstance(e, str) for e in expect)
        ):
            problems.append(f"{where}: 'expect' is a list of action URIs, or relay, drop or hold")
            continue
        if "eml" in raw:
            eml = path.parent / str(raw["eml"])
            try:
                data = eml.read_bytes()
            except OSError as exc:
                problems.append(f"{where}: cannot read {eml}: {exc.strerror}")
                continue
            message = RawMessage.parse(data)
            sender = str(raw.get("from") or _bare(message.get("from")))
            rcpt = str(raw.get("to") or _bare(message.get("to")))
        elif all(k in raw for k in ("from", "to", "subject")):
            sender, rcpt = str(raw["from"]), str(raw["to"])
            data = synthetic_message(sender, rcpt, str(raw["subject"]))
        else:
            problems.append(f"{where}: give 'eml', or 'from', 'to' and 'subject'")
            continue
        cases.append(Case(raw["name"], Envelope(sender, (rcpt,)), data, tuple(expect)))
    if problems:
        raise UsageError("\n".join(problems))
    return cases


def _bare(header: str) -> str:
    return email.utils.parseaddr(header)[1] or header


def run_suite(config: Config, cases: Sequence[Case], context: Context) -> SuiteResult:
    """Route every case as ``serve`` would and compare with what the case expects."""
    result = SuiteResult(total_rules=sum(len(m.rules) for m in config.routing))
    for case in cases:
        ex = explain(config, case.envelope, case.data, context)
        result.results.append((case.name, diff(case.expect, ex.outcome)))
        for t in ex.decision.trace:
            if t.matched and ex.decision.manager:
                result.exercised.add((ex.decision.manager, t.index))
    return result


# -- the coverage report ---------------------------------------------------------------------


@dataclass(frozen=True)
class CoverageReport:
    """For every gocd manager: group -> pipeline -> event -> actions; orphans; dead rules."""

    managers: Mapping[str, Mapping[str, Mapping[str, Mapping[str, tuple[str, ...]]]]]
    orphans: Mapping[str, tuple[str, ...]]
    dead_rules: Mapping[str, tuple[str, ...]]
    missing_data: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--format yaml|json``; secrets masked."""
        return {
            "routes": {
                label: {
                    group: {
                        pipeline: {ev: [mask(a) for a in acts] for ev, acts in events.items()}
                        for pipeline, events in pipelines.items()
                    }
                    for group, pipelines in groups.items()
                }
                for label, groups in self.managers.items()
            },
            "orphans_for_BREAKS": {k: list(v) for k, v in self.orphans.items()},
            "dead_rules": {k: list(v) for k, v in self.dead_rules.items()},
            "no_gocd_data": list(self.missing_data),
        }


def coverage(config: Config, context: Context) -> CoverageReport:
    """Route a stage mail for every known pipeline and every event, as ``serve`` would."""
    routes: dict[str, dict[str, dict[str, dict[str, tuple[str, ...]]]]] = {}
    orphans: dict[str, tuple[str, ...]] = {}
    dead: dict[str, tuple[str, ...]] = {}
    missing: list[str] = []
    verb_of = {event: verb for verb, event in VERBS.items()}
    for manager in config.routing:
        if manager.type.name != "gocd":
            continue
        groups = context.snapshots.get(manager.label)
        if not isinstance(groups, PipelineGroups):
            missing.append(manager.label)
            continue
        envelope = Envelope(
            manager.wants_from[0] if manager.wants_from else "gocd@localhost",
            (manager.wants_to[0] if manager.wants_to else "mail2alert@localhost",),
        )
        matched: set[int] = set()
        by_group: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {}
        lonely: list[str] = []
        for group, pipelines in sorted(groups.groups.items()):
            for pipeline in sorted(pipelines):
                events: dict[str, tuple[str, ...]] = {}
                for event in EVENTS:
                    subject = f"Stage [{pipeline}/1/stage/1] {verb_of[event]}"
                    data = synthetic_message(envelope.mail_from, envelope.rcpt_tos[0], subject)
                    ex = explain(config, envelope, data, _without_history(context))
                    if ex.decision.manager != manager.label:
                        continue
                    events[event] = ex.decision.actions if ex.decision.outcome == "deliver" else ()
                    matched.update(t.index for t in ex.decision.trace if t.matched)
                by_group.setdefault(group, {})[pipeline] = events
                if not events.get("BREAKS"):
                    lonely.append(f"{group}/{pipeline}")
        routes[manager.label] = by_group
        orphans[manager.label] = tuple(lonely)
        dead[manager.label] = tuple(
            f"rule {i + 1} (line {manager.rules[i].line}): {rule_text(manager, i)}"
            for i in range(len(manager.rules))
            if i not in matched and manager.rules[i].function.name.startswith("pipelines.")
        )
    return CoverageReport(routes, orphans, dead, tuple(missing))


def _without_history(context: Context) -> Context:
    return Context(snapshot=context.snapshot, snapshots=context.snapshots)


def render_coverage(report: CoverageReport) -> str:
    """The text ``mail2alert coverage`` prints."""
    out: list[str] = []
    for label, groups in report.managers.items():
        out.append(f"{label}:")
        for group, pipelines in groups.items():
            out.append(f"  group {group}")
            for pipeline, events in pipelines.items():
                out.append(f"    {pipeline}")
                for event in EVENTS:
                    acts = events.get(event, ())
                    shown = ", ".join(mask(a) for a in acts) if acts else "-"
                    out.append(f"      {event:<9} {shown}")
        orphans = report.orphans.get(label, ())
        out.append(f"  pipelines with no route for BREAKS: {len(orphans)}")
        out.extend(f"    {o}" for o in orphans)
        dead = report.dead_rules.get(label, ())
        out.append(f"  rules that match no known pipeline: {len(dead)}")
        out.extend(f"    {d}" for d in dead)
    for label in report.missing_data:
        out.append(f"{label}: no pipeline groups from GoCD (use --gocd-snapshot FILE)")
    return "\n".join(out)


def snapshots_from_file(path: Path, config: Config) -> dict[str, PipelineGroups]:
    """``--gocd-snapshot FILE.json``: the same groups for every gocd manager."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--gocd-snapshot {path}: cannot read: {exc}") from None
    try:
        groups = parse_groups(payload, source=str(path))
    except GocdError as exc:
        raise UsageError(f"--gocd-snapshot {exc}") from None
    return {m.label: groups for m in config.routing if m.type.name == "gocd"}
