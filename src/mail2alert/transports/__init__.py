"""Transports: the only code that talks to the network on the way out."""

from __future__ import annotations

from dataclasses import dataclass

from mail2alert.outbox import RecipientResult


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt, whatever the transport.

    ``recipients`` says what became of each recipient (or chat action) that was answered for.
    When the whole attempt failed, ``recipients`` is empty, ``error`` says why and
    ``permanent`` tells a refusal (give up) from a passing failure (try again later);
    ``retry_after`` is the wait the other side asked for (Slack's 429 Retry-After).
    ``unreachable`` says the destination itself did not answer (no connection, a timeout, a
    lost connection, 421): nothing was said about this item, so it waits for the
    destination rather than spend an attempt of its own.
    """

    recipients: tuple[RecipientResult, ...]
    error: str = ""
    permanent: bool = False
    retry_after: float | None = None
    unreachable: bool = False
