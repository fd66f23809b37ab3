"""Post chat items: Slack's Web API for ``slack:#channel`` actions, Apprise for chat URLs.

An outbox chat item holds the rendered message and the action's id, never its URL (which is
a secret); the URL is looked up in the running configuration when the item is sent.

Threading: the Slack ``ts`` of the post that starts a conversation (a breakage,
say)
is kept in the outbox, and the post that answers it (the fix) is sent as a reply in that
thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mail2alert.actions import is_slack_web, mask, parse_slack
from mail2alert.bounded import TooLong, read_at_most
from mail2alert.model import ChatPost, ChatSettings
from mail2alert.outbox import Item, RecipientResult
from mail2alert.transports import Attempt

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

#: Slack Web API errors that no retry will cure.
SLACK_PERMANENT = frozenset(
    {
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "token_revoked",
        "missing_scope",
        "no_permission",
        "invalid_arguments",
        "msg_too_long",
        "token_expired",
        "not_allowed_token_type",
        "access_denied",
        "team_access_not_granted",
        "org_login_required",
        "ekm_access_denied",
        "cannot_reply_to_message",
        "restricted_action",
        "restricted_action_read_only_channel",
        "restricted_action_thread_only_channel",
        "restricted_action_non_threadable_channel",
    }
)

ThreadKey = tuple[str, ...]


@dataclass
class ThreadStore:
    """Where Slack thread timestamps live (the outbox), as async callables."""

    get: Callable[[ThreadKey], Awaitable[tuple[str, str] | None]]
    put: Callable[[ThreadKey, str, str], Awaitable[None]]
    drop: Callable[[ThreadKey], Awaitable[None]]


class ChatSender:
    """Sends chat items; never raises for the other side's trouble."""

    def __init__(self, settings: ChatSettings, threads: ThreadStore) -> None:
        self.settings = settings
        self.threads = threads
        self._session: aiohttp.ClientSession | None = None

    @property
    def address(self) -> str:
        """Chat destinations are named per item (their action); logs say ``chat``."""
        return "chat"

    async def close_if_idle(self, idle: float) -> None:
        """aiohttp keeps its own idle connections in check: nothing to do."""

    async def close(self) -> None:
        """Close the HTTP connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, item: Item) -> Attempt:
        """Post one chat item to its action."""
        action = item.recipients[0] if item.recipients else ""
        uri = self.settings.actions.get(action)
        try:
            post = ChatPost.from_json(item.data)
        except ValueError:
            return Attempt((), "the stored chat message is not valid JSON", permanent=True)
        if uri is None:
            shown = post.action or action
            return Attempt((), f"{shown} is no longer in the configuration", permanent=True)
        if is_slack_web(uri):
            return await self._slack(uri, action, post)
        return await self._apprise(uri, action, post)

    # -- Slack's Web API ------------------------------------------------------------------

    async def _slack(self, uri: str, action: str, post: ChatPost) -> Attempt:
        token = self.settings.slack_token
        if token is None:
            return Attempt((), "slack: actions need the top-level slack-token", permanent=True)
        channel, _ = parse_slack(uri)
        key = (*post.thread_key, action) if post.thread_key else None
        thread = None
        if key is not None and post.thread == "reply":
            thread = await self.threads.get(key)
        body: dict[str, Any] = {
            "channel": thread[0] if thread else channel,
            "text": post.title,
            "attachments": [
                {
                    "color": post.colour or None,
                    "fallback": post.title,
                    "title": post.title,
                    "title_link": post.link or None,
                    "text": post.body,
                }
            ],
        }
        if thread:
            body["thread_ts"] = thread[1]
        url = f"{self.settings.slack_api_url.rstrip('/')}/chat.postMessage"
        session = self._client()
        try:
            async with session.post(
                url,
                json=body,
                headers={"Authorization": f"Bearer {token.reveal()}"},
            ) as response:
                if response.status == 429:
                    wait = _seconds(response.headers.get("Retry-After"))
                    return Attempt((), "Slack: rate limited (429)", retry_after=wait)
                if response.status >= 500:
                    return Attempt((), f"Slack answered HTTP {response.status}")
                if response.status != 200:
                    return Attempt((), f"Slack answered HTTP {response.status}", permanent=True)
                answer = await _json_answer(response)
        except (_client_error(), TimeoutError, ValueError) as exc:
            return Attempt(
                (),
                f"Slack Web API at {self.settings.slack_api_url}: {_why(exc)}",
                unreachable=not isinstance(exc, ValueError) and not _answered(exc),
            )
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = str(answer.get("error", "unknown")) if isinstance(answer, dict) else "?"
            return Attempt((), f"Slack: {error}", permanent=error in SLACK_PERMANENT)
        # Slack has the post: whatever happens to the thread's note now, it is not sent again.
        try:
            if key is not None and post.thread == "start" and answer.get("ts"):
                where = str(answer.get("channel") or channel)
                await self.threads.put(key, where, str(answer["ts"]))
            elif key is not None and thread:
                await self.threads.drop(key)
        except Exception as exc:  # noqa: BLE001 - the post is made; only its thread suffers
            log.error("posted to %s, but its thread could not be kept: %s", channel, exc)
        return Attempt((RecipientResult(action, "done", f"posted to {channel}"),))

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp  # here: only the delivery process posts to chats

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout)
            )
        return self._session

    # -- Apprise --------------------------------------------------------------------------

    async def _apprise(self, uri: str, action: str, post: ChatPost) -> Attempt:
        loop = asyncio.get_running_loop()
        ok, detail = await loop.run_in_executor(None, _notify, uri, post)
        if ok:
            return Attempt((RecipientResult(action, "done", f"sent to {mask(uri)}"),))
        return Attempt((), f"{mask(uri)}: {_scrub(detail, uri) or 'notification failed'}")


def _notify(uri: str, post: ChatPost) -> tuple[bool, str]:
    """Send with Apprise (blocking: runs in a worker thread); (success, what Apprise logged)."""
    import apprise

    kinds = {
        "failure": apprise.NotifyType.FAILURE,
        "success": apprise.NotifyType.SUCCESS,
        "warning": apprise.NotifyType.WARNING,
        "info": apprise.NotifyType.INFO,
    }
    body = post.body or post.title
    link = post.link
    if link and link not in body:
        body = f"{body}\n{link}"
    notifier = apprise.Apprise()
    if not notifier.add(uri):
        return False, "Apprise does not accept the URL"
    # Apprise is untyped; LogCapture collects what it logs while sending, for the error.
    with apprise.LogCapture(  # type: ignore[no-untyped-call]
        level=apprise.logging.WARNING, fmt="%(message)s"
    ) as captured:
        ok = notifier.notify(
            title=post.title,
            body=body,
            notify_type=kinds[post.severity],
        )
        detail = captured.getvalue()
    return bool(ok), " ".join(str(detail).split())[-300:]


def _scrub(text: str, uri: str) -> str:
    """Remove every longer piece of a chat URL from a message: they may be secrets."""
    for piece in sorted(re.split(r"[/:@?&=#]+", uri), key=len, reverse=True):
        if len(piece) >= 6:
            text = text.replace(piece, "***")
    return text


#: The longest Retry-After taken as said (a proxy may say anything): an hour.
RETRY_AFTER_MAX = 3600.0


def _seconds(value: str | None) -> float:
    """Retry-After in seconds, from 1 s to :data:`RETRY_AFTER_MAX` (30 s when it is no
    number of seconds, such as an HTTP date)."""
    try:
        wait = float(value or 1)
    except ValueError:
        return 30.0
    return min(RETRY_AFTER_MAX, max(1.0, wait)) if wait == wait else 30.0


def _client_error() -> type[Exception]:
    """aiohttp's ClientError, imported on first use (only the delivery process posts)."""
    import aiohttp

    return aiohttp.ClientError


def _answered(exc: BaseException) -> bool:
    """Whether aiohttp raised after Slack answered (a bad response, not a lost connection)."""
    import aiohttp

    return isinstance(exc, aiohttp.ClientResponseError)


#: The most of one answer of Slack's Web API that is read: its answers are a few hundred
#: bytes, and a server or proxy that answers without end must not fill memory.
SLACK_ANSWER_MAX = 1024 * 1024


async def _json_answer(response: aiohttp.ClientResponse) -> Any:
    """The JSON of ``response`` (None for an empty body), read up to
    :data:`SLACK_ANSWER_MAX` bytes. Raises TooLong past that, ValueError when it is not
    JSON, and what aiohttp raises."""
    body = await read_at_most(response, SLACK_ANSWER_MAX)
    return json.loads(body) if body.strip() else None  # None for nothing, as aiohttp's


def _why(exc: BaseException) -> str:
    if isinstance(exc, TooLong):
        return str(exc)
    return "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}"


async def check_slack_token(settings: ChatSettings) -> tuple[bool, str]:
    """``check --online``: whether Slack's Web API takes ``slack-token`` (``auth.test``: it
    posts nothing); (ok, what Slack said), never the token."""
    import aiohttp

    assert settings.slack_token is not None, "asked only with a token"
    url = f"{settings.slack_api_url.rstrip('/')}/auth.test"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.timeout)) as s,
            s.post(url, headers={"Authorization": f"Bearer {settings.slack_token.reveal()}"}) as r,
        ):
            if r.status != 200:
                return False, f"answered HTTP {r.status}"
            answer = await _json_answer(r)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return False, _why(exc)
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error", "unknown") if isinstance(answer, dict) else "not JSON"
        return False, f"slack-token refused: {error}"
    return True, f"slack-token works for team {answer.get('team', '?')!s}"
