"""Frozen records shared by every module: what came in, what was decided, what goes out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

#: GoCD stage events, in the order the original documented them.
EVENTS: tuple[str, ...] = ("PASSES", "FAILS", "BREAKS", "FIXED", "CANCELLED")


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope: who sent the message and to whom (RCPT TO), as received."""

    mail_from: str
    rcpt_tos: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """A GoCD stage run named by a stage mail's subject."""

    pipeline: str
    pipeline_counter: int
    stage: str
    stage_counter: int
    verb: str
    """The verb as GoCD wrote it (``passed``, ``is broken``...)."""

    @property
    def locator(self) -> str:
        """GoCD's stage locator, ``pipeline/counter/stage/counter``."""
        return f"{self.pipeline}/{self.pipeline_counter}/{self.stage}/{self.stage_counter}"


@dataclass(frozen=True)
class Alert:
    """A received message with the facts the managers read from it.

    ``event`` is the event rules see (after any correction); ``stage.verb`` keeps what GoCD
    said.
    """

    envelope: Envelope
    subject: str
    from_header: str
    message_id: str
    stage: Stage | None = None
    event: str | None = None
    details_url: str | None = None
    changes: str | None = None


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


@dataclass(frozen=True)
class ChatTemplate:
    """How a rule's chat messages read: Jinja2 sources (None = the default) and a style.

    ``style`` is ``full`` (title, link and the changes) or ``brief`` (title and link).
    """

    title: str | None = None
    body: str | None = None
    style: str = "full"


@dataclass(frozen=True)
class RuleTrace:
    """How one rule judged one alert: the operator-facing reason, matched or not."""

    index: int
    matched: bool
    reason: str
    actions: tuple[str, ...] = ()


Outcome = Literal["deliver", "drop", "relay", "hold"]


@dataclass(frozen=True)
class Decision:
    """What routing decided for one message.

    - ``deliver``: send to ``actions`` (mailto recipients are in ``recipients``).
    - ``drop``: a manager wanted it but no rule matched.
    - ``relay``: no manager wanted it (or routing failed); pass it upstream unchanged.
    - ``hold``: rules need GoCD data that is not there yet; keep it and route again later.
    """

    outcome: Outcome
    manager: str | None
    reason: str
    actions: tuple[str, ...] = ()
    trace: tuple[RuleTrace, ...] = ()
    alert: Alert | None = None
    passthrough: tuple[str, ...] = ()
    """Recipients the deciding manager did not take: they get the message unchanged."""
    templates: Mapping[str, ChatTemplate] = field(default_factory=dict)
    """For chat actions: the template of the first rule that named the action."""

    @property
    def recipients(self) -> tuple[str, ...]:
        """The addresses of the ``mailto:`` actions, in order."""
        return tuple(a[len("mailto:") :] for a in self.actions if a.lower().startswith("mailto:"))


@dataclass(frozen=True)
class Outgoing:
    """One thing to deliver: a mail (envelope + bytes) headed upstream."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    kind: str = "smtp"
    meta: Mapping[str, str] = field(default_factory=dict)


Severity = Literal["failure", "success", "warning", "info"]


@dataclass(frozen=True)
class ChatPost:
    """One chat message to post, as the outbox keeps it (the text, never the secret URI).

    ``thread_key`` names the conversation the post belongs to; a post with ``thread``
    ``start`` opens a thread (its Slack timestamp is kept), one with ``reply`` is posted in
    it and ends it.
    """

    action: str
    """The action URI, masked: for display only."""
    title: str
    body: str
    colour: str
    severity: Severity = "info"
    event: str | None = None
    link: str | None = None
    thread_key: tuple[str, str] | None = None
    thread: Literal["start", "reply"] | None = None

    def to_json(self) -> str:
        """The post as the outbox stores it (as UTF-8)."""
        fields = {
            "action": self.action,
            "title": self.title,
            "body": self.body,
            "colour": self.colour,
            "severity": self.severity,
            "event": self.event,
            "link": self.link,
            "thread_key": list(self.thread_key) if self.thread_key else None,
            "thread": self.thread,
        }
        return json.dumps(fields, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: bytes | str) -> ChatPost:
        """A stored post; raises ValueError for data that is not one.

        Posts stored before ``thread_key`` and ``severity`` existed name their conversation
        by ``pipeline`` and ``stage``, and have no severity: they read as they were meant.
        """
        fields = json.loads(data)
        if not isinstance(fields, dict) or not isinstance(fields.get("title"), str):
            raise ValueError("not a chat post")
        key = fields.get("thread_key")
        if key is None and fields.get("pipeline") and fields.get("stage"):
            key = [fields["pipeline"], fields["stage"]]
        thread = fields.get("thread")
        severity = fields.get("severity")
        return cls(
            action=str(fields.get("action") or ""),
            title=fields["title"],
            body=str(fields.get("body") or ""),
            colour=str(fields.get("colour") or ""),
            severity=severity
            if severity in _SEVERITIES
            else _LEGACY_SEVERITY.get(str(fields.get("event")), "info"),
            event=fields.get("event"),
            link=fields.get("link"),
            thread_key=(str(key[0]), str(key[1])) if key else None,
            thread=thread if thread in ("start", "reply") else None,
        )


_SEVERITIES = frozenset({"failure", "success", "warning", "info"})
#: How posts stored before ``severity`` existed read: by their event.
_LEGACY_SEVERITY: Mapping[str, Severity] = {
    "BREAKS": "failure",
    "FAILS": "failure",
    "FIXED": "success",
    "PASSES": "success",
    "CANCELLED": "warning",
}


@dataclass(frozen=True)
class ChatSettings:
    """What chat delivery needs from the configuration."""

    actions: Mapping[str, str] = field(default_factory=dict)
    """Action id -> action URI, for every chat action in the configuration."""
    slack_token: Secret | None = None
    slack_api_url: str = "https://slack.com/api"
    timeout: float = 30.0


@dataclass(frozen=True)
class Secret:
    """A password, token or chat URL: shown as ``***`` everywhere but where it is used."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return "***"

    def __repr__(self) -> str:
        return "Secret('***')"

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it."""
        return self.value
