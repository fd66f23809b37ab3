"""Chat messages rendered from an alert's facts with sandboxed Jinja2 templates.

Every template sees ``event`` (as rules see it), ``word`` (how the event reads), ``group``
(the alert's label), ``subject``, ``details_url`` (the alert's link), ``sender`` and
``committers`` (each with ``name`` and ``address``, "" where unknown), plus the
facts of every registered manager type (see each type's :class:`Presentation`, and the README
for the built-in ones). Facts an alert does not have are empty strings,
so one template serves every mail.

Templates are rendered against each manager type's sample alert and a plain one when the
configuration loads, so a mistake in one is a configuration error with its line, never a
failed alert.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from mail2alert.model import Alert, ChatTemplate, Envelope, Severity

if TYPE_CHECKING:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

NEUTRAL = "#808080"

SAMPLE_PLAIN = Alert(
    envelope=Envelope("go@example.com", ("admin@example.com",)),
    subject="Server Backup Completed Successfully",
    from_header="go@example.com",
    message_id="<sample2@example.com>",
)


@dataclass(frozen=True)
class Presentation:
    """How a manager type's alerts read in chat: its fact names, default templates, and
    the colour, severity and word of each of its events."""

    facts: tuple[str, ...] = ()
    title: str = "{{ subject }}"
    brief: str = "from {{ sender }}"
    full: str = "from {{ sender }}"
    colours: Mapping[str, str] = field(default_factory=dict)
    severities: Mapping[str, Severity] = field(default_factory=dict)
    words: Mapping[str, str] = field(default_factory=dict)
    sample: Alert = SAMPLE_PLAIN
    """An alert of this type that every template must render for."""


PLAIN = Presentation()


@dataclass(frozen=True)
class Rendered:
    """A chat message ready to post."""

    title: str
    body: str
    colour: str
    severity: Severity
    event: str | None
    link: str | None


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Imported here: only a configuration with chat actions needs Jinja2 in memory.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Sandboxed: templates come from a config file, and must not reach Python's internals.
    return ImmutableSandboxedEnvironment(
        autoescape=False, undefined=jinja2.StrictUndefined, keep_trailing_newline=False
    )


@lru_cache(maxsize=256)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _every_fact() -> dict[str, object]:
    """Every registered manager type's fact names, empty."""
    from mail2alert.managers.registry import MANAGER_TYPES  # the registry imports templates

    return {name: "" for t in MANAGER_TYPES.values() for name in t.presentation.facts}


def facts(alert: Alert, label: str | None = None, shown: Presentation = PLAIN) -> dict[str, object]:
    """The names a template sees, for one alert."""
    event = alert.event or ""
    return {
        **_every_fact(),
        "event": event,
        "word": shown.words.get(event, ""),
        "group": label or "",
        "subject": alert.subject,
        "details_url": alert.link or "",
        "sender": alert.envelope.mail_from,
        "committers": alert.committers,
        **alert.facts,
    }


def render(
    template: ChatTemplate, alert: Alert, label: str | None = None, shown: Presentation = PLAIN
) -> Rendered:
    """Render ``template`` for ``alert``; raises jinja2.TemplateError on a broken template."""
    names = facts(alert, label, shown)
    title = _compile(template.title or shown.title).render(names).strip()
    body_source = template.body or (shown.brief if template.style == "brief" else shown.full)
    body = _compile(body_source).render(names).strip()
    return Rendered(
        title=title,
        body=body,
        colour=shown.colours.get(alert.event or "", NEUTRAL),
        severity=shown.severities.get(alert.event or "", "info"),
        event=alert.event,
        link=alert.link,
    )


def check(template: ChatTemplate) -> str | None:
    """Why ``template`` cannot render (for every manager type's sample and a plain mail)."""
    if template.title is None and template.body is None:
        return None  # the defaults, tested with the project
    import jinja2

    from mail2alert.managers.registry import MANAGER_TYPES

    samples = [(t.presentation, t.presentation.sample) for t in MANAGER_TYPES.values()]
    for shown, sample in [*samples, (PLAIN, SAMPLE_PLAIN)]:
        try:
            render(template, sample, "my-group", shown)
        except jinja2.TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" (template line {line})" if line else ""
            return f"template error{where}: {exc.message or exc}"
        except Exception as exc:  # noqa: BLE001 - a filter or an operation failing ('%d' % text)
            return f"template error: {type(exc).__name__}: {exc}"
    return None
