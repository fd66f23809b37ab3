"""The ``mail`` manager: rules that need nothing beyond the message itself."""

from __future__ import annotations

from mail2alert.errors import RuleArgumentError
from mail2alert.managers.base import (
    Context,
    ManagerType,
    Predicate,
    RuleFunction,
    Verdict,
    read_alert,
)
from mail2alert.model import Alert


def _compile_in_subject(args: tuple[str, ...]) -> Predicate:
    words = tuple(w.casefold() for w in args)
    for i, w in enumerate(words):
        if not w.strip():
            raise RuleArgumentError(i, "an empty word matches every subject; remove it")

    def in_subject(alert: Alert, context: Context) -> Verdict:
        subject = alert.subject.casefold()
        missing = [w for w in words if w not in subject]
        if missing:
            return Verdict(False, f"subject lacks {', '.join(repr(w) for w in missing)}")
        return Verdict(True, f"subject has {', '.join(repr(w) for w in words)}")

    return in_subject


IN_SUBJECT = RuleFunction(
    name="mail.in_subject",
    summary="every word occurs in the Subject (case-insensitive, after decoding)",
    params=(("word", "word"),),
    variadic=True,
    compile=_compile_in_subject,
)

MAIL = ManagerType(
    name="mail",
    summary="routes by what the message itself says",
    read=read_alert,
    functions={IN_SUBJECT.name: IN_SUBJECT},
)
