"""The gocd manager's state policy, as pure functions of an alert: what a stage mail starts
or answers, what it leaves to remember, what makes a copy a duplicate, where it belongs.

No outbox, no GoCD: the alert is read from a mail as GoCD writes it, with the history
given as a :class:`~mail2alert.managers.base.Context`.
"""

from __future__ import annotations

import pytest

from mail2alert.gocd.manager import read_gocd_alert
from mail2alert.gocd.memory import GOCD_MEMORY, HISTORY, RUNS
from mail2alert.gocd.model import PipelineGroups
from mail2alert.gocd.testing import gocd_stage_mail
from mail2alert.managers.base import Context
from mail2alert.managers.memory import Claim, Conversation, Note
from mail2alert.message import RawMessage
from mail2alert.model import Alert, Envelope

KEY = ("my-pipeline", "my-stage")


def alert(verb: str, *, last: str | None = None, subject: str | None = None) -> Alert:
    """The alert of a stage mail with ``verb``, given the stage's last known result."""
    state = {HISTORY: {KEY: last}} if last else {}
    raw = gocd_stage_mail(subject or f"Stage [My-Pipeline/6/My-Stage/1] {verb}")
    envelope = Envelope("go@example.com", ("mail2alert@example.com",))
    return read_gocd_alert(RawMessage.parse(raw), envelope, Context(state=state))


@pytest.mark.parametrize(
    ("verb", "last", "role"),
    [
        ("is broken", None, "start"),
        ("failed", "passed", "start"),  # corrected to BREAKS
        ("is fixed", None, "answer"),
        ("passed", "failed", "answer"),  # corrected to FIXED
        ("failed", "failed", None),
        ("is cancelled", None, None),
    ],
)
def test_a_breakage_starts_the_stages_conversation_and_a_fix_answers_it(
    verb: str, last: str | None, role: str | None
) -> None:
    assert GOCD_MEMORY.conversation(alert(verb, last=last)) == Conversation(KEY, role)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("verb", "result"),
    [("passed", "passed"), ("is fixed", "passed"), ("failed", "failed"), ("is broken", "failed")],
)
def test_each_result_is_remembered_by_gocds_own_verb(verb: str, result: str) -> None:
    assert GOCD_MEMORY.notes(alert(verb, last="passed"))[0] == Note(HISTORY, KEY, result)


def test_the_run_a_stage_mail_came_for_is_remembered_whatever_its_verb() -> None:
    """Reconciliation reads it: a run with a mail needs no made-up alert."""
    for verb in ("passed", "is broken", "is cancelled"):
        assert Note(RUNS, KEY, "6/1") in GOCD_MEMORY.notes(alert(verb))


def test_a_cancelled_run_and_a_mail_that_is_no_stage_mail_leave_no_result() -> None:
    assert GOCD_MEMORY.notes(alert("is cancelled")) == (Note(RUNS, KEY, "6/1"),)
    assert GOCD_MEMORY.notes(alert("", subject="Server Backup Failed")) == ()
    assert GOCD_MEMORY.conversation(alert("", subject="Server Backup Failed")) is None


def test_the_same_stage_run_and_result_of_one_manager_is_one_claim() -> None:
    """By result, not verb: an alert mail2alert made may say "is broken" where GoCD's late
    mail says "failed" (GoCD compared with a cancelled run); both are one event."""
    options = {"duplicate-window": 300.0, "reconcile": False}
    first = GOCD_MEMORY.claim(alert("failed"), "gocd#0", options)
    assert first == GOCD_MEMORY.claim(alert("failed"), "gocd#0", options)
    assert first == GOCD_MEMORY.claim(alert("is broken"), "gocd#0", options)
    assert first is not None
    assert first.window == 300.0
    assert first != GOCD_MEMORY.claim(alert("failed"), "gocd#1", options)
    assert first != GOCD_MEMORY.claim(alert("passed"), "gocd#0", options)
    assert first != GOCD_MEMORY.claim(alert("is cancelled"), "gocd#0", options)
    assert isinstance(first, Claim)


def test_with_reconciliation_a_claim_lasts_as_long_as_a_made_up_alert_may_be_followed() -> None:
    options = {"duplicate-window": 300.0, "reconcile-window": 3600.0}
    claim = GOCD_MEMORY.claim(alert("failed"), "gocd#0", options)
    assert claim is not None
    assert claim.window == 3600.0


def test_a_duplicate_window_of_zero_claims_nothing() -> None:
    assert GOCD_MEMORY.claim(alert("failed"), "gocd#0", {"duplicate-window": 0.0}) is None


def test_without_a_window_configured_the_declared_default_applies() -> None:
    claim = GOCD_MEMORY.claim(alert("failed"), "gocd#0", {"reconcile": False})
    assert claim is not None
    assert claim.window == 600.0


def test_the_label_is_the_pipelines_group_in_the_snapshot() -> None:
    groups = PipelineGroups({"Team-A": ("my-pipeline",)})
    assert GOCD_MEMORY.label(alert("failed"), groups) == "Team-A"
    assert GOCD_MEMORY.label(alert("failed"), None) is None
    assert GOCD_MEMORY.label(alert("failed"), PipelineGroups({"other": ("x",)})) is None
