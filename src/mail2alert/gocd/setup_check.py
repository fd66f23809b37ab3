"""``check --gocd``: is GoCD set up to mail this mail2alert every stage event?

Asked with the manager's own credentials, as GoCD documents its APIs:

- ``GET /api/current_user`` (v1, GoCD >= 17.5): the user, whether "email me" is on, and its
  e-mail, which must be one of the manager's ``messages-we-want: to:`` addresses (GoCD may
  hold a list: the other addresses then get the mail unchanged);
- ``GET /api/notification_filters`` (v2): a filter ``[Any Pipeline] [Any Stage] All`` that
  matches every change, not only the user's own check-ins;
- ``GET /api/config/mailserver`` (v1, GoCD >= 19.8): where GoCD sends its mail, compared with
  ``local-smtp``. Only admins may read it: a 403 is no finding, only not checked;
- the pipeline groups the user views (``/api/dashboard``, and ``/api/admin/pipeline_groups``
  for an admin, who sees every group). GoCD shows no user the groups it cannot view, so for
  a non-admin only the groups the rules name can be found missing.

A 401 ends the check at once (every further request would be one more failed login), and
is one finding naming the status, never the credentials. Judging what GoCD answered is
done by pure functions, tested without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

from mail2alert.gocd.client import (
    STARTING,
    UNAUTHORIZED,
    Answer,
    AnswerTooLong,
    ClientError,
    GocdClient,
    GocdError,
)
from mail2alert.gocd.settings import GocdSettings
from mail2alert.managers.explaining import SetupCheck, SetupFinding, SetupReport
from mail2alert.routing import Manager
from mail2alert.settings import Listener

CURRENT_USER = ("/api/current_user", "application/vnd.go.cd.v1+json")
FILTERS = ("/api/notification_filters", "application/vnd.go.cd.v2+json")
MAIL_SERVER = ("/api/config/mailserver", "application/vnd.go.cd.v1+json")
ADMIN_GROUPS = ("/api/admin/pipeline_groups", "application/vnd.go.cd.v1+json")
DASHBOARD = ("/api/dashboard", "application/vnd.go.cd.v4+json")

ANY_PIPELINE = "[Any Pipeline]"
ANY_STAGE = "[Any Stage]"
#: GoCD's stage events a filter may name; ``All`` includes each.
FILTER_EVENTS = ("Passes", "Fails", "Breaks", "Fixed", "Cancelled")
#: What GoCD's mail server API says (404, with the right version) when none is set up.
NO_MAIL_SERVER = "SMTP config was not found"
#: Hosts that mean "every address of this machine" in ``local-smtp``.
WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})  # noqa: S104 - compared, never bound
THE_FILTER = (
    f'the filter {ANY_PIPELINE} {ANY_STAGE} All with "only if it contains my check-ins" off'
)


@dataclass(frozen=True)
class GocdUser:
    """What ``/api/current_user`` says of the manager's user."""

    login: str
    email: str
    email_me: bool
    enabled: bool = True


@dataclass(frozen=True)
class Filter:
    """One of the user's notification filters."""

    pipeline: str
    stage: str
    event: str
    match_commits: bool


@dataclass(frozen=True)
class MailServer:
    """GoCD's mail server settings (``tls`` is "Use SMTPS": TLS from the first byte)."""

    hostname: str
    port: int
    tls: bool
    sender: str = ""


@dataclass
class Judgement:
    """Findings and notes, in the order they were made."""

    findings: list[SetupFinding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    def wrong(self, what: str, change: str) -> None:
        self.findings.append(SetupFinding(what, change))

    def right(self, note: str) -> None:
        self.checked.append(note)

    def report(self, label: str) -> SetupReport:
        return SetupReport(label, tuple(self.findings), tuple(self.checked))


# -- reading GoCD's payloads -------------------------------------------------------------------


def parse_user(payload: Any) -> GocdUser:
    """The user from ``/api/current_user``; GocdError for another shape."""
    try:
        login = payload["login_name"]
        email = payload.get("email") or ""
        if not isinstance(login, str) or not isinstance(email, str):
            raise TypeError("login_name or email is not text")
        return GocdUser(
            login, email, payload.get("email_me") is True, payload.get("enabled") is not False
        )
    except (AttributeError, KeyError, TypeError) as exc:
        raise GocdError(f"current user: unexpected payload shape ({exc!r})") from None


def parse_filters(payload: Any) -> tuple[Filter, ...]:
    """The filters from ``/api/notification_filters``: v2 embeds them (``_embedded``); the
    documentation's example has them at the top, so both are read."""
    try:
        embedded = payload.get("_embedded", payload)
        return tuple(
            Filter(
                str(f["pipeline"]),
                str(f["stage"]),
                str(f["event"]),
                f.get("match_commits") is True,
            )
            for f in embedded["filters"]
        )
    except (AttributeError, KeyError, TypeError) as exc:
        raise GocdError(f"notification filters: unexpected payload shape ({exc!r})") from None


def parse_mail_server(payload: Any) -> MailServer:
    """GoCD's mail server settings from ``/api/config/mailserver``."""
    try:
        hostname, port = payload["hostname"], int(payload["port"])
        if not isinstance(hostname, str):
            raise TypeError("hostname is not text")
        sender = payload.get("sender_email") or ""
        return MailServer(hostname, port, payload.get("tls") is True, str(sender))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise GocdError(f"mail server: unexpected payload shape ({exc!r})") from None


def group_names(payload: Any) -> tuple[str, ...]:
    """The pipeline group names of an admin or dashboard answer (empty ones too)."""
    try:
        embedded = payload["_embedded"]
        entries = embedded["groups"] if "groups" in embedded else embedded["pipeline_groups"]
        return tuple(str(entry["name"]) for entry in entries)
    except (AttributeError, KeyError, TypeError) as exc:
        raise GocdError(f"pipeline groups: unexpected payload shape ({exc!r})") from None


# -- judging them (pure) -----------------------------------------------------------------------


def judge_user(user: GocdUser, wants_to: Sequence[str], judged: Judgement) -> None:
    """ "email me" on, enabled, and an e-mail this manager takes."""
    who = f"user {user.login}"
    if not user.enabled:
        judged.wrong(f"{who} is disabled", f"enable {user.login} in GoCD (Admin → Users)")
    if not user.email_me:
        judged.wrong(
            f'{who} has "email me" off, so GoCD mails it nothing',
            f'turn "email me" on in {user.login}\'s preferences in GoCD',
        )
    addresses = [a.lower() for _, a in getaddresses([user.email]) if "@" in a]
    wanted = [w.lower() for w in wants_to]
    if wanted and not set(addresses) & set(wanted):
        has = f"e-mail is {user.email!r}" if user.email.strip() else "has no e-mail"
        judged.wrong(
            f"{who} {has}, not {' or '.join(wants_to)} (messages-we-want: to:)",
            f"set {user.login}'s e-mail in GoCD to {wants_to[0]}",
        )
    elif not addresses:
        judged.wrong(f"{who} has no e-mail", f"set {user.login}'s e-mail in GoCD")
    elif user.email_me:
        judged.right(f'{who}, "email me" on, e-mail {user.email}')


def covered_events(filters: Iterable[Filter]) -> set[str]:
    """The events for which the filters send every pipeline's and stage's mail, whoever made
    the change (GoCD compares ``[Any Pipeline]`` and ``[Any Stage]`` exactly)."""
    events: set[str] = set()
    for f in filters:
        if f.pipeline != ANY_PIPELINE or f.stage != ANY_STAGE or f.match_commits:
            continue
        events.update(FILTER_EVENTS if f.event.lower() == "all" else [f.event.capitalize()])
    return events


def judge_filters(login: str, filters: Sequence[Filter], judged: Judgement) -> None:
    """One filter, or several together, that cover every pipeline, stage and event."""
    missing = [e for e in FILTER_EVENTS if e not in covered_events(filters)]
    if not missing:
        judged.right("notification filters cover every pipeline, stage and event")
        return
    has = ", ".join(_shown(f) for f in filters) or "none"
    mine = any(f.match_commits for f in filters)
    why = ' ("only if it contains my check-ins" leaves out others\' changes)' if mine else ""
    judged.wrong(
        f"user {login}'s notification filters miss {', '.join(missing)} for some pipelines "
        f"(it has: {has}){why}",
        f"add {THE_FILTER} to {login}'s preferences in GoCD",
    )


def _shown(f: Filter) -> str:
    return f"{f.pipeline} {f.stage} {f.event}" + (" (my check-ins)" if f.match_commits else "")


def judge_groups(
    manager: Manager, login: str, viewed: Sequence[str], admin: bool, judged: Judgement
) -> None:
    """The groups the rules name against those the user views. An admin views every group
    GoCD has; anyone else cannot be told the groups it does not view."""
    seen = {g.lower() for g in viewed}
    for index, rule in enumerate(manager.rules):
        for (_, kind), group in zip(rule.function.params, rule.args, strict=False):
            if kind != "group" or group.lower() in seen:
                continue
            where = f"rule {index + 1} (line {rule.line}) names pipeline group {group!r}"
            if admin:
                judged.wrong(
                    f"{where}, which GoCD does not have",
                    f"create it in GoCD, or correct the rule (GoCD has: {', '.join(viewed)})",
                )
            else:
                judged.wrong(
                    f"{where}, which user {login} cannot view (or GoCD does not have)",
                    f"give {login} view permission on pipeline group {group} in GoCD",
                )
    if admin:
        judged.right(f"views every pipeline group ({len(viewed)}, as an admin)")
    else:
        judged.right(
            f"views {len(viewed)} pipeline groups (GoCD shows no one the groups they cannot "
            "view: the groups the rules name were checked)"
        )


def is_wildcard(host: str) -> bool:
    """Whether ``local-smtp``'s host listens on every address of the machine."""
    return host.strip("[]") in WILDCARDS


def same_host(gocd: str, ours: str, resolved: Mapping[str, frozenset[str]]) -> bool:
    """Whether GoCD's mail host is where mail2alert listens: the same name, addresses in
    common as resolved here, or loopback on both sides (GoCD on this machine)."""
    if gocd.lower() == ours.lower():
        return True
    theirs, mine = resolved.get(gocd, frozenset()), resolved.get(ours, frozenset())
    if theirs & mine:
        return True
    return bool(theirs and mine) and all(_loopback(a) for a in theirs | mine)


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def judge_mail_server(
    server: MailServer,
    listener: Listener,
    wants_from: Sequence[str],
    resolved: Mapping[str, frozenset[str]],
    judged: Judgement,
) -> None:
    """GoCD's mail server against ``local-smtp`` (host, port, implicit TLS) and the sender
    against ``messages-we-want: from:``."""
    ours = listener.address
    sends = f"{server.hostname}:{server.port}"
    setting = "GoCD's email server (Admin → Server Configuration)"
    if is_wildcard(ours.host):
        compared = f"port {ours.port} (local-smtp {ours} listens on every address)"
        host_ok = True
    else:
        compared = f"local-smtp {ours}"
        host_ok = same_host(server.hostname, ours.host, resolved)
    if not host_ok or server.port != ours.port:
        host = "this machine's name" if is_wildcard(ours.host) else ours.host
        judged.wrong(
            f"GoCD sends its mail to {sends}, not to this mail2alert (compared with {compared})",
            f"set {setting} to host {host}, port {ours.port}",
        )
    else:
        judged.right(f"GoCD's mail server {sends} is this mail2alert (compared with {compared})")
    implicit = listener.tls is not None and listener.tls.mode == "implicit"
    if server.tls and not implicit:
        judged.wrong(
            'GoCD\'s email server has "Use SMTPS" on, and local-smtp offers no implicit TLS',
            f'turn "Use SMTPS" off in {setting} (or set local-smtp tls mode: implicit)',
        )
    elif implicit and not server.tls:
        judged.wrong(
            'local-smtp speaks TLS from the first byte (mode: implicit), GoCD\'s "Use SMTPS" '
            "is off",
            f'turn "Use SMTPS" on in {setting}',
        )
    wanted = [w.lower() for w in wants_from]
    if wanted and server.sender and server.sender.lower() not in wanted:
        judged.wrong(
            f"GoCD sends as {server.sender}, not {' or '.join(wants_from)} "
            "(messages-we-want: from:)",
            f"set the sender email of {setting} to {wants_from[0]}",
        )


# -- asking GoCD -------------------------------------------------------------------------------


class SetupClient(GocdClient):
    """A GoCD client that hands back every answer as it is, with its body: the check tells a
    missing mail server from an old GoCD by the message of a 404."""

    async def read(self, path: str, accept: str) -> Answer:
        """One GET of ``path`` with this exact Accept; GocdError when GoCD does not answer
        (AnswerTooLong when the answer goes on past ``answer_max`` bytes)."""
        target = f"{self.url}{path}"
        async with self._session() as session:
            try:
                headers = {"Accept": accept}
                async with session.get(target, headers=headers, ssl=self._ssl) as response:
                    return Answer(response.status, await self._body(target, response), None)
            except (ClientError(), TimeoutError, ssl.SSLError) as exc:
                reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
                raise GocdError(f"{target} unreachable: {reason}") from None


class _Stop(Exception):
    """Asking further makes no sense (401, GoCD unreachable, security off)."""


@dataclass
class _Asker:
    client: SetupClient
    judged: Judgement

    async def get(self, endpoint: tuple[str, str]) -> tuple[int, Any, str]:
        """GoCD's status, its JSON (None if not JSON) and message for one endpoint."""
        path, accept = endpoint
        target = f"{self.client.url}{path}"
        try:
            answer = await self.client.read(path, accept)
        except AnswerTooLong as exc:
            self.judged.wrong(str(exc), "check that this manager's url is GoCD's")
            raise _Stop from None
        except GocdError as exc:
            self.judged.wrong(f"GoCD not asked: {exc}", "check this manager's url and GoCD")
            raise _Stop from None
        if answer.status == UNAUTHORIZED:
            self.judged.wrong(
                f"{target} answered HTTP 401: GoCD does not accept the configured user and "
                "password (or token)",
                "set this manager's user and passwd (or token) to those of the GoCD user "
                "that gets the stage mails",
            )
            raise _Stop
        try:
            payload = json.loads(answer.body) if answer.body else None
        except ValueError:
            payload = None
        message = payload.get("message", "") if isinstance(payload, dict) else ""
        return answer.status, payload, str(message)


def _not_checked(what: str, path: str, status: int, why: str = "") -> str:
    return f"{what} not checked: {path} answered HTTP {status}" + (f" ({why})" if why else "")


async def _resolve(*hosts: str) -> dict[str, frozenset[str]]:
    """Each host's addresses as this machine resolves them (none when it cannot)."""
    loop = asyncio.get_running_loop()
    resolved: dict[str, frozenset[str]] = {}
    for host in hosts:
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host.strip("[]"), None), 5.0)
        except (OSError, TimeoutError, UnicodeError):
            infos = []
        resolved[host] = frozenset(str(info[4][0]) for info in infos)
    return resolved


async def check(manager: Manager, listener: Listener) -> SetupReport:
    """Ask GoCD, as the manager's user, everything it must have set up for this mail2alert."""
    judged = Judgement()
    settings = GocdSettings.of(manager.options)
    if settings.url is None:
        judged.right("no url: GoCD not asked")
        return judged.report(manager.label)
    asker = _Asker(SetupClient.of(settings), judged)
    # A stop is a finding already made: the report says what was found until then.
    with contextlib.suppress(_Stop):
        await _ask(asker, manager, listener, judged)
    return judged.report(manager.label)


async def _ask(asker: _Asker, manager: Manager, listener: Listener, judged: Judgement) -> None:
    status, payload, _ = await asker.get(CURRENT_USER)
    login = "the user"
    if status == 403:
        judged.wrong(
            f"GoCD answers {CURRENT_USER[0]} with HTTP 403 (as it does when security is off): "
            "GoCD then sends no stage mails at all",
            "enable security in GoCD (an authorization configuration) and give mail2alert a "
            "user of its own",
        )
        raise _Stop
    if status == 200:
        try:
            user = parse_user(payload)
        except GocdError as exc:
            judged.right(f"user not checked: {exc}")
        else:
            login = user.login
            judge_user(user, manager.wants_to, judged)
    else:
        judged.right(_not_checked("user", CURRENT_USER[0], status, "GoCD before 17.5?"))

    status, payload, _ = await asker.get(FILTERS)
    try:
        if status != 200:
            raise GocdError(_not_checked("notification filters", FILTERS[0], status))
        judge_filters(login, parse_filters(payload), judged)
    except GocdError as exc:
        judged.right(str(exc))

    status, payload, message = await asker.get(MAIL_SERVER)
    admin = status == 200 or (status == 404 and NO_MAIL_SERVER in message)
    if status == 200:
        try:
            server = parse_mail_server(payload)
        except GocdError as exc:
            judged.right(f"mail server not checked: {exc}")
        else:
            resolved = await _resolve(server.hostname, listener.address.host)
            judge_mail_server(server, listener, manager.wants_from, resolved, judged)
    elif admin:
        host = listener.address.host
        judged.wrong(
            "GoCD has no mail server set up, so it sends no mail at all",
            "set GoCD's email server (Admin → Server Configuration) to host "
            f"{socket.gethostname() if is_wildcard(host) else host}, port {listener.address.port}",
        )
    elif status == 403:
        judged.right(f"mail server not checked: {login} is no GoCD admin (only admins may read it)")
    else:
        judged.right(_not_checked("mail server", MAIL_SERVER[0], status, "GoCD before 19.8?"))

    await _groups(asker, manager, login, admin, judged)


async def _groups(
    asker: _Asker, manager: Manager, login: str, admin: bool, judged: Judgement
) -> None:
    """An admin's groups are every group GoCD has; anyone else's, its dashboard's."""
    endpoint = ADMIN_GROUPS if admin else DASHBOARD
    status, payload, _ = await asker.get(endpoint)
    if status in STARTING:
        judged.right(
            f"pipeline groups not checked: GoCD is starting ({endpoint[0]} answered {status})"
        )
        return
    try:
        if status != 200:
            raise GocdError(_not_checked("pipeline groups", endpoint[0], status))
        viewed = group_names(payload)
    except GocdError as exc:
        judged.right(str(exc))
        return
    judge_groups(manager, login, viewed, admin, judged)


GOCD_SETUP = SetupCheck(
    flag="--gocd",
    help="also ask GoCD, as each gocd manager's user, whether it is set up to mail this"
    ' mail2alert: the user\'s e-mail and "email me", its notification filters, the pipeline'
    " groups it views, GoCD's mail server (if the user may read it)",
    run=check,
)
