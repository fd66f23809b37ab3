"""The plugin contracts: what a manager type and a rule function are.

A *manager type* (``mail``, ``gocd``) reads facts from a message and offers rule functions.
A *rule function* (``mail.in_subject``, ``pipelines.in_group``...) is compiled once, when the
configuration loads, into a :class:`Predicate`; compiling checks its arguments, so a bad regex
or a missing argument is a configuration error and never a surprise at run time.

Everything here is pure and synchronous: no I/O, no awaiting. GoCD data reaches predicates
as an immutable snapshot in the :class:`Context`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mail2alert.message import RawMessage
from mail2alert.model import Alert, Envelope, PipelineGroups


@dataclass(frozen=True)
class Context:
    """What routing may know beyond the message itself.

    ``snapshots`` holds the latest pipeline groups per manager (by label, e.g. ``gocd#0``);
    routing puts the deciding manager's into ``groups``, which is None while that manager has
    never had a snapshot. ``last_results`` maps ``(pipeline, stage)`` (lower case) to the last
    known result, ``passed`` or ``failed``, for the event correction of the gocd manager.
    """

    groups: PipelineGroups | None = None
    snapshots: Mapping[str, PipelineGroups] = field(default_factory=dict)
    last_results: Mapping[tuple[str, str], str] = field(default_factory=dict)
    threads: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """``(pipeline, stage)`` -> Message-ID of the BREAKS mail a FIXED mail answers."""


@dataclass(frozen=True)
class Verdict:
    """A predicate's answer, with the reason an operator reads in ``route --trace``.

    ``waiting`` means the answer needs data that is not there yet (GoCD groups).
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
    """

    name: str
    summary: str
    params: tuple[tuple[str, ArgKind], ...]
    compile: Callable[[tuple[str, ...]], Predicate]
    variadic: bool = False
    needs_groups: bool = False

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


OptionKind = Literal["text", "secret", "url", "seconds", "bool", "path"]


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


def read_alert(message: RawMessage, envelope: Envelope, context: Context) -> Alert:
    """The facts every manager type reads: subject, From: and Message-ID."""
    return Alert(
        envelope=envelope,
        subject=message.get("subject"),
        from_header=message.get("from"),
        message_id=message.get("message-id"),
    )
