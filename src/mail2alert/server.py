"""Intake's handler: each message a session received is parsed, routed, planned and
committed to the outbox, and only then answered 250 (:class:`Handler`).

It never opens a socket itself (:mod:`mail2alert.app` does), and it never sends anything: the
outcome of routing goes into the outbox, and the dispatcher delivers from there. The SMTP
session that calls it is :mod:`mail2alert.session`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mail2alert.actions import mask
from mail2alert.errors import OutboxError, OutboxFull
from mail2alert.logs import about, loggable
from mail2alert.managers.base import Context
from mail2alert.message import RawMessage
from mail2alert.model import Envelope
from mail2alert.outbox import Accepted, GroupCommitter, new_queue_id
from mail2alert.planning import accept
from mail2alert.routing import Manager
from mail2alert.session import REPLY_NO_SPACE

log = logging.getLogger(__name__)

REPLY_QUEUED = "250 2.0.0 Ok: queued as {}"
REPLY_NOT_QUEUED = "451 4.3.0 Requested action aborted: cannot queue the message, try again later"
REPLY_LOOP = "554 5.4.6 Too many hops: mail loop detected"

#: A message that has passed more mail servers than this is looping (Postfix's
#: ``hopcount_limit`` counts the same way, with 50); it is refused, not passed round again.
MAX_HOPS = 30


def duplicate(accepted: Accepted, original: str) -> str:
    """The one log line of a message whose event was delivered before, as ``original``:
    who still gets it unchanged (recipients its manager did not take), if anyone."""
    others = loggable(",".join(accepted.decision.passthrough))
    relayed = f"; relayed unchanged to <{others}>" if others else ""
    return (
        f"{accepted.queue_id}: duplicate of {original} (the same event)"
        f"{relayed}: {loggable(accepted.subject)}"
    )


def decided(accepted: Accepted, original: str | None = None) -> dict[str, str]:
    """The JSON log fields of a decision's line (see :mod:`mail2alert.logs`)."""
    outcome = "duplicate" if original is not None else accepted.decision.outcome
    return about(accepted.queue_id, "decision", outcome=outcome)


def describe(accepted: Accepted) -> str:
    """The one log line per message decision."""
    d = accepted.decision
    sender = loggable(accepted.envelope.mail_from)
    recipients = loggable(",".join(accepted.envelope.rcpt_tos))
    head = (
        f"{accepted.queue_id}: from=<{sender}> to=<{recipients}> subject={accepted.subject[:120]!r}"
    )
    who = f"manager={d.manager} " if d.manager else ""
    if d.outcome == "deliver":
        actions = loggable(",".join(mask(a) for a in d.actions))
        return f"{head} {who}deliver={actions} ({d.reason})"
    return f"{head} {who}{d.outcome} ({d.reason})"


class Handler:
    """aiosmtpd handler: accepts every recipient, answers DATA once the outcome is durable."""

    def __init__(
        self,
        committer: GroupCommitter,
        managers: Callable[[], Sequence[Manager]],
        context: Callable[[], Context],
        *,
        on_commit: Callable[[Accepted], None] = lambda accepted: None,
        sender: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.committer = committer
        self.managers = managers
        self.context = context
        self.on_commit = on_commit
        self.sender = sender
        self.hostname = socket.gethostname()
        self.in_flight = 0

    def rejected(self) -> None:
        """A message was refused for good (5xx): counted for /metrics."""
        self.committer.count("messages", manager="", outcome="rejected")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        """Route, commit, then answer: 250 with the queue id, or 451 (452 when the disk is
        full) so the sender retries."""
        self.in_flight += 1
        try:
            queue_id = new_queue_id()
            content = envelope.content
            data = content if isinstance(content, bytes) else (content or "").encode("utf-8")
            peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
            message = RawMessage.parse(data)
            hops = message.count("received")
            if hops > MAX_HOPS:
                log.warning(
                    "%s: refused, looping: %d Received: fields (more than %d) from=<%s> to=<%s>",
                    queue_id,
                    hops,
                    MAX_HOPS,
                    loggable(_reverse_path(envelope.mail_from)),
                    loggable(",".join(envelope.rcpt_tos)),
                    extra=about(queue_id, "decision", outcome="rejected"),
                )
                self.rejected()
                return REPLY_LOOP
            accepted = accept(
                queue_id,
                Envelope(_reverse_path(envelope.mail_from), tuple(envelope.rcpt_tos)),
                data,
                self.managers(),
                self.context(),
                helo=session.host_name or "",
                peer=peer,
                hostname=self.hostname,
                sender=self.sender(),
                parsed=message,
            )
            # The items hold their own copies now; while the commit waits for its fsync the
            # message's bytes need not be held too (a 31 MB message is held by its items alone).
            envelope.content = envelope.original_content = None
            del content, data, message
            try:
                duplicate_of = await self.committer.put(accepted)
            except OutboxError as exc:
                log.error("%s: not queued, sender told to retry: %s", queue_id, exc)
                # 452 tells the sender it is our storage, not its message (RFC 3463 4.3.1).
                return REPLY_NO_SPACE if isinstance(exc, OutboxFull) else REPLY_NOT_QUEUED
            if duplicate_of is not None:
                log.info(
                    "%s", duplicate(accepted, duplicate_of), extra=decided(accepted, duplicate_of)
                )
            else:
                log.info("%s", describe(accepted), extra=decided(accepted))
            self.on_commit(accepted)
            return REPLY_QUEUED.format(queue_id)
        finally:
            self.in_flight -= 1


def _reverse_path(mail_from: str | None) -> str:
    """The sender as stored: aiosmtpd keeps a bounce's null reverse-path as ``<>``."""
    return "" if mail_from is None or mail_from == "<>" else mail_from
