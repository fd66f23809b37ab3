"""``mail2alert send-test``: one clearly labelled test notification through the real transport.

The target is an action URI (``mailto:ops@example.com``, ``slack:#builds``, ``json://...``)
or a rule of the configuration (``managers[0].rules[1]``, as ``check`` names it, or
``ci#0:2``, manager and rule number as ``route --trace`` shows them); a rule sends to each
of its actions. Nothing goes through the outbox: the answer is the transport's own.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import replace

from mail2alert.actions import chat_item, check_action, is_chat, is_committers, mask
from mail2alert.config import Config
from mail2alert.errors import UsageError
from mail2alert.managers.registry import MANAGER_TYPES
from mail2alert.message import RawMessage, rewrite
from mail2alert.model import ChatPost, Decision
from mail2alert.outbox import Item
from mail2alert.templates import PLAIN, Presentation
from mail2alert.transports import Attempt
from mail2alert.transports.chat import ChatSender, ThreadStore
from mail2alert.transports.smtp import SmtpConnection

_RULE_PATH = re.compile(r"^managers\[(\d+)\]\.rules\[(\d+)\]$")
_RULE_LABEL = re.compile(r"^([a-z]+)#(\d+):(\d+)$")

#: Every test notification says what it is, in its title and subject.
LABEL = "[mail2alert test]"


def targets(config: Config, target: str) -> tuple[str, ...]:
    """The action URIs ``target`` names; UsageError when it names nothing valid.

    ``committers:`` actions are left out: their addresses come from each alert.
    """
    managers = config.routing
    found = _RULE_PATH.match(target)
    if found:
        m, r = int(found[1]), int(found[2])
        if m < len(managers) and r < len(managers[m].rules):
            return _testable(target, managers[m].rules[r].actions)
        raise UsageError(f"{target}: no such rule in {config.path}")
    found = _RULE_LABEL.match(target)
    if found:
        label, number = f"{found[1]}#{found[2]}", int(found[3])
        manager = next((x for x in managers if x.label == label), None)
        if manager is not None and 1 <= number <= len(manager.rules):
            return _testable(target, manager.rules[number - 1].actions)
        raise UsageError(f"{target}: no such rule in {config.path}")
    problem = check_action(target)
    if problem:
        raise UsageError(f"{problem} (or name a rule: managers[0].rules[1] or gocd#0:2)")
    return _testable(target, (target,))


def _testable(target: str, actions: tuple[str, ...]) -> tuple[str, ...]:
    kept = tuple(a for a in actions if not is_committers(a))
    if not kept:
        raise UsageError(
            f"{target}: committers: has no address of its own (it mails the authors each"
            " alert names): nothing to test"
        )
    return kept


def _richest() -> Presentation:
    """The presentation of the first manager type whose sample has an event."""
    shown = [t.presentation for t in MANAGER_TYPES.values()]
    return next((p for p in shown if p.sample.event), PLAIN)


def test_alert() -> Decision:
    """A decision for the sample BREAKS alert, labelled as a test."""
    sample = _richest().sample
    alert = replace(sample, subject=f"{LABEL} {sample.subject}")
    return Decision("deliver", "send-test", "send-test", alert=alert)


async def send(config: Config, uri: str, *, sender: str) -> Attempt:
    """Send one test notification to ``uri``; the transport's verdict."""
    decision = test_alert()
    if is_chat(uri):
        post = chat_item(uri, replace(decision, actions=(uri,)), "my-group", shown=_richest())
        rendered = ChatPost.from_json(post.data)
        data = replace(rendered, title=f"{LABEL} {rendered.title}").to_json().encode("utf-8")
        item = Item(0, "TEST", "chat", "", data, 0, time.time(), post.recipients)
        settings = config.chat_settings()
        settings = replace(settings, actions={**settings.actions, post.recipients[0]: uri})
        sender_ = ChatSender(settings, _no_threads())
        try:
            return await sender_.send(item)
        finally:
            await sender_.close()
    address = uri[len("mailto:") :]
    body = (
        f"This is a test notification from mail2alert on {socket.gethostname()}.\r\n"
        f"It was sent with `mail2alert send-test` to check the way to {address}.\r\n"
    )
    text = (
        f"From: {sender}\r\nTo: {address}\r\nSubject: {LABEL} mail2alert can reach you\r\n"
        f"Auto-Submitted: auto-generated\r\n\r\n{body}"
    )
    raw = RawMessage.parse(text.encode("utf-8"))
    data = rewrite(raw, from_value=None, to_addresses=(address,), prepend=b"")
    item = Item(0, "TEST", "smtp", sender, data, 0, time.time(), (address,))
    connection = SmtpConnection.to(
        config.upstream, timeout=config.delivery.timeout, local_hostname=socket.gethostname()
    )
    try:
        return await connection.send(item)
    finally:
        await connection.close()


def describe(uri: str, attempt: Attempt, remote: str) -> tuple[bool, str]:
    """(success, the line to print) for one attempt."""
    shown = mask(uri)
    if attempt.recipients and all(r.state == "done" for r in attempt.recipients):
        via = f" via {remote}" if not is_chat(uri) else ""
        return True, f"sent: {shown}{via}"
    reasons = [r.reason for r in attempt.recipients if r.state != "done"] or [attempt.error]
    text = "; ".join(r.removeprefix(f"{shown}: ") for r in reasons)
    return False, f"FAILED: {shown}: {text}"


def _no_threads() -> ThreadStore:
    async def get(key: tuple[str, ...]) -> tuple[str, str] | None:
        return None

    async def put(key: tuple[str, ...], channel: str, ts: str) -> None:
        return None

    return ThreadStore(get=get, put=put, drop=lambda key: put(key, "", ""))
