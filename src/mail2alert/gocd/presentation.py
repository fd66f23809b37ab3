"""How GoCD stage alerts read in chat: the facts templates see, the defaults, the colours."""

from __future__ import annotations

from mail2alert.gocd.model import Stage
from mail2alert.model import Alert, Envelope, Person
from mail2alert.templates import Presentation

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

FACTS = (
    "pipeline",
    "pipeline_counter",
    "stage",
    "stage_counter",
    "locator",
    "verb",
    "gocd_event",
    "changes",
    "cancelled_by",
)


def stage_facts(
    stage: Stage, gocd_event: str, changes: str | None, cancelled_by: str = ""
) -> dict[str, object]:
    """The names a template sees for a stage mail (``committers`` comes with every alert)."""
    return {
        "pipeline": stage.pipeline,
        "pipeline_counter": stage.pipeline_counter,
        "stage": stage.stage,
        "stage_counter": stage.stage_counter,
        "locator": stage.locator,
        "verb": stage.verb,
        "gocd_event": gocd_event,
        "changes": changes or "",
        "cancelled_by": cancelled_by,
    }


_SAMPLE_STAGE = Stage("my-pipeline", 6, "my-stage", 1, "is broken")
SAMPLE = Alert(
    envelope=Envelope("go@example.com", ("mail2alert@example.com",)),
    subject="Stage [my-pipeline/6/my-stage/1] is broken",
    from_header="go@example.com",
    message_id="<sample@example.com>",
    event="BREAKS",
    link="https://ci.example.com/go/pipelines/my-pipeline/6/my-stage/1",
    facts=stage_facts(
        _SAMPLE_STAGE,
        "BREAKS",
        "Git: https://git.example.com/app.git\nrevision: 1f5557f8, modified by Jane Doe",
    ),
    detail=_SAMPLE_STAGE,
    committers=(Person("Jane Doe", "jane@example.com"), Person("bob")),
)

GOCD_PRESENTATION = Presentation(
    facts=FACTS,
    title=DEFAULT_TITLE,
    brief=BRIEF_BODY,
    full=FULL_BODY,
    # Red for trouble, green for good news, amber for a cancel.
    colours={
        "BREAKS": "#d50200",
        "FAILS": "#d50200",
        "FIXED": "#2eb886",
        "PASSES": "#2eb886",
        "CANCELLED": "#daa038",
    },
    severities={
        "BREAKS": "failure",
        "FAILS": "failure",
        "FIXED": "success",
        "PASSES": "success",
        "CANCELLED": "warning",
    },
    words={
        "BREAKS": "is broken",
        "FAILS": "failed",
        "FIXED": "is fixed",
        "PASSES": "passed",
        "CANCELLED": "is cancelled",
    },
    sample=SAMPLE,
)
