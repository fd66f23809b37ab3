"""How a manager type's keeper fares, for ``/metrics`` and ``/readyz``: an optional hook.

A keeper (:class:`~mail2alert.managers.memory.Keeper`) that also has ``health()`` is
:class:`Reporting`: the core then serves its polls and its snapshot's age as
``mail2alert_<type>_polls_total{manager,result}`` and
``mail2alert_<type>_snapshot_age_seconds{manager}``, its state in ``/readyz``'s body
(never a failing check: routing goes on with the last snapshot kept), and its last poll and
last error on the web console. The core reads only this record; the words in it are the
keeper's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class KeeperHealth:
    """One keeper's polls so far and its snapshot's freshness."""

    ok: bool
    """Whether its last poll succeeded."""
    state: str
    """One line on its last poll, as its log says it (never a credential)."""
    polls: Mapping[str, int] = field(default_factory=dict)
    """Polls since the process started, by result (a few fixed words, e.g. ok, failed)."""
    snapshot_age: float | None = None
    """Seconds since its snapshot was last confirmed by the source; None without one."""
    last_poll: float | None = None
    """When its last poll ended (epoch seconds); None before the first."""
    last_error: str = ""
    """The last trouble it had with its source, even when it has recovered since ("" for
    none since the process started; never a credential)."""
    last_error_at: float | None = None
    """When it had it (epoch seconds)."""


@runtime_checkable
class Reporting(Protocol):
    """A keeper that says how it fares."""

    def health(self) -> KeeperHealth:
        """Its health now (cheap: no I/O)."""
        ...
