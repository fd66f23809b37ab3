"""Action URIs: which ones are valid, and the outgoing items a decision turns into.

An action is a URI in a rule's ``actions`` list:

- ``mailto:team@example.com`` adds a recipient to the rewritten mail;
- ``committers:`` adds the authors of the changes the alert is about, those with an address
  (``committers:@example.com``: those of one domain), read by the manager type; a rule that
  finds none of them for an alert sends to the manager's ``fallback`` if it has nothing else;
- ``slack:#channel`` / ``slack:@user`` (optionally ``:brief`` or ``:full``) posts through
  Slack's Web API with the top-level ``slack-token``, as the original did;
- any other ``scheme://...`` URL is a notification URL handled by Apprise (``slack://``,
  ``msteams://``, ``discord://``, ``tgram://``, ``json://``...).

Every action is checked when the configuration loads, so a malformed one is a load-time error.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import lru_cache

from mail2alert.managers.memory import Conversation
from mail2alert.message import RawMessage, address_of, one_line, rewrite, valid_text
from mail2alert.model import Alert, ChatPost, ChatTemplate, Decision, Envelope, Outgoing
from mail2alert.templates import PLAIN, Presentation, render

log = logging.getLogger(__name__)

#: A host (domain) name: letters, digits, dots and hyphens, neither first nor last a dot or
#: a hyphen.
HOST_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?"
# No control character either (a commit's author writes the address a committers: action
# mails, and it reaches log lines and terminals).
# \Z, not $: $ also matches before a final line break.
_MAILBOX = re.compile(rf"^[^@\s<>(),;:\"\[\]\\\x00-\x1f\x7f-\x9f\u2028\u2029]+@{HOST_NAME}\Z")


def is_mailbox(address: str) -> bool:
    """Whether ``address`` is one plain mail address (nothing that could add a recipient or
    a header field)."""
    return bool(_MAILBOX.match(address))


def _check_mailto(uri: str) -> str | None:
    address = uri[len("mailto:") :]
    if not address:
        return "mailto: needs an address, e.g. mailto:team@example.com"
    if "?" in address or "," in address:
        return f"{uri!r}: give one address per mailto: action, without ?headers"
    if not _MAILBOX.match(address):
        return f"{uri!r} is not a valid mail address"
    return None


_SLACK = re.compile(r"^slack:(?P<target>[#@][^\s:]+)(?::(?P<style>brief|full))?$")


def _check_slack(uri: str) -> str | None:
    if not _SLACK.match(uri):
        # Not repeated whole: a webhook URL short of a slash carries its token.
        shown = repr(uri) if uri[len("slack:") :].startswith(("#", "@")) else "'slack:***'"
        return (
            f"{shown}: write slack:#channel, slack:@user, optionally with :brief or :full "
            "(or use a slack:// webhook URL)"
        )
    return None


def parse_slack(uri: str) -> tuple[str, str | None]:
    """``slack:#channel:brief`` -> ``("#channel", "brief")``."""
    found = _SLACK.match(uri)
    if not found:
        raise ValueError(uri)
    return found["target"], found["style"]


def _check_notification_url(uri: str) -> str | None:
    import apprise

    if apprise.Apprise.instantiate(uri, suppress_exceptions=True) is None:
        scheme = uri.partition(":")[0]
        if scheme.lower() not in _apprise_schemes():
            return (
                f"unknown notification scheme {scheme + '://'!r} (see Apprise's list of services)"
            )
        return f"{mask(uri)!r} is not a valid {scheme}:// URL"
    return None


@lru_cache(maxsize=1)
def _apprise_schemes() -> frozenset[str]:
    import apprise

    schemes: set[str] = set()
    for details in apprise.Apprise().details()["schemas"]:
        schemes.update(s.lower() for s in details.get("protocols") or ())
        schemes.update(s.lower() for s in details.get("secure_protocols") or ())
    return frozenset(schemes)


_COMMITTERS = re.compile(rf"^committers:(?:@(?P<domain>{HOST_NAME}))?\Z", re.IGNORECASE)


def _check_committers(uri: str) -> str | None:
    if not _COMMITTERS.match(uri):
        return (
            f"{uri!r}: write committers: (every committer with an address) or"
            " committers:@example.com (only the addresses of that domain)"
        )
    return None


#: Opaque action schemes mail2alert knows itself, each with its load-time check.
SCHEMES: Mapping[str, Callable[[str], str | None]] = {
    "mailto": _check_mailto,
    "slack": _check_slack,
    "committers": _check_committers,
}


def is_chat(uri: str) -> bool:
    """Whether ``uri`` is a chat action (anything but ``mailto:`` and ``committers:``)."""
    return not uri.lower().startswith(("mailto:", "committers:"))


def is_slack_web(uri: str) -> bool:
    """Whether ``uri`` posts through Slack's Web API (``slack:#channel``), not through an
    Apprise ``slack://`` webhook."""
    uri = uri.strip()
    return uri.lower().startswith("slack:") and not uri.startswith("slack://")


def is_committers(uri: str) -> bool:
    """Whether ``uri`` is a ``committers:`` action."""
    return uri.lower().startswith("committers:")


def for_committers(actions: tuple[str, ...], alert: Alert) -> tuple[tuple[str, ...], str | None]:
    """``actions`` with each ``committers:`` action replaced by a ``mailto:`` action for each
    committer of ``alert`` it keeps, and what they found, for ``route --trace`` (None when
    there is no ``committers:`` action).

    A committer is kept when the message gave a plain address (not every version control
    system names one) in the action's domain, if it names one. Addresses are compared
    case-insensitively and each is mailed once.
    """
    if not any(is_committers(uri) for uri in actions):
        return actions, None
    out: list[str] = []
    found: list[str] = []
    for uri in actions:
        matched = _COMMITTERS.match(uri)
        if matched is None:
            out.append(uri)
            continue
        domain = (matched["domain"] or "").lower()
        kept = [
            person.address
            for person in alert.committers
            if is_mailbox(person.address)
            and (not domain or person.address.lower().endswith(f"@{domain}"))
        ]
        out.extend(f"mailto:{address}" for address in kept)
        scope = f"committers at {domain}" if domain else "committers"
        found.append(f"{scope}: {', '.join(kept) if kept else 'none with an address'}")
    unique: dict[str, str] = {}
    for uri in out:
        unique.setdefault(uri.lower(), uri)
    return tuple(unique.values()), "; ".join(found)


def action_id(uri: str) -> str:
    """A stable id for an action, stored in the outbox instead of the (secret) URI."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]


def check_action(uri: str) -> str | None:
    """Why ``uri`` is not a usable action, or None when it is."""
    scheme, sep, rest = uri.partition(":")
    if not sep or not scheme:
        # Shown only up to its first slash: a webhook written without its scheme has its
        # secret in the path.
        shown = uri.split("/", 1)[0] + ("/***" if "/" in uri else "")
        return f"{shown!r} is not a URI: write it as mailto:team@example.com or a chat URL"
    if rest.startswith("//"):
        if scheme.lower() == "mailto":
            # Apprise's e-mail URL (mailto://user:password@gmail.com) would be taken for a
            # mail action, and its login for a recipient's address.
            return (
                f"{mask(uri)!r}: mail2alert sends mail itself, through remote-smtp: write"
                " mailto:team@example.com, one address per action"
            )
        return _check_notification_url(uri)
    check = SCHEMES.get(scheme.lower())
    if check is None:
        known = ", ".join(f"{s}:" for s in SCHEMES)
        return f"unsupported action scheme {scheme + ':'!r} (use {known} or a chat URL)"
    return check(uri)


#: Apprise's generic webhooks: their path is the user's own and often holds a token, which
#: Apprise shows in full.
_WEBHOOKS = frozenset({"json", "jsons", "form", "forms", "xml", "xmls"})


@lru_cache(maxsize=1024)
def mask(uri: str) -> str:
    """An action URI fit to show: mail addresses as they are, a chat URL's secrets hidden.

    Chat URLs carry their credentials in the URL itself; Apprise knows, per service, which
    parts are secret, and shows the URL with those parts elided. A generic webhook's path is
    hidden whole (``json://user:****@host:8080/***``).
    """
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest.startswith("//"):
        return uri
    try:
        import apprise

        plugin = apprise.Apprise.instantiate(uri, suppress_exceptions=True)
        # Apprise is untyped; url(privacy=True) returns the URL with its secrets elided.
        shown = plugin.url(privacy=True) if plugin is not None else None  # type: ignore[no-untyped-call]
    except Exception:  # noqa: BLE001 - masking must never fail; fall back to hiding all
        shown = None
    if not shown:
        return f"{scheme}://***"
    shown = str(shown).split("?", 1)[0]
    if scheme.lower() in _WEBHOOKS:
        where, _, path = shown.partition("://")[2].partition("/")
        shown = f"{scheme}://{where}/***" if path.strip("/") else f"{scheme}://{where}"
    return shown


def outgoing_for(
    decision: Decision,
    envelope: Envelope,
    message: RawMessage,
    received: bytes,
    *,
    label: str | None = None,
    in_reply_to: str | None = None,
    conversation: Conversation | None = None,
    shown: Presentation = PLAIN,
    sender: str | None = None,
    queue_id: str = "",
) -> list[Outgoing]:
    """The items to send for a decision; ``received`` is the trace field to prepend.

    A delivered mail gets ``To:`` = its recipients and ``From:`` = the envelope sender (the
    original field is kept when it already names that address, so its display name stays);
    ``in_reply_to`` threads it under an earlier mail. With ``sender`` (hosted smarthosts
    refuse other senders than their login), ``From:`` is ``sender`` and the original From:
    becomes ``Reply-To:`` when the message has none. All ``mailto:`` recipients share one
    mail; each chat action is an item of its own (``label`` and ``conversation`` reach its
    template and its thread). A routed mail names its queue id and the rules that sent it
    (``X-Mail2alert-Id``, ``X-Mail2alert-Rule``: where to look it up in the history). A
    relayed mail, and the copy for recipients no manager took, is the original unchanged
    (its queue id is in the ``Received:`` field).
    """
    items: list[Outgoing] = []
    if decision.outcome == "relay":
        unchanged = received + message.data
        return [Outgoing(envelope.mail_from, envelope.rcpt_tos, unchanged, passthrough=True)]
    if decision.outcome == "deliver" and decision.recipients:
        author = sender or envelope.mail_from
        keep_from = not author or address_of(message.get("from")).lower() == author.lower()
        added: tuple[bytes, ...] = ()
        if queue_id:
            added = (
                f"X-Mail2alert-Id: {queue_id}".encode(),
                f"X-Mail2alert-Rule: {rules_of(decision)}".encode(),
            )
        if in_reply_to:
            added += (
                f"In-Reply-To: {in_reply_to}".encode(),
                f"References: {in_reply_to}".encode(),
            )
        original = message.get_raw("from")
        if sender and not keep_from and original and message.get_raw("reply-to") is None:
            # Unfolded, so that no line break of the original can end up in a new field.
            added += (b"Reply-To: " + one_line(original).strip(),)
        data = rewrite(
            message,
            from_value=None if keep_from else author,
            to_addresses=decision.recipients,
            prepend=received,
            add_fields=added,
        )
        items.append(Outgoing(envelope.mail_from, decision.recipients, data))
    if decision.outcome == "deliver" and decision.alert is not None:
        for uri in decision.actions:
            if is_chat(uri):
                items.append(chat_item(uri, decision, label, conversation, shown))
    if decision.passthrough:
        unchanged = received + message.data
        copy = Outgoing(envelope.mail_from, decision.passthrough, unchanged, passthrough=True)
        items.append(copy)
    return items


def rules_of(decision: Decision) -> str:
    """The manager and the rules that matched: ``gocd#0 rules 1, 3``; ``gocd#0 fallback``
    when none did (held mail that waited too long)."""
    matched = [str(t.index + 1) for t in decision.trace if t.matched]
    if not matched:
        return f"{decision.manager} fallback"
    return f"{decision.manager} rule{'s' if len(matched) > 1 else ''} {', '.join(matched)}"


def chat_item(
    uri: str,
    decision: Decision,
    label: str | None,
    conversation: Conversation | None = None,
    shown: Presentation = PLAIN,
) -> Outgoing:
    """One chat post, rendered now: the outbox keeps the text, never the (secret) URI."""
    assert decision.alert is not None
    template = decision.templates.get(uri, ChatTemplate())
    if uri.lower().startswith("slack:") and not uri.startswith("slack://"):
        style = parse_slack(uri)[1]
        if style:
            template = replace(template, style=style)
    try:
        rendered = render(template, decision.alert, label, shown)
    except Exception as exc:  # noqa: BLE001 - a template the samples did not trip up
        # The check at load renders samples; a real alert may take another branch. The post
        # goes out with the default text rather than the message being refused (which would
        # lose its mail items too: GoCD never sends a mail again).
        log.warning(
            "a chat template failed on this alert (%s: %s); posting the default text",
            type(exc).__name__,
            exc,
        )
        rendered = render(replace(template, title=None, body=None), decision.alert, label, shown)
    role = conversation.role if conversation else None
    post = ChatPost(
        action=mask(uri),
        title=rendered.title,
        body=rendered.body,
        colour=rendered.colour,
        severity=rendered.severity,
        event=decision.alert.event,
        link=rendered.link,
        thread_key=conversation.key if conversation else None,
        thread="start" if role == "start" else "reply" if role == "answer" else None,
    )
    # A template may show the envelope sender, which non-UTF-8 bytes make surrogate-escaped.
    data = valid_text(post.to_json()).encode("utf-8")
    return Outgoing("", (action_id(uri),), data, kind="chat")
