"""The plugin contracts: what a manager type and a rule function are.

A *manager type* (``mail``, and each one in the registry) reads facts from a message and
offers rule functions. A *rule function* (``mail.in_subject``...) is compiled once, when the
configuration loads, into a :class:`Predicate`; compiling checks its arguments, so a bad regex
or a missing argument is a configuration error and never a surprise at run time.

Everything here is pure and synchronous: no I/O, no awaiting. Outside data (a manager's
snapshot, the notes earlier decisions kept) reaches predicates in the immutable
:class:`Context`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mail2alert.managers.explaining import SUBJECT_ONLY, Explaining
from mail2alert.managers.memory import NO_MEMORY, Background, Memory
from mail2alert.message import RawMessage
from mail2alert.model import Alert, Envelope
from mail2alert.templates import PLAIN, Presentation


@dataclass(frozen=True)
class Context:
    """What routing may know beyond the message itself.

    ``snapshots`` holds the latest snapshot of each manager's outside data, by manager label
    (``ci#0``); routing puts the deciding manager's into ``snapshot``, which is None while
    that manager has never had one. ``state`` holds the notes decisions have kept (see
    :mod:`mail2alert.managers.memory`), by table and key.
    """

    snapshot: object | None = None
    snapshots: Mapping[str, object] = field(default_factory=dict)
    state: Mapping[str, Mapping[tuple[str, ...], str]] = field(default_factory=dict)

    def recall(self, table: str, key: tuple[str, ...]) -> str | None:
        """The note kept in ``table`` for ``key``, or None."""
        return self.state.get(table, {}).get(key)


@dataclass(frozen=True)
class Verdict:
    """A predicate's answer, with the reason an operator reads in ``route --trace``.

    ``waiting`` means the answer needs outside data that is not there yet (no snapshot).
    """

    matched: bool
    reason: str
    waiting: bool = False


class Predicate(Protocol):
    """A compiled rule function: judges one alert."""

    def __call__(self, alert: Alert, context: Context) -> Verdict: ...


ArgKind = Literal["word", "regex", "group"]


@dataclass(frozen=True)
class RuleFunction:
    """A rule function as registered: its name, its arguments and how to compile it.

    ``compile`` receives the arguments from the configuration and returns the predicate; it
    raises :class:`~mail2alert.errors.RuleArgumentError` for an argument it cannot use.
    With ``variadic`` the last parameter may repeat (and must be given at least once).
    ``requires`` says, given the manager's keys, why the function cannot work there (say it
    reads a snapshot the manager has no source for), or None.
    """

    name: str
    summary: str
    params: tuple[tuple[str, ArgKind], ...]
    compile: Callable[[tuple[str, ...]], Predicate]
    variadic: bool = False
    requires: Callable[[Mapping[str, object]], str | None] | None = None

    @property
    def signature(self) -> str:
        """How the function is written in messages, e.g. ``mail.in_subject(word, ...)``."""
        names = [name for name, _ in self.params]
        if self.variadic:
            names.append("...")
        return f"{self.name}({', '.join(names)})"

    def arity_problem(self, count: int) -> str | None:
        """Why ``count`` arguments do not fit, or None when they do."""
        needed = len(self.params)
        if self.variadic and count < needed:
            plural = "s" * (needed != 1)
            return f"{self.signature} takes at least {needed} argument{plural}, got {count}"
        if not self.variadic and count != needed:
            return f"{self.signature} takes {needed} argument{'s' * (needed != 1)}, got {count}"
        return None


OptionKind = Literal["text", "secret", "url", "seconds", "bool", "path", "ca-file"]


@dataclass(frozen=True)
class Option:
    """A manager-specific configuration key (``url``, ``passwd``...)."""

    kind: OptionKind
    summary: str
    default: object = None
    zero_means_off: bool = False
    """For ``seconds``: 0 is allowed, and switches the feature off."""


Reader = Callable[[RawMessage, Envelope, Context], Alert]


@dataclass(frozen=True)
class ManagerType:
    """A manager plugin: how it reads messages and which rule functions and keys it offers."""

    name: str
    summary: str
    read: Reader
    functions: Mapping[str, RuleFunction]
    events: tuple[str, ...] = ()
    options: Mapping[str, Option] = field(default_factory=dict)
    memory: Memory = NO_MEMORY
    """The stateful half: what decisions remember and recall (nothing, by default)."""
    presentation: Presentation = PLAIN
    """How its alerts read in chat: fact names, default templates, colours."""
    background: Background | None = None
    """How its outside data is kept fresh (None: it has none)."""
    explaining: Explaining = SUBJECT_ONLY
    """What ``route`` and ``coverage`` show of its alerts, in its words."""
    waiting: str = "waiting for outside data"
    """Why a message is held while a rule waits for a snapshot that is not there yet."""
    gave_up: str = "no outside data in time"
    """Why held mail went to the fallback actions (or was relayed) after ``hold_max``."""
    hold_max: Callable[[Mapping[str, object]], float] = lambda options: DEFAULT_HOLD_MAX
    """Given a manager's keys, how long (seconds) its mail may be held."""
    reads_committers: bool = False
    """Whether its alerts name the authors of changes (:attr:`Alert.committers`), so that
    its rules may have ``committers:`` actions."""


#: How long mail may be held for a manager type that does not say.
DEFAULT_HOLD_MAX = 600.0


def read_alert(message: RawMessage, envelope: Envelope, context: Context) -> Alert:
    """The facts every manager type reads: subject, From: and Message-ID."""
    return Alert(
        envelope=envelope,
        subject=message.get("subject"),
        from_header=message.get("from"),
        message_id=message.get("message-id"),
    )
