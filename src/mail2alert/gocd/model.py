"""GoCD's records: a stage run named by a mail, its events, and the pipeline groups."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mail2alert.model import Alert

#: GoCD stage events, in the order the original documented them.
EVENTS: tuple[str, ...] = ("PASSES", "FAILS", "BREAKS", "FIXED", "CANCELLED")

#: GoCD's verbs and the events mail2alert calls them.
VERBS: dict[str, str] = {
    "passed": "PASSES",
    "failed": "FAILS",
    "is broken": "BREAKS",
    "is fixed": "FIXED",
    "is cancelled": "CANCELLED",
}


#: The value of :data:`~mail2alert.managers.memory.RECOVERED_HEADER` on an alert made for a
#: run whose result only cctray.xml gave (a GoCD without the stage history API, before
#: 20.9): cctray.xml shows a cancelled run as failed, so its ``failed`` may be a cancel.
CCTRAY_SOURCE = "gocd-cctray"


@dataclass(frozen=True)
class Stage:
    """A GoCD stage run named by a stage mail's subject."""

    pipeline: str
    pipeline_counter: int
    stage: str
    stage_counter: int
    verb: str
    """The verb as GoCD wrote it (``passed``, ``is broken``...)."""
    result_known: bool = True
    """False for an alert mail2alert made from cctray.xml alone (:data:`CCTRAY_SOURCE`),
    whose ``failed`` may be a cancel: it corrects no event and teaches the history nothing."""

    @property
    def locator(self) -> str:
        """GoCD's stage locator, ``pipeline/counter/stage/counter``."""
        return f"{self.pipeline}/{self.pipeline_counter}/{self.stage}/{self.stage_counter}"


@dataclass(frozen=True)
class StageRun:
    """A completed stage run as GoCD's cctray.xml shows it."""

    pipeline: str
    pipeline_counter: int
    stage: str
    stage_counter: int
    completed_at: float
    """Seconds since the epoch, by GoCD's clock."""
    url: str
    """Its page in GoCD (the details URL of its mail)."""
    status: str = ""
    """cctray's ``passed`` or ``failed`` (a cancelled run shows as failed), "" if neither."""

    @property
    def locator(self) -> str:
        """GoCD's stage locator, ``pipeline/counter/stage/counter``."""
        return f"{self.pipeline}/{self.pipeline_counter}/{self.stage}/{self.stage_counter}"


@dataclass(frozen=True)
class PipelineGroups:
    """Which pipelines are in which pipeline group: an immutable snapshot of GoCD's config.

    Names are kept as GoCD spells them; look-ups are case-insensitive, as in GoCD.
    """

    groups: Mapping[str, tuple[str, ...]]
    fetched_at: float = 0.0
    source: str = ""
    _by_pipeline: Mapping[str, str] = field(init=False, repr=False, compare=False)
    _by_group: Mapping[str, frozenset[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_pipeline: dict[str, str] = {}
        by_group: dict[str, frozenset[str]] = {}
        for group, pipelines in self.groups.items():
            by_group[group.lower()] = frozenset(p.lower() for p in pipelines)
            for pipeline in pipelines:
                by_pipeline.setdefault(pipeline.lower(), group)
        object.__setattr__(self, "_by_pipeline", by_pipeline)
        object.__setattr__(self, "_by_group", by_group)

    def group_of(self, pipeline: str) -> str | None:
        """The group a pipeline is in, or None when GoCD does not know the pipeline."""
        return self._by_pipeline.get(pipeline.lower())

    def in_group(self, pipeline: str, group: str) -> bool:
        """Whether ``pipeline`` is in ``group`` (both compared case-insensitively)."""
        return pipeline.lower() in self._by_group.get(group.lower(), frozenset())


def stage_of(alert: Alert) -> Stage | None:
    """The stage run a stage mail's alert is about, or None for any other mail."""
    return alert.detail if isinstance(alert.detail, Stage) else None
