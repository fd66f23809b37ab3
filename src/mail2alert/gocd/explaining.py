"""What the gocd manager shows operators: a stage's facts in ``route``, the ``coverage`` of
every pipeline by group and event, ``--gocd-snapshot FILE``, ``check --gocd``, and its page
of the web console (pipeline groups and the stage history)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mail2alert.actions import is_committers, mask
from mail2alert.errors import UsageError
from mail2alert.gocd.client import GocdError, parse_groups
from mail2alert.gocd.memory import HISTORY, RUNS
from mail2alert.gocd.model import EVENTS, VERBS, PipelineGroups, stage_of
from mail2alert.gocd.setup_check import GOCD_SETUP
from mail2alert.managers.explaining import (
    ConsolePage,
    Explaining,
    Facts,
    Kept,
    Probe,
    SnapshotFile,
    Table,
)
from mail2alert.model import Alert, Decision, Envelope
from mail2alert.routing import Manager

#: The event every pipeline should have a route for.
ESSENTIAL = "BREAKS"


def stage_facts(alert: Alert, group: str | None, known: bool) -> Facts:
    """The stage, the event (and what GoCD called it) and the pipeline's group."""
    s = stage_of(alert)
    if s is None:
        return Facts("not a GoCD stage mail (no pipeline, no event)")
    said = VERBS[s.verb]
    event = alert.event if alert.event == said else f"{alert.event} (GoCD said {said})"
    # Named: a rule may find another pipeline's group for this one (name_like_in_group),
    # and "in no group" alone read as if that rule were wrong.
    if group:
        where = f"group {group}"
    elif known:
        where = f"{s.pipeline} is in no group GoCD knows"
    else:
        where = "group unknown (no GoCD data)"
    line = (
        f"pipeline {s.pipeline} #{s.pipeline_counter}, stage {s.stage} "
        f"#{s.stage_counter}, event {event}, {where}"
    )
    data = {
        "pipeline": s.pipeline,
        "pipeline_counter": s.pipeline_counter,
        "stage": s.stage,
        "stage_counter": s.stage_counter,
        "gocd_verb": s.verb,
        "gocd_event": VERBS[s.verb],
        "event": alert.event,
        "group": group,
        "details_url": alert.link,
        "committers": [{"name": c.name, "address": c.address} for c in alert.committers],
        "cancelled_by": alert.facts.get("cancelled_by") or None,
    }
    return Facts(line, data)


Routes = Mapping[str, Mapping[str, Mapping[str, Mapping[str, tuple[str, ...]]]]]


@dataclass(frozen=True)
class PipelineCoverage:
    """For every gocd manager: group -> pipeline -> event -> actions; orphans; dead rules."""

    routes: Routes
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
                for label, groups in self.routes.items()
            },
            f"orphans_for_{ESSENTIAL}": {k: list(v) for k, v in self.orphans.items()},
            "dead_rules": {k: list(v) for k, v in self.dead_rules.items()},
            "no_gocd_data": list(self.missing_data),
        }

    def lines(self) -> list[str]:
        """The text ``mail2alert coverage`` prints."""
        out: list[str] = []
        for label, groups in self.routes.items():
            out.append(f"{label}:")
            for group, pipelines in groups.items():
                out.append(f"  group {group}")
                for pipeline, events in pipelines.items():
                    out.append(f"    {pipeline}")
                    for event in EVENTS:
                        acts = events.get(event, ())
                        shown = ", ".join(mask(a) for a in acts) if acts else "-"
                        out.append(f"      {event:<9} {shown}")
            orphans = self.orphans.get(label, ())
            out.append(f"  pipelines with no route for {ESSENTIAL}: {len(orphans)}")
            out.extend(f"    {o}" for o in orphans)
            dead = self.dead_rules.get(label, ())
            out.append(f"  rules that match no known pipeline: {len(dead)}")
            out.extend(f"    {d}" for d in dead)
        for label in self.missing_data:
            out.append(f"{label}: no pipeline groups from GoCD (use --gocd-snapshot FILE)")
        return out


def _stage_mail(envelope: Envelope, subject: str) -> bytes:
    # Imported here: explain imports the registry, which imports this module.
    from mail2alert.explain import synthetic_message

    return synthetic_message(envelope.mail_from, envelope.rcpt_tos[0], subject)


def _shown_actions(manager: Manager, decision: Decision) -> tuple[str, ...]:
    """Where a made-up stage mail goes, with the ``committers:`` actions of the rules that
    matched it as written: the mail names no committer, so its decision alone shows only
    what happens when none is found (the rule's other actions, or the fallback)."""
    if decision.outcome not in ("deliver", "drop"):
        return ()
    written = [
        action
        for trace in decision.trace
        if trace.matched
        for action in manager.rules[trace.index].actions
        if is_committers(action)
    ]
    sent = decision.actions if decision.outcome == "deliver" else ()
    return tuple(dict.fromkeys((*written, *sent)))


def pipeline_coverage(
    managers: Sequence[Manager], snapshots: Mapping[str, object], probe: Probe
) -> PipelineCoverage:
    """Route a stage mail for every known pipeline and every event, as ``serve`` would."""
    routes: dict[str, dict[str, dict[str, dict[str, tuple[str, ...]]]]] = {}
    orphans: dict[str, tuple[str, ...]] = {}
    dead: dict[str, tuple[str, ...]] = {}
    missing: list[str] = []
    verb_of = {event: verb for verb, event in VERBS.items()}
    for manager in managers:
        groups = snapshots.get(manager.label)
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
                    decision = probe(envelope, _stage_mail(envelope, subject))
                    if decision.manager != manager.label:
                        continue
                    events[event] = _shown_actions(manager, decision)
                    matched.update(t.index for t in decision.trace if t.matched)
                by_group.setdefault(group, {})[pipeline] = events
                if not events.get(ESSENTIAL):
                    lonely.append(f"{group}/{pipeline}")
        routes[manager.label] = by_group
        orphans[manager.label] = tuple(lonely)
        dead[manager.label] = tuple(
            f"rule {i + 1} (line {manager.rules[i].line}): {manager.rule_text(i)}"
            for i in range(len(manager.rules))
            if i not in matched and manager.rules[i].function.name.startswith("pipelines.")
        )
    return PipelineCoverage(routes, orphans, dead, tuple(missing))


def groups_from_file(path: Path) -> PipelineGroups:
    """``--gocd-snapshot FILE.json``: pipeline groups in any of GoCD's three payloads."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--gocd-snapshot {path}: cannot read: {exc}") from None
    try:
        return parse_groups(payload, source=str(path))
    except GocdError as exc:
        raise UsageError(f"--gocd-snapshot {exc}") from None


#: The most stages the console's stage history shows of one manager.
STAGES_SHOWN = 1000


def console_tables(kept: Kept) -> list[Table]:
    """The console's page of one gocd manager: its pipeline groups, and the stage history
    (each stage's last run a mail came for, and its last result) of its pipelines."""
    groups = kept.snapshot if isinstance(kept.snapshot, PipelineGroups) else None
    if groups is None:
        snapshot = Table("Pipeline groups: none from GoCD yet", ("group", "pipelines"), ())
    else:
        fetched = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(groups.fetched_at))
        count = sum(len(p) for p in groups.groups.values())
        snapshot = Table(
            f"Pipeline groups: {len(groups.groups)} groups, {count} pipelines,"
            f" as GoCD gave them at {fetched}",
            ("group", "pipelines"),
            tuple((g, ", ".join(sorted(p))) for g, p in sorted(groups.groups.items())),
        )
    return [snapshot, _stage_history(kept, groups)]


def _stage_history(kept: Kept, groups: PipelineGroups | None) -> Table:
    results = kept.notes.get(HISTORY, {})
    runs = kept.notes.get(RUNS, {})
    # The notes are every gocd manager's: with a snapshot, this manager's pipelines only.
    spelt = {p.lower(): p for ps in groups.groups.values() for p in ps} if groups else {}
    rows = []
    for key in sorted({*results, *runs}):
        if len(key) != 2 or (groups is not None and key[0] not in spelt):
            continue
        pipeline, stage = key
        group = (groups.group_of(pipeline) if groups else None) or ""
        rows.append(
            (spelt.get(pipeline, pipeline), stage, group, runs.get(key, ""), results.get(key, ""))
        )
    rows.sort(key=lambda row: (row[2].lower(), row[0].lower(), row[1]))
    return Table(
        "Stage history: each stage's last run a mail came for, and its last result",
        ("pipeline", "stage", "group", "last run", "last result"),
        tuple(rows[:STAGES_SHOWN]),
        left_out=max(0, len(rows) - STAGES_SHOWN),
    )


GOCD_EXPLAINING = Explaining(
    facts=stage_facts,
    held="GoCD's pipeline groups are known",
    coverage=pipeline_coverage,
    snapshot_file=SnapshotFile(
        flag="--gocd-snapshot",
        metavar="FILE.json",
        help="pipeline groups from this file (any of GoCD's three payloads) instead of GoCD",
        read=groups_from_file,
    ),
    setup=GOCD_SETUP,
    console=ConsolePage(
        title="GoCD", show=console_tables, filters=("pipeline", "stage", "group", "event")
    ),
)
