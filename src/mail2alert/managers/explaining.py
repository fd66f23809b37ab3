"""What a manager type shows operators, in its own words: ``route``'s facts line, what held
mail waits for, the ``coverage`` inventory, a snapshot read from a file, whether its
outside source is set up to send this mail2alert its mail (``check --<type>``), and its page
of the web console (what the running service keeps of each of its managers).

The commands in :mod:`mail2alert.explain` and :mod:`mail2alert.cli` and the console
(:mod:`mail2alert.console`) call these hooks without knowing what a manager's facts are; a
type without them shows the subject alone, and has no console page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mail2alert.model import Alert, Decision, Envelope
from mail2alert.settings import Listener

if TYPE_CHECKING:
    from mail2alert.routing import Manager


@dataclass(frozen=True)
class Facts:
    """What an alert is about: one line for ``route``, and the same as data for ``--json``
    (None when the alert has none of the type's facts)."""

    line: str
    data: Mapping[str, object] | None = None


#: Routes a made-up message as ``serve`` would (without the notes of earlier decisions).
Probe = Callable[[Envelope, bytes], Decision]


class Inventory(Protocol):
    """A type's part of the ``coverage`` report."""

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--format json|yaml`` (merged with other types' by key)."""
        ...

    def lines(self) -> list[str]:
        """The text ``coverage`` prints for it."""
        ...


@dataclass(frozen=True)
class SnapshotFile:
    """A command-line option that gives a snapshot from a file instead of the outside source.

    ``read`` raises :class:`~mail2alert.errors.UsageError` naming the option and the file.
    """

    flag: str
    metavar: str
    help: str
    read: Callable[[Path], object]


@dataclass(frozen=True)
class SetupFinding:
    """One thing set up wrong at a manager's source: what is wrong, and what to change there."""

    wrong: str
    change: str


@dataclass(frozen=True)
class SetupReport:
    """What asking one manager's source about its setup found.

    ``findings`` are what must change for the source to send this mail2alert every mail it
    should; ``checked`` says what was found right, and what was not asked and why (which is
    no finding: say, a setting the user may not read).
    """

    label: str
    findings: tuple[SetupFinding, ...] = ()
    checked: tuple[str, ...] = ()

    def finding_lines(self) -> list[str]:
        """One line per finding: ``label: what is wrong: what to change``."""
        return [f"{self.label}: {f.wrong}: {f.change}" for f in self.findings]

    def summary(self) -> str | None:
        """``label: OK (...)`` without findings, else what was checked (None if nothing)."""
        notes = "; ".join(self.checked)
        if not self.findings:
            return f"{self.label}: OK ({notes})" if notes else f"{self.label}: OK"
        return f"{self.label}: also checked: {notes}" if notes else None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``coverage --format json|yaml``."""
        return {
            "findings": [{"wrong": f.wrong, "change": f.change} for f in self.findings],
            "checked": list(self.checked),
        }


@dataclass(frozen=True)
class SetupCheck:
    """``check FLAG``: asks a manager's source whether it is set up for this mail2alert.

    ``run`` gets the manager and where this mail2alert listens (``local-smtp``), and never
    raises for what the source answers: a refusal, wrong credentials or no answer at all are
    findings or notes in its report.
    """

    flag: str
    help: str
    run: Callable[[Manager, Listener], Awaitable[SetupReport]]


@dataclass(frozen=True)
class Table:
    """Plain text in rows for the web console (which escapes it): a caption, the column
    names, the rows, and how many rows were left out."""

    caption: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    left_out: int = 0


@dataclass(frozen=True)
class Kept:
    """What the running service keeps of one manager: its snapshot of the outside data
    (None before the first) and the notes decisions and keepers kept (by table and key, for
    every manager: a type's tables are its own)."""

    manager: Manager
    snapshot: object | None
    notes: Mapping[str, Mapping[tuple[str, ...], str]]


@dataclass(frozen=True)
class ConsolePage:
    """A page of the web console for the managers of one type: ``title`` names it in the
    menu, and ``show`` makes one manager's tables (pure and quick: it runs on the event
    loop). Its keeper's health (last poll, last error) is shown beside them by the core."""

    title: str
    show: Callable[[Kept], Sequence[Table]]
    filters: tuple[str, ...] = ()
    """Keys of its facts (as in :attr:`Facts.data`) the console's message list offers to
    filter by."""


@dataclass(frozen=True)
class Explaining:
    """The hooks; ``facts(alert, label, known)`` gets the manager's label for the alert (its
    group, say) and whether the manager had a snapshot."""

    facts: Callable[[Alert, str | None, bool], Facts]
    held: str = "its manager's outside data is known"
    """What held mail waits for, as ``route`` says: "hold until ..."."""
    coverage: Callable[[Sequence[Manager], Mapping[str, object], Probe], Inventory] | None = None
    """Routes every subject the type knows of (for its managers, by their snapshots)."""
    snapshot_file: SnapshotFile | None = None
    setup: SetupCheck | None = None
    """``check --<type>`` and the setup section of ``coverage``."""
    console: ConsolePage | None = None
    """Its page of the web console (None: it has none)."""


def subject_only(alert: Alert, label: str | None, known: bool) -> Facts:
    """The facts of a type that reads none beyond the subject."""
    return Facts("none beyond the subject")


#: The hooks of a type that shows nothing of its own (the ``mail`` manager).
SUBJECT_ONLY = Explaining(facts=subject_only)
