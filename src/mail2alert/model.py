"""Frozen records shared by every module: what came in, what was decided, what goes out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope: who sent the message and to whom (RCPT TO), as received."""

    mail_from: str
    rcpt_tos: tuple[str, ...]


@dataclass(frozen=True)
class Person:
    """Someone an alert names, such as the author of a change: a name, and a mail address
    where the message gives one ("" where it does not)."""

    name: str
    address: str = ""

    def __str__(self) -> str:
        return f"{self.name} <{self.address}>" if self.address else self.name


@dataclass(frozen=True)
class Alert:
    """A received message with the facts its manager read from it.

    ``event`` is the event rules see (after any correction by the manager); ``link`` points
    to where the alert is explained; ``facts`` are the manager's own names for templates;
    ``detail`` is the manager's own record of what the alert is about (opaque to the core);
    ``committers`` are the authors of the changes the alert is about, in the order the
    message names them (``committers:`` actions mail those with an address).
    """

    envelope: Envelope
    subject: str
    from_header: str
    message_id: str
    event: str | None = None
    link: str | None = None
    facts: Mapping[str, object] = field(default_factory=dict)
    detail: object | None = None
    committers: tuple[Person, ...] = ()


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
    - ``hold``: rules need data their manager does not have yet; keep it, route again later.
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
    passthrough: bool = False
    """The message unchanged, for recipients no manager took: it goes out even when the
    message is a duplicate (a claim is the deciding manager's, and covers only what the
    manager made of the message)."""


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
    thread_key: tuple[str, ...] | None = None
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

        Posts stored before ``severity`` existed read with the severity of their colour.
        """
        fields = json.loads(data)
        if not isinstance(fields, dict) or not isinstance(fields.get("title"), str):
            raise ValueError("not a chat post")
        key = fields.get("thread_key")
        thread = fields.get("thread")
        severity = fields.get("severity")
        return cls(
            action=str(fields.get("action") or ""),
            title=fields["title"],
            body=str(fields.get("body") or ""),
            colour=str(fields.get("colour") or ""),
            severity=severity
            if severity in _SEVERITIES
            else _LEGACY_SEVERITY.get(str(fields.get("colour")), "info"),
            event=fields.get("event"),
            link=fields.get("link"),
            thread_key=tuple(str(part) for part in key) if key else None,
            thread=thread if thread in ("start", "reply") else None,
        )


_SEVERITIES = frozenset({"failure", "success", "warning", "info"})
#: How posts stored before ``severity`` existed read: by the colour they were given.
_LEGACY_SEVERITY: Mapping[str, Severity] = {
    "#d50200": "failure",
    "#2eb886": "success",
    "#daa038": "warning",
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
