"""What the gocd manager's decisions remember: stage results, threads, events seen.

- A stage's conversation is its pipeline and stage (lower case): a breakage starts it, the
  next pass or fix answers it (threaded under the breakage's mail and chat post).
- The last result of every stage is kept (the ``history`` table), so that the next mail's
  event is corrected: a failure after a known pass is a breakage, a pass after a known
  failure a fix (see :func:`~mail2alert.gocd.manager.corrected_event`).
- The last run of every stage a mail came for is kept (the ``gocd_runs`` table), so that
  reconciliation (:mod:`mail2alert.gocd.reconcile`) knows which completed runs had none.
- The same stage event (pipeline run, stage run, result) within ``duplicate-window`` is
  delivered once: GoCD sends one mail per user it notifies. The result, not GoCD's verb:
  an alert mail2alert made for a run whose mail never came may name it otherwise (``is
  broken`` where GoCD, comparing with a cancelled run, says ``failed``), and the real mail
  arriving late is the same event. With reconciliation on, the window is at least
  ``reconcile-window``, as long as a late mail may still follow its made-up twin.
- A stage mail's label is its pipeline's group in the manager's snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping

from mail2alert.gocd.model import PipelineGroups, stage_of
from mail2alert.gocd.settings import GocdSettings
from mail2alert.managers.memory import Claim, Conversation, Note
from mail2alert.model import Alert

#: Where the last result of each stage is kept.
HISTORY = "history"
#: Where the last run of each stage that a mail came for is kept: ``pipeline counter/stage
#: counter``.
RUNS = "gocd_runs"

#: What each of GoCD's verbs says of the run's result (a cancel says nothing).
_RESULTS = {"passed": "passed", "is fixed": "passed", "failed": "failed", "is broken": "failed"}


class GocdMemory:
    """The gocd manager's :class:`~mail2alert.managers.memory.Memory`."""

    def conversation(self, alert: Alert) -> Conversation | None:
        stage = stage_of(alert)
        if stage is None:
            return None
        key = (stage.pipeline.lower(), stage.stage.lower())
        if alert.event == "BREAKS":
            return Conversation(key, "start")
        if alert.event in ("FIXED", "PASSES"):
            return Conversation(key, "answer")
        return Conversation(key)

    def notes(self, alert: Alert) -> tuple[Note, ...]:
        stage = stage_of(alert)
        if stage is None:
            return ()
        key = (stage.pipeline.lower(), stage.stage.lower())
        run = Note(RUNS, key, f"{stage.pipeline_counter}/{stage.stage_counter}")
        result = stage_result(alert)
        if result is None:
            return (run,)
        return (Note(HISTORY, key, result), run)

    def claim(self, alert: Alert, label: str, options: Mapping[str, object]) -> Claim | None:
        stage = stage_of(alert)
        settings = GocdSettings.of(options)
        window = settings.duplicate_window
        if stage is None or window <= 0:
            return None
        if settings.reconcile:
            window = max(window, settings.reconcile_window)
        # What the mail says, even where the history may not learn it: GoCD's own mail of
        # the same run, arriving late, is the same event.
        result = _RESULTS.get(stage.verb) or "cancelled"
        return Claim(f"{label}:{stage.locator.lower()}:{result}", window)

    def label(self, alert: Alert, snapshot: object | None) -> str | None:
        stage = stage_of(alert)
        if stage is None or not isinstance(snapshot, PipelineGroups):
            return None
        return snapshot.group_of(stage.pipeline)


def stage_result(alert: Alert) -> str | None:
    """What a stage mail says of the run's result for the history: passed, failed or None.

    GoCD's own verb counts, not the corrected event; None too for a ``failed`` that may be
    a cancel (an alert made from cctray.xml alone).
    """
    stage = stage_of(alert)
    if stage is None or not stage.result_known:
        return None
    return _RESULTS.get(stage.verb)


GOCD_MEMORY = GocdMemory()
