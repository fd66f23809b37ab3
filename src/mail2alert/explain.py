"""What operators see and test: one message explained, test suites, and the coverage report.

Everything here calls :func:`mail2alert.planning.accept`, which calls
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
from mail2alert.errors import UsageError
from mail2alert.logs import loggable
from mail2alert.managers.base import Context
from mail2alert.managers.explaining import Facts, Inventory, SetupReport
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.message import RawMessage, address_of
from mail2alert.model import ChatPost, Decision, Envelope
from mail2alert.planning import accept
from mail2alert.routing import Manager, find_manager

#: What ``--expect`` and test suites may say instead of a list of actions.
OUTCOME_WORDS = ("relay", "drop", "hold")


def synthetic_message(mail_from: str, to: str, subject: str) -> bytes:
    """A minimal mail with these headers, as a sender of alerts would write it."""
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
    facts: Facts | None = None
    """What the deciding manager's type reads the alert as (None: no manager wanted it)."""
    held: str = ""
    """What held mail waits for, in the deciding manager type's words."""
    trace: tuple[str, ...] = ()
    """Each rule's verdict in one line, as the decision history keeps it."""

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
        return {
            "envelope": {"from": self.envelope.mail_from, "to": list(self.envelope.rcpt_tos)},
            "subject": alert.subject if alert else None,
            "facts": None if self.facts is None or self.facts.data is None else {**self.facts.data},
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
    """A rule as one line: ``ci.in_team('a') events FAILED``."""
    return manager.rule_text(index)


def explain(
    config: Config, envelope: Envelope, data: bytes, context: Context, *, queue_id: str = "TEST"
) -> Explanation:
    """Route one message exactly as ``serve`` would, and keep every step for display."""
    accepted = accept(
        queue_id, envelope, data, config.routing, context, sender=config.upstream.sender
    )
    d = accepted.decision
    manager = find_manager(config.routing, d.manager)
    facts = None
    if manager is not None and d.alert is not None:
        facts = Facts(accepted.facts, accepted.facts_data)
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
        facts,
        manager.type.explaining.held if manager is not None else "",
        accepted.trace,
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
    if ex.facts is not None:
        out.append(f"facts:    {ex.facts.line}")
    out.append(f"manager:  {d.manager or 'none wants it'}")
    if trace and ex.trace:
        out.append("rules:")
        out.extend(f"  {line}" for line in ex.trace)
    if d.outcome == "deliver":
        out.append(f"outcome:  deliver to {', '.join(mask(a) for a in d.actions)} ({d.reason})")
    elif d.outcome == "relay":
        out.append(f"outcome:  relay unchanged to remote-smtp ({d.reason})")
    elif d.outcome == "hold":
        out.append(f"outcome:  hold until {ex.held} ({d.reason})")
    else:
        out.append(f"outcome:  drop ({d.reason})")
    if d.passthrough:
        out.append(f"          and relay unchanged to {', '.join(d.passthrough)}")
    for post in ex.chat:
        out.append(f"chat:     {post['action']} ({post['colour']})")
        out.append(f"          {post['title']}")
        out.extend(f"          | {line}".rstrip() for line in str(post["body"]).splitlines())
    # The mail's own text (its subject decoded, the chat title and body made of it) must not
    # drive the terminal: control characters are shown escaped, as in the log.
    return "\n".join(loggable(line) for line in out)


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
    return address_of(header) or header


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
    """Every manager type's inventory: what each subject it knows of would be routed to;
    and what asking each manager's source about its setup found."""

    parts: tuple[Inventory, ...]
    setup: tuple[SetupReport, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--format yaml|json``; secrets masked."""
        merged: dict[str, Any] = {}
        for part in self.parts:
            merged.update(part.as_dict())
        if self.setup:
            merged["setup"] = {report.label: report.as_dict() for report in self.setup}
        return merged


def coverage(
    config: Config, context: Context, setup: tuple[SetupReport, ...] = ()
) -> CoverageReport:
    """Ask every manager type that has an inventory to route all it knows of, as ``serve``
    would (each probe through :func:`explain`, without the notes of earlier decisions);
    ``setup`` is what :func:`setup_reports` found, shown after it."""
    bare = Context(snapshot=context.snapshot, snapshots=context.snapshots)

    def probe(envelope: Envelope, data: bytes) -> Decision:
        return explain(config, envelope, data, bare).decision

    parts = []
    for kind in MANAGER_TYPES.values():
        inventory = kind.explaining.coverage
        if inventory is not None:
            managers = [m for m in config.routing if m.type.name == kind.name]
            parts.append(inventory(managers, context.snapshots, probe))
    return CoverageReport(tuple(parts), setup)


def render_coverage(report: CoverageReport) -> str:
    """The text ``mail2alert coverage`` prints."""
    lines = [line for part in report.parts for line in part.lines()]
    for setup in report.setup:
        notes = "; ".join(setup.checked)
        if not setup.findings:
            lines.append(f"setup of {setup.label}: OK" + (f" ({notes})" if notes else ""))
            continue
        count = len(setup.findings)
        lines.append(f"setup of {setup.label}: {count} finding{'s' * (count != 1)}")
        lines.extend(f"  {f.wrong}: {f.change}" for f in setup.findings)
        if notes:
            lines.append(f"  also checked: {notes}")
    return "\n".join(lines)


async def setup_reports(
    config: Config, kinds: Sequence[str], *, blocked: set[int] | frozenset[int] = frozenset()
) -> tuple[SetupReport, ...]:
    """Ask the source of each manager of these types whether it is set up for this
    mail2alert (``check --<type>``); the managers in ``blocked`` (by index: their keys name
    unset variables) are not asked."""
    reports = []
    for index, manager in enumerate(config.routing):
        check = manager.type.explaining.setup
        if check is None or manager.type.name not in kinds:
            continue
        if index in blocked:
            note = "not asked: its keys name unset variables"
            reports.append(SetupReport(manager.label, checked=(note,)))
            continue
        reports.append(await check.run(manager, config.listener))
    return tuple(reports)


def snapshots_from_files(files: Mapping[str, Path], config: Config) -> dict[str, object]:
    """Snapshots from files named on the command line, by manager type: the same snapshot
    for every manager of that type."""
    snapshots: dict[str, object] = {}
    for kind, path in files.items():
        reading = MANAGER_TYPES[kind].explaining.snapshot_file
        assert reading is not None
        snapshot = reading.read(path)
        snapshots.update({m.label: snapshot for m in config.routing if m.type.name == kind})
    return snapshots
