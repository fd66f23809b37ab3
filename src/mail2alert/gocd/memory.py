"""What the gocd manager's decisions remember: stage results, threads, events seen.

- A stage's conversation is its pipeline and stage (lower case): a breakage starts it, the
  next pass or fix answers it (threaded under the breakage's mail and chat post).
- The last result of every stage is kept (the ``history`` table), so that the next mail's
  event is corrected: a failure after a known pass is a breakage, a pass after a known
  failure a fix (see :func:`~mail2alert.gocd.manager.corrected_event`).
- The same stage event (pipeline run, stage run, verb) within ``duplicate-window`` is
  delivered once: GoCD sends one mail per user it notifies.
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
        result = stage_result(alert)
        if result is None:
            return ()
        return (Note(HISTORY, (stage.pipeline.lower(), stage.stage.lower()), result),)

    def claim(self, alert: Alert, label: str, options: Mapping[str, object]) -> Claim | None:
        stage = stage_of(alert)
        window = GocdSettings.of(options).duplicate_window
        if stage is None or window <= 0:
            return None
        return Claim(f"{label}:{stage.locator.lower()}:{stage.verb}", window)

    def label(self, alert: Alert, snapshot: object | None) -> str | None:
        stage = stage_of(alert)
        if stage is None or not isinstance(snapshot, PipelineGroups):
            return None
        return snapshot.group_of(stage.pipeline)


def stage_result(alert: Alert) -> str | None:
    """What a stage mail says of the run's result for the history: passed, failed or None.

    GoCD's own verb counts, not the corrected event.
    """
    stage = stage_of(alert)
    return _RESULTS.get(stage.verb) if stage else None


GOCD_MEMORY = GocdMemory()
