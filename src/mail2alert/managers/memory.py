"""The stateful half of a manager plugin: what its decisions remember and what they recall.

Routing (:mod:`mail2alert.routing`) and planning (:mod:`mail2alert.planning`) are generic;
they call these hooks and know none of a manager type's words. A manager type that has
nothing to remember (``mail``) uses :data:`NO_MEMORY`.

The words the core does know:

- a **conversation** is a run of alerts about one subject of the manager's (say, one job
  of a CI server). An alert may *start* it (a breakage) or *answer* it (the fix):
  the answer's mail is threaded under the start's, its chat post replied in the start's
  thread, and the conversation ends;
- a **note** is one fact the manager keeps in the outbox once the message is committed (say,
  the last result of a job, which corrects the next event), and routing sees it
  again in :attr:`~mail2alert.managers.base.Context.state`;
- a **claim** says an alert is the same event as any other with its key within a window:
  the second is recorded, and delivered not at all;
- a **label** names, for display and for templates, where the alert belongs (a group);
- a **snapshot** is the outside data a manager's rules read (say, which team owns which job),
  kept fresh in the background by the manager type's :class:`Background` keeper;
- a **recovered** message is one a keeper made from its source's own state because the
  sender's mail never came (a CI server that does not retry a failed send): the core routes
  it exactly like a message that arrived, and it carries :data:`RECOVERED_HEADER`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from mail2alert.model import Alert

#: A conversation's or a note's key: its parts, lower case.
Key = tuple[str, ...]

#: The header of a message mail2alert made itself (see :class:`Recovered`); its value names
#: where the facts came from (``gocd-api``).
RECOVERED_HEADER = "X-Mail2alert-Recovered"


@dataclass(frozen=True)
class Conversation:
    """The conversation an alert is part of, and whether it starts or answers it."""

    key: Key
    role: Literal["start", "answer"] | None = None


@dataclass(frozen=True)
class Note:
    """A fact to keep in the manager's ``table`` once the message is committed."""

    table: str
    key: Key
    value: str


@dataclass(frozen=True)
class Claim:
    """Deliver at most one alert with this ``key`` within ``window`` seconds."""

    key: str
    window: float


class Memory(Protocol):
    """What a manager type's decisions remember and recall (all pure, no I/O).

    ``options`` are the manager's validated keys; ``state`` is the snapshot of the notes
    kept so far, by table and key.
    """

    def conversation(self, alert: Alert) -> Conversation | None:
        """The conversation ``alert`` is part of, or None."""
        ...

    def notes(self, alert: Alert) -> tuple[Note, ...]:
        """What to remember once ``alert`` is committed (not for held mail)."""
        ...

    def claim(self, alert: Alert, label: str, options: Mapping[str, object]) -> Claim | None:
        """The de-duplication claim of ``alert`` by the manager ``label``, or None."""
        ...

    def label(self, alert: Alert, snapshot: object | None) -> str | None:
        """Where ``alert`` belongs, by the manager's snapshot (for display), or None."""
        ...


class _Forgetful:
    """A memory that keeps and recalls nothing: the ``mail`` manager's."""

    def conversation(self, alert: Alert) -> Conversation | None:
        return None

    def notes(self, alert: Alert) -> tuple[Note, ...]:
        return ()

    def claim(self, alert: Alert, label: str, options: Mapping[str, object]) -> Claim | None:
        return None

    def label(self, alert: Alert, snapshot: object | None) -> str | None:
        return None


NO_MEMORY: Memory = _Forgetful()


@dataclass(frozen=True)
class Recovered:
    """A message a manager's keeper made because the sender's own never came.

    ``data`` is the message (with :data:`RECOVERED_HEADER`) as the sender would have written
    it, so that the manager reads, routes, threads and de-duplicates it as any other, but
    without ``From:`` and ``To:``: ``label`` names the manager whose keeper made it, and the
    core addresses it from and to that manager's own addresses (its ``messages-we-want``).
    """

    label: str
    data: bytes


@dataclass(frozen=True)
class Feed:
    """What a keeper hands the core: a new snapshot, notes learnt from outside, recovered
    messages; and what the core remembers, to read."""

    snapshot: Callable[[str, object], None]
    """``(manager label, snapshot)``: routing uses it from now on."""
    notes: Callable[[Sequence[Note]], None]
    """Notes to keep only where nothing is known yet (what mail2alert saw itself wins)."""
    recall: Callable[[str, Key], str | None] = lambda table, key: None
    """The note kept in a table for a key (what routing sees), or None."""
    recover: Callable[[Recovered], Awaitable[str]] | None = None
    """Route and commit a recovered message as one that arrived; its queue id once it is
    durable. Raises :class:`~mail2alert.errors.Mail2AlertError` when it cannot be kept.
    None: this core takes none (a keeper then makes none)."""


class Keeper(Protocol):
    """Background work that keeps one manager's snapshot fresh (in the delivery process)."""

    @property
    def name(self) -> str:
        """How logs name it, e.g. ``poller of ci#0``."""
        ...

    @property
    def snapshot(self) -> object | None:
        """The latest snapshot (at first, one kept from an earlier run, or None)."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the snapshot fresh until ``stop`` is set; raise only for a bug."""
        ...


@dataclass(frozen=True)
class Background:
    """How a manager type keeps its outside data fresh, and how others read what it keeps.

    ``keeper`` makes the keeper of one manager (None when its options need none);
    ``saved`` is where the keeper saves the latest snapshot in ``data-dir``, for the other
    processes (intake workers) to follow with ``load``; ``fetch`` reads a snapshot once,
    for commands (``route``, ``test``, ``coverage``): the snapshot, or None, and a note
    for the operator on what was used; ``probe`` asks the source once for ``check
    --online``: whether it answers as the keeper needs (ok, and one line on what was found).
    """

    keeper: Callable[[str, Mapping[str, object], Path, Feed], Keeper | None]
    saved: Callable[[Mapping[str, object], Path], Path | None]
    load: Callable[[Path], object | None]
    fetch: Callable[[str, Mapping[str, object], Path], Awaitable[tuple[object | None, str]]]
    probe: Callable[[str, Mapping[str, object]], Awaitable[tuple[bool, str]]] | None = None
