"""Transports: the only code that talks to the network on the way out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mail2alert.outbox import Item, RecipientResult


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
    reply: str = ""
    """The other side's answer to the whole attempt when it took it (``250 2.0.0 Ok:
    queued as ...``): the history shows it."""


class Transport(Protocol):
    """Delivers outbox items to one kind of destination and says what happened.

    ``send`` never raises for the other side's trouble: a refusal, a timeout or a lost
    connection is an :class:`Attempt`. The dispatcher decides, from the attempt alone, what
    becomes of the item (:func:`mail2alert.dispatcher.judge`).
    """

    @property
    def address(self) -> str:
        """Where it delivers, as logs name it (``mx.example.com:25``, ``chat``)."""
        ...

    async def send(self, item: Item) -> Attempt:
        """Try to deliver ``item`` to its pending recipients once."""
        ...

    async def close_if_idle(self, idle: float) -> None:
        """Let go of connections unused for ``idle`` seconds."""
        ...

    async def close(self) -> None:
        """Let go of every connection."""
        ...
