"""Action URIs: which ones are valid, and the outgoing items a decision turns into.

An action is a URI in a rule's ``actions`` list. ``mailto:team@example.com`` adds a recipient
to the rewritten mail. Schemes are registered in :data:`SCHEMES`, each with a check that the
configuration loader runs, so a malformed action is a load-time error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from mail2alert.message import RawMessage, address_of, rewrite
from mail2alert.model import Decision, Envelope, Outgoing

_MAILBOX = re.compile(r"^[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?$")


def _check_mailto(uri: str) -> str | None:
    address = uri[len("mailto:") :]
    if not address:
        return "mailto: needs an address, e.g. mailto:team@example.com"
    if "?" in address or "," in address:
        return f"{uri!r}: give one address per mailto: action, without ?headers"
    if not _MAILBOX.match(address):
        return f"{uri!r} is not a valid mail address"
    return None


#: Action schemes mail2alert can act on, each with its load-time check (None = valid).
SCHEMES: Mapping[str, Callable[[str], str | None]] = {"mailto": _check_mailto}


def check_action(uri: str) -> str | None:
    """Why ``uri`` is not a usable action, or None when it is."""
    scheme, sep, _ = uri.partition(":")
    if not sep or not scheme:
        return f"{uri!r} is not a URI: write it as mailto:team@example.com"
    check = SCHEMES.get(scheme.lower())
    if check is None:
        known = ", ".join(f"{s}:" for s in SCHEMES)
        return f"unsupported action scheme {scheme + ':'!r} (supported: {known})"
    return check(uri)


def mask(uri: str) -> str:
    """An action URI fit to show: mail addresses as they are, any other target's secrets hidden.

    Chat URLs carry their credentials in the URL itself, so only the scheme and the host
    (or, for opaque URIs such as ``slack:#channel``, the whole) are shown.
    """
    scheme, sep, rest = uri.partition(":")
    if scheme.lower() == "mailto" or not sep:
        return uri
    if not rest.startswith("//"):
        return uri
    host = rest[2:].split("/", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}/***" if host else f"{scheme}://***"


def outgoing_for(
    decision: Decision, envelope: Envelope, message: RawMessage, received: bytes
) -> list[Outgoing]:
    """The mails to send for a decision; ``received`` is the trace field to prepend.

    A delivered mail gets ``To:`` = its recipients and ``From:`` = the envelope sender (the
    original field is kept when it already names that address, so its display name stays).
    A relayed mail, and the copy for recipients no manager took, is the original unchanged.
    """
    items: list[Outgoing] = []
    if decision.outcome == "relay":
        return [Outgoing(envelope.mail_from, envelope.rcpt_tos, received + message.data)]
    if decision.outcome == "deliver" and decision.recipients:
        sender = envelope.mail_from
        keep_from = not sender or address_of(message.get("from")).lower() == sender.lower()
        data = rewrite(
            message,
            from_value=None if keep_from else sender,
            to_addresses=decision.recipients,
            prepend=received,
        )
        items.append(Outgoing(sender, decision.recipients, data))
    if decision.passthrough:
        items.append(Outgoing(envelope.mail_from, decision.passthrough, received + message.data))
    return items
