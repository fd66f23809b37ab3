"""Chat messages rendered from an alert's facts with sandboxed Jinja2 templates.

A template sees these names: ``pipeline``, ``pipeline_counter``, ``stage``, ``stage_counter``,
``event`` (as rules see it), ``gocd_event`` and ``verb`` (as GoCD said it), ``group``,
``subject``, ``details_url``, ``changes``, ``sender`` and ``locator``. Missing facts are empty
strings (a mail that is not a stage mail has no pipeline), so one template serves every mail.

Templates are rendered against a sample alert when the configuration loads, so a mistake in
one is a configuration error with its line, never a failed alert.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from mail2alert.gocd.manager import VERBS
from mail2alert.model import Alert, ChatTemplate, Envelope, Severity, Stage

if TYPE_CHECKING:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Colour per event: red for trouble, green for good news, amber for a cancel.
COLOURS: Mapping[str, str] = {
    "BREAKS": "#d50200",
    "FAILS": "#d50200",
    "FIXED": "#2eb886",
    "PASSES": "#2eb886",
    "CANCELLED": "#daa038",
}
NEUTRAL = "#808080"

#: What each event is, for services that show a kind rather than a colour (Apprise).
SEVERITIES: Mapping[str, Severity] = {
    "BREAKS": "failure",
    "FAILS": "failure",
    "FIXED": "success",
    "PASSES": "success",
    "CANCELLED": "warning",
}

#: How each event reads in a title.
WORDS: Mapping[str, str] = {
    "BREAKS": "is broken",
    "FAILS": "failed",
    "FIXED": "is fixed",
    "PASSES": "passed",
    "CANCELLED": "is cancelled",
}

DEFAULT_TITLE = (
    "{% if pipeline %}{{ event }}: {{ pipeline }}/{{ pipeline_counter }} {{ stage }}"
    "{% if stage_counter != 1 %} (run {{ stage_counter }}){% endif %}"
    "{% else %}{{ subject }}{% endif %}"
)
BRIEF_BODY = (
    "{% if pipeline %}Stage {{ locator }} {{ word }}"
    "{% if group %} (group {{ group }}){% endif %}"
    "{% if details_url %}\n{{ details_url }}{% endif %}{% else %}from {{ sender }}{% endif %}"
)
FULL_BODY = BRIEF_BODY + "{% if changes %}\n\n{{ changes }}{% endif %}"


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


def facts(alert: Alert, group: str | None = None) -> dict[str, object]:
    """The names a template sees, for one alert."""
    stage = alert.stage
    event = alert.event or ""
    return {
        "pipeline": stage.pipeline if stage else "",
        "pipeline_counter": stage.pipeline_counter if stage else "",
        "stage": stage.stage if stage else "",
        "stage_counter": stage.stage_counter if stage else "",
        "locator": stage.locator if stage else "",
        "verb": stage.verb if stage else "",
        "gocd_event": event if not stage else _gocd_event(stage),
        "event": event,
        "word": WORDS.get(event, ""),
        "group": group or "",
        "subject": alert.subject,
        "details_url": alert.details_url or "",
        "changes": alert.changes or "",
        "sender": alert.envelope.mail_from,
    }


def _gocd_event(stage: Stage) -> str:
    return VERBS[stage.verb]


def render(template: ChatTemplate, alert: Alert, group: str | None = None) -> Rendered:
    """Render ``template`` for ``alert``; raises jinja2.TemplateError on a broken template."""
    names = facts(alert, group)
    title = _compile(template.title or DEFAULT_TITLE).render(names).strip()
    body_source = template.body or (BRIEF_BODY if template.style == "brief" else FULL_BODY)
    body = _compile(body_source).render(names).strip()
    return Rendered(
        title=title,
        body=body,
        colour=COLOURS.get(alert.event or "", NEUTRAL),
        severity=SEVERITIES.get(alert.event or "", "info"),
        event=alert.event,
        link=alert.details_url,
    )


SAMPLE = Alert(
    envelope=Envelope("go@example.com", ("mail2alert@example.com",)),
    subject="Stage [my-pipeline/6/my-stage/1] is broken",
    from_header="go@example.com",
    message_id="<sample@example.com>",
    stage=Stage("my-pipeline", 6, "my-stage", 1, "is broken"),
    event="BREAKS",
    details_url="https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1",
    changes="Git: https://git.example.com/app.git\nrevision: 1f5557f8, modified by Jane Doe",
)
SAMPLE_PLAIN = Alert(
    envelope=Envelope("go@example.com", ("admin@example.com",)),
    subject="Server Backup Completed Successfully",
    from_header="go@example.com",
    message_id="<sample2@example.com>",
)


def check(template: ChatTemplate) -> str | None:
    """Why ``template`` cannot render (against a stage mail and a plain mail), or None."""
    if template.title is None and template.body is None:
        return None  # the defaults, tested with the project
    import jinja2

    for sample in (SAMPLE, SAMPLE_PLAIN):
        try:
            render(template, sample, "my-group")
        except jinja2.TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" (template line {line})" if line else ""
            return f"template error{where}: {exc.message or exc}"
    return None
