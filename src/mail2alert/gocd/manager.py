"""The ``gocd`` manager: the ``mail`` manager plus GoCD stage facts and the ``pipelines.*`` rules.

It reads ``Stage [<pipeline>/<counter>/<stage>/<counter>] <verb>`` subjects into a
:class:`~mail2alert.model.Stage` and an event, the body into the details URL, the changes,
their committers and who cancelled the stage, and asks the pipeline-group snapshot (kept
fresh by the poller in :mod:`mail2alert.gocd`) which group a pipeline is in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace

from mail2alert.actions import is_mailbox
from mail2alert.errors import RuleArgumentError
from mail2alert.gocd.explaining import GOCD_EXPLAINING
from mail2alert.gocd.memory import GOCD_MEMORY, HISTORY
from mail2alert.gocd.model import CCTRAY_SOURCE, EVENTS, VERBS, PipelineGroups, Stage, stage_of
from mail2alert.gocd.poller import GOCD_BACKGROUND
from mail2alert.gocd.presentation import GOCD_PRESENTATION, stage_facts
from mail2alert.gocd.settings import OPTIONS, GocdSettings, hold_max
from mail2alert.managers.base import (
    Context,
    ManagerType,
    Predicate,
    RuleFunction,
    Verdict,
    read_alert,
)
from mail2alert.managers.mail import MAIL
from mail2alert.managers.memory import RECOVERED_HEADER
from mail2alert.message import RawMessage
from mail2alert.model import Alert, Envelope, Person

_NAME = r"[A-Za-z0-9_\-][A-Za-z0-9_\-.]*"
# GoCD's counters are Java ints and longs: 19 digits at most. More is not a GoCD subject (and
# int() of thousands of digits raises). ASCII digits only: \d reads any script's digits, so a
# subject with an Arabic-Indic or a fullwidth digit became a stage of GoCD's.
_COUNTER = r"[0-9]{1,19}"
_SUBJECT = re.compile(
    rf"^Stage \[(?P<pipeline>{_NAME})/(?P<pc>{_COUNTER})/"
    rf"(?P<stage>{_NAME})/(?P<sc>{_COUNTER})\] "
    rf"(?P<verb>{'|'.join(re.escape(v) for v in VERBS)})\s*$"
)


def parse_subject(subject: str) -> Stage | None:
    """The stage a GoCD stage-mail subject names, or None for any other subject."""
    found = _SUBJECT.match(" ".join(subject.split()))
    if not found:
        return None
    return Stage(
        pipeline=found["pipeline"],
        pipeline_counter=int(found["pc"]),
        stage=found["stage"],
        stage_counter=int(found["sc"]),
        verb=found["verb"],
    )


_DETAILS = re.compile(r"^See details:\s*(\S+)", re.MULTILINE)
_CHANGES = re.compile(
    r"^-- (?:CHECK-INS|CHANGES) --[ \t]*\n(?P<changes>.*?)(?:^Sent by Go on behalf of.*)?\Z",
    re.MULTILINE | re.DOTALL,
)


# GoCD writes "revision: <r>, modified by <user> on <date>" for every change; Git's user is
# "Name <email>", other SCMs' a bare user name. Read with partitions, never a regular
# expression that could backtrack over a long line of a made-up mail.
_REVISION = "revision: "
_MODIFIED_BY = ", modified by "
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}\b")
#: Longer lines are no GoCD revision line (names, addresses and dates are short).
_LINE_MAX = 1000
#: The first line of the body when a user cancelled the stage before any job was assigned.
_CANCELLED_BY = "The stage was cancelled by "


def committers_in(changes: str) -> tuple[Person, ...]:
    """The authors of the changes in a stage mail's changes section, each once, in order.

    A Git author has the address GoCD shows (``Jane Doe <jane@example.com>``); other SCMs
    name a user without one. An address that is not one plain mail address is left out.
    """
    people: dict[str, Person] = {}
    for line in changes.splitlines():
        if not line.startswith(_REVISION) or len(line) > _LINE_MAX:
            continue
        who, on, when = line.partition(_MODIFIED_BY)[2].rpartition(" on ")
        if not on or not who.strip() or not _DATE.match(when):
            continue
        person = _person(who.strip())
        people.setdefault((person.address or person.name).lower(), person)
    return tuple(people.values())


def _person(who: str) -> Person:
    """``Jane Doe <jane@example.com>`` or ``bob`` as a person."""
    if not who.endswith(">") or "<" not in who:
        return Person(who)
    name, _, address = who[:-1].partition("<")
    if "<" in address or ">" in address or ">" in name:
        return Person(who)  # Git allows neither in a name: this is no "Name <address>"
    address = address.strip()
    return Person(name.strip() or address, address if is_mailbox(address) else "")


def cancelled_by(body: str) -> str:
    """Who cancelled the stage, as the first line of a stage mail's body says, or ""."""
    first = body.lstrip("\n").partition("\n")[0].strip()
    if not first.startswith(_CANCELLED_BY) or len(first) > _LINE_MAX:
        return ""
    return first[len(_CANCELLED_BY) :].removesuffix(".").strip()


def corrected_event(stage: Stage, last_result: str | None) -> str:
    """The event rules see: GoCD's, corrected by the last result mail2alert knows.

    GoCD compares with the previous run including cancelled ones, and forgets across its own
    restarts; so a ``failed`` after a known pass is BREAKS and a ``passed`` after a known
    failure is FIXED. A cancel is reported as GoCD said it and never changes the last result,
    nor does a ``failed`` that may be a cancel (``result_known`` False).
    """
    event = VERBS[stage.verb]
    if not stage.result_known:
        return event
    if event == "FAILS" and last_result == "passed":
        return "BREAKS"
    if event == "PASSES" and last_result == "failed":
        return "FIXED"
    return event


def read_gocd_alert(message: RawMessage, envelope: Envelope, context: Context) -> Alert:
    """The common facts plus, for a stage mail, the stage, its event, details URL, changes,
    their committers and who cancelled it."""
    alert = read_alert(message, envelope, context)
    stage = parse_subject(alert.subject)
    if stage is None:
        return alert
    if message.get(RECOVERED_HEADER) == CCTRAY_SOURCE:
        stage = replace(stage, result_known=False)
    body = message.body_text.replace("\r\n", "\n")
    details = _DETAILS.search(body)
    found = _CHANGES.search(body)
    changes = found.group("changes").strip() if found else ""
    last = context.recall(HISTORY, (stage.pipeline.lower(), stage.stage.lower()))
    return replace(
        alert,
        event=corrected_event(stage, last),
        link=details.group(1) if details else None,
        facts=stage_facts(stage, VERBS[stage.verb], changes, cancelled_by(body)),
        detail=stage,
        committers=committers_in(changes),
    )


def _compile_any(args: tuple[str, ...]) -> Predicate:
    def any_pipeline(alert: Alert, context: Context) -> Verdict:
        stage = stage_of(alert)
        if stage is None:
            return Verdict(False, "not a stage mail (no pipeline in the subject)")
        return Verdict(True, f"pipeline {stage.pipeline!r}")

    return any_pipeline


def _group_verdict(pipeline: str, group: str, context: Context, *, via: str = "") -> Verdict:
    groups = context.snapshot
    if not isinstance(groups, PipelineGroups):
        return Verdict(False, "no pipeline groups from GoCD yet", waiting=True)
    shown = f"pipeline {pipeline!r}{via}"
    if groups.in_group(pipeline, group):
        return Verdict(True, f"{shown} is in group {group!r}")
    actual = groups.group_of(pipeline)
    where = f"is in group {actual!r}" if actual else "is unknown to GoCD"
    return Verdict(False, f"{shown} {where}, not in {group!r}")


def _compile_in_group(args: tuple[str, ...]) -> Predicate:
    (group,) = args

    def in_group(alert: Alert, context: Context) -> Verdict:
        stage = stage_of(alert)
        if stage is None:
            return Verdict(False, "not a stage mail (no pipeline in the subject)")
        return _group_verdict(stage.pipeline, group, context)

    return in_group


def _compile_name_like_in_group(args: tuple[str, ...]) -> Predicate:
    pattern_text, group = args
    try:
        pattern = re.compile(pattern_text, re.IGNORECASE)
    except re.error as exc:
        raise RuleArgumentError(0, f"invalid regular expression {pattern_text!r}: {exc}") from None
    if pattern.groups < 1:
        raise RuleArgumentError(
            0,
            f"regular expression {pattern_text!r} has no group: its first group names the "
            "pipeline to look up, e.g. '(.+)-release.*'",
        )

    def name_like_in_group(alert: Alert, context: Context) -> Verdict:
        stage = stage_of(alert)
        if stage is None:
            return Verdict(False, "not a stage mail (no pipeline in the subject)")
        found = pattern.match(stage.pipeline)
        if not found or not found.group(1):
            return Verdict(False, f"pipeline {stage.pipeline!r} does not match {pattern_text!r}")
        return _group_verdict(found.group(1), group, context, via=f" (from {stage.pipeline!r})")

    return name_like_in_group


def _needs_groups(name: str) -> Callable[[Mapping[str, object]], str | None]:
    def requires(options: Mapping[str, object]) -> str | None:
        if GocdSettings.of(options).url is not None:
            return None
        return f"{name} needs pipeline groups from GoCD: set 'url' on this manager"

    return requires


ANY = RuleFunction(
    name="pipelines.any",
    summary="any stage mail, whatever its pipeline",
    params=(),
    compile=_compile_any,
)
IN_GROUP = RuleFunction(
    name="pipelines.in_group",
    summary="the pipeline is in this pipeline group",
    params=(("group", "group"),),
    compile=_compile_in_group,
    requires=_needs_groups("pipelines.in_group"),
)
NAME_LIKE_IN_GROUP = RuleFunction(
    name="pipelines.name_like_in_group",
    summary="the regex's first group, applied to the pipeline name, names a pipeline in the group",
    params=(("pattern", "regex"), ("group", "group")),
    compile=_compile_name_like_in_group,
    requires=_needs_groups("pipelines.name_like_in_group"),
)

GOCD = ManagerType(
    name="gocd",
    summary="routes GoCD stage mails by pipeline group and event",
    read=read_gocd_alert,
    functions={
        **MAIL.functions,
        **{f.name: f for f in (ANY, IN_GROUP, NAME_LIKE_IN_GROUP)},
    },
    events=EVENTS,
    memory=GOCD_MEMORY,
    presentation=GOCD_PRESENTATION,
    background=GOCD_BACKGROUND,
    waiting="waiting for pipeline groups from GoCD",
    gave_up="no GoCD data in time",
    explaining=GOCD_EXPLAINING,
    options=OPTIONS,
    hold_max=hold_max,
    reads_committers=True,
)
