"""The web console: server-rendered pages on the ``http`` listener (Jinja2, autoescaped, no
JavaScript), readable on a phone.

Pages (every one behind HTTP basic auth when ``http.users-file`` is set; ``/healthz``,
``/readyz`` and ``/metrics`` stay open, see :mod:`mail2alert.web`):

- ``/``: recent messages, filtered by manager, state and the facts keys manager types offer
  (``?pipeline=...&event=...``), a page at a time; each links to
- ``/messages/<queue id>``: envelope, subject, the facts, each rule's verdict (as ``route
  --trace``), each outgoing item with every attempt and its answer, the headers received;
- ``/outbox``: pending, dead and held, with Retry and Delete buttons when ``http.admin`` is
  true: forms that POST to ``/outbox/retry`` or ``/outbox/delete`` with a token
  (:class:`~mail2alert.console.access.Csrf`); a POST without a valid token, or with
  ``admin: false``, gets 403 and changes nothing;
- ``/managers/<type>``: for a manager type with a console page (its
  :class:`~mail2alert.managers.explaining.ConsolePage` hook), each manager's keeper health
  and the type's own tables;
- ``/config``: the running configuration with its secrets masked, its hash, the last reload;
- ``/chart``: alerts per hour over the last 24 hours by event (else outcome), an SVG drawn
  here.

The outbox is read through the listener's own connection, on its one ``http`` thread (the
``read`` given to :class:`Console`); what only the running service knows (the configuration,
the last reload, keepers, snapshots and notes) comes from ``running`` on the event loop.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

from aiohttp import web
from jinja2 import Environment, PackageLoader, StrictUndefined

from mail2alert import postqueue
from mail2alert.config import Config
from mail2alert.console.access import Csrf, Logins, UsersUnreadable
from mail2alert.console.views import (
    HOURS,
    ago,
    config_sections,
    hourly_chart,
    managers_shown,
    when,
)
from mail2alert.errors import Mail2AlertError, OutboxError
from mail2alert.managers.base import Context
from mail2alert.managers.explaining import Kept
from mail2alert.managers.health import KeeperHealth
from mail2alert.metrics import config_hash
from mail2alert.outbox import (
    STATES,
    Decided,
    Entry,
    HistoryRow,
    Outbox,
    StoredAttempt,
    StoredItem,
    StoredRecipient,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Messages per page of the message list.
PAGE_SIZE = 50
#: Where a form may send the browser back to: a path of this console, never another site
#: (``//host`` or ``/\host`` is one to a browser) and without a query of its own.
_LOCAL_PATH = re.compile(r"/(?:[A-Za-z0-9_.~-]+(?:/[A-Za-z0-9_.~-]+)*)?")
#: The message list's manager filter for mail no manager decided.
NO_MANAGER = "-"
#: How many header lines the message page shows of the headers received.
HEADER_LINES = 500

#: Sent with every console page: no framing (the admin buttons cannot be clicked through
#: another site's page), no script, no other origin, nothing cached.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:;"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


#: The answer to a request for another host name while no users file guards the console.
NOT_OUR_NAME = (
    "421: without http.users-file the console answers only at localhost, an IP address or"
    " the host name of http's address (a page of another site could read it through DNS"
    " rebinding, and use its forms)\n"
)


def own_name(host: str, configured: str) -> bool:
    """Whether a request's ``Host`` (with or without a port) names this listener in a way no
    other site can take over: an IP address, ``localhost``, or the host of ``http``'s
    address. A DNS name of another site may resolve to 127.0.0.1 too (DNS rebinding)."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return True
    return name in ("localhost", configured.strip("[]").lower()) or name.endswith(".localhost")


class Reloaded(Protocol):
    """How the last (re)load of the configuration went."""

    @property
    def ok(self) -> bool: ...
    @property
    def at(self) -> float: ...
    @property
    def message(self) -> str: ...


@dataclass(frozen=True)
class Running:
    """What the running service knows beyond the outbox, read on the event loop."""

    config: Config
    reload: Reloaded
    keepers: Mapping[str, tuple[str, KeeperHealth]]
    """How each reporting keeper fares, by manager label, with its manager type's name."""
    context: Context
    """The snapshots and notes routing uses now."""
    wake: Callable[[], None] = lambda: None
    """Tells delivery that items are due now (after a Retry), without waiting for its poll."""


class Reader(Protocol):
    """Runs ``work`` with the listener's outbox connection, on the thread that owns it;
    raises :class:`~mail2alert.errors.OutboxError` when the outbox is not open."""

    def __call__(self, work: Callable[[Outbox], T], /) -> Awaitable[T]: ...


@dataclass(frozen=True)
class Listing:
    """One page of the message list."""

    rows: tuple[HistoryRow, ...]
    more: bool


@dataclass(frozen=True)
class ItemShown:
    """An outgoing item on the message page: its recipients, every attempt, what was sent."""

    item: StoredItem
    recipients: tuple[StoredRecipient, ...]
    attempts: tuple[StoredAttempt, ...]
    sent: tuple[str, ...]
    """A mail's header lines, or a chat post's JSON lines."""


@dataclass(frozen=True)
class MessageShown:
    """Everything the message page shows of one message."""

    decided: Decided
    state: str
    items: tuple[ItemShown, ...]
    headers: tuple[str, ...]
    """The header lines as received."""


Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


class Console:
    """The console's routes, added to the listener's aiohttp application."""

    def __init__(self, read: Reader, running: Callable[[], Running]) -> None:
        self._read = read
        self._running = running
        self._logins = Logins()
        self._csrf = Csrf()
        self._jinja = Environment(
            loader=PackageLoader("mail2alert.console", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._unreadable = ""

    def add_routes(self, app: web.Application) -> None:
        """Every console page and form."""
        app.router.add_get("/", self._guarded(self._messages))
        app.router.add_get("/messages/{queue_id}", self._guarded(self._message))
        app.router.add_get("/outbox", self._guarded(self._outbox))
        app.router.add_post("/outbox/{action:retry|delete}", self._guarded(self._change))
        app.router.add_get("/managers/{kind}", self._guarded(self._managers))
        app.router.add_get("/config", self._guarded(self._config))
        app.router.add_get("/chart", self._guarded(self._chart))

    # -- access ---------------------------------------------------------------------------

    def _guarded(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """``handler`` behind basic auth when ``http.users-file`` is set; it gets the user
        ("" without logins)."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            http = self._running().config.http
            users_file = http.users_file if http is not None else None
            if users_file is None:
                if not own_name(request.host, http.address.host if http else ""):
                    return web.Response(status=421, text=NOT_OUR_NAME)
                return await handler(request, "")
            try:
                user = await self._logins.check(
                    users_file, request.headers.get("Authorization"), request.remote or ""
                )
            except UsersUnreadable as exc:
                if self._unreadable != str(exc):
                    self._unreadable = str(exc)
                    log.error("console: the users file cannot be read, nobody is let in: %s", exc)
                return web.Response(status=503, text="the users file cannot be read\n")
            self._unreadable = ""
            if user is None:
                return web.Response(
                    status=401,
                    text="401: log in with a user of http.users-file\n",
                    headers={"WWW-Authenticate": 'Basic realm="mail2alert", charset="UTF-8"'},
                )
            return await handler(request, user)

        return guarded

    # -- rendering ------------------------------------------------------------------------

    def _page(
        self, request: web.Request, user: str, template: str, status: int = 200, **values: Any
    ) -> web.Response:
        running = self._running()
        kinds = {
            m.type.name: m.type.explaining.console.title
            for m in running.config.routing
            if m.type.explaining.console is not None
        }
        http = running.config.http
        text = self._jinja.get_template(template).render(
            path=request.path,
            user=user,
            admin=http is not None and http.admin,
            kinds=sorted(kinds.items()),
            now=time.time(),
            when=when,
            ago=ago,
            **values,
        )
        return web.Response(
            status=status, text=text, content_type="text/html", charset="utf-8", headers=HEADERS
        )

    def _trouble(self, request: web.Request, user: str, exc: Mail2AlertError) -> web.Response:
        return self._page(request, user, "trouble.html", status=503, trouble=str(exc))

    # -- pages ----------------------------------------------------------------------------

    async def _messages(self, request: web.Request, user: str) -> web.StreamResponse:
        running = self._running()
        query = request.query
        manager = query.get("manager", "")
        state = query.get("state", "")
        state = state if state in STATES else ""
        offered = _facts_filters(running.config)
        facts = {k: query[k] for k in offered if query.get(k)}
        try:
            page = max(1, int(query.get("page", "1")))
        except ValueError:
            page = 1
        try:
            rows = await self._read(
                lambda outbox: outbox.history(
                    # "-": mail no manager decided (relayed, refused).
                    manager=None if not manager else "" if manager == NO_MANAGER else manager,
                    state=state or None,
                    facts=facts,
                    limit=PAGE_SIZE + 1,
                    offset=(page - 1) * PAGE_SIZE,
                )
            )
        except Mail2AlertError as exc:
            return self._trouble(request, user, exc)
        listing = Listing(tuple(rows[:PAGE_SIZE]), more=len(rows) > PAGE_SIZE)
        kept = {"manager": manager, "state": state, **facts}

        def link(to: int) -> str:
            wanted = {k: v for k, v in kept.items() if v}
            return "/?" + urlencode({**wanted, "page": to})

        return self._page(
            request,
            user,
            "messages.html",
            listing=listing,
            managers=[m.label for m in running.config.routing],
            states=STATES,
            offered=offered,
            chosen=kept,
            page=page,
            previous=link(page - 1) if page > 1 else None,
            next=link(page + 1) if listing.more else None,
            plain=_plain,
        )

    async def _message(self, request: web.Request, user: str) -> web.StreamResponse:
        queue_id = request.match_info["queue_id"]
        try:
            found = await self._read(lambda outbox: _message_shown(outbox, queue_id))
        except Mail2AlertError as exc:
            return self._trouble(request, user, exc)
        if found is None:
            return self._page(request, user, "missing.html", status=404, queue_id=queue_id)
        return self._page(
            request,
            user,
            "message.html",
            shown=found,
            message=found.decided.message,
            retryable=found.state in ("pending", "dead"),
            deletable=found.state in ("pending", "dead", "held"),
            token=self._csrf.token(user),
            plain=_plain,
        )

    async def _outbox(self, request: web.Request, user: str) -> web.StreamResponse:
        try:
            entries = await self._read(lambda outbox: outbox.entries())
        except Mail2AlertError as exc:
            return self._trouble(request, user, exc)
        by_state: dict[str, list[Entry]] = {"dead": [], "pending": [], "held": []}
        for entry in entries:
            by_state.setdefault(entry.state, []).append(entry)
        return self._page(
            request,
            user,
            "outbox.html",
            by_state=by_state,
            token=self._csrf.token(user),
            done=request.query.get("done", ""),
        )

    async def _change(self, request: web.Request, user: str) -> web.StreamResponse:
        """Retry or delete one message: only with ``admin: true`` and a valid token."""
        http = self._running().config.http
        if http is None or not http.admin:
            return web.Response(status=403, text="403: the console is read-only (http.admin)\n")
        form = await request.post()
        token, queue_id = form.get("csrf"), form.get("queue_id")
        if not isinstance(token, str) or not self._csrf.valid(token, user):
            return web.Response(status=403, text="403: the form's token is missing or stale\n")
        if not isinstance(queue_id, str) or not queue_id:
            return web.Response(status=400, text="400: which message? (queue_id)\n")
        action = request.match_info["action"]
        now = time.time()
        try:
            if action == "retry":
                changes = await self._read(lambda outbox: outbox.retry([queue_id], now))
            else:
                changes = await self._read(lambda outbox: outbox.delete([queue_id]))
        except OutboxError as exc:
            if "no message" in str(exc):
                return self._page(request, user, "missing.html", status=404, queue_id=queue_id)
            return self._trouble(request, user, exc)
        if action == "retry":
            self._running().wake()
        verb = "requeued" if action == "retry" else "deleted"
        done = "; ".join(postqueue.change_line(c, verb) for c in changes)
        log.info("console: %s by %s: %s", action, user or "the console", done)
        back = form.get("next")
        back = back if isinstance(back, str) and _LOCAL_PATH.fullmatch(back) else "/outbox"
        raise web.HTTPSeeOther(f"{back}?{urlencode({'done': done})}", headers=HEADERS)

    async def _managers(self, request: web.Request, user: str) -> web.StreamResponse:
        kind = request.match_info["kind"]
        running = self._running()
        managers = [m for m in running.config.routing if m.type.name == kind]
        page = managers[0].type.explaining.console if managers else None
        if page is None:
            raise web.HTTPNotFound(text=f"404: no manager of type {kind!r} has a console page\n")
        context = running.context
        shown = [
            (
                m.label,
                running.keepers.get(m.label, (kind, None))[1],
                page.show(Kept(m, context.snapshots.get(m.label), context.state)),
            )
            for m in managers
        ]
        return self._page(request, user, "managers.html", title=page.title, managers=shown)

    async def _config(self, request: web.Request, user: str) -> web.StreamResponse:
        running = self._running()
        config = running.config
        return self._page(
            request,
            user,
            "config.html",
            config=config,
            digest=config_hash(config.source),
            reload=running.reload,
            sections=config_sections(config),
            managers=managers_shown(config.routing),
        )

    async def _chart(self, request: web.Request, user: str) -> web.StreamResponse:
        now = time.time()
        try:
            rows = await self._read(lambda outbox: outbox.hourly(now - HOURS * 3600))
        except Mail2AlertError as exc:
            return self._trouble(request, user, exc)
        chart = hourly_chart({(int(hour), kind): n for hour, kind, n in rows}, now)
        return self._page(request, user, "chart.html", chart=chart)


# -- reading the outbox (on the http thread) ------------------------------------------------


def _facts_filters(config: Config) -> tuple[str, ...]:
    """The facts keys the configured managers' types offer to filter by, in order."""
    keys: dict[str, None] = {}
    for manager in config.routing:
        page = manager.type.explaining.console
        keys.update(dict.fromkeys(page.filters if page else ()))
    return tuple(keys)


def _plain(value: object) -> str:
    """A fact's value as text: plain values as they are, a list's items joined by commas, a
    mapping's values by spaces (a committer's name and address), anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str | int | float | bool):
        return str(value)
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return " ".join(_plain(v) for v in value.values() if v not in (None, ""))
    return json.dumps(value, ensure_ascii=False, default=str)


def _message_shown(outbox: Outbox, queue_id: str) -> MessageShown | None:
    """The message page's records of one message, read at once; None if there is none."""
    with outbox.reading():
        decided = outbox.decision(queue_id)
        if decided is None:
            return None
        items = outbox.items_of(queue_id)
        recipients = outbox.recipients_of(queue_id)
        attempts = outbox.attempts_of(queue_id)
    shown = tuple(
        ItemShown(
            item,
            tuple(r for r in recipients if r.item_id == item.id),
            tuple(a for a in attempts if a.item_id == item.id),
            postqueue.data_lines(item.kind, item.data),
        )
        for item in items
    )
    return MessageShown(
        decided,
        _state_of(decided.message.outcome, [i.state for i in items]),
        shown,
        postqueue.header_lines(decided.headers or decided.message.raw or b"", HEADER_LINES),
    )


def _state_of(outcome: str, item_states: Sequence[str]) -> str:
    """A message's state as the history says it (:data:`~mail2alert.outbox.STATES`)."""
    if outcome == "hold":
        return "held"
    for state in ("pending", "dead"):
        if state in item_states:
            return state
    return "done" if item_states else "none"
