"""The SMTP side: an aiosmtpd handler that parses, routes, commits, and only then says 250.

It never opens a socket itself (:mod:`mail2alert.app` does), and it never sends anything: the
outcome of routing goes into the outbox, and the dispatcher delivers from there.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from aiosmtpd.smtp import SMTP, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mail2alert.actions import mask, outgoing_for
from mail2alert.errors import OutboxError, OutboxFull
from mail2alert.managers.base import Context
from mail2alert.managers.gocd import stage_result
from mail2alert.message import RawMessage, received_header
from mail2alert.model import Decision, Envelope
from mail2alert.outbox import Accepted, GroupCommitter, new_queue_id
from mail2alert.routing import Manager, find_manager, route

log = logging.getLogger(__name__)

REPLY_QUEUED = "250 2.0.0 Ok: queued as {}"
#: Events whose mail answers the BREAKS mail of the same stage (threads in mail clients).
_ANSWERS = frozenset({"FIXED", "PASSES"})
REPLY_NOT_QUEUED = "451 4.3.0 Requested action aborted: cannot queue the message, try again later"
REPLY_NO_SPACE = "452 4.3.1 Insufficient system storage, try again later"
REPLY_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
REPLY_BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"


def accept(
    queue_id: str,
    envelope: Envelope,
    data: bytes,
    managers: Sequence[Manager],
    context: Context,
    *,
    helo: str = "",
    peer: str = "",
    hostname: str = "localhost",
    received_at: float | None = None,
    stop_holding: bool = False,
) -> Accepted:
    """Route one received message and build what the outbox must keep; never raises.

    If routing itself fails (our bug, never the sender's), the message is relayed unchanged
    and the error logged with its queue id. With ``stop_holding``, a message that would be
    held again goes to its manager's ``fallback`` actions, or is relayed unchanged.
    """
    now = time.time() if received_at is None else received_at
    message = RawMessage.parse(data)
    try:
        decision = route(managers, envelope, message, context)
    except Exception:
        log.exception("%s: routing failed; relaying the message unchanged", queue_id)
        decision = Decision("relay", None, "routing failed: relayed unchanged")
    if decision.outcome == "hold" and stop_holding:
        decision = _stop_holding(queue_id, decision, managers)
    single = envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None
    received = received_header(
        helo=helo,
        peer=peer,
        hostname=hostname,
        queue_id=queue_id,
        recipient=single,
        newline=message.newline,
    )
    alert = decision.alert
    stage = alert.stage if alert else None
    key = (stage.pipeline.lower(), stage.stage.lower()) if stage else None
    manager = find_manager(managers, decision.manager)
    groups = context.snapshots.get(manager.label, context.groups) if manager else None
    group = groups.group_of(stage.pipeline) if groups and stage else None
    answers = context.threads.get(key) if key and alert and alert.event in _ANSWERS else None
    items = outgoing_for(decision, envelope, message, received, group=group, in_reply_to=answers)
    subject = alert.subject if alert else message.get("subject")
    history = event_key = thread = None
    window = 0.0
    if alert is not None and stage is not None and key and decision.outcome != "hold":
        result = stage_result(stage)
        if result:
            history = (*key, result)
        if alert.event == "BREAKS" and alert.message_id:
            thread = (*key, alert.message_id)
        elif answers:
            thread = (*key, "")
        window = manager.seconds("duplicate-window", 0.0) if manager else 0.0
        if window > 0:
            event_key = f"{decision.manager}:{stage.locator.lower()}:{stage.verb}"
    return Accepted(
        queue_id,
        now,
        envelope,
        subject,
        decision,
        tuple(items),
        raw=data if decision.outcome == "hold" else None,
        history=history,
        event_key=event_key,
        event_window=window,
        thread=thread,
        group=group,
    )


def _stop_holding(queue_id: str, decision: Decision, managers: Sequence[Manager]) -> Decision:
    manager = find_manager(managers, decision.manager)
    if manager is not None and manager.fallback:
        log.warning(
            "%s: no pipeline groups from GoCD in time; sending to %s's fallback actions",
            queue_id,
            manager.label,
        )
        return replace(
            decision,
            outcome="deliver",
            reason="no GoCD data in time: fallback actions",
            actions=manager.fallback,
        )
    log.warning(
        "%s: no pipeline groups from GoCD in time and no fallback; relaying unchanged", queue_id
    )
    return replace(decision, outcome="relay", reason="no GoCD data in time: relayed unchanged")


#: What must not reach a log line as it came: C0 and C1 controls (a terminal obeys ESC and
#: CSI), DEL, line separators, and the surrogates that stand for undecodable bytes.
_UNLOGGABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that was not UTF-8, as that byte
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def loggable(text: str) -> str:
    """``text`` fit for one log line: control characters and undecodable bytes escaped."""
    return _UNLOGGABLE.sub(_escaped, text)


class EscapeClientText(logging.Filter):
    """Escapes what :func:`loggable` escapes in every record of the logger it filters.

    aiosmtpd logs commands, HELO names and addresses as the client sent them (``%s``), so an
    escape sequence or a bare CR from a client would reach the operator's terminal or forge
    a log line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's to report, not ours
            return True
        safe = loggable(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


logging.getLogger("mail.log").addFilter(EscapeClientText())


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
        return f"{head} {who}deliver={','.join(mask(a) for a in d.actions)} ({d.reason})"
    return f"{head} {who}{d.outcome} ({d.reason})"


class Handler:
    """aiosmtpd handler: accepts every recipient, answers DATA once the outcome is durable."""

    def __init__(
        self,
        committer: GroupCommitter,
        managers: Callable[[], Sequence[Manager]],
        context: Callable[[], Context],
        *,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.committer = committer
        self.managers = managers
        self.context = context
        self.on_commit = on_commit
        self.hostname = socket.gethostname()
        self.in_flight = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        """Route, commit, then answer: 250 with the queue id, or 451 (452 when the disk is
        full) so the sender retries."""
        self.in_flight += 1
        try:
            queue_id = new_queue_id()
            content = envelope.content
            data = content if isinstance(content, bytes) else (content or "").encode("utf-8")
            peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
            accepted = accept(
                queue_id,
                Envelope(_reverse_path(envelope.mail_from), tuple(envelope.rcpt_tos)),
                data,
                self.managers(),
                self.context(),
                helo=session.host_name or "",
                peer=peer,
                hostname=self.hostname,
            )
            try:
                duplicate_of = await self.committer.put(accepted)
            except OutboxError as exc:
                log.error("%s: not queued, sender told to retry: %s", queue_id, exc)
                # 452 tells the sender it is our storage, not its message (RFC 3463 4.3.1).
                return REPLY_NO_SPACE if isinstance(exc, OutboxFull) else REPLY_NOT_QUEUED
            if duplicate_of is not None:
                log.info(
                    "%s: same GoCD event as %s, already delivered once: %s",
                    queue_id,
                    duplicate_of,
                    loggable(accepted.subject),
                )
            else:
                log.info("%s", describe(accepted))
            self.on_commit()
            return REPLY_QUEUED.format(queue_id)
        finally:
            self.in_flight -= 1


def _reverse_path(mail_from: str | None) -> str:
    """The sender as stored: aiosmtpd keeps a bounce's null reverse-path as ``<>``."""
    return "" if mail_from is None or mail_from == "<>" else mail_from


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
# <local@domain> with both parts plain dot-atoms (RFC 5322 3.2.3), then plain parameters;
# everything else (comments, quoted parts, line breaks) goes through aiosmtpd's full parser.
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*<({_DOT_ATOM}@{_DOT_ATOM})>((?:[ \t]*[^ \t(\r\n][^(\r\n]*)?)\Z"
)
#: C0 controls and DEL, which no address may hold; a tab may only separate parameters.
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class LeanSMTP(SMTP):
    """aiosmtpd's SMTP session with its two hottest spots made cheap, and hardened.

    Measured under load, a new session spent most of its set-up in ``inspect.getmembers``
    and ``dir`` over ~200 attributes (to find ``smtp_*``/``auth_*`` methods), and every
    MAIL/RCPT parsed its address with the full RFC 5322 header parser. Here ``dir`` lists just
    those methods (computed once per class), and plain ``<local@domain>`` addresses take a
    regular expression; anything else still goes through aiosmtpd's own parser, which gives
    the same result.

    Hardened: an address with a control character is refused at MAIL or RCPT, and HELP lists
    only the commands EHLO offers.
    """

    _names: ClassVar[list[str] | None] = None

    def __dir__(self) -> list[str]:
        cls = type(self)
        if cls._names is None:
            cls._names = [n for n in dir(cls) if n.startswith(("smtp_", "auth_"))]
        return list(cls._names)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        found = _SIMPLE_ADDRESS.match(arg)
        if found is None:
            return super()._getaddr(arg)
        # aiosmtpd's parser drops the white space after the closing bracket; so do we.
        address, rest = found.group(1), found.group(2).lstrip(" \t")
        local = address.rpartition("@")[0]
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return address, rest

    def _syntax_available(self, method: Callable[..., Any]) -> bool:
        # HELP would list AUTH, which EHLO does not offer without TLS (and we have no TLS).
        if method == self.smtp_AUTH and self._auth_require_tls and not self._tls_protocol:
            return False
        return bool(super()._syntax_available(method))

    def _has_control(self, arg: str | None, keyword: str) -> bool:
        """Whether a MAIL/RCPT argument holds a control character, but for a tab between parts."""
        if arg is None:
            return False
        if _CONTROL_BUT_TAB.search(arg):
            return True
        if "\t" not in arg:
            return False
        stripped = self._strip_command_keyword(keyword, arg)
        if stripped is None:
            return False
        if stripped.startswith("<") and "\t" in stripped.partition(">")[0]:
            return True
        address, params = self._getaddr(stripped)
        if address is None or params is None:
            return False
        # The parser turns a tab inside a quoted local part into a space; so look at the text
        # the address was read from, not at what it was read as.
        source = stripped[: len(stripped) - len(params)].strip(" \t")
        return "\t" in source

    # aiosmtpd's parser takes a NUL or an escape sequence for part of an address, and the
    # address would go into the envelope, the outbox and the upstream's MAIL FROM as it is.
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL as aiosmtpd's, but an address with a control character is a syntax error."""
        if self._has_control(arg, "FROM:"):
            await self.push(REPLY_BAD_SENDER)
            return
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT as aiosmtpd's, but an address with a control character is a syntax error."""
        if self._has_control(arg, "TO:"):
            await self.push(REPLY_BAD_RECIPIENT)
            return
        await super().smtp_RCPT(arg)


def smtp_factory(handler: Handler, *, hostname: str | None = None) -> Callable[[], Any]:
    """A protocol factory for ``loop.create_server``: aiosmtpd with SMTPUTF8 and 8BITMIME."""

    def make() -> SMTP:
        return LeanSMTP(
            handler,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname or handler.hostname,
            ident="mail2alert ESMTP",
        )

    return make
